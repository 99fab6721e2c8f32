"""The generated gRPC code must match the .proto files (regenerate with ``teleread proto gen``)."""

import shutil

from teleread import protogen


def test_generated_code_matches_proto() -> None:
    assert protogen.drift() == []


def test_drift_is_detected(tmp_path, monkeypatch) -> None:
    # on a copy of the contract: the checkout's files stay as they are for tests running beside this one
    root = tmp_path / "proto"
    shutil.copytree(protogen.PROTO_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(protogen, "PROTO_ROOT", root)
    monkeypatch.setattr(protogen, "PROTO_DIR", root / "teleread" / "v1")
    assert protogen.drift() == []
    generated = protogen.PROTO_DIR / "common_pb2.pyi"
    generated.write_bytes(generated.read_bytes() + b"\n# edited by hand\n")
    assert protogen.drift() == ["common_pb2.pyi"]
