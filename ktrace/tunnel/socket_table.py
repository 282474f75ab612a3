"""Which UDP sockets still exist, from the kernel's /proc/net/udp and udp6 tables.

ktrace keeps a loopback relay (and an agent session) per UDP socket of the
program, keyed by the socket's inode, but it never sees close(): a program that
opens a socket per DNS lookup would leak relays. The tables list every UDP socket
of the network namespace with its inode, so sockets that are gone can be found
without tracing close/dup/exit. ktrace runs in the program's network namespace.
"""

from __future__ import annotations

from collections.abc import Iterable

UDP_TABLES = ("/proc/self/net/udp", "/proc/self/net/udp6")
_INODE_COLUMN = 9  # sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode ...


def parse_inodes(text: str) -> set[int]:
    """Inodes listed in one /proc/net/udp{,6} table (header line skipped, junk ignored)."""
    found: set[int] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > _INODE_COLUMN and fields[_INODE_COLUMN].isdigit():
            found.add(int(fields[_INODE_COLUMN]))
    return found


def live_udp_inodes(tables: Iterable[str] = UDP_TABLES) -> set[int] | None:
    """Inodes of every UDP socket in this network namespace; None if no table could be read
    (then nothing may be assumed closed)."""
    found: set[int] = set()
    read_any = False
    for path in tables:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                found |= parse_inodes(f.read())
            read_any = True
        except OSError:
            continue
    return found if read_any else None
