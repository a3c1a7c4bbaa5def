"""The generation side of an evaluation: one engine holding both models, R2R on top of it, and a
batched loop (every item submitted at once, the engine batching `max_num_seqs`) with a progress bar."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from routing.deciders import EntropyDecider, RandomDecider, RouterDecider
from routing.r2r import R2R
from routing.router import Router, RouterCheckpointError
from tandem.datasets import GSM8K_STOP, MathItem, extract_answer, gsm8k_prompt
from tandem.errors import InvalidRequestError
from tandem.evals.store import EvalError, RunConfig
from workers.chat import encode
from workers.engine import (
    Engine,
    EngineConfig,
    ModelConfig,
    RequestOutput,
    SamplingParams,
    StepView,
)

DECIDER = {"r2r": "router", "random": "random", "entropy": "entropy"}


def prompt_tokens(tokenizer, item: MathItem) -> list[int]:
    """The prompt the labels were made with (`tandem.datasets.gsm8k_prompt`)."""
    return encode(tokenizer, gsm8k_prompt(item))


class Generator:
    def __init__(self, slm: str, llm: str, router: str | None, *, dtype: str = "bfloat16", batch: int = 32,
                 kv_cache_mb: float = 1024.0, max_new_tokens: int = 320, seed: int = 0, progress: bool = True,
                 max_num_batched_tokens: int = 2048, llm_min_rows: int = 1):
        models = [ModelConfig("slm", slm, dtype=dtype, kv_cache_mb=kv_cache_mb),
                  ModelConfig("llm", llm, dtype=dtype, kv_cache_mb=kv_cache_mb)]
        self.engine = Engine(EngineConfig(models, max_num_seqs=batch, max_num_batched_tokens=max_num_batched_tokens))
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop=GSM8K_STOP)
        self.seed, self.progress = seed, progress
        deciders = [RandomDecider(seed), EntropyDecider()]
        if router:
            deciders.insert(0, RouterDecider(self._router(router)))
        self.r2r = self._r2r(deciders, llm_min_rows)
        self.tokenizer = self.engine.model("slm").tokenizer
        self._warm()

    def _warm(self) -> None:
        """A few tokens through each model, so the first config's wall time holds no first-call costs."""
        tokens = encode(self.tokenizer, "1 + 1 =")
        for model in ("slm", "llm"):
            self.engine.generate([tokens], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), model=model)

    def _r2r(self, deciders: list, llm_min_rows: int) -> R2R:
        try:
            return R2R(self.engine, "slm", "llm", deciders, llm_min_rows=llm_min_rows)
        except InvalidRequestError as e:
            raise EvalError(f"--{e}") from None

    def _router(self, directory: str) -> Router:
        runner = self.engine.model("slm").runner
        embedding = runner.model.model.embed_tokens.weight.detach()
        try:
            return Router.load(directory, embedding, slm_hidden_size=runner.spec.hidden_size)
        except RouterCheckpointError as e:
            raise EvalError(f"--router: {e}") from None

    def _submit(self, cfg: RunConfig, rid: str, item: MathItem) -> None:
        tokens = prompt_tokens(self.tokenizer, item)
        if cfg.kind in ("slm", "llm"):
            self.engine.add_request(rid, tokens, self.params, model=cfg.kind)
        else:
            self.r2r.add_request(rid, tokens, self.params, decider=DECIDER[cfg.kind], threshold=cfg.threshold)

    def run(self, cfg: RunConfig, items: list[MathItem], on_record: Callable[[dict], None]) -> None:
        """Generate for every item at once; each finished item's record goes to `on_record` as it finishes."""
        from tqdm import tqdm

        if cfg.kind == "random":
            self.r2r.deciders["random"].generator.manual_seed(self.seed)
        session = f"{time.time():.6f}"
        pending: dict[str, tuple[MathItem, RequestOutput]] = {}
        for item in items:
            rid = f"eval/{cfg.name}/{item.index}/{session}"
            self._submit(cfg, rid, item)
            pending[rid] = (item, RequestOutput(rid))
        bar = tqdm(total=len(items), desc=cfg.name, unit="item", disable=not self.progress, file=sys.stderr,
                   dynamic_ncols=True)
        t0 = last = time.perf_counter()
        tokens = 0
        try:
            while pending:
                outs = self.engine.step()
                if not outs and not self.engine.has_work:
                    raise EvalError(f"{cfg.name}: the engine stopped with {len(pending)} items unfinished")
                for out in outs:
                    entry = pending.get(out.request_id)
                    if entry is None:
                        continue
                    entry[1].add(out)
                    tokens += len(out.new_token_ids)
                    if out.finished:
                        del pending[out.request_id]
                        on_record(record(cfg, *entry, session, time.perf_counter() - t0))
                        bar.update(1)
                now = time.perf_counter()
                if now - last > 1.0:
                    bar.set_postfix_str(f"{tokens / (now - t0):.1f} tok/s")
                    last = now
        finally:
            bar.close()
            for rid in pending:
                self.engine.abort(rid)
            if pending:
                self._drain()

    def _drain(self) -> None:
        while self.engine.has_unfinished:
            self.engine.step()

    def slm_entropies(self, items: list[MathItem]) -> list[float]:
        """The normalised entropy (as the entropy decider scores it) of every token the SLM generates,
        greedy, for `items`."""
        scorer, collected = EntropyDecider(), []

        def policy(step: StepView) -> None:
            rows = [i for i, s in enumerate(step.seqs) if s.request_id.startswith("eval/calibration/")]
            if rows:
                collected.extend(scorer.scores(step)[rows].tolist())

        self.engine.add_policy("slm", policy)
        try:
            cfg = RunConfig("calibration", "slm")
            self.run(cfg, items, lambda rec: None)
        finally:
            self.engine.model("slm").policies.remove(policy)
        return collected


def record(cfg: RunConfig, item: MathItem, out: RequestOutput, session: str, t_done: float) -> dict:
    answer = extract_answer(out.text)
    return {"index": item.index, "threshold": cfg.threshold, "correct": answer == item.answer, "answer": answer,
            "reference": item.answer, "tokens": len(out.token_ids), "llm_tokens": out.sources.count("llm"),
            "finish_reason": out.finish_reason, "session": session, "t_done": round(t_done, 4), "text": out.text}
