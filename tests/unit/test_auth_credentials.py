"""Credentials files (several tokens per principal, expiry, reload), rate limits, the role-table
check at start-up, and ``lodestar tokens``."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from lodestar.common import auth
from lodestar.common.auth import (
    Credentials,
    CredentialsFile,
    Principal,
    Role,
    check_method_roles,
    hash_token,
    new_token,
    write_credentials,
    write_private_file,
)
from lodestar.common.cli import app
from lodestar.common.config import ServiceSettings, load_settings
from lodestar.common.errors import AuthenticationError, ConfigurationError
from lodestar.common.module import HealthReport, HealthState, Module
from lodestar.common.ratelimit import RateLimiter, RateLimitSettings, TokenBucketLimit
from lodestar.common.server import ServiceRunner
from lodestar.common.tokens_cli import parse_duration
from lodestar.core.v1 import bus_pb2_grpc
from lodestar_core.service import CoreModule
from lodestar_core.settings import CoreSettings
from lodestar_usage.service import UsageModule
from lodestar_usage.settings import UsageSettings

NOW = datetime.now(UTC).replace(microsecond=0)
BUS = "lodestar.core.v1.EventBusService"
REGISTRY_SERVICE = "lodestar.core.v1.RegistryService"


def entry(name: str, role: str, token: str, expires_at: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "role": role, "token_sha256": hash_token(token)}
    if expires_at is not None:
        out["expires_at"] = expires_at
    return out


def write_entries(path: Path, *entries: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump({"principals": list(entries)}))


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append(("error", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


# --- the file -----------------------------------------------------------------------------------


def test_a_principal_may_hold_several_tokens_with_expiry(tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    old, new, other = new_token(), new_token(), new_token()
    write_entries(
        path,
        entry("gateway", "publisher", old, stamp(NOW + timedelta(hours=1))),
        entry("gateway", "publisher", new),
        entry("usage-tracker", "module", other, "2999-01-01T00:00:00+02:00"),
    )
    credentials = Credentials.load(path)
    assert credentials.check(old) == Principal("gateway", Role.PUBLISHER)
    assert credentials.check(new) == Principal("gateway", Role.PUBLISHER)
    assert credentials.check(other) == Principal("usage-tracker", Role.MODULE)
    expiries = [e.expires_at for e in credentials.entries]
    assert expiries[0] == NOW + timedelta(hours=1)
    assert expiries[1] is None
    assert expiries[2] == datetime(2998, 12, 31, 22, tzinfo=UTC)


def test_expired_token_is_refused_saying_it_expired(tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    expired, current = new_token(), new_token()
    write_entries(
        path,
        entry("gateway", "publisher", expired, stamp(NOW - timedelta(seconds=5))),
        # from the run's clock, not NOW (collection time): the suite may take over 5 minutes
        entry("gateway", "publisher", current, stamp(datetime.now(UTC) + timedelta(minutes=5))),
    )
    credentials = Credentials.load(path)
    with pytest.raises(AuthenticationError) as caught:
        credentials.check(expired)
    assert "expired" in caught.value.message
    assert stamp(NOW - timedelta(seconds=5)) in caught.value.message
    assert "gateway" in caught.value.message
    assert expired not in caught.value.message
    assert credentials.authenticate(expired) is None
    assert credentials.check(current).name == "gateway"
    with pytest.raises(AuthenticationError) as unknown:
        credentials.check("never-issued")
    assert "not known" in unknown.value.message
    assert "expired" not in unknown.value.message


def test_unquoted_yaml_times_and_naive_times_are_utc(tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    one, two = new_token(), new_token()
    path.write_text(
        "principals:\n"
        f"  - {{name: a, role: admin, token_sha256: {hash_token(one)}, "
        "expires_at: 2999-01-01T10:00:00Z}\n"
        f"  - {{name: b, role: admin, token_sha256: {hash_token(two)}, "
        "expires_at: '2999-01-01T10:00:00'}\n"
    )
    times = [e.expires_at for e in Credentials.load(path).entries]
    assert times == [datetime(2999, 1, 1, 10, tzinfo=UTC)] * 2


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [entry("gw", "publisher", "a"), entry("gw", "admin", "b")],
            "principal 'gw' has role admin here but publisher",
        ),
        ([entry("gw", "publisher", "a"), entry("other", "module", "a")], "listed twice"),
        ([entry("gw", "publisher", "a", "next tuesday")], "principals[0].expires_at"),
        ([entry("gw", "publisher", "a", 1700000000)], "RFC 3339"),
        ([{"name": "gw", "role": "publisher", "token_sha256": "0x" + "a" * 62}], "64-hex"),
        ([entry("gw", "root", "a")], "principals[0].role must be one of"),
        (["not a mapping"], "principals[0] must be a mapping"),
    ],
)
def test_bad_credentials_files_are_refused_naming_the_entry(
    tmp_path: Path, entries: list[Any], message: str
) -> None:
    path = tmp_path / "credentials.yaml"
    path.write_text(yaml.safe_dump({"principals": entries}))
    with pytest.raises(ConfigurationError) as caught:
        Credentials.load(path)
    assert message in caught.value.message


def test_credentials_are_written_atomically_for_the_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "credentials.yaml"
    token = new_token()
    write_credentials(path, {"gw": (Role.PUBLISHER, token)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Credentials.load(path).check(token).name == "gw"
    inode = path.stat().st_ino
    write_private_file(path, path.read_text())
    assert path.stat().st_ino != inode, "replaced by rename, not rewritten in place"
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.yaml"]


# --- reload -------------------------------------------------------------------------------------


def test_a_changed_file_is_reloaded_after_the_check_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(auth, "log", recorder)
    path, clock = tmp_path / "credentials.yaml", FakeClock()
    first, second = new_token(), new_token()
    write_entries(path, entry("gw", "publisher", first))
    credentials = CredentialsFile(path, check_interval=1.0, clock=clock)
    write_entries(path, entry("gw", "publisher", second))
    with pytest.raises(AuthenticationError):
        credentials.check(second)  # not looked at before a second has passed
    assert credentials.check(first).name == "gw"
    clock.now += 1.0
    assert credentials.check(second).name == "gw"
    with pytest.raises(AuthenticationError):
        credentials.check(first)
    assert [line[1] for line in recorder.lines] == ["credentials reloaded"]


def test_a_broken_new_file_keeps_the_old_credentials_and_logs_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(auth, "log", recorder)
    path, clock = tmp_path / "credentials.yaml", FakeClock()
    token = new_token()
    write_entries(path, entry("gw", "publisher", token))
    credentials = CredentialsFile(path, check_interval=1.0, clock=clock)
    write_entries(path, entry("gw", "publisher", "x"), entry("gw", "admin", "y"))
    clock.now += 5
    assert credentials.check(token).name == "gw"
    clock.now += 5
    assert credentials.check(token).name == "gw"
    errors = [line for line in recorder.lines if line[0] == "error"]
    assert len(errors) == 1, "reported once per change, not on every check"
    assert "keeping the previous credentials" in errors[0][1]
    assert "'gw' has role admin" in errors[0][2]["error"]
    path.unlink()
    clock.now += 5
    assert credentials.check(token).name == "gw"
    assert len([line for line in recorder.lines if line[0] == "error"]) == 2


# --- rate limits --------------------------------------------------------------------------------


def limiter(clock: FakeClock, **settings: Any) -> RateLimiter:
    return RateLimiter(RateLimitSettings.model_validate(settings), clock=clock)


def refused_total(principal: str, role: str) -> float:
    value = REGISTRY.get_sample_value(
        "lodestar_rate_limited_total", {"principal": principal, "role": role}
    )
    return value or 0.0


def test_bucket_allows_a_burst_then_refuses_with_a_retry_delay_and_refills() -> None:
    clock = FakeClock()
    gate = limiter(clock, roles={"publisher": {"rate_per_second": 2, "burst": 3}})
    gw = Principal("gw-burst", Role.PUBLISHER)
    before = refused_total("gw-burst", "publisher")
    assert [gate.refusal(gw) for _ in range(3)] == [None, None, None]
    refused = gate.refusal(gw)
    assert refused is not None
    assert refused.retry_after == pytest.approx(0.5)
    assert "gw-burst (publisher)" in refused.message
    assert "2 calls per second with bursts of 3" in refused.message
    assert refused_total("gw-burst", "publisher") == before + 1
    clock.now += 0.5
    assert gate.refusal(gw) is None
    assert gate.refusal(gw) is not None
    clock.now += 60  # refills to the burst, no further
    assert [gate.refusal(gw) is None for _ in range(4)] == [True, True, True, False]


def test_principal_limit_overrides_its_role_and_others_are_unaffected() -> None:
    clock = FakeClock()
    gate = limiter(
        clock,
        roles={"publisher": {"rate_per_second": 1, "burst": 1}, "admin": None},
        principals={"bulk": {"rate_per_second": 100, "burst": 50}, "free": None},
    )
    assert gate.wait_seconds(Principal("gw", Role.PUBLISHER)) == 0
    assert gate.wait_seconds(Principal("gw", Role.PUBLISHER)) == pytest.approx(1.0)
    assert all(gate.wait_seconds(Principal("gw2", Role.PUBLISHER)) == 0 for _ in range(1))
    assert all(gate.wait_seconds(Principal("bulk", Role.PUBLISHER)) == 0 for _ in range(50))
    assert gate.wait_seconds(Principal("bulk", Role.PUBLISHER)) > 0
    assert all(gate.wait_seconds(Principal("free", Role.PUBLISHER)) == 0 for _ in range(1000))
    assert all(gate.wait_seconds(Principal("root", Role.ADMIN)) == 0 for _ in range(1000))


def test_burst_defaults_to_one_second_and_limits_can_be_turned_off() -> None:
    clock = FakeClock()
    gate = limiter(clock, roles={"module": {"rate_per_second": 2.5}})
    mod = Principal("mod", Role.MODULE)
    assert [gate.wait_seconds(mod) == 0 for _ in range(4)] == [True, True, True, False]
    off = limiter(clock, enabled=False, roles={"module": {"rate_per_second": 1, "burst": 1}})
    assert all(off.wait_seconds(mod) == 0 for _ in range(100))


def test_default_limits_are_generous() -> None:
    defaults = RateLimitSettings()
    expected = {
        Role.PUBLISHER: (10_000, 20_000),
        Role.MODULE: (5_000, 10_000),
        Role.ADMIN: (2_000, 10_000),
    }
    for role, (rate, burst) in expected.items():
        limit = defaults.limit_for(Principal("x", role))
        assert limit is not None
        assert (limit.rate_per_second, limit.capacity) == (rate, burst)


def test_rate_limits_come_from_config_files_and_environment(tmp_path: Path) -> None:
    (tmp_path / "lodestar.yaml").write_text(
        "rate_limits:\n  roles:\n    module: {rate_per_second: 7, burst: 9}\n"
        "  principals:\n    gw: {rate_per_second: 3}\n"
    )
    settings = load_settings(
        ServiceSettings,
        "core",
        config_dir=tmp_path,
        env={
            "LODESTAR_RATE_LIMITS__ROLES__PUBLISHER__RATE_PER_SECOND": "50",
            "LODESTAR_RATE_LIMITS__ROLES__ADMIN": "null",
        },
    )
    limits = settings.rate_limits
    assert limits.roles.module == TokenBucketLimit(rate_per_second=7, burst=9)
    assert limits.roles.publisher == TokenBucketLimit(rate_per_second=50)
    assert limits.roles.admin is None
    assert limits.limit_for(Principal("gw", Role.PUBLISHER)) == TokenBucketLimit(rate_per_second=3)


def test_bad_rate_limit_names_the_field_and_layer(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(
            ServiceSettings,
            "core",
            config_dir=tmp_path,
            env={"LODESTAR_RATE_LIMITS__ROLES__PUBLISHER__RATE_PER_SECOND": "0"},
        )
    message = caught.value.message
    assert "rate_limits.roles.publisher.rate_per_second" in message
    assert "LODESTAR_RATE_LIMITS__ROLES__PUBLISHER__RATE_PER_SECOND" in message


# --- the role table -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module", [CoreModule(CoreSettings()), UsageModule(UsageSettings())], ids=lambda m: m.name
)
async def test_the_shipped_role_tables_name_real_methods(module: Module) -> None:
    server = grpc.aio.server()
    check_method_roles(module.method_roles(), module.add_to_server(server))
    assert module.method_roles(), "a table to check"


def test_a_misspelt_method_is_refused_naming_it_and_the_known_methods() -> None:
    roles = {
        f"/{BUS}/Publish": frozenset({Role.PUBLISHER}),
        f"/{BUS}/Publsh": frozenset({Role.PUBLISHER}),
        f"/{REGISTRY_SERVICE}/Register": frozenset({Role.MODULE}),
    }
    with pytest.raises(ConfigurationError) as caught:
        check_method_roles(roles, [BUS, REGISTRY_SERVICE])
    message = caught.value.message
    assert f"'/{BUS}/Publsh'" in message
    assert "Publish, PublishStream, Subscribe" in message
    assert "ReplayDeadLetters" in message


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/lodestar.core.v1.RegistryService/Register", "which this module does not serve"),
        ("/lodestar.core.v1.EventBus/Publish", "names service 'lodestar.core.v1.EventBus'"),
        ("lodestar.core.v1.EventBusService/Publish", "not a full method name"),
        ("/lodestar.core.v1.EventBusService/Publish/x", "not a full method name"),
    ],
)
def test_methods_of_other_services_or_malformed_names_are_refused(
    method: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_method_roles({method: frozenset({Role.MODULE})}, [BUS])
    assert message in caught.value.message


class MisspeltModule(Module):
    """Serves the bus but names a method it does not have."""

    name = "misspelt"

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        bus_pb2_grpc.add_EventBusServiceServicer_to_server(
            bus_pb2_grpc.EventBusServiceServicer(),
            server,  # type: ignore[arg-type]
        )
        return [BUS]

    def method_roles(self) -> Mapping[str, frozenset[Role]]:
        return {f"/{BUS}/Subscibe": frozenset({Role.MODULE})}

    async def start(self) -> None:
        raise AssertionError("must not start")

    async def stop(self) -> None:
        pass

    async def health_check(self) -> HealthReport:
        return HealthReport(HealthState.DOWN, 0, "", 0)


def test_start_up_fails_on_a_misspelt_method(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials.yaml"
    write_credentials(credentials, {"a": (Role.ADMIN, new_token())})
    settings = ServiceSettings(port=0, metrics_port=-1, credentials_file=credentials)
    runner = ServiceRunner(MisspeltModule(), settings)
    with pytest.raises(ConfigurationError) as caught:
        asyncio.run(runner.run(handle_signals=False))
    assert "Subscibe" in caught.value.message
    assert "Subscribe" in caught.value.message.replace("Subscibe", "")


# --- lodestar tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("0", 0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1 hour", "-5m", "5x", "1h 30m", "100000d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|maximum"):
        parse_duration(text)


@pytest.fixture
def state(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A state dir as `lodestar up` leaves it: tokens.yaml and credentials.yaml."""
    tokens = {"admin": new_token(), "publisher": new_token(), "core": new_token()}
    write_private_file(tmp_path / "tokens.yaml", yaml.safe_dump(tokens))
    write_credentials(
        tmp_path / "credentials.yaml",
        {
            "admin": (Role.ADMIN, tokens["admin"]),
            "publisher": (Role.PUBLISHER, tokens["publisher"]),
            "core": (Role.MODULE, tokens["core"]),
        },
    )
    return tmp_path, tokens


def run_cli(*args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "LODESTAR_CREDENTIALS_FILE"}
    return CliRunner().invoke(app, list(args), env=env)


def test_rotate_adds_a_token_and_lets_the_old_one_expire_after_the_grace(
    state: tuple[Path, dict[str, str]],
) -> None:
    state_dir, tokens = state
    path = state_dir / "credentials.yaml"
    before = datetime.now(UTC)
    result = run_cli("tokens", "rotate", "publisher", "--state-dir", str(state_dir))
    assert result.exit_code == 0, result.output
    new = result.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", new), new  # 32 random bytes, URL-safe base64
    assert "\n" not in new, "the token alone on stdout"
    assert new not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    credentials = Credentials.load(path)
    assert credentials.check(new) == Principal("publisher", Role.PUBLISHER)
    assert credentials.check(tokens["publisher"]).name == "publisher", "valid during the grace"
    old = next(e for e in credentials.entries if e.token_sha256 == hash_token(tokens["publisher"]))
    assert old.expires_at is not None
    assert old.expires_at >= before + timedelta(hours=1), "the grace is never cut short"
    assert old.expires_at <= before + timedelta(hours=1, seconds=5)
    fresh = next(e for e in credentials.entries if e.token_sha256 == hash_token(new))
    assert fresh.expires_at is None
    assert credentials.check(tokens["admin"]).name == "admin", "other principals untouched"
    assert [e.expires_at for e in credentials.entries if e.principal.name != "publisher"] == [
        None,
        None,
    ]
    assert yaml.safe_load((state_dir / "tokens.yaml").read_text())["publisher"] == new
    assert "fingerprint" in result.stderr


def test_rotate_with_no_grace_and_a_lifetime(state: tuple[Path, dict[str, str]]) -> None:
    state_dir, tokens = state
    path = state_dir / "credentials.yaml"
    args = ("tokens", "rotate", "core", "--state-dir", str(state_dir))
    result = run_cli(*args, "--expire-old-in", "0", "--expires-in", "7d")
    assert result.exit_code == 0, result.output
    new = result.stdout.strip()
    credentials = Credentials.load(path)
    with pytest.raises(AuthenticationError) as caught:
        credentials.check(tokens["core"])
    assert "expired" in caught.value.message
    fresh = next(e for e in credentials.entries if e.token_sha256 == hash_token(new))
    assert fresh.expires_at is not None
    assert fresh.expires_at - datetime.now(UTC) > timedelta(days=6, hours=23)
    # a second rotation drops the token that has expired since
    again = run_cli(*args)
    assert again.exit_code == 0, again.output
    hashes = [e.token_sha256 for e in Credentials.load(path).entries]
    assert hash_token(tokens["core"]) not in hashes
    assert hash_token(new) in hashes


def test_rotate_refuses_unknown_principals_and_bad_durations(
    state: tuple[Path, dict[str, str]],
) -> None:
    state_dir, _ = state
    text = (state_dir / "credentials.yaml").read_text()
    result = run_cli("tokens", "rotate", "nobody", "--state-dir", str(state_dir))
    assert result.exit_code == 1
    assert "no principal 'nobody'" in result.stderr
    assert "admin, core, publisher" in result.stderr
    result = run_cli(
        "tokens", "rotate", "core", "--state-dir", str(state_dir), "--expire-old-in", "soon"
    )
    assert result.exit_code == 2
    assert "--expire-old-in" in result.stderr
    assert (state_dir / "credentials.yaml").read_text() == text, "nothing written"


def test_list_shows_fingerprints_and_expiry_never_tokens(
    state: tuple[Path, dict[str, str]],
) -> None:
    state_dir, tokens = state
    rotated = run_cli("tokens", "rotate", "admin", "--state-dir", str(state_dir))
    result = run_cli("tokens", "list", "--state-dir", str(state_dir))
    assert result.exit_code == 0, result.output
    for token in (*tokens.values(), rotated.stdout.strip()):
        assert token not in result.stdout
        assert hash_token(token)[:8] in result.stdout
        assert hash_token(token) not in result.stdout
    assert "never" in result.stdout
    assert result.stdout.count("valid") == 4
    assert "publisher" in result.stdout
