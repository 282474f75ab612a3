"""Whether the tunnel to the agent works: the one record of it the report reads (pure).

``AgentClient`` marks it lost when a stream finds the tunnel down (``TunnelLost``) or the gRPC
channel fails to connect, and back when a stream opens or the channel is ready again. Listeners
hear each change once; a connect or a DNS question that fails while the tunnel is down failed
because the agent could not be reached, whatever errno the program was given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("ktrace.tunnel")

# (up, reason): reason says why it was lost (empty when back).
HealthListener = Callable[[bool, str], None]


@dataclass
class TunnelHealth:
    down_since: float | None = None  # time.time() when lost; None while up
    reason: str = ""
    outages: int = 0
    listeners: list[HealthListener] = field(default_factory=list)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def lost(self, reason: str, now: float | None = None) -> None:
        if self.down_since is not None:
            if reason and not self.reason:
                self.reason = reason
            return
        self.down_since = time.time() if now is None else now
        self.reason = reason
        self.outages += 1
        self._tell(False, reason)

    def back(self) -> None:
        if self.down_since is None:
            return
        self.down_since = None
        self.reason = ""
        self._tell(True, "")

    def _tell(self, up: bool, reason: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(up, reason)
            except Exception:
                log.exception("tunnel health listener failed")


def short_reason(details: str) -> str:
    """The useful end of a gRPC error text: ``failed to connect to all addresses; last error:
    UNKNOWN: unix:/p: Connection refused`` says ``Connection refused``."""
    text = details.strip()
    if "last error:" in text:
        text = text.rsplit("last error:", 1)[1].strip()
        text = text.rsplit(": ", 1)[-1]
    return text or "no reason given"
