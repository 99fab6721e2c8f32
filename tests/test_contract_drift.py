"""The generated gRPC code must match the .proto files (regenerate with ``teleread proto gen``)."""

from teleread import protogen


def test_generated_code_matches_proto() -> None:
    assert protogen.drift() == []


def test_drift_is_detected(tmp_path, monkeypatch) -> None:
    generated = protogen.PROTO_DIR / "common_pb2.pyi"
    original = generated.read_bytes()
    try:
        generated.write_bytes(original + b"\n# edited by hand\n")
        assert "common_pb2.pyi" in protogen.drift()
    finally:
        generated.write_bytes(original)
