"""The server config: typed, unknown keys rejected with the key named, shortcuts."""
from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, default_config, from_model, load, parse


def test_from_model_and_defaults():
    c = from_model("/some/dir/tiny-model")
    assert c.models[0].name == "tiny-model" and c.workers[0].models == ["tiny-model"]
    assert c.pipeline_config("single").model == "tiny-model"
    from tandem import assets

    assert default_config().models[0].path == assets.DEFAULT_MODEL


@pytest.mark.parametrize("data, key", [
    ({"models": [{"name": "a", "path": "p"}], "sever": {}}, "sever"),
    ({"models": [{"name": "a", "path": "p", "kv_cache": 3}]}, "models.0.kv_cache"),
    ({"models": [{"name": "a", "path": "p"}], "server": {"port": -1}}, "server.port"),
    ({"models": [{"name": "a", "path": "p"}], "workers": [{"models": ["b"]}]}, "workers.0.models"),
    ({"models": [{"name": "a", "path": "p"}], "pipelines": {"nope": {}}}, "pipelines.nope"),
    ({"models": [{"name": "a", "path": "p"}], "pipelines": {"single": {"modle": "a"}}}, "modle"),
    ({"models": []}, "models"),
    ({"models": [{"name": "a", "path": "p", "dtype": "float64"}]}, "models.0.dtype"),
    ({"models": [{"name": "a", "path": "p", "block_size": 24}]}, "models.0.block_size"),
    ({"models": [{"name": "a", "path": "p"}], "workers": [{"models": ["a"], "device": "gpu"}]}, "workers.0.device"),
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert key in str(e.value)


def test_load_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("server: {port: 6000}\nmodels:\n  - {name: m, path: /x}\npipelines: {single: {model: m}}\n")
    assert load(f).server.port == 6000
    f.write_text("models: [1, 2\n")
    with pytest.raises(ConfigError):
        load(f)
