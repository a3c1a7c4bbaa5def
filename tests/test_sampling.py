"""Sampling parameters, seeds, stops, logprobs and incremental detokenization."""
from __future__ import annotations

import pytest
from conftest import make_engine

from workers.engine import SamplingParams
from workers.engine.detokenizer import IncrementalDetokenizer

PROMPT = [5, 9, 13, 21, 34]


@pytest.fixture(scope="module")
def engine(tiny_path):
    return make_engine(tiny_path)


def test_seed_makes_sampling_reproducible_regardless_of_batch(engine):
    p = SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPT], p)[0].token_ids
    others = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    batched = engine.generate([[7, 7, 7], PROMPT, [8, 9]], [others, p, others])[1].token_ids
    assert alone == batched
    different = engine.generate([PROMPT], SamplingParams(max_tokens=24, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert different.token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].token_ids
    k1 = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=5.0, top_k=1, ignore_eos=True))[0]
    p0 = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=5.0, top_p=1e-6, ignore_eos=True))[0]
    assert k1.token_ids == greedy and p0.token_ids == greedy


def test_top_k_restricts_support(engine):
    rec = []
    engine.add_policy("m", lambda step: rec.append(step.logits[0].topk(3).indices.tolist()))
    out = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=3.0, top_k=3, seed=5, ignore_eos=True))[0]
    engine.models["m"].policies.clear()
    assert all(tok in top for tok, top in zip(out.token_ids, rec))


def test_stop_token_ids_and_max_tokens(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop_at = greedy.token_ids[4]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_at) + 1]
    assert len(greedy.token_ids) == 10 and greedy.finish_reason == "length"


class Script:
    """A policy that replaces each sampled token with the next token of a fixed text."""

    def __init__(self, tokenizer, text: str):
        import torch

        self.ids = tokenizer.encode(text, add_special_tokens=False)
        self.torch = torch

    def __call__(self, step):
        from workers.engine import PolicyDecision

        tokens = [self.ids[min(s.num_output, len(self.ids) - 1)] for s in step.seqs]
        return PolicyDecision(tokens=self.torch.tensor(tokens))


@pytest.mark.parametrize("stop", ["lo wö", "ö", "rld, t", "near"])
def test_stop_string_spanning_tokens(tiny_path, stop):
    engine = make_engine(tiny_path)
    text = "hello wörld, the end is near"
    engine.add_policy("m", Script(engine.model().tokenizer, text))
    streamed = []
    seq = engine.add_request("s", PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=[stop], ignore_eos=True))
    while engine.has_unfinished:
        streamed += [o.text_delta for o in engine.step()]
    assert seq.finish_reason == "stop"
    assert "".join(streamed) == text[: text.index(stop)]
    assert len(seq.output_token_ids) <= len(engine.model().tokenizer.encode(text, add_special_tokens=False))


def test_logprobs(engine):
    out = engine.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp["token_id"] == tok and lp["logprob"] <= 0
        assert len(lp["top"]) == 3 and lp["top"][0][0] == tok


class _Bytes:
    """A tokenizer whose tokens are single UTF-8 bytes, so characters span tokens."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenization_of_multibyte_characters():
    text = "naïve 日本語 ✓ 🚀!"
    data = list(text.encode())
    detok = IncrementalDetokenizer(_Bytes(), [ord("x")])
    pieces = [detok.add(b) for b in data]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_with_real_tokenizer(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    text = "héllo wörld, 日本 ✓"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add(i) for i in ids) + detok.flush() == text


def test_argmax_rows_equals_torch_argmax():
    import torch

    from workers.engine.sampler import argmax_rows

    torch.manual_seed(0)
    x = torch.randn(6, 128 * 40)
    x[1, 7] = x[1, 4000] = 50.0                 # a tie across blocks: the first index wins
    x[2, 300] = x[2, 301] = 50.0                # a tie inside a block
    x[3] = float("-inf")
    x[4, 999] = float("nan")
    x[5] = x[5].bfloat16().float()
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x[:, :1000]), x[:, :1000].argmax(dim=-1))   # not a whole number of blocks
