"""web/events.ts and web/delta-push.js stay in step with the Python definitions.

The TypeScript lists (event types, services, priorities, error and close codes,
client and server actions, lagged reasons) and the fields of every protocol
message interface are parsed out of events.ts and compared with
cluster.envelope, cluster.protocol and what the builders actually emit; the
browser client's constants are compared with the Python client's and the
node's.
"""

from __future__ import annotations

import inspect
import re
from functools import cache
from pathlib import Path

import orjson
import pytest
from conftest import ROOT

from cluster import client as python_client
from cluster import envelope, protocol
from cluster.settings import Settings
from node import queue as node_queue

WEB = ROOT / "web"


@cache
def events_ts() -> str:
    return (WEB / "events.ts").read_text()


def ts_list(name: str, source: str | None = None) -> list[str]:
    match = re.search(rf"export const {name} = \[(.*?)\] as const;", source or events_ts(), re.S)
    assert match, f"events.ts has no `export const {name} = [...] as const`"
    return re.findall(r'"([^"]+)"', match.group(1))


def ts_object(name: str) -> dict[str, int]:
    match = re.search(rf"export const {name} = \{{(.*?)\}} as const;", events_ts(), re.S)
    assert match, f"events.ts has no `export const {name} = {{...}} as const`"
    return {key: int(value) for key, value in re.findall(r"(\w+): (\d+)", match.group(1))}


def ts_fields(interface: str) -> dict[str, bool]:
    """Field name -> required, of ``export interface <interface>``."""
    match = re.search(rf"export interface {interface}(?:<[^>]*>)?(?: extends [^{{]+)? \{{\n(.*?)\n\}}", events_ts(), re.S)
    assert match, f"events.ts has no interface {interface}"
    return {name: not optional for name, optional in re.findall(r"^  (\w+)(\??):", match.group(1), re.M)}


def public_constants(cls: type) -> dict[str, object]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def test_event_types_match_known_types():
    listed = ts_list("EVENT_TYPES")
    assert len(listed) == len(set(listed))
    assert set(listed) == envelope.KNOWN_TYPES


def test_services_match_known_services():
    listed = ts_list("SERVICES")
    assert len(listed) == len(set(listed))
    assert set(listed) == envelope.KNOWN_SERVICES


def test_priorities_match_in_order():
    assert tuple(ts_list("PRIORITIES")) == envelope.PRIORITIES
    assert f'DEFAULT_PRIORITY: Priority = "{envelope.DEFAULT_PRIORITY}"' in events_ts()
    assert f'ENVELOPE_VERSION = "{envelope.VERSION}"' in events_ts()


def test_error_codes_match():
    assert ts_list("ERROR_CODES") == list(public_constants(protocol.ErrorCode).values())


def test_close_codes_match():
    assert ts_object("CLOSE_CODES") == public_constants(protocol.CloseCode)


def test_envelope_fields_match_what_the_sdk_builds():
    minimal = envelope.build_envelope("order.filled", {}, source="order-executor")
    full = envelope.build_envelope(
        "order.filled", {}, source="order-executor", user_id="u", session_id="s", priority="p1", ttl=1, correlation_id="c"
    )
    fields = ts_fields("EventEnvelope")
    assert set(fields) == set(full)
    assert {name for name, required in fields.items() if required} == set(minimal)


def client_actions_in_parser() -> set[str]:
    return set(re.findall(r'action == "(\w+)"', inspect.getsource(protocol.parse_client_message)))


def test_client_actions_match_the_parser():
    assert set(ts_list("CLIENT_ACTIONS")) == client_actions_in_parser()
    samples = {
        "subscribe": {"channels": ["order.*"], "options": {"priority": "p1", "limit": 5, "since": "x"}},
        "unsubscribe": {"channels": ["order.*"]},
        "auth": {"token": "t"},
        "ping": {},
    }
    for action in ts_list("CLIENT_ACTIONS"):
        message = protocol.parse_client_message(orjson.dumps({"action": action, "id": "r1", **samples[action]}))
        fields = ts_fields(f"{type(message).__name__}Message")
        assert set(fields) == {"action", *samples[action], "id"}, action
        assert {name for name, required in fields.items() if required} == {"action", *samples[action]} - {"options"}
    assert set(ts_fields("SubscribeOptions")) == set(samples["subscribe"]["options"])


def server_messages() -> dict[str, dict]:
    """One message of every kind the server builds, with every optional field set."""
    event = envelope.build_envelope("order.filled", {}, source="order-executor")
    frames = [
        protocol.welcome("c1", "node-1", "u1", 1, Settings().public_limits()),
        protocol.ack("r1", ["order.*"], ["risk.*"], recovered={"order.*": True}, cursor="e:@1-1"),
        protocol.event_frame("order.filled", orjson.dumps(event), "e:order.filled:x"),
        protocol.error("FORBIDDEN", "no", "r1", ["order.*"]),
        protocol.authenticated("u1", 1, "r1"),
        protocol.pong("r1"),
        protocol.lagged(3, "queue_full"),
        protocol.reconnect("draining"),
    ]
    return {doc["action"]: doc for doc in map(orjson.loads, frames)}


INTERFACES = {
    "welcome": "WelcomeMessage",
    "ack": "AckMessage",
    "event": "EventMessage",
    "error": "ErrorMessage",
    "authenticated": "AuthenticatedMessage",
    "pong": "PongMessage",
    "lagged": "LaggedMessage",
    "reconnect": "ReconnectMessage",
}


def test_server_actions_match_the_builders():
    built = server_messages()
    assert set(ts_list("SERVER_ACTIONS")) == set(built) == set(INTERFACES)
    source = inspect.getsource(protocol)
    named = {a or b for a, b in re.findall(r'"action"\s*:\s*"(\w+)"|\{"action":"(\w+)"', source)}
    assert named <= set(built) | client_actions_in_parser(), "protocol.py builds a message events.ts does not type"


@pytest.mark.parametrize("action", sorted(INTERFACES))
def test_server_message_interface_matches_its_builder(action):
    doc = server_messages()[action]
    fields = ts_fields(INTERFACES[action])
    assert set(fields) == set(doc), f"{INTERFACES[action]} fields differ from protocol.{action}()"
    minimal = {
        "ack": orjson.loads(protocol.ack(None)),
        "pong": orjson.loads(protocol.pong()),
        "error": orjson.loads(protocol.error("INTERNAL", "x")),
    }.get(action, doc)
    assert {name for name, required in fields.items() if required} <= set(minimal)


def test_welcome_limits_match_the_settings():
    assert set(ts_fields("Limits")) == set(Settings().public_limits())


def test_lagged_reasons_match_what_the_node_reports():
    sources = "".join(path.read_text() for path in (ROOT / "node").glob("*.py"))
    reported = set(re.findall(r'_report(?:_drop)?\(\s*"(\w+)"', sources))
    assert set(ts_list("LAGGED_REASONS")) == reported


def test_browser_client_constants_match_the_python_client_and_the_node():
    source = (WEB / "delta-push.js").read_text()
    priorities = re.search(r"export const PRIORITIES = Object\.freeze\(\[(.*?)\]\)", source).group(1)
    assert tuple(re.findall(r'"([^"]+)"', priorities)) == envelope.PRIORITIES
    fatal = re.search(r"export const FATAL_CLOSE_CODES = Object\.freeze\(\[(.*?)\]\)", source).group(1)
    assert {int(code) for code in fatal.split(",")} == python_client.FATAL_CLOSE_CODES
    conflated = re.search(r"const CONFLATED_TYPES = new Set\(\[(.*?)\]\)", source).group(1)
    assert set(re.findall(r'"([^"]+)"', conflated)) == node_queue.CONFLATED_TYPES
    assert f"dedupWindow: {python_client.DEDUP_WINDOW:_}" in source


@pytest.mark.parametrize("module", ["delta-push", "fossil"])
def test_declarations_cover_the_module_exports(module):
    source = (WEB / f"{module}.js").read_text()
    exported = set(re.findall(r"^export (?:const|class|function) (\w+)", source, re.M))
    declared = set(re.findall(r"^export declare (?:const|class|function) (\w+)", (WEB / f"{module}.d.ts").read_text(), re.M))
    assert exported == declared


def test_web_files_exist():
    for name in ("delta-push.js", "delta-push.d.ts", "fossil.js", "fossil.d.ts", "events.ts", "index.html", "app.js", "style.css"):
        assert Path(WEB / name).is_file(), name


def test_type_imports_name_their_file_extension_for_nodenext_resolution():
    """TS2835: under `moduleResolution: nodenext` a relative import needs its extension;
    `.js` is how TypeScript spells a sibling `.ts` file."""
    for name in ("delta-push.d.ts", "events.ts"):
        text = (WEB / name).read_text()
        for spec in re.findall(r"""\bfrom\s+["'](\.[^"']*)["']""", text):
            assert re.search(r"\.(?:js|mjs|ts|d\.ts)$", spec), f"{name}: import {spec!r} has no file extension"
            target = WEB / spec
            assert target.exists() or target.with_suffix(".ts").exists(), f"{name}: {spec} resolves to no file"
