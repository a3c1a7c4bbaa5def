"""The Pareto plot of an evaluation: accuracy (95% CI) against the share of tokens the LLM wrote."""
from __future__ import annotations

from pathlib import Path

from tandem.evals.stats import Summary

STYLE = {
    "slm": {"marker": "s", "color": "tab:blue", "label": "SLM only"},
    "llm": {"marker": "D", "color": "tab:red", "label": "LLM only"},
    "r2r": {"marker": "o", "color": "tab:green", "label": "R2R (router)", "linestyle": "-"},
    "random": {"marker": "^", "color": "tab:gray", "label": "random routing", "linestyle": "--"},
    "entropy": {"marker": "v", "color": "tab:orange", "label": "entropy routing", "linestyle": ":"},
}


def pareto(summaries: list[Summary], path: str | Path, title: str = "GSM8K") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in STYLE.items():
        group = sorted((s for s in summaries if s.kind == kind and s.n), key=lambda s: s.llm_token_share)
        if not group:
            continue
        x = [s.llm_token_share for s in group]
        y = [s.accuracy for s in group]
        err = [[s.accuracy - s.ci_low for s in group], [s.ci_high - s.accuracy for s in group]]
        style = dict(style)
        if len(group) == 1 or "linestyle" not in style:
            style["linestyle"] = "none"
        ax.errorbar(x, y, yerr=err, capsize=3, markersize=6, **style)
        if kind == "r2r":
            for s in group:
                ax.annotate(f"t={s.threshold:g}", (s.llm_token_share, s.accuracy), textcoords="offset points",
                            xytext=(5, -12), fontsize=8, color=style["color"])
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("LLM-token share")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    n = max((s.n for s in summaries), default=0)
    ax.set_title(f"{title}: accuracy vs LLM-token share ({n} items)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
