"""Bad input gets a typed error naming the problem and never disturbs other sequences."""
from __future__ import annotations

import json

import pytest
from conftest import make_engine

from tandem.errors import CheckpointError, InvalidRequestError
from workers.engine import SamplingParams
from workers.models import load_model


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


def test_bad_prompts_do_not_disturb_running_sequences(tiny_path):
    engine = make_engine(tiny_path)
    good = engine.add_request("good", [5, 6, 7], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    engine.step()
    bad = [
        ("empty", [], "prompt"),
        ("empty-text", "", "prompt"),
        ("too-long", [5] * 600, "prompt"),
        ("vocab", [5, 384], "prompt_token_ids"),
        ("negative", [5, -1], "prompt_token_ids"),
        ("good", [5, 6], "request_id"),
        ("", [5, 6], "request_id"),
    ]
    for rid, prompt, field in bad:
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(rid, prompt, SamplingParams(max_tokens=4))
        assert e.value.field == field, (rid, str(e.value))
        engine.step()
    with pytest.raises(Exception, match="not loaded"):
        engine.add_request("x", [5], model="nope")
    while engine.has_unfinished:
        engine.step()
    assert good.finish_reason == "length" and good.num_output == 20
    alone = make_engine(tiny_path).generate([[5, 6, 7]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert good.output_token_ids == alone.token_ids
    stats = engine.stats()["m"]
    assert stats["free_blocks"] == stats["num_blocks"]


def test_missing_and_corrupt_checkpoints(tiny_path, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt|unreadable|missing"):
        load_model(broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not supported|could not be read"):
        load_model(broken)
    shards = tmp_path / "shards"
    shards.mkdir()
    for f in tiny_path.iterdir():
        (shards / f.name).write_bytes(f.read_bytes())
    index = shards / "model.safetensors.index.json"
    for text, message in [("{}", "weight_map"), ("{oops", "weight_map"),
                          ('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}', "interrupted download")]:
        index.write_text(text)
        with pytest.raises(CheckpointError, match=message):
            load_model(shards)
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"not a gguf")
    with pytest.raises(CheckpointError, match="GGUF"):
        load_model(gguf)


def test_only_the_models_own_weights_file_is_read(tiny_paths, tmp_path):
    import shutil

    from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

    def tokens(path) -> list[int]:
        engine = Engine(EngineConfig([ModelConfig("m", str(path), dtype="float32", block_size=4, kv_cache_mb=4)]))
        return engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0].token_ids

    model = tmp_path / "model"
    shutil.copytree(tiny_paths["llama"], model)
    reference = tokens(model)
    other = tmp_path / "other"
    shutil.copytree(tiny_paths["llama"], other)
    st = other / "model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v + 1 for k, v in load_file(st).items()}, model / "model_backup.safetensors")
    assert tokens(model) == reference
    (model / "model.safetensors").rename(model / "weights.safetensors")
    with pytest.raises(CheckpointError, match="2 other"):
        load_model(model)
