"""The R2R router: (SLM last hidden state, embedding of the chosen token, top-k raw logits) -> MLP ->
probability that the SLM's token diverges from the LLM's path. Checkpoint: safetensors + JSON.

Inside, the top-k logits are taken as log-probabilities over the top k (so the SLM's confidence is a
feature, not only the gaps between logits), and every input feature is standardised with the training
set's mean and spread (the SLM's hidden states have a few dimensions hundreds of times larger than the
rest); both raised validation recall at 10-20% LLM tokens by 4-5 points (docs/r2r.md)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import tandem_kernels as kernels
from tandem.errors import TandemError
from workers.models.packed_linear import can_pack, pack_linears

WEIGHTS, CONFIG = "router.safetensors", "router.json"


class RouterCheckpointError(TandemError):
    """A router checkpoint that is missing, malformed or made for another SLM."""


@dataclass
class RouterConfig:
    hidden_size: int
    top_k: int = 100
    width: int = 1024
    depth: int = 6
    expansion: int = 4
    dropout: float = 0.1
    threshold: float = 0.5
    slm: str = ""
    llm: str = ""
    calibration: dict | None = None
    logit_features: str = "log_softmax"     # or "raw": the top-k logits as they come
    standardize: bool = True                # inputs standardised by the training set's statistics

    @classmethod
    def from_dict(cls, data: dict) -> RouterConfig:
        known = {f.name for f in fields(cls)}
        data = {"logit_features": "raw", "standardize": False, **data}   # checkpoints made before these keys
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.check_types()
        if config.logit_features not in LOGIT_FEATURES:
            raise TypeError(f"logit_features must be one of {LOGIT_FEATURES}, got {config.logit_features!r}")
        return config

    def check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, FIELD_TYPES[f.type]) or (isinstance(value, bool) and f.type != "bool"):
                raise TypeError(f"{f.name} must be of type {f.type}, got {value!r}")


LOGIT_FEATURES = ("raw", "log_softmax")
FIELD_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict | None": (dict, type(None))}


class Block(nn.Module):
    """Pre-LN residual MLP block."""

    def __init__(self, width: int, expansion: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, width * expansion)
        self.down = nn.Linear(width * expansion, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(self.drop(nn.functional.gelu(self.up(self.norm(x))))))


class Router(nn.Module):
    """Runs in fp32. The token embedding is the SLM's own input table, looked up, never trained or saved."""

    def __init__(self, config: RouterConfig, embedding: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        h, w = config.hidden_size, config.width
        self.embedding = embedding.detach() if embedding is not None else None
        if config.standardize:
            self.register_buffer("feature_mean", torch.zeros(2 * h + config.top_k))
            self.register_buffer("feature_std", torch.ones(2 * h + config.top_k))
        self.logits_proj = nn.Linear(config.top_k, h)
        self.input = nn.Sequential(nn.Linear(3 * h, w), nn.Linear(w, w))
        self.blocks = nn.ModuleList(Block(w, config.expansion, config.dropout) for _ in range(config.depth))
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, hidden: torch.Tensor, token_emb: torch.Tensor, topk_logits: torch.Tensor) -> torch.Tensor:
        """[B,H], [B,H], [B,k] -> divergence logit [B]."""
        x = self.inputs(hidden, token_emb, topk_logits)
        if self.config.standardize:
            x = (x - self.feature_mean) / self.feature_std
        h = self.config.hidden_size
        x = torch.cat([x[:, : 2 * h], self.logits_proj(x[:, 2 * h :])], dim=-1)
        x = self.input(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)

    def inputs(self, hidden: torch.Tensor, token_emb: torch.Tensor, topk_logits: torch.Tensor) -> torch.Tensor:
        """The features before standardisation, [B, 2H + k]."""
        topk = topk_logits.float()
        if self.config.logit_features == "log_softmax":
            topk = topk.log_softmax(-1)
        return torch.cat([hidden.float(), token_emb.float(), topk], dim=-1)

    @torch.no_grad()
    def fit_standardization(self, batches) -> None:
        """Mean and spread of each input feature over `batches` of (hidden, token_emb, topk_logits)."""
        assert self.config.standardize
        n, total, squares = 0, 0.0, 0.0
        for batch in batches:
            x = self.inputs(*batch).double()
            n, total, squares = n + len(x), total + x.sum(0), squares + (x * x).sum(0)
        assert n > 1, "standardisation needs at least two rows"
        mean = total / n
        std = ((squares / n - mean * mean).clamp_min(0) * n / (n - 1)).sqrt()
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float().clamp_min(1e-3))

    def features(self, hidden: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor):
        """From one SLM step: the hidden state, the token embedding and the top-k raw logits (sorted)."""
        assert self.embedding is not None, "the router needs the SLM's embedding table"
        emb = self.embedding[tokens.to(self.embedding.device)].to(hidden.device)
        topk = kernels.top_values(logits, min(self.config.top_k, logits.shape[-1]))
        if topk.shape[-1] < self.config.top_k:
            topk = nn.functional.pad(topk, (0, self.config.top_k - topk.shape[-1]), value=float(topk.min()))
        return hidden, emb, topk

    def pack_for_cpu(self) -> Router:
        """For serving on the CPU: the linears on oneDNN-packed fp32 weights (2-3x faster at 1-8 rows for the
        paper-size router). Inference only: a packed router can neither train nor `save`."""
        if next(self.parameters()).device.type == "cpu" and can_pack(torch.float32, torch.device("cpu")):
            pack_linears(self)
        return self

    @torch.inference_mode()
    def prob(self, hidden: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(*self.features(hidden, tokens, logits)))

    def save(self, directory: str | Path) -> Path:
        """Weights then config, each through a temporary file, so a crash leaves the old checkpoint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        _replace(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
        _replace(directory / CONFIG, lambda tmp: tmp.write_text(json.dumps(asdict(self.config), indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | Path, embedding: torch.Tensor | None = None,
             slm_hidden_size: int | None = None, device: str | torch.device = "cpu") -> Router:
        directory = Path(directory)
        for name in (CONFIG, WEIGHTS):
            if not (directory / name).is_file():
                raise RouterCheckpointError(f"router checkpoint {directory}: {name} is missing")
        try:
            config = RouterConfig.from_dict(json.loads((directory / CONFIG).read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise RouterCheckpointError(f"router checkpoint {directory}: {CONFIG} is not valid: {e}") from None
        if slm_hidden_size is not None and config.hidden_size != slm_hidden_size:
            raise RouterCheckpointError(
                f"router checkpoint {directory} was made for hidden size {config.hidden_size}, "
                f"but the SLM's hidden size is {slm_hidden_size}")
        try:
            router = cls(config, embedding)
        except (RuntimeError, ValueError) as e:
            raise RouterCheckpointError(f"router checkpoint {directory}: {CONFIG} is not valid: {e}") from None
        try:
            weights = load_file(str(directory / WEIGHTS))
        except (SafetensorError, OSError) as e:
            raise RouterCheckpointError(f"router checkpoint {directory}: {WEIGHTS} is not readable: {e}") from None
        try:
            router.load_state_dict(weights)
        except RuntimeError as e:
            raise RouterCheckpointError(f"router checkpoint {directory}: weights do not match its config: {e}") from None
        return router.to(device).eval()


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RouterGraphs:
    """The router's step captured in CUDA graphs at small batch sizes, where launches would dominate."""

    BUCKETS = (1, 2, 4, 8, 16)

    def __init__(self, router: Router, hidden: torch.Tensor, logits: torch.Tensor):
        n, dev = self.BUCKETS[-1], hidden.device
        self.router = router
        self.hidden = torch.zeros((n, hidden.shape[-1]), dtype=hidden.dtype, device=dev)
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.logits = torch.zeros((n, logits.shape[-1]), dtype=logits.dtype, device=dev)
        self.probs = torch.zeros(n, dtype=torch.float32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        self.capture_stream = torch.cuda.Stream(dev)     # its own cuBLAS workspace (see DecodeGraphs)
        for b in reversed(self.BUCKETS):
            for _ in range(2):
                self._forward(b)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=self.capture_stream):
                self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph

    def fits(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        return (hidden.shape[0] <= self.BUCKETS[-1] and hidden.dtype == self.hidden.dtype
                and logits.shape[-1] == self.logits.shape[-1])

    @torch.inference_mode()
    def _forward(self, b: int) -> None:
        self.probs[:b] = self.router.prob(self.hidden[:b], self.tokens[:b], self.logits[:b])

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        b = next(x for x in self.BUCKETS if x >= n)
        self.hidden[:n].copy_(hidden)
        self.tokens[:n].copy_(tokens)
        self.logits[:n].copy_(logits)
        self.graphs[b].replay()
        return self.probs[:n]
