"""``lodestar-usage-tracker serve``, ``migrate`` and ``import-archive``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from lodestar.common.config import load_settings
from lodestar.common.db import create_pool
from lodestar.common.errors import ConfigurationError
from lodestar.common.service_cli import service_app
from lodestar_usage.retention import import_archive
from lodestar_usage.service import SPEC
from lodestar_usage.settings import UsageSettings

app = service_app(SPEC)


@app.command("import-archive")
def import_archive_command(
    manifest: Annotated[Path, typer.Argument(help="an archived partition's .manifest.json")],
    config_dir: Annotated[Path | None, typer.Option("--config-dir")] = None,
) -> None:
    """Put the rows of an archived ledger partition back into the ledger."""

    async def run() -> int:
        settings = load_settings(UsageSettings, SPEC.name, config_dir=config_dir)
        if settings.database.url is None:
            raise ConfigurationError("no database configured", field="database.url")
        pool = await create_pool(
            settings.database.url.get_secret_value(), settings.database.schema_name
        )
        try:
            return await import_archive(pool, manifest)
        finally:
            await pool.close()

    print(f"imported {asyncio.run(run())} rows")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
