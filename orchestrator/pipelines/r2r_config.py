"""The `r2r` pipeline's config section and per-request params, and the checks that run when the config
loads: both models defined and hosted, one tokenizer for both, a router made for the SLM's hidden size."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.pipelines.base import Params, check_hosted
from routing.deciders import BASELINES

if TYPE_CHECKING:
    from orchestrator.config import TandemConfig

BASELINE_THRESHOLDS = {name: cls.default_threshold for name, cls in BASELINES.items()}


class R2RConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slm: str = Field(min_length=1, description="the small model: proposes every token")
    llm: str = Field(min_length=1, description="the large model: writes the tokens the decider flags")
    router: str | None = Field(None, description="a router checkpoint directory (router.json + router.safetensors)")
    decider: str = Field("", description='default decider; empty: "router" with a router, else "entropy"')
    threshold: float | None = Field(None, ge=0, le=1, description="the default decider's threshold; "
                                    "unset: the router's calibrated threshold, else the decider's default")
    min_threshold: float = Field(0.0, ge=0, le=1, description="lowest per-request threshold accepted")
    max_threshold: float = Field(1.0, ge=0, le=1, description="highest per-request threshold accepted")
    seed: int = Field(0, ge=0, description="seed of the random decider on each SLM worker")
    llm_prefill: Literal["lazy", "eager"] = Field(
        "lazy", description='co-located: "lazy", the LLM reads the prompt at the first hand-off (fastest first '
        'token); "eager", it prefills the prompt when the request arrives (no prompt-long stall mid-stream)')
    llm_stream: bool = Field(True, description="co-located on CUDA: the LLM's work on a CUDA stream of its "
                             "own, so a hand-off's catch-up runs beside the SLM step already launched")

    @model_validator(mode="after")
    def _defaults(self) -> R2RConfig:
        if self.router is not None:
            self.router = str(Path(self.router).expanduser().resolve())
        self.decider = self.decider or ("router" if self.router else "entropy")
        if self.decider not in self.deciders:
            raise ValueError(f"decider: {self.decider!r} is not one of {self.deciders}")
        if self.min_threshold > self.max_threshold:
            raise ValueError(f"min_threshold: {self.min_threshold} is above max_threshold {self.max_threshold}")
        if self.threshold is None:
            self.threshold = self.default_threshold(self.decider)
        if not self.min_threshold <= self.threshold <= self.max_threshold:
            raise ValueError(f"threshold: {self.threshold} is outside [{self.min_threshold}, {self.max_threshold}]")
        return self

    @property
    def deciders(self) -> list[str]:
        return (["router"] if self.router else []) + list(BASELINE_THRESHOLDS)

    def default_threshold(self, decider: str) -> float:
        if decider == self.decider and self.threshold is not None:
            return self.threshold
        if decider == "router":
            return router_config(self.router)["threshold"]
        return BASELINE_THRESHOLDS[decider]

    def worker_spec(self, hosted: list[str]) -> dict | None:
        """What a worker hosting `hosted` needs to run this pipeline's SLM side (`--r2r`), or None."""
        if self.slm not in hosted:
            return None
        return {"slm": self.slm, "llm": self.llm if self.llm in hosted else None, "router": self.router,
                "decider": self.decider, "seed": self.seed, "llm_prefill": self.llm_prefill,
                "llm_stream": self.llm_stream}


class R2RParams(Params):
    decider: str = Field("", description="router, entropy, random or forced; empty: the pipeline's default")
    threshold: float | None = Field(None, ge=0, le=1, description="0: every token to the LLM, 1: none; "
                                    "random: 1 - the LLM share; unset: the pipeline's default")


def check_against_server(config: R2RConfig, server: TandemConfig, key: str) -> None:
    check_hosted(server, key, [("slm", config.slm), ("llm", config.llm)])
    if config.slm == config.llm:
        raise ValueError(f"{key}.llm: must differ from slm ({config.slm!r})")
    slm, llm = (server.model(n) for n in (config.slm, config.llm))
    slm_path, llm_path = resolve(slm.path, f"models {slm.name!r}"), resolve(llm.path, f"models {llm.name!r}")
    differ = tokenizer_difference(str(slm_path), str(llm_path))
    if differ:
        raise ValueError(f"{key}: models {slm.name!r} ({slm.path}) and {llm.name!r} ({llm.path}) have different "
                         f"tokenizers ({differ}); r2r needs one tokenizer for both")
    if config.router is not None:
        size, slm_size = router_config(config.router)["hidden_size"], hidden_size(str(slm_path))
        if size != slm_size:
            raise ValueError(f"{key}.router: checkpoint {config.router} was made for hidden size {size}, but the "
                             f"SLM {slm.name!r} has hidden size {slm_size}")


def resolve(path: str, what: str) -> Path:
    from tandem import assets
    from tandem.errors import TandemError

    try:
        return assets.resolve(path)
    except TandemError as e:
        raise ValueError(f"{what}: {e}") from None


def router_config(directory: str | None) -> dict:
    from routing.router import CONFIG, WEIGHTS

    d = Path(directory or "")
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise ValueError(f"router: {d / name} does not exist (a router checkpoint holds {CONFIG} and {WEIGHTS})")
    try:
        data = json.loads((d / CONFIG).read_text())
        return {"hidden_size": int(data["hidden_size"]), "threshold": float(data.get("threshold", 0.5))}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"router: {d / CONFIG} is not a valid router config: {e}") from None


def tokenizer_difference(a: str, b: str) -> str:
    """Empty when both models read and write token ids alike: the same vocabulary and merges (from their
    tokenizer.json, or the loaded tokenizers' vocabularies for GGUF files) and the same end-of-sequence ids."""
    files = [Path(p) / "tokenizer.json" for p in (a, b)]
    from_files = all(f.is_file() for f in files)
    (na, ha), (nb, hb) = (_vocabulary(p, from_files) for p in (a, b))
    if na != nb:
        return f"vocabulary sizes {na} and {nb}"
    if ha != hb:
        return f"the same vocabulary size {na} but different tokens or merges"
    ea, eb = _eos_ids(a), _eos_ids(b)
    if ea != eb:
        return f"end-of-sequence ids {sorted(ea)} and {sorted(eb)}"
    return ""


@functools.lru_cache(maxsize=32)
def _vocabulary(path: str, from_file: bool) -> tuple[int, str]:
    """(number of tokens, digest of the token table and merges)."""
    if from_file:
        data = json.loads((Path(path) / "tokenizer.json").read_text())
        model, added = data.get("model") or {}, {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        vocab = model.get("vocab") or {}
        size = len({**vocab, **added}) if isinstance(vocab, dict) else len(vocab) + len(added)
        table = [model, sorted(added.items())]
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        p = Path(path)
        try:
            tok = (AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name) if p.is_file()
                   else AutoTokenizer.from_pretrained(p))
        except Exception as e:
            raise ValueError(f"{path}: tokenizer could not be loaded: {e}") from None
        vocab = tok.get_vocab()
        size, table = len(vocab), sorted(vocab.items())
    return size, hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def _eos_ids(path: str) -> frozenset[int]:
    eos = _config(path).get("eos_token_id")
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def hidden_size(path: str) -> int:
    return int(_config(path)["hidden_size"])


@functools.lru_cache(maxsize=32)
def _config(path: str) -> dict:
    """The model's (text) config: config.json of a directory, or the header of a GGUF file."""
    p = Path(path)
    try:
        if p.is_dir():
            data = json.loads((p / "config.json").read_text())
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoConfig

            data = AutoConfig.from_pretrained(p.parent, gguf_file=p.name).to_dict()
    except Exception as e:
        raise ValueError(f"{path}: config could not be read: {e}") from None
    return data.get("text_config") or data
