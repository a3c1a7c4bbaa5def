"""Teacher forcing on a resident model: one forward over prompt + response per sequence, batched under a
token budget, returning the final (post-norm) hidden state, top-k raw logits and argmax at every
response position (the row that predicts response token j)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

import tandem_kernels as kernels
from tandem.errors import InvalidRequestError
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence


@dataclass
class Forced:
    hidden: torch.Tensor   # [n, H], the model's dtype, on CPU
    topk: torch.Tensor     # [n, k] fp32, sorted descending
    argmax: torch.Tensor   # [n] int64

    @property
    def num_tokens(self) -> int:
        return self.argmax.shape[0]


def top_values(logits: torch.Tensor, k: int) -> torch.Tensor:
    values = logits.float().topk(min(k, logits.shape[-1]), dim=-1).values
    if values.shape[-1] < k:
        values = torch.nn.functional.pad(values, (0, k - values.shape[-1]), value=float(values.min()))
    return values


def batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indices of sequences, grouped so each group's total length stays within `budget` (one long
    sequence may exceed it alone)."""
    group, used = [], 0
    for i, n in enumerate(lengths):
        if group and used + n > budget:
            yield group
            group, used = [], 0
        group.append(i)
        used += n
    if group:
        yield group


@torch.inference_mode()
def teacher_force(resident, prompts: list[list[int]], responses: list[list[int]], top_k: int = 100,
                  token_budget: int = 4096, logits_rows: int = 256) -> list[Forced]:
    """`resident` is an `Engine.models[name]`; it must not be stepping (its scheduler is not consulted,
    blocks are taken from its pool for the duration of each batch and given back)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    out: list[Forced | None] = [None] * len(seqs)
    for group in batches([len(s) for s in seqs], token_budget):
        for i, forced in zip(group, _forward(resident, [seqs[i] for i in group],
                                             [len(prompts[i]) for i in group], top_k, logits_rows)):
            out[i] = forced
    return out


def _forward(resident, seqs: list[list[int]], prompt_lens: list[int], top_k: int, logits_rows: int) -> list[Forced]:
    runner, blocks = resident.runner, resident.blocks
    holders = [Sequence(f"teacher-{i}", resident.name, list(s), SamplingParams()) for i, s in enumerate(seqs)]
    try:
        for h in holders:
            if not blocks.ensure(h, h.num_tokens):
                raise InvalidRequestError(
                    "kv_cache_mb", f"the KV pool of {resident.name!r} ({blocks.num_free} free blocks of "
                    f"{blocks.block_size}) cannot hold a {h.num_tokens}-token sequence; raise --kv-cache-mb")
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]) > 1)
        meta = kernels.build_metadata(
            [holders[i].block_table for i in order], [0] * len(order), [len(seqs[i]) for i in order],
            runner.block_size, runner.device, runner.num_splits(len(order)))
        ids = torch.tensor([t for i in order for t in seqs[i]], dtype=torch.long)
        hidden = runner.model(ids.to(runner.device), runner.forward_batch(meta))
        results: dict[int, Forced] = {}
        offset = 0
        for i in order:
            start = offset + prompt_lens[i] - 1
            rows = hidden[start : offset + len(seqs[i]) - 1]
            results[i] = _summarise(runner.model, rows, top_k, logits_rows)
            offset += len(seqs[i])
        return [results[i] for i in range(len(seqs))]
    finally:
        for h in holders:
            blocks.release(h)


def _summarise(model, rows: torch.Tensor, top_k: int, chunk: int) -> Forced:
    tops, argmaxes = [], []
    for at in range(0, rows.shape[0], chunk):
        logits = model.logits(rows[at : at + chunk])
        tops.append(top_values(logits, top_k).cpu())
        argmaxes.append(logits.argmax(-1).cpu())
    empty = rows.shape[0] == 0
    return Forced(
        hidden=rows.cpu(),
        topk=torch.zeros(0, top_k) if empty else torch.cat(tops),
        argmax=torch.zeros(0, dtype=torch.long) if empty else torch.cat(argmaxes),
    )
