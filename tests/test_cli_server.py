"""`tandem serve` in a subprocess (SIGTERM at the end), and the client commands against it via CliRunner."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def served(tiny_path, tmp_path_factory):
    """`tandem serve --config FILE --port 0`; yields (address, process)."""
    config = tmp_path_factory.mktemp("serve") / "tandem.yaml"
    config.write_text(f"""
server: {{drain_grace_s: 5}}
models:
  - {{name: tiny, path: "{tiny_path}", kv_cache_mb: 4, block_size: 4, dtype: float32}}
workers:
  - {{models: [tiny], threads: 1}}
""")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--config", str(config), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    address, seen, deadline = None, [], time.monotonic() + 120
    while address is None and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stderr], [], [], 0.5)[0]:
            line = proc.stderr.readline()
            seen.append(line)
            m = re.search(r"serving .* on (\S+?)[,;]", line)
            address = m.group(1) if m else None
    if address is None:
        proc.kill()
        pytest.fail(f"tandem serve did not start: {''.join(seen)}")
    yield address, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_generate_against_server(served):
    address, _ = served
    r = invoke("generate", "--server", address, "-p", "hello", "--max-tokens", "5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 5 and out["usage"]["completion_tokens"] == 5
    streamed = invoke("generate", "--server", address, "-p", "hello", "--max-tokens", "5", "--raw")
    assert streamed.exit_code == 0, streamed.output


def test_chat_with_piped_stdin(served):
    address, _ = served
    r = invoke("chat", "--server", address, "--max-tokens", "4", "--temperature", "0",
               input="hello\nsecond turn\n\nthird turn\n/reset\nafter reset\n/bogus\n/exit\nnever sent\n")
    assert r.exit_code == 0, r.output
    cached = [int(x) for x in re.findall(r"cached prefix (\d+) tokens", r.stdout)]
    assert len(cached) == 4, r.output  # three turns, a reset, one more; nothing after /exit
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]
    assert "new session" in r.stdout and "unknown command /bogus" in r.output


@pytest.mark.parametrize("args, message", [
    (["generate", "--server", "nohostport", "-p", "x"], "--server: expected HOST:PORT"),
    (["generate", "--server", "{addr}", "-p", "x", "--top-p", "2"], "sampling.top_p"),
    (["generate", "--server", "{addr}", "-p", "x", "--max-tokens", "0"], "sampling.max_tokens"),
    (["generate", "--server", "{addr}", "-p", "x", "-m", "nope"], "NOT_FOUND"),
    (["generate", "--server", "127.0.0.1:1", "-p", "x"], "UNAVAILABLE"),
    (["chat", "--server", "{addr}", "-m", "nope"], "NOT_FOUND"),
    (["serve", "--config", "/no/such/file.yaml"], "no such file"),
    (["serve", "--config", "x.yaml", "--model", "y"], "not both"),
    (["serve", "--model", "/no/such/model"], "error:"),
    (["worker", "--model", "x", "--orchestrator", "nocolon"], "--orchestrator: expected HOST:PORT"),
    (["worker", "--model", "x", "--c2c", "{bad"], "--c2c: not valid JSON"),
    (["worker", "--model", "x", "--r2r", "[1]"], "--r2r: expected a JSON object"),
    (["bench", "no_such_bench"], "no benchmark 'no_such_bench'"),
])
def test_bad_input_is_a_clear_error(served, args, message):
    address, _ = served
    r = invoke(*[a.replace("{addr}", address) for a in args], input="")
    assert r.exit_code == 2, r.output
    assert "error:" in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:7"], "--device: 'cuda:7'"),
    (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N"),
    (["--dtype", "float64"], "dtype 'float64'"),
    (["--kv-cache-mb", "-1"], "kv_cache_mb: must be positive"),
    (["--block-size", "24"], "block_size: must be a power of two"),
])
def test_bad_worker_options_are_clear_errors(tiny_path, args, message):
    r = invoke("worker", "--model", str(tiny_path), *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert "Traceback" not in r.output


def test_serve_on_a_port_in_use_is_refused(served, tiny_path):
    address, _ = served
    r = invoke("serve", "--model", str(tiny_path), "--port", address.rpartition(":")[2])
    assert r.exit_code == 2 and "cannot bind" in r.stderr, r.output


def test_serve_gives_up_on_a_model_that_does_not_load(tiny_path, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_path, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    t0 = time.monotonic()
    r = invoke("serve", "--model", str(bad), "--port", "0")
    assert r.exit_code == 2 and "exited before it was ready 2 times" in r.stderr, r.output
    assert time.monotonic() - t0 < 120


def test_a_failed_chat_turn_does_not_end_the_chat(served):
    address, _ = served
    r = invoke("chat", "--server", address, "--max-tokens", "4", "--temperature", "0",
               input="first\n" + "x " * 600 + "\nafter the error\n")
    assert r.exit_code == 0, r.output
    assert "error: INVALID_ARGUMENT" in r.stderr and "/reset" in r.stderr
    assert len(re.findall(r"cached prefix (\d+) tokens", r.stdout)) == 2, r.output


def test_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 1, bogus_key: 3}\nmodels: [{name: a, path: /x}]\n")
    r = invoke("serve", "--config", str(bad))
    assert r.exit_code == 2 and "server.bogus_key" in r.stderr, r.output
    assert "install" not in r.stderr


def test_sigterm_drains_and_exits(served):
    _, proc = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
