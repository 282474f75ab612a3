"""Every event type renders to a JSON object the documented schema accepts (pure)."""

from __future__ import annotations

import json
import pathlib

import jsonschema
import pytest

from ktrace.report.events import SCHEMA_VERSION, Closed, Connect, DnsQuery, Event, Exit, Start, UdpFlow, to_json

SCHEMA_PATH = pathlib.Path(__file__).resolve().parent.parent / "docs" / "log-schema.json"

EVENTS: list[Event] = [
    Start(1.5, ["curl", "-s", "http://hello"], "unix:/tmp/a.sock", "0.1.0"),
    DnsQuery(1.6, "hello.default.svc.cluster.local", "A", "answer", "remote", "10.96.0.10:53", ("10.96.1.10",), 0.002),
    DnsQuery(1.6, "orders", "AAAA", "timeout", "local", "10.96.0.10:53", rule="--local orders"),
    Connect(
        1.7, 42, "10.96.1.10:8080", "ok", "remote", "hello.default.svc.cluster.local", None, 0.004, "10.0.0.5:41000"
    ),
    Connect(1.7, 42, "[fd00::1]:80", "ECONNREFUSED", "local", rule="--local fd00::/64"),
    UdpFlow(1.8, None, "10.96.1.11:7", "remote", "send"),
    Closed(2.0, "10.96.1.10:8080", 77, 1024, "reset: ECONNRESET", None, 0.3),
    Closed(2.0, "10.96.1.11:7", 10, 10, "closed", "echo.default.svc.cluster.local", None, "udp", 2, 2),
    Exit(2.1, 0, 7),
]


def schema() -> dict[str, object]:
    loaded = json.loads(SCHEMA_PATH.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.kind)
def test_event_validates(event: Event) -> None:
    line = json.dumps(to_json(event))
    obj = json.loads(line)
    assert obj["v"] == SCHEMA_VERSION and obj["event"] == event.kind
    jsonschema.validate(obj, schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    "broken",
    [
        {"v": 1, "event": "connect", "time": 1.0},  # fields missing
        {**to_json(EVENTS[3]), "route": "sideways"},
        {**to_json(EVENTS[3]), "v": 2},
        {**to_json(EVENTS[3]), "dest": "hello:80"},
        {**to_json(EVENTS[6]), "bytes_up": -1},
        {**to_json(EVENTS[0]), "event": "dns"},
        {**to_json(EVENTS[6]), "proto": "sctp"},
    ],
)
def test_schema_rejects_what_it_should(broken: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema(), cls=jsonschema.Draft202012Validator)
