"""Looking for a same-named service in other namespaces, through the cluster's DNS.

When the program's lookup of a short name (``orders``) ended in NXDOMAIN, ktrace
asks the cluster's DNS, through the agent (so with the pod's view), for
``orders.<ns>.svc.<cluster domain>`` in a few candidate namespaces. DNS cannot list
namespaces, so the candidates must come from somewhere honest:

* namespaces the user named (``hint-namespaces`` in ktrace.toml, ``--hint-namespace``),
* namespaces the program itself reached during the run (``x.<ns>.svc.<domain>`` answers),
* a list provided by whoever knows the cluster (the Kubernetes API, with ``--agent kube``).

The number of questions is bounded, and so is the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from ktrace.report.searchlist import SearchList
from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.dns_answers import build_query, parse_response
from ktrace.tunnel.types import Endpoint, TunnelError

log = logging.getLogger("ktrace.report")

MAX_QUESTIONS = 64
PROBE_TIMEOUT = 2.0


def questions(search: SearchList, names: Sequence[str], namespaces: Sequence[str]) -> dict[str, str]:
    """fully qualified service name -> the short name it is a candidate for."""
    asked: dict[str, str] = {}
    for name in names:
        for namespace in namespaces:
            if namespace == search.namespace:
                continue
            fqdn = search.service_name(name, namespace)
            if fqdn and len(asked) < MAX_QUESTIONS:
                asked[fqdn] = name
    return asked


async def find_elsewhere(
    client: AgentClient,
    server: Endpoint,
    search: SearchList,
    names: Sequence[str],
    namespaces: Sequence[str],
    timeout: float = PROBE_TIMEOUT,
) -> dict[str, list[str]]:
    """short name -> the fully qualified names of same-named services found in ``namespaces``."""
    asked = questions(search, names, namespaces)
    if not asked:
        return {}
    try:
        session = await asyncio.wait_for(client.open_udp(server.family), timeout)
    except (TunnelError, OSError, TimeoutError) as exc:
        log.debug("cannot look for same-named services: %s", exc)
        return {}
    found: dict[str, list[str]] = {}
    waiting = {fqdn.lower() for fqdn in asked}
    done = asyncio.Event()

    def receive(source: Endpoint, payload: bytes) -> None:
        response = parse_response(payload)
        if response is None:
            return
        fqdn = response.question.name.lower()
        if fqdn not in waiting:
            return
        waiting.discard(fqdn)
        if response.outcome == "answer" and response.addresses:
            name = asked.get(fqdn) or next(v for k, v in asked.items() if k.lower() == fqdn)
            found.setdefault(name, []).append(fqdn)
        if not waiting:
            done.set()

    session.set_receiver(receive)
    try:
        for fqdn in asked:
            session.send(server, build_query(fqdn + "."))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
    finally:
        await session.close()
    return {name: sorted(fqdns) for name, fqdns in found.items()}
