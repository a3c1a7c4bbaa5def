"""Per-token deciders for R2R: which rows of an SLM step go to the LLM. Each takes the step and a
per-row threshold in [0, 1] and returns a boolean mask on the host. Deciders `on_device` score the
rows batched on the step's device when the step is launched (R2R's `prepare`), and find the scores
on the host in `step.prepared` when it lands; the others score on the host when it lands.
Threshold 0 always fires and 1 never does, whatever the score."""
from __future__ import annotations

import math
import zlib

import torch

from routing.router import Router, RouterGraphs
from workers.engine import StepView


class Decider:
    """Scores each row; a row goes to the LLM when its score reaches its threshold."""

    name: str = ""
    default_threshold: float = 0.5
    on_device: bool = True

    def scores(self, step: StepView) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, step: StepView, thresholds: torch.Tensor) -> torch.Tensor:
        scores = step.prepared if step.prepared is not None and self.on_device else self.scores(step).float().cpu()
        return torch.where(thresholds <= 0, True, torch.where(thresholds >= 1, False, scores >= thresholds))


class RouterDecider(Decider):
    """The learned router: P(divergent) from the hidden state, the chosen token and the top-k logits."""

    name = "router"

    def __init__(self, router: Router, cuda_graphs: bool = True):
        """Takes `router` over for inference (on the CPU its linears are packed in place)."""
        self.router = router.pack_for_cpu()
        self.default_threshold = float(router.config.threshold)
        self.cuda_graphs = cuda_graphs
        self.graphs: RouterGraphs | None = None

    def scores(self, step: StepView) -> torch.Tensor:
        if self.cuda_graphs and step.hidden.is_cuda:
            if self.graphs is None:
                self.graphs = RouterGraphs(self.router, step.hidden, step.logits)
            if self.graphs.fits(step.hidden, step.logits):
                return self.graphs(step.hidden, step.tokens, step.logits)
        return self.router.prob(step.hidden, step.tokens, step.logits)


class EntropyDecider(Decider):
    """Baseline: the SLM's predictive entropy, normalised by log(vocab) into [0, 1]."""

    name = "entropy"
    default_threshold = 0.1

    def scores(self, step: StepView) -> torch.Tensor:
        logp = step.logits.float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1) / math.log(step.logits.shape[-1])


class RandomDecider(Decider):
    """Baseline: each token goes to the LLM with probability 1 - threshold."""

    name = "random"
    default_threshold = 0.87
    on_device = False

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, step: StepView) -> torch.Tensor:
        return torch.rand(len(step.seqs), generator=self.generator)


class ForcedDecider(Decider):
    """For benchmarks and tests: fires on an exact share (1 - threshold) of each sequence's tokens,
    evenly spaced, whatever the models say. With `spread`, each sequence starts at its own phase (from
    its request id), so a batch's rows do not all fire on the same step."""

    name = "forced"
    default_threshold = 0.87
    on_device = False

    def __init__(self, spread: bool = False):
        self.spread = spread

    def decide(self, step: StepView, thresholds: torch.Tensor) -> torch.Tensor:
        shares = (1 - thresholds.clamp(0, 1)).tolist()
        fire = []
        for s, p in zip(step.seqs, shares):
            k, phase = s.num_output, (zlib.crc32(s.request_id.encode()) % 997) / 997 if self.spread else 0.0
            fire.append(math.floor((k + 1) * p + phase + 1e-9) > math.floor(k * p + phase + 1e-9))
        return torch.tensor(fire)


BASELINES: dict[str, type[Decider]] = {d.name: d for d in (EntropyDecider, RandomDecider, ForcedDecider)}
