"""`tandem r2r train`: fit the router on labels from `tandem r2r label` (weighted BCE, early stopping on
validation loss), then calibrate its threshold at a target recall of divergent tokens.

Two training targets. `divergent`: the judged labels (divergent 1; identical and neutral 0). `mismatch`: every
position where the SLM's token differs from the LLM's is a positive, the judged-divergent ones weighted
`divergent_weight` times, and every position with features counts, judged or not. Either way the threshold is
calibrated on the recall of judged-divergent tokens."""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from routing.features import Features, load_features
from routing.labels import LABELS, MANIFEST, read_jsonl
from routing.router import Router, RouterConfig
from tandem.errors import TandemError

GRID = [round(0.01 * i, 2) for i in range(1, 100)]


class TrainError(TandemError):
    """Labels that cannot train a router (none divergent, too few items, another SLM)."""


@dataclass
class TrainConfig:
    labels: str | list[str]
    slm: str
    out: str
    width: int = 256
    depth: int = 2
    dropout: float = 0.1
    lr: float = 5e-4
    weight_decay: float = 5e-4
    batch: int = 1024
    epochs: int = 50
    patience: int = 10
    target_recall: float = 0.95
    val_fraction: float = 0.2
    seed: int = 0
    target: str = "divergent"
    divergent_weight: float = 5.0     # target "mismatch" only


TARGETS = ("divergent", "mismatch")


@dataclass
class Dataset:
    feats: Features
    y: torch.Tensor          # [N] float: the training target
    weight: torch.Tensor     # [N] float: each row's weight in the loss
    divergent: torch.Tensor  # [N] int64: judged divergent 1, identical or neutral 0, not judged -1

    def pos_weight(self, idx: torch.Tensor) -> float:
        """Balances the positives' total weight against the negatives' over `idx`."""
        w, y = self.weight[idx], self.y[idx]
        return float((w * (1 - y)).sum() / (w * y).sum())


def label_dirs(labels: str | Path | list) -> list[Path]:
    return [Path(labels)] if isinstance(labels, (str, Path)) else [Path(d) for d in labels]


def load_dataset(labels_dirs: str | Path | list, target: str = "divergent", divergent_weight: float = 5.0) -> Dataset:
    """`divergent`: the rows with a label (dropped and capped ones left out). `mismatch`: every row. Several
    directories are read as one data set; one without judged labels (`tandem r2r rollout`) serves `mismatch` only."""
    if target not in TARGETS:
        raise TrainError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    dirs, parts, divergent = label_dirs(labels_dirs), [], []
    for d in dirs:
        lines = read_jsonl(d / LABELS)
        feats = load_features(d)
        if feats is None or (not lines and target == "divergent"):
            raise TrainError(f"{d} holds no finished labels; run `tandem r2r label --out {d}` first"
                             + (" (a rollout directory serves --target mismatch only)" if feats is not None else ""))
        check_finite(d, feats)
        parts.append(feats)
        divergent.append(_judged(lines, feats))
    check_same_sizes(dirs, parts)
    feats, divergent = Features.cat(parts), torch.cat(divergent)
    if target == "divergent":
        keep = divergent >= 0
        y = divergent[keep].float()
        return Dataset(feats.select(keep), y, torch.ones_like(y), divergent[keep])
    y = (feats.token != feats.target).float()
    weight = torch.where(divergent == 1, divergent_weight, 1.0)
    return Dataset(feats, y, weight, divergent)


def check_finite(directory: Path, feats: Features) -> None:
    bad = ~(torch.isfinite(feats.hidden).all(1) & torch.isfinite(feats.topk).all(1))
    if bad.any():
        raise TrainError(f"--labels: {directory} holds non-finite features (inf or NaN hidden states or logits) in "
                         f"{int(bad.sum())} of {len(bad)} rows; a router cannot train on them")


def check_same_sizes(dirs: list[Path], parts: list[Features]) -> None:
    sizes = [(f.hidden.shape[1], f.topk.shape[1]) for f in parts]
    for d, (hidden, top_k) in zip(dirs, sizes):
        if (hidden, top_k) != sizes[0]:
            raise TrainError(f"--labels: {d} holds features of hidden size {hidden} and top-k {top_k}, but {dirs[0]} "
                             f"of hidden size {sizes[0][0]} and top-k {sizes[0][1]}; train on labels of one SLM")


def _judged(lines: list[dict], feats: Features) -> torch.Tensor:
    """Per row: judged divergent 1, identical or neutral 0, not judged -1."""
    label: dict[tuple[int, int], int] = {}
    for line in lines:
        excluded = set(line["dropped"]) | set(line["capped"])
        for p in range(line["num_tokens"]):
            if p not in excluded:
                label[(line["index"], p)] = 0
        for p in line["divergent"]:
            label[(line["index"], p)] = 1
    keys = zip(feats.item.tolist(), feats.pos.tolist())
    return torch.tensor([label.get(k, -1) for k in keys], dtype=torch.int64)


def split_by_item(items: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    unique = items.unique()
    if len(unique) < 2:
        raise TrainError(f"labels of {len(unique)} item(s) cannot be split into training and validation; label more items")
    order = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))]
    n_val = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    val = torch.isin(items, order[:n_val])
    return ~val, val


def slm_embedding(path: str | Path) -> torch.Tensor:
    """The SLM's input embedding table, read from its safetensors without loading the model."""
    path = Path(path)
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        with safe_open(str(f), "pt") as s:
            for key in s.keys():
                if key.endswith("embed_tokens.weight"):
                    return s.get_tensor(key).float()
    from workers.models import load_model

    return load_model(path, "float32").model.model.embed_tokens.weight.detach()


def calibrate(probs: torch.Tensor, divergent: torch.Tensor, target: float) -> dict:
    """Over GRID: recall of divergent tokens (`divergent` == 1) and the share of all tokens sent to the LLM;
    the chosen threshold is the one with the lowest share among those reaching the target recall (the lowest
    threshold if none does)."""
    positives = divergent == 1
    recall, share = [], []
    for t in GRID:
        pred = probs >= t
        recall.append(float((pred & positives).sum() / max(int(positives.sum()), 1)))
        share.append(float(pred.float().mean()))
    ok = [i for i, r in enumerate(recall) if r >= target]
    best = min(ok, key=lambda i: (share[i], -GRID[i])) if ok else 0
    return {"threshold": GRID[best], "target_recall": target, "recall": recall[best], "llm_share": share[best],
            "reached": bool(ok), "curve": {"threshold": GRID, "recall": recall, "llm_share": share}}


def plot(calibration: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = calibration["curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["threshold"], curve["recall"], label="recall (divergent)")
    ax.plot(curve["threshold"], curve["llm_share"], label="LLM-token share")
    ax.axhline(calibration["target_recall"], color="grey", linestyle=":", linewidth=1)
    ax.axvline(calibration["threshold"], color="red", linestyle="--", linewidth=1,
               label=f"threshold {calibration['threshold']:.2f}")
    ax.set(xlabel="threshold", ylabel="fraction", ylim=(0, 1.02))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class Trainer:
    def __init__(self, cfg: TrainConfig, data: Dataset, embedding: torch.Tensor, echo: Callable[[str], None]):
        self.cfg, self.data, self.embedding, self.echo = cfg, data, embedding, echo

    def inputs(self, idx: torch.Tensor):
        f = self.data.feats
        return f.hidden[idx].float(), self.embedding[f.token[idx]].float(), f.topk[idx].float()

    def loss_over(self, router: Router, idx: torch.Tensor, loss_fn) -> tuple[float, torch.Tensor]:
        router.eval()
        logits = []
        with torch.no_grad():
            for at in range(0, len(idx), self.cfg.batch):
                logits.append(router(*self.inputs(idx[at : at + self.cfg.batch])))
        logits = torch.cat(logits) if logits else torch.zeros(0)
        return float(loss_fn(logits, idx)), torch.sigmoid(logits)

    def loss_fn(self, pos_weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Weighted BCE of the router's logits over rows `idx`: each row's weight, positives times `pos_weight`."""
        def loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            y = self.data.y[idx]
            w = self.data.weight[idx] * torch.where(y > 0, pos_weight, 1.0)
            return (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean()
        return loss

    def fit(self, router: Router, train_idx: torch.Tensor, val_idx: torch.Tensor, pos_weight: float) -> list[dict]:
        cfg = self.cfg
        loss_fn = self.loss_fn(pos_weight)
        opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        best, best_state, since, history = math.inf, None, 0, []
        steps = math.ceil(len(train_idx) / cfg.batch)
        for epoch in range(1, cfg.epochs + 1):
            router.train()
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            total = 0.0
            for at in tqdm(range(0, len(order), cfg.batch), total=steps, desc=f"epoch {epoch}", leave=False,
                           disable=steps < 4):
                idx = order[at : at + cfg.batch]
                loss = loss_fn(router(*self.inputs(idx)), idx)
                value = loss.item()
                self.check_loss("training", value, epoch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += value * len(idx)
            val_loss, _ = self.loss_over(router, val_idx, loss_fn)
            self.check_loss("validation", val_loss, epoch)
            improved = val_loss < best
            if improved:
                best, best_state, since = val_loss, copy.deepcopy(router.state_dict()), 0
            else:
                since += 1
            history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss})
            self.echo(f"epoch {epoch:>3}/{cfg.epochs}  train loss {total / len(order):.4f}  "
                      f"val loss {val_loss:.4f}{'  (best)' if improved else ''}")
            if since >= cfg.patience:
                self.echo(f"early stop: no better validation loss for {cfg.patience} epochs")
                break
        if best_state is None:
            raise TrainError(f"no epoch lowered the validation loss on {self.labels}; nothing to save")
        router.load_state_dict(best_state)
        return history

    @property
    def labels(self) -> str:
        return ", ".join(str(d) for d in label_dirs(self.cfg.labels))

    def check_loss(self, split: str, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            raise TrainError(f"the {split} loss on {self.labels} is {loss} at epoch {epoch}; "
                             "check the labels' features or lower --lr")


def train_router(cfg: TrainConfig, echo: Callable[[str], None] = print) -> dict:
    data = load_dataset(cfg.labels, cfg.target, cfg.divergent_weight)
    dirs = label_dirs(cfg.labels)
    manifests = [json.loads((d / MANIFEST).read_text()) if (d / MANIFEST).is_file() else {} for d in dirs]
    for d, m in zip(dirs, manifests):
        if m.get("slm") and Path(m["slm"]).resolve() != Path(cfg.slm).resolve():
            echo(f"warning: the labels in {d} were made with SLM {m['slm']}, training with {cfg.slm}")
    manifest = manifests[0]
    n1 = int((data.divergent == 1).sum())
    if n1 == 0:
        raise TrainError(f"no divergent labels in {cfg.labels} ({int((data.divergent >= 0).sum())} labelled tokens): "
                         "nothing to learn; label more items (a wider --items range) or use another judge")
    embedding = slm_embedding(cfg.slm)
    hidden_size = data.feats.hidden.shape[1]
    if embedding.shape[1] != hidden_size:
        raise TrainError(f"the labels hold hidden states of size {hidden_size}, but {cfg.slm} has size {embedding.shape[1]}")
    train_mask, val_mask = split_by_item(data.feats.item, cfg.val_fraction, cfg.seed)
    train_idx, val_idx = train_mask.nonzero().flatten(), val_mask.nonzero().flatten()
    if int((data.divergent[train_idx] == 1).sum()) == 0:
        raise TrainError(f"the training split of {cfg.labels} has no divergent labels ({n1} in all); label more items")
    pos_weight = data.pos_weight(train_idx)
    echo(f"{int((data.divergent >= 0).sum())} labelled tokens ({n1} divergent) from "
         f"{len(data.feats.item[data.divergent >= 0].unique())} items; target {cfg.target}: {len(data.y)} rows "
         f"({int(data.y.sum())} positive) from {len(data.feats.item.unique())} items; train {len(train_idx)}, "
         f"validation {len(val_idx)}; pos_weight {pos_weight:.2f}")
    torch.manual_seed(cfg.seed)
    rcfg = RouterConfig(hidden_size=hidden_size, top_k=data.feats.topk.shape[1], width=cfg.width, depth=cfg.depth,
                        dropout=cfg.dropout, slm=Path(manifest.get("slm", cfg.slm)).name,
                        llm=Path(manifest.get("llm", "")).name)
    router = Router(rcfg, embedding)
    trainer = Trainer(cfg, data, embedding, echo)
    router.fit_standardization(trainer.inputs(train_idx[at : at + cfg.batch]) for at in range(0, len(train_idx), cfg.batch))
    history = trainer.fit(router, train_idx, val_idx, pos_weight)
    calib_idx, calib_set = val_idx, "validation"
    if int((data.divergent[val_idx] == 1).sum()) == 0:
        echo("warning: the validation split has no divergent labels; calibrating on all tokens")
        calib_idx, calib_set = torch.arange(len(data.y)), "all"
    _, probs = trainer.loss_over(router, calib_idx, trainer.loss_fn(pos_weight))
    calibration = calibrate(probs, data.divergent[calib_idx], cfg.target_recall)
    calibration.update(set=calib_set, tokens=len(calib_idx), positives=int((data.divergent[calib_idx] == 1).sum()),
                       target=cfg.target)
    if not calibration["reached"]:
        echo(f"warning: no threshold reaches recall {cfg.target_recall}; using {calibration['threshold']}")
    rcfg.threshold, rcfg.calibration = calibration["threshold"], calibration
    out = router.save(cfg.out)
    plot(calibration, out / "calibration.png", f"router {rcfg.slm} -> {rcfg.llm}")
    summary = {"config": asdict(cfg), "history": history, "threshold": rcfg.threshold,
               "recall": calibration["recall"], "llm_share": calibration["llm_share"]}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    echo(f"threshold {rcfg.threshold:.2f}: recall {calibration['recall']:.3f}, LLM-token share "
         f"{calibration['llm_share']:.3f} on {calib_set} ({calibration['tokens']} tokens); saved to {out}")
    return summary
