"""C2C: the fuser, token alignment, training (loss, resume), co-located serving (C2C, T2T) on tiny models."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from c2c import checkpoint
from c2c.align import TokenAligner
from c2c.colocated import C2C, runs
from c2c.fuser import Fuser, FuserConfig, KVShape, fuse, layer_map, temperature
from c2c.stepping import C2CError
from c2c.t2t import T2T
from c2c.train import Example, PairModels, TrainConfig, TrainError, train
from tandem.errors import CheckpointError, InvalidRequestError
from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = list(range(5, 27))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose much when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paths(tiny_paths, tiny_root) -> dict[str, Path]:
    """The shared tiny models, a 5-layer Llama, and a Llama with a tokenizer of its own."""
    return {**tiny_paths, "llama5": _deeper_llama(tiny_root), "other": _other_tokenizer(tiny_paths["llama"], tiny_root)}


def _deeper_llama(root: Path) -> Path:
    from tiny import _write_tokenizer, perturb
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "llama5-c2c"
    if not out.exists():
        cfg = LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                          num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, tie_word_embeddings=True)
        torch.manual_seed(5)
        model = LlamaForCausalLM(cfg).eval()
        perturb(model)
        model.save_pretrained(out)
        _write_tokenizer(out, 384)
    return out


def _other_tokenizer(model: Path, root: Path) -> Path:
    """The same weights with a different byte-level BPE: shuffled ids, other merges, other specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = root / "llama-other-tok"
    if out.exists():
        return out
    shutil.copytree(model, out)
    for f in out.glob("*"):
        if "token" in f.name or f.name == "chat_template.jinja":
            f.unlink()
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    random.Random(1).shuffle(base)
    tokens, merges = ["<unk>", "<bos>", "<eos>"] + base, []
    for a, b in [("t", "h"), ("th", "e"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("q", "u"), ("o", "w"), ("Ġ", "b"),
                 ("r", "ow"), ("Ġb", "row"), ("Ġbrow", "n"), ("o", "x"), ("Ġ", "f"), ("Ġf", "ox"), ("e", "r"), ("Ġ", "o"),
                 ("v", "er"), ("Ġo", "ver")]:
        merges.append((a, b))
        tokens.append(a + b)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}" \
                         "{% if add_generation_prompt %}### assistant\n{% endif %}"
    fast.save_pretrained(out)
    return out


def _engine(receiver: Path, *sharers: tuple[str, Path], sharer_len: int | None = None) -> Engine:
    models = [ModelConfig("recv", str(receiver), dtype="float32", block_size=4, kv_cache_mb=4)]
    models += [ModelConfig(name, str(p), dtype="float32", block_size=4, kv_cache_mb=4, max_model_len=sharer_len)
               for name, p in sharers]
    return Engine(EngineConfig(models))


def _fuser(engine: Engine, sharer: str = "shr", gate: float = 1.0, seed: int = 0, **kw) -> Fuser:
    r, s = engine.model("recv").runner.spec, engine.model(sharer).runner.spec
    torch.manual_seed(seed)
    cfg = FuserConfig(KVShape(r.num_layers, r.num_kv_heads, r.head_dim), KVShape(s.num_layers, s.num_kv_heads, s.head_dim),
                      hidden=32, intermediate=32, dropout=0.0, **kw)
    fuser = Fuser(cfg)
    with torch.no_grad():
        for layer in fuser.layers:
            layer.gate_logits.fill_(gate)
    return fuser.eval()


def _all_free(engine: Engine) -> bool:
    engine.step()
    return all(s["free_blocks"] == s["num_blocks"] and not s["paused"] for s in engine.stats().values())


# ----- the fuser -----


def test_layer_mapping_and_temperature():
    assert layer_map(28, 24)[:6] == [0, 0, 0, 0, 0, 1] and layer_map(28, 24)[27] == 23
    assert layer_map(28, 36) == [n + 8 for n in range(28)]
    assert layer_map(28, 16)[:13] == [0] * 13 and layer_map(28, 16)[13] == 1
    assert layer_map(3, 5, "nearest") == [0, 2, 4]
    assert temperature(0, 100) == 1.0 and temperature(100, 100) == pytest.approx(0.001)
    assert temperature(50, 100) == pytest.approx(0.001 ** 0.5) and temperature(500, 100) == pytest.approx(0.001)
    assert runs([4, 0, 1, 2, 7]) == [range(3), range(4, 5), range(7, 8)]


def test_fuser_gates_heads_and_several_sharers():
    cfg = FuserConfig(KVShape(3, 2, 32), KVShape(5, 4, 12), hidden=16, intermediate=24, dropout=0.0)
    torch.manual_seed(0)
    a, b = Fuser(cfg).eval(), Fuser(cfg).eval()
    own = {n: (torch.randn(7, 2, 32), torch.randn(7, 2, 32)) for n in range(3)}
    shr = {n: (torch.randn(7, 4, 12), torch.randn(7, 4, 12)) for n in range(5)}
    assert a.sharer_layer == [2, 3, 4]
    i, o, h, f, heads, d = 48, 64, 16, 24, 2, cfg.depth                   # the notes' per-layer parameter count
    per_layer = 2 * ((i + o) * h + h + (h + 2 * h * f) + (h + 2 * h * h) + (h * heads + heads) + (d - 2) * (h + 2 * h * f)
                     + (h * o + o) + 1)
    assert sum(p.numel() for p in a.parameters()) == 3 * per_layer
    assert fuse(own, [(a, shr, None)]) == {} and a.open_layers() == {} and a.sharer_layers() == []   # logits 0: closed
    with torch.no_grad():
        a.layers[1].gate_logits.copy_(torch.tensor([-1.0, 2.0]))         # layer 1: V only
        b.layers[1].gate_logits.fill_(1.0)
    assert a.open_layers() == {1: (False, True)} and a.sharer_layers() == [3]
    out = fuse(own, [(a, shr, None)])
    assert list(out) == [1] and torch.equal(out[1][0], own[1][0]) and not torch.equal(out[1][1], own[1][1])
    p, w = a.layers[1].paths[1](shr[3][1], own[1][1])
    assert p.shape == (7, 2, 32) and w.shape == (7, 2, 1) and bool(((w > 0) & (w < 1)).all())
    assert torch.allclose(out[1][1], own[1][1] + w * p, atol=1e-6)                   # R + g*w*P with g = 1
    mask = torch.tensor([True, False] * 3 + [True])
    masked = fuse(own, [(a, shr, mask)])[1][1]
    assert torch.equal(masked[1], own[1][1][1]) and torch.equal(masked[0], out[1][1][0])
    both = [(a, shr, None), (b, shr, None)]
    seq, par = fuse(own, both, "sequential"), fuse(own, both, "parallel")
    r = own[1][1]
    assert torch.allclose(par[1][1], r + a.layers[1].delta(1, shr[3][1], r, 1.0) + b.layers[1].delta(1, shr[3][1], r, 1.0), atol=1e-6)
    mid = r + a.layers[1].delta(1, shr[3][1], r, 1.0)
    assert torch.allclose(seq[1][1], mid + b.layers[1].delta(1, shr[3][1], mid, 1.0), atol=1e-6)
    a.train()
    a.tau = 0.5
    g = a.layers[0].gate(0, torch.zeros(7, 2, 32), a.tau)
    assert g.shape == (7, 2, 1) and bool(((g > 0) & (g < 1)).all()) and len(fuse(own, [(a, shr, None)])) == 3


# ----- token alignment -----


def test_token_alignment_maps_every_receiver_token(paths):
    from transformers import AutoTokenizer

    rtok, stok = AutoTokenizer.from_pretrained(paths["qwen3"]), AutoTokenizer.from_pretrained(paths["other"])
    aligner = TokenAligner(rtok, stok)
    assert not aligner.identity and TokenAligner(rtok, AutoTokenizer.from_pretrained(paths["llama"])).identity
    text = "the quick brown fox jumps over the lazy dog, then rests 42 times"
    a = aligner.align_text(text)
    assert len(a.sharer_ids) == len(a.receiver_ids) > 10 and all(a.fuse)
    assert all(0 <= s < len(stok) for s in a.sharer_ids)
    for r, s in zip(a.receiver_ids, a.sharer_ids):
        assert rtok.decode([r]).startswith(stok.decode([s]))              # `first`: the leading sharer token
    assert stok.decode(a.sharer_ids) != text or a.sharer_ids != a.receiver_ids
    longest = TokenAligner(rtok, stok, "longest").align_text(text)
    assert all(len(stok.decode([x])) >= len(stok.decode([y])) for x, y in zip(longest.sharer_ids, a.sharer_ids))
    partial = aligner.align_text("café")                                    # 'é' is two byte tokens: no counterpart alone
    assert len(partial.sharer_ids) == len(partial.receiver_ids) and partial.fuse[:3] == [True] * 3 and not partial.fuse[-1]
    assert aligner.align_ids([rtok.eos_token_id]).sharer_ids == [stok.eos_token_id]
    chat = aligner.align_chat([{"role": "user", "content": "the brown fox"}])
    content = [rtok.decode([r]) for r, f in zip(chat.receiver_ids, chat.fuse) if f]
    assert "".join(content) == "the brown fox" and not all(chat.fuse)      # template tokens are not fused


# ----- serving -----


def test_closed_gates_leave_the_receiver_alone(paths):
    engine = _engine(paths["qwen3"], ("shr", paths["llama"]))
    alone = engine.generate([PROMPT], GREEDY, model="recv")[0].token_ids
    closed = C2C(engine, "recv", {"shr": _fuser(engine, gate=0.0)})
    assert closed.active == {} and closed.generate([PROMPT], GREEDY)[0].token_ids == alone
    zero = _fuser(engine, gate=1.0)                                         # open gates, zero projection: R + 0
    with torch.no_grad():
        for layer in zero.layers:
            for path in layer.paths:
                path.proj[-1].weight.zero_()
                path.proj[-1].bias.zero_()
    out = C2C(engine, "recv", {"shr": zero}).generate([PROMPT], GREEDY)[0]
    assert out.token_ids == alone and out.stats["kv_bytes_fused"] > 0 and out.stats["fused_layers"] == 3
    assert _all_free(engine)


@pytest.mark.parametrize("pair", [("qwen3", "llama5"), ("gemma3", "qwen2"), ("qwen2", "other")])
def test_engine_fusion_equals_the_training_path(paths, pair):
    """Fused in our engine (paged blocks) and in the transformers training path: the same receiver logits."""
    engine = _engine(paths[pair[0]], ("shr", paths[pair[1]]))
    fuser = _fuser(engine)
    c2c = C2C(engine, "recv", {"shr": fuser})
    messages = [{"role": "user", "content": "the brown fox jumps over the lazy dog near the river bank"}]
    out = c2c.generate([messages], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2))[0]
    aligned = c2c.sharers["shr"].aligner.align_chat(messages)
    models = PairModels(str(paths[pair[0]]), str(paths[pair[1]]))
    example = Example(aligned.receiver_ids, aligned.sharer_ids, aligned.fuse, out.token_ids)
    with torch.no_grad():
        logp = torch.log_softmax(models.logits(fuser, example), -1)
        plain = torch.log_softmax(models.logits(None, example), -1)
    assert logp.argmax(-1).tolist() == out.token_ids and (logp - plain).abs().max() > 1e-2
    for i, lp in enumerate(out.logprobs):
        assert logp[i, lp["token_id"]].item() == pytest.approx(lp["logprob"], abs=1e-4)
    n, s = len(aligned.receiver_ids) - 1, engine.model("shr").runner.spec
    used = len(set(fuser.sharer_layer))
    assert out.stats["kv_bytes_sharer"] == 2 * used * n * s.num_kv_heads * s.head_dim * 4
    assert out.usage.prompt_tokens == n + 1 and out.stats["fuser_s"] > 0 and out.stats["receiver_s"] > 0
    assert _all_free(engine)


def test_only_open_layers_move_and_several_sharers_combine(paths):
    engine = _engine(paths["qwen3"], ("shr", paths["llama"]), ("shr2", paths["qwen2"]))
    one = _fuser(engine, gate=-1.0)
    with torch.no_grad():
        one.layers[2].gate_logits.fill_(1.0)
    out = C2C(engine, "recv", {"shr": one}).generate([PROMPT], GREEDY)[0]
    s = engine.model("shr").runner.spec
    assert out.stats["fused_layers"] == 1 and out.stats["kv_bytes_sharer"] == 2 * 21 * s.num_kv_heads * s.head_dim * 4
    both = {"shr": _fuser(engine, "shr"), "shr2": _fuser(engine, "shr2", seed=1)}
    results = {mode: C2C(engine, "recv", both, mode).generate([PROMPT], GREEDY)[0] for mode in ("sequential", "parallel")}
    single = C2C(engine, "recv", {"shr": both["shr"]}).generate([PROMPT], GREEDY)[0]
    assert results["sequential"].stats["kv_bytes_sharer"] == 2 * single.stats["kv_bytes_sharer"] > 0
    assert all(r.token_ids and r.finish_reason == "length" for r in results.values())
    assert _all_free(engine)


def test_t2t_baseline(paths):
    engine = _engine(paths["qwen3"], ("shr", paths["llama"]))
    out = T2T(engine, "recv", "shr", context_tokens=8).generate(["Why is the sky blue?"], GREEDY)[0]
    assert len(out.token_ids) == 6 and 0 < out.stats["context_tokens"] <= 8
    assert out.stats["sharer_s"] > 0 and out.stats["receiver_s"] > 0 and out.stats["kv_bytes_moved"] == 0
    assert _all_free(engine)


def test_bad_input(paths, tmp_path):
    engine = _engine(paths["qwen3"], ("shr", paths["llama"]), sharer_len=16)
    c2c = C2C(engine, "recv", {"shr": _fuser(engine)})
    with pytest.raises(InvalidRequestError, match="sharer 'shr'"):
        c2c.add_request("long", PROMPT)                                     # 22 tokens, the sharer holds 16
    with pytest.raises(InvalidRequestError, match="receiver 'recv'"):
        c2c.add_request("longer", [7] * 600)
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        c2c.add_request("outside", [5, 6, 999])
    assert not engine.requests and _all_free(engine)
    r, s = engine.model("recv").runner.spec, engine.model("shr").runner.spec
    wrong = Fuser(FuserConfig(KVShape(r.num_layers, r.num_kv_heads, r.head_dim), KVShape(s.num_layers, 4, 8), hidden=8,
                              intermediate=8))
    with pytest.raises(InvalidRequestError, match="mode"):
        C2C(engine, "recv", {"shr": _fuser(engine)}, mode="sideways")
    with pytest.raises(CheckpointError, match=r"receiver 'recv' and sharer 'shr' have"):
        C2C(engine, "recv", {"shr": wrong})
    c2c.sharers["shr"].fuser.config.sharer = KVShape(s.num_layers, 4, 8)  # the cache read back is not what it expects
    expect = r"kv: sharer 'shr' layer \d k has shape \(11, 2, 16\), the fuser expects \(11, 4, 8\)"
    with pytest.raises(C2CError, match=expect):
        c2c.generate([PROMPT[:12]], GREEDY)
    assert _all_free(engine) and not engine.requests
    pair = checkpoint.Pair(checkpoint.ModelId.read(paths["qwen3"]), checkpoint.ModelId.read(paths["llama"]))
    checkpoint.save(tmp_path / "ck", _fuser(engine), pair)
    other = _engine(paths["qwen2"], ("shr", paths["llama"]))
    expect = r"trained for receiver qwen3-0 .* <- sharer llama-0 .*cannot serve receiver qwen2-0"
    with pytest.raises(CheckpointError, match=expect):
        C2C.from_checkpoints(other, "recv", {"shr": tmp_path / "ck"})
    loaded = C2C.from_checkpoints(_engine(paths["qwen3"], ("shr", paths["llama"])), "recv", {"shr": tmp_path / "ck"})
    assert loaded.layers == [0, 1, 2]


# ----- training -----


def test_training_lowers_the_loss_and_resumes(paths, tmp_path):
    from typer.testing import CliRunner

    from tandem.cli import app

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                                       {"role": "assistant", "content": f"The answer is {a + b}."}]})
                              for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]))
    receiver, sharer = paths["qwen3"], paths["other"]
    models = PairModels(str(receiver), str(sharer))
    kw = dict(receiver=str(receiver), sharer=str(sharer), data=str(data), steps=8, batch=2, lr=1e-3, hidden=32,
              intermediate=32, dropout=0.0, val_fraction=0.25, log_every=4, save_every=4)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **kw), lambda _: None, models)
    assert whole.step == 8 and whole.val_loss < whole.receiver_val_loss
    assert sum(whole.losses[-3:]) < sum(whole.losses[:3])
    first = train(TrainConfig(out=str(tmp_path / "split"), session_steps=4, **kw), lambda _: None, models)
    assert first.step == 4 and len(first.losses) == 4
    args = ["c2c", "train", "--receiver", str(receiver), "--sharer", str(sharer), "--data", str(data), "--out",
            str(tmp_path / "split"), "--steps", "8", "--batch", "2", "--lr", "1e-3", "--hidden", "32",
            "--intermediate", "32", "--dropout", "0", "--val-fraction", "0.25", "--log-every", "4", "--save-every", "4"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "resumed" in run.output and "at step 4/8" in run.output and "step 8/8" in run.output
    assert "step 4/8  loss" not in run.output
    a = checkpoint.load(tmp_path / "whole")[0].state_dict()
    b = checkpoint.load(tmp_path / "split")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                          # the same run, interrupted or not
    doc = json.loads((tmp_path / "split" / "fuser.json").read_text())
    assert doc["step"] == 8 and doc["pair"]["receiver"]["name"] == "qwen3-0"
    assert doc["pair"]["sharer"]["name"] == "llama-other-tok"
    cached = train(TrainConfig(out=str(tmp_path / "cached"), prefill_cache=True, **kw), lambda _: None, models)
    c = checkpoint.load(tmp_path / "cached")[0].state_dict()
    assert cached.losses == whole.losses and all(torch.equal(a[k], c[k]) for k in a)   # later epochs read the cache
    assert len(list((tmp_path / "cached" / "prefills").glob("*.pt"))) == 8
    assert doc["val_match"] is not None and 0 <= doc["receiver_val_match"] <= 1
    bad = CliRunner().invoke(app, args + ["--mapping", "sideways"])
    assert bad.exit_code == 2 and "--mapping" in bad.output
    with pytest.raises(CheckpointError, match="holds a run for receiver qwen3-0"):
        train(TrainConfig(out=str(tmp_path / "split"), **{**kw, "sharer": str(paths["llama"])}), lambda _: None)


def test_training_continues_from_a_trained_fuser(paths, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Name {a} twice."},
                                                       {"role": "assistant", "content": f"{a} {a}."}]})
                              for a in range(6)))
    receiver, sharer = paths["qwen3"], paths["other"]
    models = PairModels(str(receiver), str(sharer))
    kw = dict(receiver=str(receiver), sharer=str(sharer), data=str(data), batch=2, lr=1e-3, hidden=32,
              intermediate=32, dropout=0.0, val_fraction=0.0, prefill_cache=True)
    train(TrainConfig(out=str(tmp_path / "base"), steps=3, **kw), lambda _: None, models)
    (tmp_path / "more" / "prefills").mkdir(parents=True)
    stale = torch.load(tmp_path / "base" / "prefills" / "0.pt")
    torch.save(tuple({n: (k[:, :1], v[:, :1]) for n, (k, v) in kv.items()} for kv in stale),
               tmp_path / "more" / "prefills" / "0.pt")                        # a cached prefill of other tokens
    said = []
    more = train(TrainConfig(out=str(tmp_path / "more"), steps=3, lr=0.0, init=str(tmp_path / "base"),
                             tau_start=0.001, **{k: v for k, v in kw.items() if k != "lr"}), said.append, models)
    assert more.step == 3 and any("starting from the weights of" in s for s in said)
    a = checkpoint.load(tmp_path / "base")[0].state_dict()
    b = checkpoint.load(tmp_path / "more")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                          # lr 0: the weights it started from
    assert torch.load(tmp_path / "more" / "prefills" / "0.pt")[0][0][0].shape[1] > 1   # recomputed, not trusted
    with pytest.raises(TrainError, match="--init: .* another shape"):
        train(TrainConfig(out=str(tmp_path / "wide"), steps=1, init=str(tmp_path / "base"),
                          **{**kw, "hidden": 64}), lambda _: None, models)
    with pytest.raises(CheckpointError, match="cannot serve"):
        train(TrainConfig(out=str(tmp_path / "other"), steps=1, init=str(tmp_path / "base"),
                          **{**kw, "sharer": str(paths["llama"])}), lambda _: None)
    weights = tmp_path / "base" / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="missing or damaged"):
        checkpoint.load(tmp_path / "base")


def test_resumed_training_keeps_one_history_line_per_step(paths, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Name {a} twice."},
                                                       {"role": "assistant", "content": f"{a} {a}."}]})
                              for a in range(4)))
    models = PairModels(str(paths["qwen2"]), str(paths["llama"]))
    cfg = TrainConfig(receiver=str(paths["qwen2"]), sharer=str(paths["llama"]), out=str(tmp_path / "run"),
                      data=str(data), steps=6, batch=2, hidden=16, intermediate=16, val_fraction=0.0, save_every=2)
    loss, calls = PairModels.loss, []

    def interrupted(self, fuser, ex):
        calls.append(1)
        if len(calls) == 7:                  # in step 4: steps 1-3 are in the history, the checkpoint is at step 2
            raise KeyboardInterrupt
        return loss(self, fuser, ex)
    monkeypatch.setattr(PairModels, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, lambda _: None, models)
    monkeypatch.setattr(PairModels, "loss", loss)
    assert train(cfg, lambda _: None, models).step == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("extra, needle", [(["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
                                           (["--weight-decay", "-0.1"], "--weight-decay")])
def test_train_cli_refuses_bad_optimizer_settings(paths, tmp_path, extra, needle):
    from typer.testing import CliRunner

    from tandem.cli import app

    run = CliRunner().invoke(app, ["c2c", "train", "--receiver", str(paths["qwen2"]), "--sharer", str(paths["llama"]),
                                   "--out", str(tmp_path / "run"), *extra])
    assert run.exit_code == 2 and f"error: {needle}: must be a finite number" in run.output, run.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_and_serving(paths, tmp_path):
    """On CUDA: training with bf16 models under autocast, and a trained fuser served by a CUDA engine."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                       {"role": "assistant", "content": f"{w}!"}]})
                              for w in ("yes", "no", "maybe", "later")))
    result = train(TrainConfig(receiver=str(paths["qwen3"]), sharer=str(paths["llama"]), out=str(tmp_path / "ck"),
                               data=str(data), steps=3, batch=2, hidden=32, intermediate=32, device="cuda",
                               val_fraction=0.25), lambda _: None)
    assert result.step == 3 and all(math.isfinite(x) for x in result.losses)
    models = [ModelConfig(n, str(p), dtype="float32", device="cuda", block_size=16, kv_cache_mb=8)
              for n, p in (("recv", paths["qwen3"]), ("shr", paths["llama"]))]
    engine = Engine(EngineConfig(models))
    fuser = _fuser(engine)
    out = C2C(engine, "recv", {"shr": fuser}).generate([PROMPT], SamplingParams(max_tokens=4, temperature=0,
                                                                                ignore_eos=True, logprobs=1))[0]
    hf = PairModels(str(paths["qwen3"]), str(paths["llama"]), device="cuda", dtype="float32")
    with torch.no_grad():
        logp = torch.log_softmax(hf.logits(fuser, Example(PROMPT, PROMPT, [True] * len(PROMPT), out.token_ids)), -1)
    for i, lp in enumerate(out.logprobs):
        assert logp[i, lp["token_id"]].item() == pytest.approx(lp["logprob"], abs=2e-3)
    assert _all_free(engine)
