"""results.json and results.md of an evaluation."""
from __future__ import annotations

import json
from pathlib import Path

from tandem.evals.stats import Summary, target


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _gap(s: Summary) -> str:
    if s.gap_ci is None:
        return _pct(s.gap_recovered)
    return f"{_pct(s.gap_recovered)} [{_pct(s.gap_ci[0])}, {_pct(s.gap_ci[1])}]"


def _sign(test: list | tuple | None) -> str:
    return "" if test is None else f" ({test[0]} vs {test[1]} items right only with one, p = {test[2]:.2g})"


def table(summaries: list[Summary]) -> str:
    head = ("| config | kind | threshold | items | accuracy | 95% CI | LLM-token share | gap recovered [95% CI] "
            "| wall (s) | tok/s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for s in summaries:
        t = "-" if s.threshold is None else f"{s.threshold:.4g}"
        match = f" (matches {s.matches})" if s.matches else ""
        rows.append(f"| {s.name}{match} | {s.kind} | {t} | {s.n} | {_pct(s.accuracy)} "
                    f"| {_pct(s.ci_low)}–{_pct(s.ci_high)} | {_pct(s.llm_token_share)} | {_gap(s)} "
                    f"| {s.wall_s:.1f} | {s.tokens_per_s:.1f} |")
    return head + "\n".join(rows) + "\n"


def _yes(x: bool | None) -> str:
    return "n/a" if x is None else ("yes" if x else "no")


def target_text(t: dict) -> str:
    head = (f"Target: R2R recovers >= {100 * t['gap_at_least']:.0f}% of the SLM→LLM accuracy gap at "
            f"<= {100 * t['share_at_most']:.0f}% LLM tokens and beats random and entropy routing at the "
            f"same share. **{'Met' if t['met'] else 'Not met'}.** Gap intervals: paired bootstrap over items; "
            f"against the baselines: exact sign test on the items only one config gets right.")
    lines = [head, ""]
    for r in t["configs"]:
        lines.append(f"- {r['config']}: share {_pct(r['llm_token_share'])}, gap recovered "
                     f"{_pct(r['gap_recovered'])}, beats random: {_yes(r['beats_random'])}"
                     f"{_sign(r.get('sign_test_random'))}, beats entropy: {_yes(r['beats_entropy'])}"
                     f"{_sign(r.get('sign_test_entropy'))} → {'met' if r['met'] else 'not met'}")
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, summaries: list[Summary]) -> dict:
    t = target(summaries)
    result = {**meta, "configs": [s.to_dict() for s in summaries], "target": t}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md = (f"# R2R on GSM8K\n\nSLM `{meta.get('slm')}`, LLM `{meta.get('llm')}`, router `{meta.get('router')}`; "
          f"GSM8K test items {meta.get('first_item')}..{meta.get('last_item')} ({meta.get('n_items')}), greedy, "
          f"at most {meta.get('max_new_tokens')} new tokens, dtype {meta.get('dtype')}.\n\n"
          + table(summaries) + "\n" + target_text(t))
    (out / "results.md").write_text(md)
    return result
