"""Regenerate (or check) the Python code of the gRPC contract from ``proto/teleread/v1/*.proto``.

``teleread proto gen`` writes ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` beside the .proto
files; ``teleread proto check`` regenerates into a temporary folder and reports any drift.
"""

from __future__ import annotations

import filecmp
import tempfile
from pathlib import Path

# The folder the .proto files are imported relative to: proto/ in a checkout, site-packages when
# installed (the package carries its .proto files beside the generated code).
PROTO_DIR = (
    Path(__file__).resolve().parent / "v1"
    if (Path(__file__).resolve().parent / "v1").is_dir()
    else (Path(__file__).resolve().parent.parent / "proto" / "teleread" / "v1")
)
PROTO_ROOT = PROTO_DIR.parent.parent


def _generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # imported here: grpcio-tools is a development dependency
    import importlib.resources

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_root / "teleread" / "v1").glob("*_pb2*.py*"))


def generate() -> list[Path]:
    """Write generated modules next to the .proto files."""
    return _generate(PROTO_ROOT)


def drift() -> list[str]:
    """Names of generated files that differ from what the .proto files produce now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generate(Path(tmp))
        problems = []
        for path in fresh:
            current = PROTO_DIR / path.name
            if not current.exists() or not filecmp.cmp(path, current, shallow=False):
                problems.append(path.name)
        for current in PROTO_DIR.glob("*_pb2*.py*"):
            if not (Path(tmp) / "teleread" / "v1" / current.name).exists():
                problems.append(current.name)
        return problems
