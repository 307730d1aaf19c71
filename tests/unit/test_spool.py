"""Unit tests of the SDK's refusal classes, spool quarantine and spool draining (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from lodestar.common.errors import InvalidArgumentError, PermissionDeniedError
from lodestar.common.events import new_event
from lodestar.common.sdk.publisher import (
    CREDENTIAL_RETRY_SECONDS,
    Verdict,
    classify,
    drain_spool,
    error_of,
    replay_quarantined,
    retry_delay,
)
from lodestar.common.sdk.spool import Refusal, Spool
from lodestar.core.v1 import bus_pb2
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2 as usage


def rpc_error(
    code: grpc.StatusCode,
    details: str = "refused",
    *,
    retry_seconds: float | None = None,
    fields: tuple[str, ...] = (),
) -> grpc.aio.AioRpcError:
    """An AioRpcError as the ErrorMappingInterceptor sends it, rich details included."""
    status = status_pb2.Status(code=code.value[0], message=details)
    if fields:
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description="bad")
                    for f in fields
                ]
            )
        )
    if retry_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_seconds * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (grpc.StatusCode.UNAVAILABLE, Verdict.TRANSIENT),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Verdict.TRANSIENT),
        (grpc.StatusCode.ABORTED, Verdict.TRANSIENT),
        (grpc.StatusCode.CANCELLED, Verdict.TRANSIENT),
        (grpc.StatusCode.UNAUTHENTICATED, Verdict.CREDENTIAL),
        (grpc.StatusCode.INVALID_ARGUMENT, Verdict.PERMANENT),
        (grpc.StatusCode.PERMISSION_DENIED, Verdict.PERMANENT),
        (grpc.StatusCode.FAILED_PRECONDITION, Verdict.PERMANENT),
        (grpc.StatusCode.OUT_OF_RANGE, Verdict.PERMANENT),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Verdict.PERMANENT),
        (grpc.StatusCode.INTERNAL, Verdict.PERMANENT),
    ],
)
def test_refusals_are_classified(code: grpc.StatusCode, verdict: Verdict):
    assert classify(rpc_error(code)) is verdict


def test_a_rate_limit_is_transient_and_its_delay_is_read():
    limited = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_seconds=1.5)
    assert classify(limited) is Verdict.TRANSIENT
    assert retry_delay(limited) == 1.5
    assert retry_delay(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)) is None


def test_errors_keep_the_code_and_the_field_violations():
    error = error_of(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, fields=("events[0].time",)))
    assert isinstance(error, InvalidArgumentError)
    assert [v.field for v in error.violations] == ["events[0].time"]
    assert isinstance(error_of(rpc_error(grpc.StatusCode.PERMISSION_DENIED)), PermissionDeniedError)


def event(model: str = "m") -> event_pb2.Event:
    return new_event(usage.RequestCompleted(model=model), source="test://spool")


def batch(*events: event_pb2.Event) -> bus_pb2.PublishRequest:
    return bus_pb2.PublishRequest(events=list(events))


def gauge() -> float:
    return REGISTRY.get_sample_value("lodestar_sdk_quarantined_batches") or 0.0


def test_quarantine_keeps_the_reason_beside_the_batch_and_moves_the_metrics(tmp_path: Path):
    spool = Spool(tmp_path)
    before_events = REGISTRY.get_sample_value("lodestar_sdk_quarantined_events_total") or 0.0
    before_gauge = gauge()
    bad = event()
    path = spool.quarantine(batch(bad), Refusal("INVALID_ARGUMENT", "no", [{"field": "x"}]))
    assert path.parent == tmp_path / "rejected"
    reason = json.loads((tmp_path / "rejected" / (path.stem + ".reason.json")).read_text())
    assert (reason["code"], reason["event_ids"]) == ("INVALID_ARGUMENT", [bad.id])
    assert REGISTRY.get_sample_value("lodestar_sdk_quarantined_events_total") == before_events + 1
    assert gauge() == before_gauge + 1
    assert [b.request.events[0].id for b in spool.quarantined()] == [bad.id]
    assert len(spool) == 0, "a quarantined batch is not pending"
    spool.remove(path)
    assert not list((tmp_path / "rejected").iterdir())
    assert gauge() == before_gauge


def test_numbers_continue_after_quarantined_batches(tmp_path: Path):
    first = Spool(tmp_path).quarantine(batch(event()))
    again = Spool(tmp_path)
    assert again.append(batch(event())).name > first.name
    assert again.quarantine(batch(event())) != first


class ScriptedStub:
    """A stand-in for the bus stub: answers each Publish from a rule on the event's model."""

    def __init__(self, refuse: dict[str, grpc.aio.AioRpcError]) -> None:
        self.refuse = refuse
        self.stored: list[str] = []

    async def Publish(
        self, request: bus_pb2.PublishRequest, timeout: float | None = None
    ) -> bus_pb2.PublishResponse:
        for e in request.events:
            error = self.refuse.get(usage.RequestCompleted.FromString(e.data.value).model)
            if error is not None:
                raise error
        self.stored += [e.id for e in request.events]
        return bus_pb2.PublishResponse(accepted=len(request.events))


async def test_drain_quarantines_refused_events_and_sends_the_rest(tmp_path: Path):
    spool = Spool(tmp_path)
    good1, bad, good2, later = event("a"), event("bad"), event("b"), event("c")
    spool.append(batch(good1, bad, good2))
    spool.append(batch(later))
    refused = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, fields=("events[0].source",))
    stub = ScriptedStub({"bad": refused})
    result = await drain_spool(stub, spool)  # type: ignore[arg-type]
    assert stub.stored == [good1.id, good2.id, later.id]
    assert (result.sent_events, result.quarantined_events, result.stopped) == (3, 1, "")
    assert len(spool) == 0
    [kept] = spool.quarantined()
    assert kept.reason is not None
    assert kept.reason["violations"] == [{"field": "events[0].source", "description": "bad"}]


async def test_an_interrupted_drain_keeps_only_the_unsent_events_pending(tmp_path: Path):
    spool = Spool(tmp_path)
    good1, bad, down = event("a"), event("bad"), event("down")
    spool.append(batch(good1, bad, down))
    stub = ScriptedStub(
        {
            "bad": rpc_error(grpc.StatusCode.INVALID_ARGUMENT),
            "down": rpc_error(grpc.StatusCode.UNAVAILABLE),
        }
    )
    result = await drain_spool(stub, spool)  # type: ignore[arg-type]
    assert result.stopped.startswith("UNAVAILABLE")
    assert [e.id for b in spool.pending() for e in b.request.events] == [down.id]
    assert [b.request.events[0].id for b in spool.quarantined()] == [bad.id]
    stub.refuse.pop("down")
    await drain_spool(stub, spool)  # type: ignore[arg-type]
    assert stub.stored == [good1.id, down.id]
    assert len(spool.quarantined()) == 1, "the refused event is not quarantined twice"


async def test_an_unauthenticated_drain_keeps_everything_pending(tmp_path: Path):
    spool = Spool(tmp_path)
    spool.append(batch(event("a")))
    stub = ScriptedStub({"a": rpc_error(grpc.StatusCode.UNAUTHENTICATED)})
    result = await drain_spool(stub, spool)  # type: ignore[arg-type]
    assert result.retry_after == CREDENTIAL_RETRY_SECONDS
    assert len(spool) == 1
    assert spool.quarantined() == []


async def test_replay_quarantined_sends_what_is_accepted_now_and_keeps_the_rest(tmp_path: Path):
    spool = Spool(tmp_path)
    fixed, still = event("fixed"), event("still")
    spool.quarantine(batch(fixed), Refusal("INVALID_ARGUMENT", "old"))
    spool.quarantine(batch(still), Refusal("INVALID_ARGUMENT", "old"))
    stub = ScriptedStub({"still": rpc_error(grpc.StatusCode.PERMISSION_DENIED, "not yours")})
    result = await replay_quarantined(stub, spool)  # type: ignore[arg-type]
    assert stub.stored == [fixed.id]
    assert (result.sent_events, result.still_refused_events) == (1, 1)
    [kept] = spool.quarantined()
    assert kept.request.events[0].id == still.id
    assert kept.reason is not None
    assert (kept.reason["code"], kept.reason["details"]) == ("PERMISSION_DENIED", "not yours")
