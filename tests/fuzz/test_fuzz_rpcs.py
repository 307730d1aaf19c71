"""Property-based fuzzing of every RPC of every installed service, against real servers.

For each RPC (found from the modules' ``add_to_server`` and the descriptors, so new services and
RPCs are covered without touching this file), hypothesis builds requests from the descriptor —
edge-leaning numbers, times out of range, text with NUL or very long, undefined enum numbers,
long repeated fields — and raw bytes that are truncated, corrupted or invalid UTF-8, sent with an
admin token (so authorization hides nothing) and with the token of the role the RPC is meant for.

Properties:

- no call ends UNKNOWN, INTERNAL, UNAVAILABLE (the database is up: that would be the request's
  doing), DATA_LOSS, UNIMPLEMENTED, or hangs past its deadline;
- a refused call stores nothing: the row count of every table of the service's schema is the
  same after it as before;
- afterwards every read still answers and every server says SERVING.

A failure that is a known, reported bug not fixed yet is listed in ``KNOWN`` with its entry in
``/work/notes/fuzz_findings.md``; the list must end empty.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lodestar.common.auth import Role
from lodestar.usage.v1 import usage_pb2
from tests.fuzz.harness import (
    RUNTIME_SERVICES,
    Outcome,
    Rpc,
    Suite,
    declared_rpcs,
    declared_services,
)
from tests.fuzz.seeds import SEEDS
from tests.fuzz.strategies import WORDS, MessageBuilder, Vocabulary, corrupted, with_invalid_utf8

pytestmark = pytest.mark.fuzz

RPCS = declared_rpcs()
#: Codes no request may cause while every dependency is up.
#: The batch RPC whose calls are answered one by one inside an OK response.
ADMIT = "/lodestar.usage.v1.BudgetService/Admit"
ADMIT_STREAM = "/lodestar.usage.v1.BudgetService/AdmitStream"
FORBIDDEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: Details that say the client never got the server's status (its trailers were too large).
LOST_STATUS = re.compile(r"metadata size exceeds|Stream removed")
#: Reads that must answer OK after the fuzzing, whatever was stored (issue #8, section 2).
READS = {
    "Summary",
    "ListRecords",
    "ListSessions",
    "ListBudgets",
    "ListPrices",
    "ListModules",
    "ListSubscriptions",
}
#: Typical arguments for reads over a time window: the last 30 days, this month.
WINDOWS = [{}, {"window": {"rolling": {"days": 30}}}, {"window": {"calendar": {"unit": 3}}}]
SETTLE_SECONDS = 5.0
#: Examples per RPC and test; LODESTAR_FUZZ_EXAMPLES=500 for a deeper run by hand.
EXAMPLES = int(os.environ.get("LODESTAR_FUZZ_EXAMPLES", "60"))

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Known:
    """A reported bug the suite tolerates until its fix lands: which RPC, what it looks like."""

    finding: str
    path: str
    pattern: str

    def matches(self, rpc: Rpc, outcome: Outcome) -> bool:
        text = outcome.details + "\n" + "\n".join(outcome.server_errors)
        return rpc.path.endswith(self.path) and re.search(self.pattern, text) is not None


#: Known bugs, by finding number in /work/notes/fuzz_findings.md. Must end empty.
KNOWN: list[Known] = []

vocabulary = Vocabulary(WORDS)
builder = MessageBuilder(vocabulary, seeds=SEEDS)


def _ids(rpc: Rpc) -> str:
    return str(rpc)


# --- the properties -------------------------------------------------------------------------------


def admin_token(suite: Suite) -> str:
    return suite.tokens[f"fuzz-{Role.ADMIN.value}"]


def role_token(suite: Suite, rpc: Rpc) -> str:
    """The token of the non-admin role the RPC is meant for (module if it is admin-only)."""
    roles = suite.served[rpc.module].module.method_roles().get(rpc.path, frozenset())
    role = Role.PUBLISHER if Role.PUBLISHER in roles else Role.MODULE
    return suite.tokens[f"fuzz-{role.value}"]


def check_call(suite: Suite, rpc: Rpc, requests: list[bytes], token: str) -> Outcome:
    """Send ``requests``; fail on a forbidden status, or on rows stored by a refused call.

    Rows are only compared for a single request: in a stream, messages before the one refused
    may rightly have stored something (a Subscribe's `open`, an accepted PublishStream batch).
    """
    before = suite.fingerprint(rpc.module)
    outcome = suite.call(rpc, requests, token)
    assert_allowed(rpc, outcome)
    assert_calls_allowed(rpc, outcome)
    learn_names(rpc, outcome)
    if len(requests) == 1 and refused(rpc, outcome):
        after = suite.fingerprint(rpc.module)
        if after != before:
            tables = ",".join(sorted(t for t in after if before.get(t) != after[t]))
            suite.calls[(str(rpc), f"rows of {tables} changed around a refusal; replayed")] += 1
            confirm_stored(suite, rpc, requests, token)
    return outcome


def assert_allowed(rpc: Rpc, outcome: Outcome) -> None:
    """The call ended with an allowed code, and the client got the server's status.

    UNIMPLEMENTED is allowed for the runtime's stock services only (health's ``List`` is in
    the proto but not in grpcio's servicer); a service's own RPC must be implemented.
    """
    if not forbidden(rpc, outcome) and not LOST_STATUS.search(outcome.details):
        return
    known = next((k for k in KNOWN if k.matches(rpc, outcome)), None)
    if known is not None:
        return
    pytest.fail(f"{rpc.path} ended {outcome.describe()}", pytrace=False)


def assert_calls_allowed(rpc: Rpc, outcome: Outcome) -> None:
    """Admit or AdmitStream: none of the calls (or requests) ended with a forbidden code either."""
    answers = {ADMIT: usage_pb2.AdmitResponse, ADMIT_STREAM: usage_pb2.AdmitStreamResponse}
    if rpc.path not in answers:
        return
    for raw in outcome.responses:
        answer = answers[rpc.path].FromString(raw)
        statuses = [r.error for r in answer.results if r.HasField("error")]
        if isinstance(answer, usage_pb2.AdmitStreamResponse) and answer.HasField("error"):
            statuses.append(answer.error)
        for status in statuses:
            code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
            if code in FORBIDDEN:
                pytest.fail(f"{rpc.path}: a call ended {code.name}: {status.message}")


def forbidden(rpc: Rpc, outcome: Outcome) -> bool:
    """Whether the call ended with a code no request may cause."""
    stock_unimplemented = (
        rpc.service in RUNTIME_SERVICES and outcome.code == grpc.StatusCode.UNIMPLEMENTED
    )
    return outcome.code in FORBIDDEN and not stock_unimplemented


def refused(rpc: Rpc, outcome: Outcome) -> bool:
    """Whether the call was refused: a status other than OK, or every response an error."""
    if outcome.code != grpc.StatusCode.OK:
        return True
    cls = message_factory.GetMessageClass(rpc.descriptor.output_type)
    if "error" not in cls.DESCRIPTOR.fields_by_name or not outcome.responses:
        return False
    return all(_has_error(cls.FromString(raw)) for raw in outcome.responses)


def _has_error(response: Any) -> bool:
    """Whether ``response``'s ``error`` field is set (a message) or not empty (a scalar)."""
    if response.DESCRIPTOR.fields_by_name["error"].message_type is not None:
        return response.HasField("error")
    return bool(response.error)


def confirm_stored(suite: Suite, rpc: Rpc, requests: list[bytes], token: str) -> None:
    """Rows changed around a refused call: fail if they do again once the servers are idle.

    The servers' background work (ingest, alerts, heartbeats) also writes, so a difference is
    only blamed on the request when a replay after everything settled changes the rows too.
    """
    before = settle(suite, rpc.module)
    outcome = suite.call(rpc, requests, token)
    after = suite.fingerprint(rpc.module)
    if refused(rpc, outcome) and after != before:
        changed = {t: (before.get(t), after.get(t)) for t in after if before.get(t) != after[t]}
        pytest.fail(f"{rpc.path} refused ({outcome.describe()}) but stored rows: {changed}")


def settle(suite: Suite, module: str) -> dict[str, int]:
    """The row counts once they stop changing (background work done)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    counts = suite.fingerprint(module)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = suite.fingerprint(module)
        if again == counts:
            return counts
        counts = again
    return counts


def assert_still_answering(suite: Suite) -> None:
    """Every read answers (the issue's list with OK, others with no forbidden code); SERVING."""
    problems = []
    for rpc in RPCS:
        method = rpc.descriptor
        if method.client_streaming or method.server_streaming:
            continue
        if not (rpc.method.startswith("List") or rpc.method in READS):
            continue
        for request in _read_requests(rpc):
            outcome = suite.call(rpc, [request], admin_token(suite))
            bad = forbidden(rpc, outcome)
            if rpc.method in READS and outcome.code != grpc.StatusCode.OK:
                bad = True
            if bad:
                problems.append(f"{rpc} with {request!r}: {outcome.describe()}")
    restore_modules(suite)
    problems += refused_deliveries(suite)
    health = suite.health()
    for name, probes in health.items():
        problems += [
            f"{name} {probe}: {status}" for probe, status in probes.items() if status != "SERVING"
        ]
    assert not problems, "\n".join(problems)


def restore_modules(suite: Suite, timeout: float = 15.0) -> None:
    """Enable every installed module again (a fuzzed admin call may have disabled it or removed
    it from the registry; its agent registers it again within a heartbeat)."""
    enable = next((r for r in RPCS if r.method == "SetModuleEnabled"), None)
    if enable is None:
        return
    cls = message_factory.GetMessageClass(enable.descriptor.input_type)
    deadline = time.monotonic() + timeout
    for name in registered_modules(suite):
        request = json_format.ParseDict({"name": name, "enabled": True}, cls()).SerializeToString()
        while True:
            outcome = suite.call(enable, [request], admin_token(suite))
            if outcome.code != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert outcome.code == grpc.StatusCode.OK, f"cannot enable {name}: {outcome.describe()}"


_registered: list[str] = []


def registered_modules(suite: Suite) -> list[str]:
    """The installed services that registered themselves in the registry (asked once)."""
    listing = next((r for r in RPCS if r.method == "ListModules"), None)
    if not _registered and listing is not None:
        outcome = suite.call(listing, [b""], admin_token(suite))
        reply = message_factory.GetMessageClass(listing.descriptor.output_type).FromString(
            outcome.responses[0]
        )
        names = {m.name for m in reply.modules}  # type: ignore[attr-defined]
        _registered.extend(n for n in suite.served if n in names)
    return _registered


def refused_deliveries(suite: Suite) -> list[str]:
    """Events core accepted that a service's subscriber then refused (nacked).

    What core stores has passed the same bounds every consumer relies on, so a consumer refusing
    it is a gap between the two (the issue's events that failed five times in the tracker).
    """
    wait_consumed(suite)
    nacks, suite.errors.nacks = suite.errors.nacks, []
    return [f"a subscriber refused an event core accepted: {nack}" for nack in nacks]


def wait_consumed(suite: Suite, timeout: float = 15.0) -> None:
    """Until every connected subscription of an installed service has no lag."""
    listing = next((r for r in RPCS if r.method == "ListSubscriptions"), None)
    if listing is None:
        return
    cls = message_factory.GetMessageClass(listing.descriptor.output_type)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = suite.call(listing, [b""], admin_token(suite))
        if outcome.code == grpc.StatusCode.OK:
            reply = cls.FromString(outcome.responses[0])
            lagging = [
                s.name  # type: ignore[attr-defined]
                for s in reply.subscriptions  # type: ignore[attr-defined]
                if s.connected and s.module in suite.served and s.lag > 0
            ]
            if not lagging:
                return
        time.sleep(0.1)


def _read_requests(rpc: Rpc) -> list[bytes]:
    cls = message_factory.GetMessageClass(rpc.descriptor.input_type)
    requests = []
    for values in WINDOWS:
        try:
            requests.append(json_format.ParseDict(values, cls()).SerializeToString())
        except json_format.ParseError:
            continue
    return requests


def refresh_vocabulary(suite: Suite) -> None:
    """Learn the names of what exists (budgets, subscriptions, modules, prices) to aim at it."""
    for rpc in RPCS:
        method = rpc.descriptor
        if method.client_streaming or method.server_streaming or not rpc.method.startswith("List"):
            continue
        learn_names(rpc, suite.call(rpc, [b""], admin_token(suite)))
    vocabulary.settle()


def learn_names(rpc: Rpc, outcome: Outcome) -> None:
    """Remember the short strings of the responses (ids Reserve returned, budget ids, ...)."""
    if outcome.code != grpc.StatusCode.OK:
        return
    cls = message_factory.GetMessageClass(rpc.descriptor.output_type)
    for raw in outcome.responses:
        try:
            vocabulary.learn(_short_strings(cls.FromString(raw)))
        except DecodeError:
            continue


def _short_strings(message: Message) -> list[tuple[str, str]]:
    """``(field name, text)`` of the short text fields of ``message``, nested ones included."""
    found = []
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if isinstance(item, str) and 0 < len(item) <= 80:
                found.append((field.name, item))
            elif isinstance(item, Message):
                found += _short_strings(item)
    return found[:200]


# --- strategies per RPC ---------------------------------------------------------------------------


def structured_requests(rpc: Rpc) -> st.SearchStrategy[list[bytes]]:
    """Messages built from the request type's descriptor, encoded; a stream for streaming RPCs."""
    method = rpc.descriptor
    one = builder.message(method.input_type).map(lambda m: m.SerializeToString())
    if method.client_streaming:
        # The first message of a stream is often special (Subscribe's `open`): make it plausible.
        first = builder.mutated(method.input_type).map(lambda m: m.SerializeToString())
        return st.tuples(st.one_of(first, one), st.lists(one, max_size=3)).map(
            lambda t: [t[0], *t[1]]
        )
    return one.map(lambda data: [data])


def garbage_requests(rpc: Rpc) -> st.SearchStrategy[list[bytes]]:
    """Encodings that are not the request type: random, truncated, corrupted, bad UTF-8."""
    method = rpc.descriptor
    messages = builder.message(method.input_type)
    valid = messages.map(lambda m: m.SerializeToString())
    bad = st.one_of(corrupted(valid), messages.map(lambda m: with_invalid_utf8(m) or b"\xff"))
    if method.client_streaming:
        return st.tuples(st.lists(valid, max_size=2), bad).map(lambda t: [*t[0], t[1]])
    return bad.map(lambda data: [data])


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _before_each_test(suite: Suite) -> None:
    registered_modules(suite)
    vocabulary.settle()


def test_row_counts_see_every_table(suite: Suite) -> None:
    """The "nothing stored" check counts rows of every table of each service's schema."""
    for name, served in suite.served.items():
        before = suite.fingerprint(name)
        assert before, f"no tables in {served.schema}"
        table = f'"{served.schema}".fuzz_probe'
        suite.execute(f"CREATE TABLE {table} (x int)")
        try:
            suite.execute(f"INSERT INTO {table} VALUES (1), (2)")
            during = suite.fingerprint(name)
        finally:
            suite.execute(f"DROP TABLE {table}")
        # Other tables' counts may move meanwhile (the services' own background work).
        assert during["fuzz_probe"] == 2
        assert set(during) == {*before, "fuzz_probe"}
        assert set(suite.fingerprint(name)) == set(before)


def test_every_declared_service_is_served_and_fuzzed(suite: Suite) -> None:
    """The suite fuzzes exactly what the servers serve: nothing missed if a service is added."""
    declared = declared_services()
    assert set(declared) == set(suite.served)
    for module, services in declared.items():
        assert set(suite.reflected_services(module)) == {*services, *RUNTIME_SERVICES}, module
    assert {(r.module, r.service) for r in RPCS} == {
        (m, s) for m, services in declared.items() for s in [*services, *RUNTIME_SERVICES]
    }


@pytest.mark.parametrize("rpc", RPCS, ids=_ids)
def test_structured_requests(suite: Suite, rpc: Rpc) -> None:
    """Requests built from the descriptor, as admin and as the RPC's own role."""
    refresh_vocabulary(suite)

    # Mostly as admin where the RPC is admin-only: other roles only get PERMISSION_DENIED there.
    admin_only = not suite.served[rpc.module].module.method_roles().get(rpc.path)
    as_admin_strategy = st.sampled_from([True, True, True, False]) if admin_only else st.booleans()

    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
    @given(requests=structured_requests(rpc), as_admin=as_admin_strategy)
    def fuzz(requests: list[bytes], as_admin: bool) -> None:
        token = admin_token(suite) if as_admin else role_token(suite, rpc)
        check_call(suite, rpc, requests, token)

    fuzz()
    assert_still_answering(suite)


@pytest.mark.parametrize("rpc", RPCS, ids=_ids)
def test_undecodable_requests(suite: Suite, rpc: Rpc) -> None:
    """Truncated, corrupted and invalid-UTF-8 encodings: a unary request that does not decode is
    INVALID_ARGUMENT naming the message; a stream never ends worse than that."""
    request_type = rpc.descriptor.input_type
    cls = message_factory.GetMessageClass(request_type)

    @settings(FUZZ_SETTINGS, max_examples=max(1, EXAMPLES // 2))
    @given(requests=garbage_requests(rpc))
    def fuzz(requests: list[bytes]) -> None:
        outcome = check_call(suite, rpc, requests, admin_token(suite))
        if rpc.descriptor.client_streaming or _decodes(cls, requests[0]):
            return
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.describe()
        assert outcome.details.startswith(f"the request is not a valid {request_type.full_name}: ")

    fuzz()


def _decodes(cls: type[Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize("rpc", RPCS, ids=_ids)
def test_message_over_the_size_limit(suite: Suite, rpc: Rpc) -> None:
    """A request larger than ``max_message_bytes`` is RESOURCE_EXHAUSTED and stores nothing."""
    limit = suite.served[rpc.module].settings.max_message_bytes
    outcome = check_call(suite, rpc, [_string_field(1, limit + 1)], admin_token(suite))
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome.describe()


def test_everything_still_answers_at_the_end(suite: Suite) -> None:
    assert_still_answering(suite)


def _string_field(number: int, size: int) -> bytes:
    """The encoding of a length-delimited field ``number`` of ``size`` bytes."""
    return bytes([number << 3 | 2]) + _varint(size) + b"x" * size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
