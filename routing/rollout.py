"""`tandem r2r rollout`: on-policy router data. R2R with a trained router answers the training prompts; the SLM
and the LLM are teacher-forced on those answers, so every position gets the SLM's features and argmax and the
LLM's argmax, in the contexts the router meets when it serves (mostly the SLM's own text). The rows carry no
judge label; `tandem r2r train --target mismatch` trains on them beside judged labels. Stages, each resumable
per item under `out`: answers (R2R greedy) -> teacher forcing (both models)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from routing.deciders import RouterDecider
from routing.labels import (ANSWERS, TEACHER, answer_rows, append_jsonl, check_manifest, load_items, pair_engine,
                            read_jsonl, run_stages, write_forced, write_manifest)
from routing.r2r import R2R
from routing.router import Router
from routing.teacher_force import teacher_force
from tandem.datasets import GSM8K_STOP, MathItem, gsm8k_prompt
from tandem.evals.store import dtype_name
from workers.chat import encode
from workers.engine import Engine, SamplingParams


@dataclass
class RolloutConfig:
    slm: str
    llm: str
    router: str
    out: str
    threshold: float | None = None   # the router's calibrated threshold when None
    data: str | None = None
    start: int = 0
    stop: int = 800
    max_new_tokens: int = 256
    batch_items: int = 16
    dtype: str = "auto"
    kv_cache_mb: float = 512.0
    llm_min_rows: int = 8
    token_budget: int = 4096

    def fixed(self) -> dict:
        keep = ("slm", "llm", "router", "threshold", "data", "max_new_tokens")
        return {"kind": "rollout", **{k: v for k, v in asdict(self).items() if k in keep}, "dtype": dtype_name(self.dtype)}


class RolloutJob:
    def __init__(self, cfg: RolloutConfig, echo: Callable[[str], None] = print):
        self.cfg, self.echo, self.out = cfg, echo, Path(cfg.out)
        self.engine: Engine | None = None
        self.r2r: R2R | None = None
        self.top_k = 0   # the router's, once loaded

    def run(self) -> dict:
        items = load_items(self.cfg.start, self.cfg.stop, self.cfg.data)
        check_manifest(self.cfg, self.out)
        stages = [("answers", ANSWERS, self._answers), ("teacher forcing", TEACHER, self._teacher)]
        seconds = run_stages(self.out, items, stages, self.cfg.batch_items, self._setup, self.echo)
        rows = read_jsonl(self.out / TEACHER)
        tokens = sum(r["num_tokens"] for r in rows)
        mismatches = sum(len(r["mismatches"]) for r in rows)
        answers = read_jsonl(self.out / ANSWERS)
        llm = sum(a["sources"].count("llm") for a in answers)
        result = {"items": len(rows), "tokens": tokens, "mismatches": mismatches,
                  "mismatch_share": mismatches / tokens if tokens else 0.0,
                  "llm_token_share": llm / max(1, sum(len(a["sources"]) for a in answers)),
                  "seconds_this_run": seconds}
        self.echo(f"rollout: {len(rows)} items, {tokens} tokens, {mismatches} SLM/LLM differences "
                  f"({result['mismatch_share']:.1%}); R2R's LLM-token share {result['llm_token_share']:.1%}")
        return result

    def _setup(self) -> None:
        if self.engine is not None:
            return
        cfg = self.cfg
        self.engine = pair_engine(cfg.slm, cfg.llm, cfg.dtype, cfg.kv_cache_mb, max_num_seqs=cfg.batch_items)
        runner = self.engine.model("slm").runner
        router = Router.load(cfg.router, runner.model.model.embed_tokens.weight.detach(),
                             slm_hidden_size=runner.spec.hidden_size)
        self.top_k = router.config.top_k
        self.r2r = R2R(self.engine, "slm", "llm", [RouterDecider(router)], llm_min_rows=cfg.llm_min_rows)
        write_manifest(self.cfg, self.out)

    def _answers(self, chunk: list[MathItem]) -> None:
        tok = self.engine.model("slm").tokenizer
        params = SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=0, stop=GSM8K_STOP)
        prompts = [encode(tok, gsm8k_prompt(it)) for it in chunk]
        outs = self.r2r.generate(prompts, params, decider="router", threshold=self.cfg.threshold)
        append_jsonl(self.out / ANSWERS, [
            {"index": it.index, "prompt": p, "response": o.token_ids, "sources": o.sources,
             "finish_reason": o.finish_reason, "text": o.text} for it, p, o in zip(chunk, prompts, outs)])

    def _teacher(self, chunk: list[MathItem]) -> None:
        rows = answer_rows(self.out, chunk)
        prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
        slm = teacher_force(self.engine.model("slm"), prompts, responses, self.top_k, self.cfg.token_budget)
        llm = teacher_force(self.engine.model("llm"), prompts, responses, 1, self.cfg.token_budget)
        write_forced(self.out, rows, slm, [g.argmax for g in llm])


def run_rollout(cfg: RolloutConfig, echo: Callable[[str], None] = print) -> dict:
    return RolloutJob(cfg, echo).run()
