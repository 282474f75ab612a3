"""The wire between ktrace and its agent: what both processes must agree on, in one package.

ktrace (the client, on the developer's machine) and the agent (``ktrace_agent``, in the cluster) both
import this package and nothing of each other: the agent image keeps ``ktrace_agent`` (this package
with it) and drops ``ktrace/``; ``ktrace/tracer`` uses only the pure values (``values.py``), without
gRPC. The contract itself is ``protos/ktrace_proto/tunnel_v1.proto``.

Compatibility rule
------------------
ktrace and its agent are one release: the agent image is tagged with ktrace's version, and a ktrace
talks to the agent of its own version. The wire changes by these rules:

1. The handshake meets every version. ``Handshake`` and its messages keep their names and numbers
   for good (so the proto package is never renamed), and the client refuses an agent whose
   ``protocol_version`` differs from ``PROTOCOL_VERSION``, or that lacks what this version requires,
   with one line naming the agent image to use. A mismatched pair is told what to do there, not
   by a fallback: no code path is kept for peers of another protocol version.
2. Within one protocol version, changes only add: a new field, frame or RPC takes a number never used
   before, and a side uses it only towards a peer that said it understands it (a ``HandshakeReply``
   field for what the agent offers, a request field for what the client accepts). An older peer
   ignores what it does not know.
3. Removing anything a peer of the same protocol version may still use, or changing what a field
   means, bumps ``PROTOCOL_VERSION``. Numbers are never reused: retired fields are ``reserved``.
4. Every IP address on the wire is 4 bytes (IPv4) or 16 (IPv6), and an IPv4-mapped IPv6 address
   travels as IPv4, whichever side encodes it (``codec.py``); the socket family decides how it is
   used locally. Errors travel by errno name, never number (``errnos.py``): the agent may run on
   another architecture.

Protocol versions
-----------------
1. The first.
2. ``Datagrams`` (a stream per UDP socket of the program) retired, with its ``batch`` frames and
   their flags (``HandshakeReply.datagram_batches``, ``UdpOpen.batches``): UDP sessions travel only
   on ``DatagramSessions`` (many per stream), which the client requires (``udp_multiplex``). The
   per-stream path was kept for agents that did not offer multiplexing; by rule 1 such an agent is
   refused instead, and keeping it doubled the UDP code of both sides for a pair that is never
   shipped together.

Modules
-------
``values``              pure values: ``Endpoint``, ``SourceRoute``, ``TunnelError``, ``MAX_DATAGRAM``
``errnos``              errno names and numbers; exceptions to names
``rpc``                 the only user of the generated code: messages, typed stub, servicer protocol,
                        call and context types, channel and server options, the bearer token
``codec``               values to messages and back: addresses (rule 4), families, failures, TCP options
``tcp_options``         which of a program's socket options act on the agent's socket, and how (pure)
``batching``            frames waiting together leave as one message
``budget``, ``read_gate``  bounded memory for data in flight
``pumps``               a relay's two directions run together (one TaskGroup for every relay)
``tuning``              gRPC, malloc and garbage-collector settings, made before grpc is imported

This module imports nothing: importing ``values`` costs no gRPC.
"""

PROTOCOL_VERSION = 2

# The numbers both sides must agree on.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # either way; HandshakeReply.max_message_bytes says the agent's
DATA_CHUNK = 1024 * 1024  # a TCP data frame's bytes at most, either way (a quarter of a message)
MAX_SESSIONS_PER_STREAM = 1024  # UDP sessions on one DatagramSessions stream (the agent refuses more)
