"""The numbers of an evaluation: Wilson intervals, per-config summaries, gap recovered with a paired bootstrap
interval, paired sign tests against the matched baselines, the R2R target."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

Z95 = 1.959963984540054
TARGET_GAP, TARGET_SHARE = 0.70, 0.20


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def gap_recovered(acc: float, acc_slm: float, acc_llm: float) -> float | None:
    """(acc - acc_slm) / (acc_llm - acc_slm); None when the two models tie."""
    gap = acc_llm - acc_slm
    return None if abs(gap) < 1e-12 else (acc - acc_slm) / gap


def gap_interval(correct: np.ndarray, slm: np.ndarray, llm: np.ndarray, resamples: int = 2000, seed: int = 0,
                 z: float = Z95) -> tuple[float, float] | None:
    """A percentile interval of the gap recovered (95% by default), from a bootstrap that resamples items,
    each item keeping its three outcomes (the configs answered the same items); resamples where the two
    models tie are left out. None when fewer than half the resamples have a gap."""
    n = len(correct)
    assert len(slm) == len(llm) == n
    if n == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, n, (resamples, n))
    a, s, l = (np.asarray(x, dtype=np.float64)[idx].mean(1) for x in (correct, slm, llm))
    keep = np.abs(l - s) > 1e-12
    if keep.sum() < resamples / 2:
        return None
    gaps = (a[keep] - s[keep]) / (l[keep] - s[keep])
    tail = 100 * (1 - math.erf(z / math.sqrt(2))) / 2
    lo, hi = np.percentile(gaps, [tail, 100 - tail])
    return float(lo), float(hi)


def sign_test(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Paired outcomes of two configs on the same items: (right only with a, right only with b, the two-sided
    exact sign-test p-value of that split)."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return only_a, only_b, p


@dataclass
class Summary:
    name: str
    kind: str
    threshold: float | None
    matches: str | None          # for matched baselines: the R2R config whose share they match
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    tokens: int
    llm_tokens: int
    llm_token_share: float
    wall_s: float
    tokens_per_s: float
    gap_recovered: float | None = None
    gap_ci: tuple[float, float] | None = None
    outcomes: dict[int, bool] = field(default_factory=dict, repr=False)   # item index -> correct

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["outcomes"]
        return d

    def paired(self, *others: Summary) -> list[np.ndarray] | None:
        """Its outcomes and each other's on the same items, in one order; None unless all cover the same."""
        items = sorted(self.outcomes)
        if not items or any(sorted(o.outcomes) != items for o in others):
            return None
        return [np.array([s.outcomes[i] for i in items]) for s in (self, *others)]


def summarise(name: str, kind: str, threshold: float | None, matches: str | None, records: list[dict]) -> Summary:
    """Records: one per item, with correct, tokens, llm_tokens, session and t_done (seconds into its session)."""
    n = len(records)
    correct = sum(1 for r in records if r["correct"])
    tokens = sum(r["tokens"] for r in records)
    llm_tokens = sum(r["llm_tokens"] for r in records)
    sessions: dict[str, float] = {}
    for r in records:
        sessions[r["session"]] = max(sessions.get(r["session"], 0.0), r["t_done"])
    wall = sum(sessions.values())
    lo, hi = wilson(correct, n)
    return Summary(name, kind, threshold, matches, n, correct, correct / n if n else 0.0, lo, hi, tokens,
                   llm_tokens, llm_tokens / tokens if tokens else 0.0, wall, tokens / wall if wall > 0 else 0.0,
                   outcomes={r["index"]: bool(r["correct"]) for r in records if "index" in r})


def add_gaps(summaries: list[Summary]) -> None:
    by_kind = {s.kind: s for s in summaries if s.kind in ("slm", "llm")}
    if "slm" not in by_kind or "llm" not in by_kind:
        return
    a_slm, a_llm = by_kind["slm"].accuracy, by_kind["llm"].accuracy
    for s in summaries:
        s.gap_recovered = gap_recovered(s.accuracy, a_slm, a_llm)
        paired = s.paired(by_kind["slm"], by_kind["llm"]) if s.kind not in ("slm", "llm") else None
        s.gap_ci = gap_interval(*paired) if paired and s.gap_recovered is not None else None


def target(summaries: list[Summary]) -> dict:
    """Per R2R config: its share, gap recovered, and whether it beats the baselines matched to it; `met`
    when one config recovers >= 70% of the gap at <= 20% LLM tokens and beats both baselines."""
    rows = []
    for s in (x for x in summaries if x.kind == "r2r"):
        matched = {b.kind: b for b in summaries if b.matches == s.name}
        beats = {k: (s.accuracy > matched[k].accuracy if k in matched else None) for k in ("random", "entropy")}
        tests = {k: (sign_test(*pair) if k in matched and (pair := s.paired(matched[k])) else None)
                 for k in ("random", "entropy")}
        gap_ok = s.gap_recovered is not None and s.gap_recovered >= TARGET_GAP
        rows.append({"config": s.name, "llm_token_share": s.llm_token_share, "gap_recovered": s.gap_recovered,
                     "gap_ci": s.gap_ci, "beats_random": beats["random"], "beats_entropy": beats["entropy"],
                     "sign_test_random": tests["random"], "sign_test_entropy": tests["entropy"],
                     "met": bool(gap_ok and s.llm_token_share <= TARGET_SHARE and beats["random"] and beats["entropy"])})
    return {"gap_at_least": TARGET_GAP, "share_at_most": TARGET_SHARE,
            "met": any(r["met"] for r in rows), "configs": rows}
