"""Generate Python code and typed stubs from protos/ into libs/common/src.

Run as ``python scripts/gen_protos.py`` to write, or with ``--check`` to fail when the
committed generated code differs from what the protos produce.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "libs" / "common" / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    """Every .proto file under protos/, sorted."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    """Run protoc with the Python, gRPC and mypy plugins into ``out``."""
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def generated_files(root: Path) -> set[Path]:
    """Generated files below ``root``, relative to it."""
    return {
        p.relative_to(root)
        for p in (root / "lodestar").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    """Generate, or check that the committed code is current."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        wanted = generated_files(fresh)
        if options.check:
            have = generated_files(OUT_ROOT)
            stale = sorted(
                str(p)
                for p in wanted | have
                if p not in wanted
                or p not in have
                or not filecmp.cmp(fresh / p, OUT_ROOT / p, shallow=False)
            )
            if stale:
                print("generated code is stale; run `make proto`:", *stale, sep="\n  ")
                return 1
            print(f"generated code is current ({len(wanted)} files)")
            return 0
        for stale in generated_files(OUT_ROOT) - wanted:
            (OUT_ROOT / stale).unlink()
        for path in sorted(wanted):
            target = OUT_ROOT / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh / path, target)
        for directory in {(OUT_ROOT / p).parent for p in wanted}:
            for parent in [directory, *directory.parents]:
                if parent == OUT_ROOT or OUT_ROOT not in parent.parents:
                    break
                init = parent / "__init__.py"
                if not init.exists():
                    init.write_text('"""Generated protobuf package."""\n')
        print(f"generated {len(wanted)} files into {OUT_ROOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
