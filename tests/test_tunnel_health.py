"""TunnelHealth: each change heard once, the reason kept (pure)."""

from __future__ import annotations

from ktrace.tunnel.health import TunnelHealth, short_reason


def test_lost_and_back_are_heard_once_each() -> None:
    heard: list[tuple[bool, str]] = []
    health = TunnelHealth()
    health.listeners.append(lambda up, reason: heard.append((up, reason)))
    health.back()  # already up: nothing to say
    health.lost("cannot connect to it", now=100.0)
    health.lost("Connection refused")  # still down: not heard again
    assert health.down and health.down_since == 100.0 and health.reason == "cannot connect to it"
    health.back()
    health.back()
    assert heard == [(False, "cannot connect to it"), (True, "")]
    assert not health.down and health.outages == 1


def test_a_failing_listener_does_not_stop_the_others() -> None:
    heard: list[bool] = []
    health = TunnelHealth()

    def broken(up: bool, reason: str) -> None:
        raise RuntimeError("listener bug")

    health.listeners += [broken, lambda up, reason: heard.append(up)]
    health.lost("x")
    assert heard == [False]


def test_short_reason_keeps_the_useful_end_of_a_grpc_error() -> None:
    details = (
        "tunnel: UNAVAILABLE: failed to connect to all addresses; last error: UNKNOWN: unix:/run/a.sock: "
        "Connection refused"
    )
    assert short_reason(details) == "Connection refused"
    assert short_reason("agent ended the stream without an answer (CANCELLED)") == (
        "agent ended the stream without an answer (CANCELLED)"
    )
    assert short_reason("  ") == "no reason given"
