"""The ``lodestar`` commands that call a service, run as processes against real servers.

``events tail`` honours ``--limit``, ends after the stored events with ``--from-start --limit``,
shows only new events without ``--from-start``, prints snake_case JSON, and gives up on an
unreachable core or a subscription already in use with one line; ``publish`` with core down is
one line; refusals name the flags the user typed; a wrong ``--target`` is said in words.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
import pytest

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.events import new_event
from lodestar.common.sdk import connect
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.usage.v1 import events_pb2 as usage
from tests.integration.test_tls import SERVER_NAME, _tls_settings, pki  # noqa: F401 (a fixture)

TYPE = "lodestar.usage.v1.RequestCompleted"


async def start(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start the ``lodestar`` CLI as a process."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lodestar.common.cli",
        *args,
        env={**os.environ, "COLUMNS": "250", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def lodestar(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    """Run the ``lodestar`` CLI as a process: exit status, stdout, stderr."""
    process = await start(*args, env=env)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return await process.wait(), out.decode(), err.decode()


@pytest.fixture
def cli_env(core, tokens, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The environment of a CLI pointed at the test's core with the admin token."""
    return {
        "LODESTAR_CORE_ENDPOINT": core.target,
        "LODESTAR_TOKEN": tokens[Role.ADMIN],
        "LODESTAR_STATE_DIR": str(tmp_path / "no-state"),
    }


async def publish(channel: grpc.aio.Channel, *models: str) -> list[str]:
    """Publish one RequestCompleted per model; their ids."""
    events = [
        new_event(usage.RequestCompleted(model=m, provider="p"), source="test://cli")
        for m in models
    ]
    await bus_pb2_grpc.EventBusServiceStub(channel).Publish(bus_pb2.PublishRequest(events=events))
    return [e.id for e in events]


async def subscription(channel: grpc.aio.Channel, name: str) -> bus_pb2.Subscription | None:
    reply = await bus_pb2_grpc.EventBusServiceStub(channel).ListSubscriptions(
        bus_pb2.ListSubscriptionsRequest()
    )
    return next((s for s in reply.subscriptions if s.name == name), None)


async def until_connected(channel: grpc.aio.Channel, name: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await subscription(channel, name)
        if found is not None and found.connected:
            return
        assert loop.time() < deadline, f"{name} never connected"
        await asyncio.sleep(0.1)


def printed(stdout: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def one_line(stderr: str) -> str:
    """The single line a failed command printed; no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def test_tail_limit_is_honoured_and_the_next_tail_resumes_after_it(
    cli_env, publisher_channel, admin_channel
):
    ids = await publish(publisher_channel, *(f"m{i}" for i in range(7)))
    tail = ("events", "tail", "--from-start", "--subscription", "cli-limit")

    code, out, err = await lodestar(*tail, "--limit", "1", env=cli_env)
    assert code == 0, err
    assert [line["id"] for line in printed(out)] == ids[:1]

    code, out, err = await lodestar(*tail, "--limit", "2", env=cli_env)
    assert code == 0, err
    assert [line["id"] for line in printed(out)] == ids[1:3]
    state = await subscription(admin_channel, "cli-limit")
    assert state is not None
    assert state.lag == 4, "exactly the printed events were acknowledged"


async def test_from_start_with_a_limit_ends_after_the_stored_events(cli_env, publisher_channel):
    """The README's `--from-start --limit 5` after one publish: one event, then the tail ends."""
    [event_id] = await publish(publisher_channel, "only")
    code, out, err = await lodestar(
        "events", "tail", "--from-start", "--limit", "5", env=cli_env, timeout=30
    )
    assert code == 0, err
    assert [line["id"] for line in printed(out)] == [event_id]


async def test_without_from_start_only_events_published_after_the_start_are_shown(
    cli_env, publisher_channel, admin_channel
):
    # An existing subscription with a backlog: what the durable name remembers is not shown.
    await publish(publisher_channel, "first")
    code, _, err = await lodestar(
        "events", "tail", "--from-start", "--limit", "1", "--subscription", "cli-new", env=cli_env
    )
    assert code == 0, err
    await publish(publisher_channel, "old-1", "old-2")

    tail = asyncio.create_task(
        lodestar("events", "tail", "--limit", "1", "--subscription", "cli-new", env=cli_env)
    )
    await until_connected(admin_channel, "cli-new")
    [new_id] = await publish(publisher_channel, "new")
    code, out, err = await tail
    assert code == 0, err
    lines = printed(out)
    assert [line["id"] for line in lines] == [new_id]
    assert lines[0]["data"]["model"] == "new"
    state = await subscription(admin_channel, "cli-new")
    assert state is not None
    assert state.lag == 0, "the skipped backlog was acknowledged"


async def test_tail_prints_snake_case_json(cli_env, publisher_channel):
    event = new_event(
        usage.RequestCompleted(
            model="m", provider="p", reported_cost=usage.Money(currency="USD", micros=42)
        ),
        source="test://cli",
    )
    await bus_pb2_grpc.EventBusServiceStub(publisher_channel).Publish(
        bus_pb2.PublishRequest(events=[event])
    )
    code, out, err = await lodestar("events", "tail", "--from-start", "--limit", "1", env=cli_env)
    assert code == 0, err
    [line] = printed(out)
    assert line["data"]["reported_cost"] == {"currency": "USD", "micros": "42"}
    assert "reportedCost" not in out


async def test_tail_gives_up_on_an_unreachable_core_with_one_line(cli_env):
    address = f"127.0.0.1:{free_port()}"
    code, out, err = await lodestar("events", "tail", "--target", address, env=cli_env, timeout=60)
    assert code == 1
    assert out == ""
    assert one_line(err).startswith(f"cannot reach core at {address} (UNAVAILABLE")


async def test_a_second_tail_on_a_subscription_in_use_fails_with_one_line_naming_the_flag(
    cli_env, admin_channel
):
    first = await start("events", "tail", "--subscription", "cli-busy", env=cli_env)
    try:
        await until_connected(admin_channel, "cli-busy")
        code, _, err = await lodestar(
            "events", "tail", "--subscription", "cli-busy", env=cli_env, timeout=30
        )
        assert code == 1
        line = one_line(err)
        assert "already connected" in line
        assert line.startswith("FAILED_PRECONDITION: --subscription:")
    finally:
        first.kill()
        await first.communicate()


async def test_publish_with_core_down_is_one_line(cli_env):
    address = f"127.0.0.1:{free_port()}"
    code, out, err = await lodestar(
        "publish", TYPE, '{"model": "m", "provider": "p"}', "--target", address, env=cli_env
    )
    assert code == 1
    assert out == ""
    assert one_line(err).startswith(f"cannot reach core at {address}")


async def test_publish_prints_the_id_core_stored(cli_env, admin_channel):
    code, out, err = await lodestar(
        "publish", TYPE, '{"model": "m1", "provider": "p"}', env=cli_env
    )
    assert code == 0, err
    event_id = out.strip()
    code, out, err = await lodestar("events", "tail", "--from-start", "--limit", "1", env=cli_env)
    assert [line["id"] for line in printed(out)] == [event_id]


async def test_dead_letters_of_an_unknown_subscription_name_the_flag(cli_env):
    code, _, err = await lodestar(
        "dead-letters", "list", "--subscription", "no-such-one", env=cli_env
    )
    assert code == 1
    line = one_line(err)
    assert line.startswith("NOT_FOUND: --subscription: no subscription named 'no-such-one'")


async def test_pointing_core_commands_at_another_service_says_so(cli_env, tracker):
    code, _, err = await lodestar("modules", "--target", tracker.target, env=cli_env)
    assert code == 1
    line = one_line(err)
    assert f"core at {tracker.target} does not serve this call" in line
    assert "is --target the address of core?" in line


async def test_budget_refusals_name_the_flags(cli_env, tracker):
    env = {**cli_env, "LODESTAR_USAGE_ENDPOINT": tracker.target}
    code, out, err = await lodestar(
        "budgets", "create", "--name", "a", "--scope", "project", "--limit-usd", "1", env=env
    )
    assert code == 1, out
    line = one_line(err)
    assert line.startswith("INVALID_ARGUMENT: --value:")
    assert "scope_value" not in line


async def test_prices_set_list_and_delete(cli_env, tracker):
    env = {**cli_env, "LODESTAR_USAGE_ENDPOINT": tracker.target}
    code, out, err = await lodestar(
        "prices", "set", "cli-model-*", "--input", "3", "--output", "15.5",
        "--valid-from", "2026-01-01", env=env,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = await lodestar("prices", "list", "--model", "cli-model-x", "--json", env=env)
    assert code == 0, err
    [price] = [p for p in json.loads(out) if p["model_pattern"] == "cli-model-*"]
    assert price["input_micros_per_mtok"] == 3_000_000
    assert price["output_micros_per_mtok"] == 15_500_000
    assert price["reasoning_micros_per_mtok"] == 15_500_000  # unset: the output price
    code, out, err = await lodestar(
        "prices", "delete", "cli-model-*", "--valid-from", "2026-01-01", env=env
    )
    assert code == 0, err
    code, out, err = await lodestar(
        "prices", "delete", "cli-model-*", "--valid-from", "2026-01-01", env=env
    )
    assert code == 1
    assert "no price for cli-model-*" in one_line(err)


async def test_prices_import_from_a_cost_map_file_and_their_history(cli_env, tracker, tmp_path):
    env = {**cli_env, "LODESTAR_USAGE_ENDPOINT": tracker.target}
    cost_map = tmp_path / "cost-map.json"
    cost_map.write_text(
        json.dumps(
            {
                "cli-llm": {
                    "mode": "chat", "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05
                },
                "cli-painter": {"mode": "image_generation", "output_cost_per_image": 0.04},
            }
        )
    )  # fmt: skip
    for day in ("2026-01-01", "2026-06-01"):
        code, out, err = await lodestar(
            "prices", "import", "--file", str(cost_map), "--valid-from", day, env=env
        )
        assert code == 0, err
    assert "imported 1 prices from cost map file cost-map.json, from 2026-06-01: 1 added" in out
    assert "skipped 1: priced per image_generation call, not per token" in out
    code, out, err = await lodestar("prices", "history", "cli-llm", "--json", env=env)
    assert code == 0, err
    history = json.loads(out)
    assert [(p["valid_from"], p["input_micros_per_mtok"]) for p in history] == [
        ("2026-01-01", 3_000_000),
        ("2026-06-01", 3_000_000),
    ]
    assert {p["source"] for p in history} == {"cost map file cost-map.json"}
    code, out, err = await lodestar(
        "prices", "import", "--file", str(tmp_path / "no.json"), env=env
    )
    assert code == 1
    assert "cannot read the cost map" in one_line(err)


async def test_publish_refuses_what_core_would_refuse_naming_the_field(cli_env):
    """Negative tokens: refused before sending (exit 2, the field named), nothing stored."""
    code, _, err = await lodestar(
        "publish", TYPE, '{"model": "m", "provider": "p", "tokens": {"input": -5}}', env=cli_env
    )
    assert code == 2
    assert "tokens.input: -5 outside" in err
    code, out, err = await lodestar("events", "tail", "--from-start", "--limit", "1", env=cli_env)
    assert (code, out) == (0, ""), err


async def test_mutual_tls_through_the_connection_options(
    core_starter,
    core_settings,
    pki,  # noqa: F811 (the fixture imported from test_tls)
    tokens,
    tmp_path,
):
    core = await core_starter(_tls_settings(core_settings, pki, mutual=True))
    env = {"LODESTAR_TOKEN": tokens[Role.ADMIN], "LODESTAR_STATE_DIR": str(tmp_path / "none")}
    tls = ["--target", core.target, "--tls-ca", str(pki["ca"]), "--tls-server-name", SERVER_NAME]
    client = ["--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
    code, out, err = await lodestar("modules", *tls, *client, env=env)
    assert code == 0, err
    assert "modules" in out

    code, _, err = await lodestar("modules", *tls, env=env)  # no client certificate
    assert code == 1
    assert "Traceback" not in err
    code, _, err = await lodestar("modules", "--target", core.target, env=env)  # plaintext
    assert code == 1
    assert one_line(err).startswith(f"cannot reach core at {core.target}")


async def test_tail_reconnects_when_core_restarts_and_prints_what_came_after(
    core_starter, core_settings, tokens, tmp_path
):
    port = free_port()
    settings = core_settings.model_copy(update={"port": port})
    core = await core_starter(settings)
    env = {
        "LODESTAR_CORE_ENDPOINT": core.target,
        "LODESTAR_TOKEN": tokens[Role.ADMIN],
        "LODESTAR_STATE_DIR": str(tmp_path / "none"),
    }
    tail = await start("events", "tail", "--limit", "1", "--subscription", "cli-restart", env=env)
    try:
        async with connect(core.target, tokens[Role.ADMIN]) as admin:
            await until_connected(admin, "cli-restart")
        await core.stop()
        core = await core_starter(settings)
        async with connect(core.target, tokens[Role.ADMIN]) as admin:
            await until_connected(admin, "cli-restart")
            [event_id] = await publish(admin, "after-restart")
        out, err = await asyncio.wait_for(tail.communicate(), 60)
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
    assert tail.returncode == 0, err.decode()
    assert [line["id"] for line in printed(out.decode())] == [event_id]
    assert "Traceback" not in err.decode()


async def test_audit_names_the_service_it_could_not_reach(cli_env):
    address = f"127.0.0.1:{free_port()}"
    code, _, err = await lodestar("audit", env={**cli_env, "LODESTAR_USAGE_ENDPOINT": address})
    assert code == 1
    assert one_line(err).startswith(f"cannot reach usage-tracker at {address}")


async def test_tail_into_a_reader_that_goes_away_ends_quietly(cli_env, publisher_channel):
    """`lodestar events tail | head -n 1`: once head has gone the tail ends, status 0, no trace."""
    await publish(publisher_channel, *(f"m{i}" for i in range(3)))
    command = (
        f"{sys.executable} -m lodestar.common.cli events tail --from-start --subscription cli-pipe"
        ' | head -n 1; echo "tail-status=${PIPESTATUS[0]}" >&2'
    )
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        env={**os.environ, **cli_env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert shell.stdout is not None
        first = await asyncio.wait_for(shell.stdout.readline(), 30)
        assert json.loads(first)["data"]["model"] == "m0"
        await publish(publisher_channel, "after-head-left")
        _, err = await asyncio.wait_for(shell.communicate(), 30)
    finally:
        if shell.returncode is None:
            shell.kill()
            await shell.wait()
    errors = err.decode()
    assert "tail-status=0" in errors, errors
    assert "Traceback" not in errors
    assert "BrokenPipe" not in errors


async def test_subscriptions_delete_forgets_a_tails_subscription(
    cli_env, publisher_channel, admin_channel
):
    await publish(publisher_channel, "m")
    code, _, err = await lodestar(
        "events", "tail", "--from-start", "--limit", "1", "--subscription", "done-with", env=cli_env
    )
    assert code == 0, err
    assert await subscription(admin_channel, "done-with") is not None
    code, out, err = await lodestar("subscriptions", "--delete", "done-with", env=cli_env)
    assert code == 0, err
    assert "deleted subscription done-with" in out
    assert await subscription(admin_channel, "done-with") is None
    code, _, err = await lodestar("subscriptions", "--delete", "done-with", env=cli_env)
    assert code == 1
    assert one_line(err).startswith("NOT_FOUND: --delete: no subscription named 'done-with'")
