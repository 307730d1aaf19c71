"""Every Lodestar error class maps to the gRPC status its documentation gives, with its details."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import grpc
import pytest
from google.rpc import status_pb2

import lodestar_usage.errors
from lodestar.common import errors
from lodestar.common.errors import (
    FieldViolation,
    HealthMonitorError,
    LearningError,
    LodestarError,
    ModuleError,
    NotFoundError,
    PermissionDeniedError,
    UsageTrackerError,
    bad_request_violations,
    rich_status,
    status_for,
)

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "libs/common/README.md", ROOT / "services/usage-tracker/API.md")
ERROR_MODULES = (errors, lodestar_usage.errors)
_TABLE_ROW = re.compile(r"^\| `(\w+Error)` \| ([A-Z_]+) \|", re.MULTILINE)


def _documented_statuses() -> dict[str, str]:
    found: dict[str, str] = {}
    for document in DOCUMENTS:
        for name, status in _TABLE_ROW.findall(document.read_text(encoding="utf-8")):
            assert name not in found, f"{name} is documented twice"
            found[name] = status
    return found


def _error_classes(module: types.ModuleType) -> list[type[LodestarError]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, LodestarError) and cls.__module__ == module.__name__
    ]


ALL_ERRORS = [cls for module in ERROR_MODULES for cls in _error_classes(module)]
DOCUMENTED = _documented_statuses()


def _status_proto(error: LodestarError) -> status_pb2.Status:
    status = rich_status(error)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    return status_pb2.Status.FromString(details)


def test_the_documents_list_exactly_the_error_classes() -> None:
    assert len(ALL_ERRORS) >= 17
    assert sorted(DOCUMENTED) == sorted(cls.__name__ for cls in ALL_ERRORS)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda cls: cls.__name__)
def test_each_error_maps_to_its_documented_status(cls: type[LodestarError]) -> None:
    expected = grpc.StatusCode[DOCUMENTED[cls.__name__]]
    assert cls.code == expected
    assert status_for(cls("the thing is wrong")) == (expected, "the thing is wrong")
    assert rich_status(cls("the thing is wrong")).code == expected


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda cls: cls.__name__)
def test_a_field_becomes_a_bad_request_violation(cls: type[LodestarError]) -> None:
    error = cls("must be positive", field="limit_micros")
    status = _status_proto(error)
    assert status.code == cls.code.value[0]
    assert status.message == "limit_micros: must be positive"
    assert bad_request_violations(status) == [FieldViolation("limit_micros", "must be positive")]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda cls: cls.__name__)
def test_no_field_no_bad_request(cls: type[LodestarError]) -> None:
    status = _status_proto(cls("unavailable for now"))
    assert status.message == "unavailable for now"
    assert list(status.details) == []


def test_per_module_errors_sit_under_the_module_error() -> None:
    for base in (UsageTrackerError, LearningError, HealthMonitorError):
        assert issubclass(base, ModuleError)
        assert base.code == grpc.StatusCode.FAILED_PRECONDITION
    tracker_errors = _error_classes(lodestar_usage.errors)
    assert tracker_errors
    assert all(issubclass(cls, UsageTrackerError) for cls in tracker_errors)


def test_a_module_error_that_is_also_a_category_is_caught_as_both() -> None:
    missing = lodestar_usage.errors.ReservationNotFoundError("no reservation", field="id")
    foreign = lodestar_usage.errors.ReservationNotYoursError("not yours", field="id")
    assert isinstance(missing, NotFoundError)
    assert isinstance(missing, UsageTrackerError)
    assert isinstance(foreign, PermissionDeniedError)
    assert isinstance(foreign, UsageTrackerError)
