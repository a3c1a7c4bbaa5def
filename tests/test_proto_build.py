"""The generated code in tandem/v1 must match what grpcio-tools makes from protos/ now."""
from __future__ import annotations

from pathlib import Path


def test_generated_code_is_not_stale(tmp_path: Path):
    from tandem._proto import build

    import tandem.v1  # noqa: F401  (builds on first import when missing)

    build.generate(tmp_path)
    for name in build.GENERATED:
        fresh = (tmp_path / "tandem" / "v1" / name).read_text()
        assert (build.OUT / name).read_text() == fresh, f"{name} is stale: run python -m tandem._proto.build"
    assert not build.is_stale()


def test_stale_detection_sees_a_changed_proto(monkeypatch):
    from tandem._proto import build

    monkeypatch.setattr(build, "sources_digest", lambda: "0" * 64)
    assert build.is_stale()
