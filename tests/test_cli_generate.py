"""`tandem generate` in process: the JSON contract, sampling flags, and clear errors for bad input."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tandem.cli import app

runner = CliRunner()


def _gen(*args: str):
    return runner.invoke(app, ["generate", *args])


def _json(path, *args: str) -> dict:
    r = _gen("--model", str(path), "--prompt", "hello there", "--raw", "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_json_output_and_sampling_flags(tiny_path):
    out = _json(tiny_path, "--max-tokens", "6", "--temperature", "0")
    assert set(out) >= {"text", "token_ids", "finish_reason", "usage"}
    assert len(out["token_ids"]) == 6 and out["finish_reason"] in ("length", "stop")
    seeded = [_json(tiny_path, "--max-tokens", "8", "--temperature", "1.0", "--seed", "7")["token_ids"] for _ in range(2)]
    assert seeded[0] == seeded[1]
    greedy = out["token_ids"]
    top_k_1 = _json(tiny_path, "--max-tokens", "6", "--temperature", "2.0", "--top-k", "1", "--seed", "3")["token_ids"]
    top_p = _json(tiny_path, "--max-tokens", "6", "--temperature", "2.0", "--top-p", "0.000001", "--seed", "3")["token_ids"]
    assert greedy[: len(top_k_1)] == top_k_1 and greedy[: len(top_p)] == top_p


@pytest.mark.parametrize("args,needle", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-2"], "top_k"),
])
def test_bad_flags_name_the_field(tiny_path, args, needle):
    r = _gen("--model", str(tiny_path), "--prompt", "x", "--raw", *args)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output


def test_missing_model_names_the_problem(tmp_path):
    r = _gen("--model", str(tmp_path / "nowhere"), "--prompt", "x")
    assert r.exit_code == 2 and "nowhere" in r.output and "Traceback" not in r.output
