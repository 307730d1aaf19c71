"""The audit log: one entry per administrative change, readable by admins, never editable.

Real core and usage-tracker servers; each admin change is made through the API with the admin
token, then read back both from the database and through AuditService (and the CLI).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from grpc_status import rpc_status

from lodestar.audit.v1 import audit_pb2, audit_pb2_grpc
from lodestar.common import audit
from lodestar.common.auth import Role
from lodestar.common.errors import bad_request_violations
from lodestar.common.sdk import connect
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage.testing import start_tracker, tracker_settings

ADMIN = "test-admin"
USAGE = "lodestar.usage.v1.RequestCompleted"


async def entries(db: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every audit row, oldest first."""
    return await db.fetch("SELECT * FROM audit_log ORDER BY id")


def parsed(value: str | None) -> object:
    return None if value is None else json.loads(value)


def limit_of(snapshot: str | None) -> object:
    """A budget snapshot's limit_micros (int64 is a string in JSON), None without a snapshot."""
    return None if snapshot is None else json.loads(snapshot)["limit_micros"]


def output_of(snapshot: str | None) -> object:
    """A price snapshot's output price, None without a snapshot."""
    return None if snapshot is None else json.loads(snapshot)["output_micros_per_mtok"]


async def list_entries(
    channel: grpc.aio.Channel, **filters: object
) -> audit_pb2.ListAuditEntriesResponse:
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    reply: audit_pb2.ListAuditEntriesResponse = await stub.ListAuditEntries(
        audit_pb2.ListAuditEntriesRequest(**filters)  # type: ignore[arg-type]
    )
    return reply


async def register(admin: grpc.aio.Channel, name: str) -> None:
    await registry_pb2_grpc.RegistryServiceStub(admin).Register(
        registry_pb2.RegisterRequest(
            name=name, version="1.0", endpoint="127.0.0.1:7000", event_types=[USAGE]
        )
    )


# --- core: modules and dead letters --------------------------------------------------------------


async def test_set_module_enabled_writes_one_entry_with_before_and_after(admin_channel, db):
    await register(admin_channel, "billing")
    assert await entries(db) == []  # registering is not an administrative change
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await stub.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="billing", enabled=False))
    [entry] = await entries(db)
    assert (entry["principal"], entry["role"]) == (ADMIN, "admin")
    assert entry["action"] == "RegistryService/SetModuleEnabled"
    assert entry["target"] == "module/billing"
    before, after = parsed(entry["before"]), parsed(entry["after"])
    assert isinstance(before, dict)
    assert isinstance(after, dict)
    assert (before["name"], before["enabled"]) == ("billing", True)
    assert (after["name"], after["enabled"]) == ("billing", False)
    assert abs(entry["changed_at"] - datetime.now(UTC)) < timedelta(minutes=1)


async def test_deregister_writes_one_entry_with_the_module_before(admin_channel, db):
    await register(admin_channel, "billing")
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await stub.Deregister(registry_pb2.DeregisterRequest(name="billing"))
    [entry] = await entries(db)
    assert (entry["principal"], entry["action"]) == (ADMIN, "RegistryService/Deregister")
    assert entry["target"] == "module/billing"
    before = parsed(entry["before"])
    assert isinstance(before, dict)
    assert (before["name"], before["endpoint"]) == ("billing", "127.0.0.1:7000")
    assert entry["after"] is None


async def test_refused_registry_changes_write_nothing(admin_channel, module_channel, db):
    await register(admin_channel, "billing")
    admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    for call in (
        admin.Deregister(registry_pb2.DeregisterRequest(name="nobody")),
        admin.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="nobody")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    module = registry_pb2_grpc.RegistryServiceStub(module_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await module.Deregister(registry_pb2.DeregisterRequest(name="billing"))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await entries(db) == []
    assert await db.fetchval("SELECT count(*) FROM modules WHERE name = 'billing'") == 1


async def plant_dead_letters(db: asyncpg.Connection, subscription: str, *seqs: int) -> None:
    """A subscription with dead letters, written directly (as N failed deliveries would)."""
    await db.execute(
        "INSERT INTO subscriptions (name, module, acked_seq) VALUES ($1, 'billing', 0)",
        subscription,
    )
    await db.executemany(
        "INSERT INTO dead_letters (subscription, seq, attempts, last_error, envelope) "
        "VALUES ($1, $2, 3, $3, $4)",
        [(subscription, seq, f"boom {seq}", b"\x00") for seq in seqs],
    )


async def test_replay_dead_letters_writes_one_entry(admin_channel, db):
    await plant_dead_letters(db, "billing.usage", 7, 9, 12)
    bus = bus_pb2_grpc.EventBusServiceStub(admin_channel)
    reply = await bus.ReplayDeadLetters(
        bus_pb2.ReplayDeadLettersRequest(subscription="billing.usage", sequences=[9, 7])
    )
    assert reply.replayed == 2
    [entry] = await entries(db)
    assert (entry["principal"], entry["role"]) == (ADMIN, "admin")
    assert entry["action"] == "EventBusService/ReplayDeadLetters"
    assert entry["target"] == "subscription/billing.usage"
    assert parsed(entry["before"]) == {
        "count": 2,
        "dead_letters": [
            {"sequence": 7, "attempts": 3, "last_error": "boom 7"},
            {"sequence": 9, "attempts": 3, "last_error": "boom 9"},
        ],
    }
    assert parsed(entry["after"]) == {"redeliveries": [7, 9]}


async def test_refused_replay_writes_nothing(admin_channel, module_channel, db):
    await plant_dead_letters(db, "billing.usage", 7)
    for channel, request, code in (
        (admin_channel, bus_pb2.ReplayDeadLettersRequest(subscription="nobody"), "NOT_FOUND"),
        (admin_channel, bus_pb2.ReplayDeadLettersRequest(), "INVALID_ARGUMENT"),
        (
            module_channel,
            bus_pb2.ReplayDeadLettersRequest(subscription="billing.usage"),
            "PERMISSION_DENIED",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bus_pb2_grpc.EventBusServiceStub(channel).ReplayDeadLetters(request)
        assert caught.value.code().name == code
    assert await entries(db) == []
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 1


# --- the log itself ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET principal = 'someone-else'",
        "UPDATE audit_log SET after = NULL WHERE false",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ],
)
async def test_the_database_refuses_to_change_or_remove_entries(admin_channel, db, statement):
    await register(admin_channel, "billing")
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await stub.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="billing"))
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute(statement)
    [entry] = await entries(db)
    assert entry["principal"] == ADMIN


async def test_entries_are_listed_newest_first_with_filters_and_pages(admin_channel, db):
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    for name in ("alpha", "beta", "gamma"):
        await register(admin_channel, name)
        await stub.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name=name))
    await stub.Deregister(registry_pb2.DeregisterRequest(name="beta"))

    everything = await list_entries(admin_channel)
    assert [(e.action.split("/")[1], e.target) for e in everything.entries] == [
        ("Deregister", "module/beta"),
        ("SetModuleEnabled", "module/gamma"),
        ("SetModuleEnabled", "module/beta"),
        ("SetModuleEnabled", "module/alpha"),
    ]
    assert everything.next_page_token == ""
    newest = everything.entries[0]
    assert (newest.principal, newest.role) == (ADMIN, "admin")
    assert json.loads(newest.before_json)["name"] == "beta"
    assert newest.after_json == ""

    by_target = await list_entries(admin_channel, target="module/beta")
    assert [e.action for e in by_target.entries] == [
        "RegistryService/Deregister",
        "RegistryService/SetModuleEnabled",
    ]
    exact = await list_entries(admin_channel, action="RegistryService/Deregister")
    assert [e.target for e in exact.entries] == ["module/beta"]
    assert len((await list_entries(admin_channel, action="RegistryService/")).entries) == 4
    assert (await list_entries(admin_channel, action="RegistryService/Dereg")).entries == []
    assert (await list_entries(admin_channel, principal="test-module")).entries == []
    assert len((await list_entries(admin_channel, principal=ADMIN)).entries) == 4

    pages, token = [], ""
    while True:
        page = await list_entries(admin_channel, page_size=3, page_token=token)
        pages.append([e.id for e in page.entries])
        if not (token := page.next_page_token):
            break
    assert pages == [[e.id for e in everything.entries[:3]], [everything.entries[3].id]]


async def test_time_filters_select_by_when_the_change_was_made(admin_channel, db):
    await register(admin_channel, "billing")
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await stub.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="billing"))
    [stored] = await entries(db)
    at = stored["changed_at"]
    since, until, later = (audit_pb2.ListAuditEntriesRequest() for _ in range(3))
    since.since.FromDatetime(at - timedelta(seconds=1))
    since.until.FromDatetime(at + timedelta(seconds=1))
    until.until.FromDatetime(at)  # until is exclusive
    later.since.FromDatetime(at + timedelta(microseconds=1))
    stub_audit = audit_pb2_grpc.AuditServiceStub(admin_channel)
    assert [e.id for e in (await stub_audit.ListAuditEntries(since)).entries] == [stored["id"]]
    assert (await stub_audit.ListAuditEntries(until)).entries == []
    assert (await stub_audit.ListAuditEntries(later)).entries == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 1001}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": "9" * 19}, "page_token"),  # beyond bigint
        ({"page_token": "0"}, "page_token"),
        ({"principal": "x" * 257}, "principal"),
        ({"target": "module/\x00"}, "target"),
        ({"since": {"seconds": 253_402_300_800}}, "since.seconds"),
        ({"until": {"seconds": 0, "nanos": -1}}, "until.nanos"),
        ({"since": {"seconds": 100}, "until": {"seconds": 99}}, "until"),
    ],
)
async def test_bad_list_requests_are_invalid_argument_naming_the_field(
    admin_channel, request_fields, field
):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_entries(admin_channel, **request_fields)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert [v.field for v in bad_request_violations(status)] == [field]


@pytest.mark.parametrize("role", [Role.MODULE, Role.PUBLISHER])
async def test_only_admins_read_the_audit_log(core, tokens, role):
    async with connect(core.target, tokens[role]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_entries(channel)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_the_audit_service_has_no_method_that_changes_entries():
    methods = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].methods_by_name
    assert list(methods) == ["ListAuditEntries"]


# --- usage-tracker: budgets and prices -----------------------------------------------------------


@pytest.fixture
async def tracker(tmp_path, database_url, schema, core, tokens):
    running = await start_tracker(
        tracker_settings(
            database_url=database_url,
            schema=f"{schema}_usage",
            core_target=core.target,
            token=tokens["usage-tracker"],
            credentials=tmp_path / "credentials.yaml",
            spool=tmp_path / "spool",
        )
    )
    yield running
    await running.stop()


@pytest.fixture
async def tracker_admin(tracker, tokens):
    async with connect(tracker.target, tokens[Role.ADMIN]) as channel:
        yield channel


@pytest.fixture
async def tracker_db(tracker, database_url, schema):
    conn = await asyncpg.connect(
        database_url, server_settings={"search_path": f"{schema}_usage,public"}
    )
    yield conn
    await conn.close()


def monthly(name: str, limit_micros: int, budget_id: str = "") -> u.Budget:
    return u.Budget(
        id=budget_id,
        name=name,
        scope=u.BUDGET_SCOPE_GLOBAL,
        period=u.BUDGET_PERIOD_MONTHLY,
        limit_micros=limit_micros,
    )


async def test_budget_changes_each_write_one_entry(tracker_admin, tracker_db):
    stub = ug.BudgetServiceStub(tracker_admin)
    created = (await stub.CreateBudget(u.CreateBudgetRequest(budget=monthly("all", 5_000)))).budget
    await stub.UpdateBudget(
        u.UpdateBudgetRequest(budget=monthly("all", 9_000, budget_id=created.id))
    )
    await stub.DeleteBudget(u.DeleteBudgetRequest(id=created.id))

    rows = await entries(tracker_db)
    assert [(r["principal"], r["role"]) for r in rows] == [(ADMIN, "admin")] * 3
    assert [r["action"] for r in rows] == [
        "BudgetService/CreateBudget",
        "BudgetService/UpdateBudget",
        "BudgetService/DeleteBudget",
    ]
    assert {r["target"] for r in rows} == {f"budget/{created.id}"}
    limits = [(limit_of(r["before"]), limit_of(r["after"])) for r in rows]
    assert limits == [(None, "5000"), ("5000", "9000"), ("9000", None)]


async def test_price_changes_each_write_one_entry(tracker_admin, tracker_db):
    stub = ug.UsageServiceStub(tracker_admin)
    price = u.Price(
        model_pattern="audit-model*",
        valid_from="2026-01-01",
        input_micros_per_mtok=3_000_000,
        output_micros_per_mtok=15_000_000,
    )
    await stub.SetPrice(u.SetPriceRequest(price=price))
    price.output_micros_per_mtok = 12_000_000
    await stub.SetPrice(u.SetPriceRequest(price=price))
    reply = await stub.DeletePrice(
        u.DeletePriceRequest(model_pattern="audit-model*", valid_from="2026-01-01")
    )
    assert reply.deleted

    rows = await entries(tracker_db)
    assert [r["action"] for r in rows] == [
        "UsageService/SetPrice",
        "UsageService/SetPrice",
        "UsageService/DeletePrice",
    ]
    assert {r["target"] for r in rows} == {"price/audit-model*@2026-01-01"}
    assert {r["principal"] for r in rows} == {ADMIN}
    outputs = [(output_of(r["before"]), output_of(r["after"])) for r in rows]
    assert outputs == [(None, "15000000"), ("15000000", "12000000"), ("12000000", None)]
    assert parsed(rows[2]["before"]) == parsed(rows[1]["after"])


async def test_refused_budget_and_price_changes_write_nothing(
    tracker, tracker_admin, tracker_db, tokens
):
    budgets = ug.BudgetServiceStub(tracker_admin)
    prices = ug.UsageServiceStub(tracker_admin)
    missing = str(uuid.uuid4())
    refusals = [
        budgets.CreateBudget(u.CreateBudgetRequest(budget=u.Budget(name=""))),
        budgets.UpdateBudget(u.UpdateBudgetRequest(budget=monthly("x", 1, budget_id=missing))),
        budgets.DeleteBudget(u.DeleteBudgetRequest(id=missing)),
        budgets.DeleteBudget(u.DeleteBudgetRequest(id="not-an-id")),
        prices.SetPrice(
            u.SetPriceRequest(price=u.Price(model_pattern="", valid_from="2026-01-01"))
        ),
        prices.DeletePrice(u.DeletePriceRequest(model_pattern="m", valid_from="yesterday")),
    ]
    for call in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
        )
    async with connect(tracker.target, tokens[Role.MODULE]) as module:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ug.BudgetServiceStub(module).CreateBudget(
                u.CreateBudgetRequest(budget=monthly("sneaky", 1))
            )
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await entries(tracker_db) == []
    assert await tracker_db.fetchval("SELECT count(*) FROM budgets") == 0


async def test_usage_tracker_serves_its_own_audit_log_to_admins_only(
    tracker, tracker_admin, tokens
):
    stub = ug.BudgetServiceStub(tracker_admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=monthly("all", 5_000)))
    reply = await list_entries(tracker_admin, action="BudgetService/")
    assert [(e.principal, e.action) for e in reply.entries] == [
        (ADMIN, "BudgetService/CreateBudget")
    ]
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_entries(publisher)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


# --- the CLI -------------------------------------------------------------------------------------


async def lodestar(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the ``lodestar`` CLI as a process; its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lodestar.common.cli",
        *args,
        env={**os.environ, "COLUMNS": "250", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return await process.wait(), output.decode()


async def test_cli_prints_entries_of_both_services(
    core, tracker, admin_channel, tracker_admin, tokens, tmp_path
):
    await register(admin_channel, "billing")
    await registry_pb2_grpc.RegistryServiceStub(admin_channel).SetModuleEnabled(
        registry_pb2.SetModuleEnabledRequest(name="billing", enabled=False)
    )
    await ug.BudgetServiceStub(tracker_admin).CreateBudget(
        u.CreateBudgetRequest(budget=monthly("all", 5_000))
    )
    env = {
        "LODESTAR_CORE_ENDPOINT": core.target,
        "LODESTAR_USAGE_ENDPOINT": tracker.target,
        "LODESTAR_TOKEN": tokens[Role.ADMIN],
    }
    base = ["audit", "--state-dir", str(tmp_path / "none")]

    code, output = await lodestar(*base, "--json", env=env)
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    assert [(line["service"], line["action"]) for line in lines] == [
        ("usage-tracker", "BudgetService/CreateBudget"),
        ("core", "RegistryService/SetModuleEnabled"),
    ]
    assert lines[1]["principal"] == ADMIN
    assert (lines[1]["before"]["enabled"], lines[1]["after"]["enabled"]) == (True, False)
    assert lines[0]["before"] is None

    code, output = await lodestar(
        *base, "--service", "core", "--since", "1h", "--on", "module/billing", env=env
    )
    assert code == 0, output
    assert "RegistryService/SetModuleEnabled" in output
    assert "enabled: true → false" in output
    assert f"{ADMIN} (admin)" in output
    assert "BudgetService" not in output

    code, output = await lodestar(*base, "--principal", "test-module", "--json", env=env)
    assert (code, output) == (0, "")

    env["LODESTAR_TOKEN"] = tokens[Role.MODULE]
    code, output = await lodestar(*base, "--service", "core", env=env)
    assert code == 1
    assert "PERMISSION_DENIED" in output


async def test_a_huge_change_cannot_break_reading_the_audit_log(admin_channel, db):
    """A 4 MB entry once made every later page of the core audit log fail for everyone."""
    huge = {"blob": "x" * (audit.MAX_SNAPSHOT_BYTES + 1)}
    large = {"blob": "y" * (audit.MAX_SNAPSHOT_BYTES - 100)}
    async with db.transaction():
        await audit.record(db, action="Test/Huge", target="t/huge", before=None, after=huge)
        for n in range(12):  # 3 MB of entries: more than one page may carry
            await audit.record(db, action="Test/Large", target=f"t/{n}", before=None, after=large)
    stored = parsed(await db.fetchval("SELECT after FROM audit_log WHERE target = 't/huge'"))
    assert stored == {
        "truncated": True,
        "bytes": len(json.dumps(huge, separators=(",", ":"))),
        "sha256": stored["sha256"],  # type: ignore[index]
    }
    stub = audit_pb2_grpc.AuditServiceStub(admin_channel)
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await stub.ListAuditEntries(
            audit_pb2.ListAuditEntriesRequest(page_size=1000, page_token=token)
        )
        pages.append([e.target for e in reply.entries])
        if not (token := reply.next_page_token):
            break
    assert len(pages) == 2, [len(p) for p in pages]
    assert [t for page in pages for t in page] == [*(f"t/{n}" for n in range(11, -1, -1)), "t/huge"]
