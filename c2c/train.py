"""`tandem c2c train`: fit a fuser for one (receiver, sharer) pair. Both models are frozen transformers
models; only the fuser trains, on the receiver's next-token loss over response tokens.

Per example, as in the reference: the receiver and the sharer (on its aligned ids) prefill the prompt
except its last token; the fuser rewrites the receiver's cache entries of those tokens; the receiver
then reads the last prompt token and the response with the fused cache as its past, and the loss is
taken on the response. The transformers cache holds the same cache-space entries as our engine's KV
blocks (keys after RoPE), so a trained fuser serves unchanged in `c2c.colocated`.

The directory `out` holds the checkpoint (`fuser.safetensors`, `fuser.json`), `train_state.pt` (fuser,
optimizer, schedule, RNG: a rerun with the same `out` resumes at its step) and `history.jsonl`."""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from c2c import checkpoint
from c2c.align import TokenAligner
from c2c.fuser import Fuser, FuserConfig, KVDict, fuse, temperature
from tandem.errors import TandemError
from workers.chat import encode, render

STATE, HISTORY = "train_state.pt", "history.jsonl"


class TrainError(TandemError):
    """A training run that cannot start or resume as configured."""


@dataclass
class TrainConfig:
    receiver: str
    sharer: str
    out: str
    data: str | None = None              # JSONL of {"messages": [...]}; default: multiple-choice validation splits
    tasks: list[str] = field(default_factory=lambda: ["arc_challenge", "arc_easy", "openbookqa", "csqa", "sciq"])
    max_items: int | None = None
    val_fraction: float = 0.05
    steps: int = 200
    batch: int = 8                        # sequences per optimizer step (gradient accumulation of single sequences)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    tau_start: float = 1.0
    tau_end: float = 0.001
    anneal_steps: int | None = None       # default: steps
    hidden: int = 1024
    intermediate: int = 1024
    depth: int = 3
    dropout: float = 0.1
    mapping: str = "last_aligned"
    alignment: str = "first"
    max_length: int = 1024
    device: str = "cpu"
    dtype: str = "auto"                   # the frozen models': float32 on CPU, bfloat16 on CUDA
    save_every: int = 50
    eval_every: int = 0                   # 0: validation loss at the end only
    log_every: int = 10
    seed: int = 0
    session_steps: int | None = None      # stop (with a checkpoint) after this many steps in this run
    prefill_cache: bool = False           # keep each example's frozen prefills under out/prefills for later epochs
    init: str | None = None               # start from this fuser checkpoint's weights (same pair and shape)

    def fixed(self) -> dict:
        """What must not change between a run and its resumption."""
        loose = ("out", "save_every", "eval_every", "log_every", "session_steps", "device", "prefill_cache")
        return {k: v for k, v in asdict(self).items() if k not in loose}


@dataclass
class Example:
    prompt: list[int]        # receiver ids
    sharer: list[int]        # the sharer's aligned ids of the prompt
    fuse: list[bool]
    response: list[int]      # receiver ids the loss is taken on
    key: int | None = None   # its place in the run's example list: the name of its cached prefills


def build_example(messages: list[dict[str, str]], aligner: TokenAligner, max_length: int) -> Example | None:
    """The last message is the response; None when the example is too short or too long."""
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        return None
    rtok = aligner.rtok
    aligned = aligner.align_chat(messages[:-1])
    before, full = render(rtok, messages[:-1], True), render(rtok, messages, False)
    tail = full[len(before):] if full.startswith(before) else messages[-1]["content"] + (rtok.eos_token or "")
    response = encode(rtok, tail)
    if len(aligned.receiver_ids) < 2 or not response or len(aligned.receiver_ids) + len(response) > max_length:
        return None
    return Example(aligned.receiver_ids, aligned.sharer_ids, aligned.fuse, response)


def load_messages(cfg: TrainConfig) -> list[list[dict[str, str]]]:
    if cfg.data:
        path = Path(cfg.data)
        if not path.is_file():
            raise TrainError(f"--data: {path} does not exist")
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line)["messages"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise TrainError(f"{path}: line {i + 1} is not {{\"messages\": [...]}}: {e}") from None
    else:
        from tandem.mc_datasets import mc_messages, shuffle_choices, training_items

        rows = [mc_messages(shuffle_choices(item, cfg.seed), with_answer=True) for item in training_items(cfg.tasks)]
        random.Random(cfg.seed).shuffle(rows)
    return rows[: cfg.max_items] if cfg.max_items else rows


def _entries(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) `[batch, tokens, heads, head_dim]` from a transformers cache."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = list(zip(cache.key_cache, cache.value_cache))
    return [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in pairs]


class PairModels:
    """The frozen receiver and sharer as transformers models, and the fused-cache loss."""

    def __init__(self, receiver: str, sharer: str, device: str = "cpu", dtype: str = "auto"):
        self.store: Path | None = None    # a directory of cached prefills (`TrainConfig.prefill_cache`)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                      "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.receiver, self.sharer = (
            AutoModelForCausalLM.from_pretrained(p, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
            for p in (receiver, sharer))
        self.rtok, self.stok = AutoTokenizer.from_pretrained(receiver), AutoTokenizer.from_pretrained(sharer)
        self.pair = checkpoint.Pair(checkpoint.ModelId.read(receiver), checkpoint.ModelId.read(sharer))

    def _prefill(self, model, ids: list[int]) -> KVDict:
        from transformers import DynamicCache

        cache = DynamicCache()   # every layer whole: a sliding-window cache would drop old entries
        with torch.no_grad():
            model(torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True)
        return dict(enumerate(_entries(cache)))

    def caches(self, ex: Example) -> tuple[KVDict, KVDict]:
        path = self.store / f"{ex.key}.pt" if self.store is not None and ex.key is not None else None
        ctx = len(ex.prompt) - 1
        if path is not None and path.is_file():
            pair = torch.load(path, map_location=self.device)
            if pair[0][0][0].shape[1] == ctx and pair[1][0][0].shape[1] == ctx:
                return pair
        pair = self._prefill(self.receiver, ex.prompt[:ctx]), self._prefill(self.sharer, ex.sharer[:ctx])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tuple({n: (k.contiguous(), v.contiguous()) for n, (k, v) in kv.items()} for kv in pair),
                       path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        return pair

    def fused_cache(self, fuser: Fuser | None, ex: Example):
        from transformers import DynamicCache

        own, sharer = self.caches(ex)
        fused = {}
        if fuser is not None:
            ctx = len(ex.prompt) - 1
            mask = torch.tensor(ex.fuse[:ctx], device=self.device)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
                fused = fuse({n: (k.float(), v.float()) for n, (k, v) in own.items()},
                             [(fuser, {s: (k.float(), v.float()) for s, (k, v) in sharer.items()}, mask)])
        layers = [fused.get(n, own[n]) for n in range(len(own))]
        return DynamicCache([(k.to(self.dtype).transpose(1, 2), v.to(self.dtype).transpose(1, 2)) for k, v in layers])

    def logits(self, fuser: Fuser | None, ex: Example) -> torch.Tensor:
        """The receiver's logits at the last prompt token and every response token but the last."""
        tail = ex.prompt[-1:] + ex.response[:-1]
        cache = self.fused_cache(fuser, ex)
        out = self.receiver(torch.tensor([tail], device=self.device), past_key_values=cache, use_cache=True)
        return out.logits[0].float()

    def loss(self, fuser: Fuser | None, ex: Example) -> torch.Tensor:
        """Summed next-token cross-entropy over the response."""
        target = torch.tensor(ex.response, device=self.device)
        return F.cross_entropy(self.logits(fuser, ex), target, reduction="sum")

    @torch.no_grad()
    def validate(self, fuser: Fuser | None, examples: list[Example]) -> tuple[float, float]:
        """Mean loss per response token, and the share of examples whose whole response is the greedy choice
        under teacher forcing (for a multiple-choice answer "The answer is X.": its accuracy)."""
        loss, match = 0.0, 0
        for ex in examples:
            logits, target = self.logits(fuser, ex), torch.tensor(ex.response, device=self.device)
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            match += bool((logits.argmax(-1) == target).all())
        return loss / max(1, sum(len(ex.response) for ex in examples)), match / max(1, len(examples))


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """A fresh permutation of the examples per epoch, a function of the step alone (so resuming needs no data state)."""
    out = []
    for p in range(step * batch, (step + 1) * batch):
        epoch, at = divmod(p, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[at]))
    return out


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    warm = max(1, round(cfg.warmup * cfg.steps))
    return lambda s: (s + 1) / warm if s < warm else max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm))


@dataclass
class TrainResult:
    step: int
    losses: list[float]              # training loss of each step run in this call
    val_loss: float | None
    receiver_val_loss: float | None  # the receiver alone, same examples
    out: str


def train(cfg: TrainConfig, echo: Callable[[str], None] = print, models: PairModels | None = None) -> TrainResult:
    out = Path(cfg.out)
    models = models or PairModels(cfg.receiver, cfg.sharer, cfg.device, cfg.dtype)
    aligner = TokenAligner(models.rtok, models.stok, cfg.alignment)
    examples = [ex for m in load_messages(cfg) if (ex := build_example(m, aligner, cfg.max_length))]
    for key, ex in enumerate(examples):
        ex.key = key
    models.store = out / "prefills" if cfg.prefill_cache else None
    if len(examples) < 2:
        raise TrainError(f"{len(examples)} usable example(s): need at least 2 (check --data and --max-length)")
    n_val = min(len(examples) - 1, max(1, round(cfg.val_fraction * len(examples)))) if cfg.val_fraction > 0 else 0
    val, train_set = examples[:n_val], examples[n_val:]
    fcfg = FuserConfig(models.pair.receiver.kv, models.pair.sharer.kv, cfg.hidden, cfg.intermediate, cfg.depth,
                       cfg.dropout, cfg.mapping)
    torch.manual_seed(cfg.seed)
    fuser = Fuser(fcfg).to(models.device)
    opt = torch.optim.AdamW(fuser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    state = _resume(out, cfg, models.pair, fuser, opt, sched)
    step = state.get("step", 0)
    _keep_history(out / HISTORY, step)
    if cfg.init and not step:
        _initialize(fuser, cfg.init, models.pair)
        echo(f"starting from the weights of {cfg.init}")
    if step:
        echo(f"resumed {out} at step {step}/{cfg.steps}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        if val:
            state["receiver_val_loss"], state["receiver_val_match"] = models.validate(None, val)
    echo(f"{models.pair}\n{len(train_set)} training and {len(val)} validation examples; "
         f"fuser {sum(p.numel() for p in fuser.parameters()) / 1e6:.2f}M parameters on {models.device}")
    anneal = cfg.anneal_steps or cfg.steps
    stop = min(cfg.steps, step + cfg.session_steps) if cfg.session_steps else cfg.steps
    losses, val_loss, t0 = [], state.get("val_loss"), time.perf_counter()
    while step < stop:
        fuser.train()
        fuser.tau = temperature(step, anneal, cfg.tau_start, cfg.tau_end)
        batch = [train_set[i] for i in batch_indices(step, cfg.batch, len(train_set), cfg.seed)]
        tokens = sum(len(ex.response) for ex in batch)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ex in batch:
            loss = models.loss(fuser, ex) / tokens
            loss.backward()
            total += loss.detach().item()
        torch.nn.utils.clip_grad_norm_(fuser.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        losses.append(total)
        record = {"step": step, "loss": total, "tau": fuser.tau, "lr": sched.get_last_lr()[0]}
        if cfg.eval_every and step % cfg.eval_every == 0 and val:
            val_loss, record["val_match"] = models.validate(fuser.eval(), val)
            record["val_loss"] = val_loss
        _append(out / HISTORY, record)
        if step % max(1, cfg.log_every) == 0 or step == stop:
            fuser.eval()
            gates = sum(k + v for k, v in fuser.open_layers().values())
            extra = f"  val {record['val_loss']:.4f} match {record['val_match']:.3f}" if "val_loss" in record else ""
            echo(f"step {step}/{cfg.steps}  loss {total:.4f}{extra}  tau {fuser.tau:.4f}  "
                 f"open gates {gates}/{2 * fcfg.receiver.num_layers}  lr {record['lr']:.2e}  "
                 f"{(time.perf_counter() - t0) / len(losses):.2f}s/step")
        if step % max(1, cfg.save_every) == 0 or step == stop:
            if step == cfg.steps and val:
                val_loss, state["val_match"] = models.validate(fuser.eval(), val)
            _save(out, cfg, models.pair, fuser, opt, sched, {**state, "step": step, "val_loss": val_loss})
    if step == cfg.steps and val_loss is not None:
        echo(f"validation loss {val_loss:.4f} with the fuser, {state['receiver_val_loss']:.4f} for the receiver alone; "
             f"responses matched {state['val_match']:.3f} and {state['receiver_val_match']:.3f}")
    return TrainResult(step, losses, val_loss, state.get("receiver_val_loss"), str(out))


def _resume(out: Path, cfg: TrainConfig, pair: checkpoint.Pair, fuser: Fuser, opt, sched) -> dict:
    if not (out / STATE).is_file():
        return {}
    trained_for, _, doc = checkpoint.read_config(out)
    if trained_for != pair:
        raise checkpoint.CheckpointError(f"{out} holds a run for {trained_for}; this run is for {pair}")
    before = doc.get("training", {})
    changed = sorted(k for k, v in cfg.fixed().items() if k != "receiver" and k != "sharer" and before.get(k) != v)
    if changed:
        raise TrainError(f"{out} holds a run with other settings ({', '.join(changed)}); use another --out")
    state = torch.load(out / STATE, map_location="cpu", weights_only=False)
    fuser.load_state_dict(state.pop("fuser"))
    opt.load_state_dict(state.pop("optimizer"))
    sched.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(state.pop("rng"))
    cuda_rng = state.pop("cuda_rng", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return state


def _initialize(fuser: Fuser, directory: str, pair: checkpoint.Pair) -> None:
    trained, _ = checkpoint.load(directory, pair)
    if trained.config != fuser.config:
        raise TrainError(f"--init: {directory} holds a fuser of another shape ({trained.config}); "
                         f"this run builds {fuser.config}")
    fuser.load_state_dict(trained.state_dict())


def _save(out: Path, cfg: TrainConfig, pair, fuser: Fuser, opt, sched, state: dict) -> None:
    full = {**state, "fuser": fuser.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    tmp = out / (STATE + ".tmp")
    torch.save(full, tmp)
    os.replace(tmp, out / STATE)
    meta = {"alignment": cfg.alignment, "step": state["step"], "training": cfg.fixed(),
            **{k: state.get(k) for k in ("val_loss", "receiver_val_loss", "val_match", "receiver_val_match")}}
    checkpoint.save(out, fuser, pair, meta)


def _keep_history(path: Path, step: int) -> None:
    """Drop the lines of steps after `step`, which a run interrupted between saves wrote and the resumed run redoes."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}) + "\n")
