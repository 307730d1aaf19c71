"""``lodestar-learning serve`` and ``lodestar-learning migrate``."""

from lodestar.common.service_cli import service_app
from lodestar_learning.service import SPEC

app = service_app(SPEC)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
