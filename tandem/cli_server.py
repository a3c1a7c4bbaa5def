"""The server-facing commands of `tandem`: serve, generate --server, chat, worker, bench.

`tandem.cli` registers them (`register(app)`); each keeps its heavy imports inside the command."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import typer

from tandem.errors import ModelNotFoundError, TandemError

REPO_ROOT = Path(__file__).resolve().parents[1]


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def load_config(config: Optional[Path], model: Optional[str]) -> Any:
    """The server config of `--config FILE`, `--model PATH` or the built-in default; errors exit 2."""
    from orchestrator import config as cfg
    from tandem import assets

    if config is not None and model is not None:
        fail("give --config FILE or --model PATH, not both")
    try:
        if config is not None:
            if not config.is_file():
                fail(f"--config: no such file: {config}")
            conf = cfg.load(config)
        elif model is not None:
            conf = cfg.from_model(str(assets.resolve(model)), name=Path(model).name or model)
        else:
            conf = cfg.default_config()
        for m in conf.models:  # fail here, with the fix, rather than in a worker process
            assets.resolve(m.path)
    except ModelNotFoundError as e:
        hint = " (install it with `tandem models install`)" if "install" not in str(e) else ""
        fail(f"{e}{hint}")
    except TandemError as e:
        fail(str(e))
    return conf


def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML server config."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Serve one model (directory, .gguf or name)."),
    port: Optional[int] = typer.Option(None, "--port", "-p", min=0, max=65535, help="gRPC port (default: config's)."),
) -> None:
    """Run the orchestrator and its workers until SIGINT/SIGTERM (then drain)."""
    from orchestrator.server import run

    conf = load_config(config, model)

    def ready(server: Any) -> None:
        metrics = f", metrics on {server.metrics.address}" if getattr(server.metrics, "address", "") else ""
        typer.echo(f"Tandem serving {[m.name for m in conf.models]} on {server.address}{metrics}; "
                   "Ctrl-C or SIGTERM drains and stops", err=True)

    try:
        run(conf, port, on_ready=ready)
    except (TandemError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        pass


def client_for(server: str, timeout: float | None = None) -> Any:
    from tandem.client import Client

    if ":" not in server:
        fail(f"--server: expected HOST:PORT, got {server!r}")
    return Client(server, timeout=timeout)


def generate_remote(server: str, prompt: str, *, model: Optional[str], chat: bool, as_json: bool,
                    **sampling: Any) -> None:
    """`tandem generate --server HOST:PORT`: stream one answer from a running server."""
    from tandem.client_errors import ClientError

    client = client_for(server)
    try:
        kw: dict[str, Any] = dict(messages=[{"role": "user", "content": prompt}]) if chat else dict(prompt=prompt)
        stream = client.generate(model=model, stream=True, **kw, **sampling)
        for chunk in stream:
            if not as_json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        r = stream.result
        assert r is not None
        if as_json:
            typer.echo(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                                   "usage": vars(r.usage), "timings": vars(r.timings), "stats": r.stats,
                                   "request_id": r.request_id, "server": server}))
        else:
            typer.echo()
    except ClientError as e:
        fail(str(e))
    finally:
        client.close()


def _lines() -> Iterator[str]:
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.secho("you> ", fg="cyan", bold=True, nl=False)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def chat(
    server: Optional[str] = typer.Option(None, "--server", "-s", help="HOST:PORT (default: start a local server)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (with --server: a served model's "
                                        "name; without: a directory, .gguf or name to serve)."),
    system: str = typer.Option("You are a concise, helpful assistant.", "--system", help="System prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    top_p: float = typer.Option(0.95, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
) -> None:
    """Interactive streaming chat in one session; `/reset` starts over, `/exit` (or EOF) quits."""
    if not 0 < top_p <= 1:
        fail(f"--top-p: must be in (0, 1], got {top_p}")
    handle = None
    if server is None:
        from orchestrator.launch import launch

        conf = load_config(None, model)
        typer.secho(f"starting a local server for {[m.name for m in conf.models]} ...", err=True, dim=True)
        try:
            handle = launch(conf)
        except RuntimeError as e:
            fail(str(e))
        server, model = handle.address, None
    try:
        _chat_loop(server, model, system, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                               seed=seed))
    finally:
        if handle is not None:
            handle.stop()


def _chat_loop(server: str, model: Optional[str], system: str, sampling: dict[str, Any]) -> None:
    from tandem.client_errors import ClientError

    client = client_for(server)
    try:
        with client.session(model=model, system=system) as session:
            typer.secho(f"session {session.session_id} on {server} ({session.info_at_start.model}); "
                        "/reset starts over, /exit quits", err=True, dim=True)
            for line in _lines():
                text = line.strip()
                if not text:
                    continue
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    session.reset()
                    typer.secho(f"(new session {session.session_id})", dim=True)
                    continue
                if text.startswith("/"):
                    typer.secho(f"unknown command {text}; /reset or /exit", fg="yellow", err=True)
                    continue
                try:
                    _turn(session, text, sampling)
                except ClientError as e:  # this turn failed; the chat goes on
                    typer.echo()
                    typer.secho(f"error: {e} (/reset starts a new session, /exit quits)", fg="red", err=True)
    except ClientError as e:
        fail(str(e))
    finally:
        client.close()


def _turn(session: Any, text: str, sampling: dict[str, Any]) -> None:
    typer.secho("assistant> ", fg="green", bold=True, nl=False)
    t0 = time.perf_counter()
    stream = session.stream(text, **sampling)
    try:
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        typer.secho("\n(interrupted)", dim=True)
        return
    r = stream.result
    dt = time.perf_counter() - t0
    u = r.usage
    rate = f", {u.completion_tokens / dt:.1f} tok/s" if dt > 0 else ""
    typer.echo()
    typer.secho(f"[{u.completion_tokens} tokens{rate}; prompt {u.prompt_tokens} tokens, cached prefix "
                f"{u.cached_tokens} tokens; finish: {r.finish_reason}]", dim=True)


def worker(
    model: list[str] = typer.Option(..., "--model", "-m", help="[NAME=]PATH or a known model name; repeatable."),
    orchestrator: str = typer.Option("", "--orchestrator", help="HOST:PORT of an orchestrator to register with."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(0, "--port", min=0, max=65535),
    advertise: str = typer.Option("", "--advertise", help="HOST:PORT the orchestrator should dial."),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    kv_cache_mb: float = typer.Option(512.0, "--kv-cache-mb"),
    block_size: int = typer.Option(16, "--block-size", min=1),
    threads: int = typer.Option(0, "--threads", min=0),
    r2r: str = typer.Option("", "--r2r", help='Host the SLM of an r2r pipeline: JSON {"slm": NAME, "llm": NAME '
                            'or null, "router": DIR or null, "decider": NAME}.'),
    c2c: str = typer.Option("", "--c2c", help='Host the receiver of a c2c pipeline: JSON {"receiver": NAME, '
                            '"sharers": {NAME: {"checkpoint": DIR, "path": MODEL_PATH}}, "mode": MODE}.'),
) -> None:
    """Start one worker process by hand (it registers itself with --orchestrator)."""
    import json

    from tandem import assets
    from workers.main import main as worker_main

    if orchestrator and ":" not in orchestrator:
        fail(f"--orchestrator: expected HOST:PORT, got {orchestrator!r}")
    if problem := device_problem(device):
        fail(f"--device: {problem}")
    for option, value in (("--r2r", r2r), ("--c2c", c2c)):
        try:
            if value and not isinstance(json.loads(value), dict):
                fail(f"{option}: expected a JSON object, got {value!r}")
        except json.JSONDecodeError as e:
            fail(f"{option}: not valid JSON: {e}")
    try:
        for spec in model:
            assets.resolve(spec.rpartition("=")[2])
    except TandemError as e:
        fail(str(e))
    argv = [a for spec in model for a in ("--model", spec)]
    argv += ["--host", host, "--port", str(port), "--device", device, "--dtype", dtype, "--kv-cache-mb",
             str(kv_cache_mb), "--block-size", str(block_size), "--threads", str(threads)]
    argv += ["--orchestrator", orchestrator] * bool(orchestrator) + ["--advertise", advertise] * bool(advertise)
    argv += [a for option, value in (("--r2r", r2r), ("--c2c", c2c)) if value for a in (option, value)]
    try:
        worker_main(argv)
    except KeyboardInterrupt:
        pass
    except TandemError as e:
        fail(str(e))


def device_problem(device: str) -> str:
    """Why `device` cannot run a worker on this machine, or '' when it can."""
    import re

    import torch

    if device == "cpu":
        return ""
    if not re.fullmatch(r"cuda(:\d+)?", device):
        return f"expected cpu, cuda or cuda:N, got {device!r}"
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    return "" if index < count else f"{device!r}: this machine has {count} CUDA device(s)"


def bench(ctx: typer.Context,
          name: str = typer.Argument("grpc_overhead", help="A script under bench/: grpc_overhead, engine_cpu.")) -> None:
    """Run a benchmark script (extra arguments go to it, e.g. `tandem bench grpc_overhead --streams 1,64`)."""
    script = REPO_ROOT / "bench" / f"{name.removesuffix('.py')}.py"
    if not script.is_file():
        known = sorted(p.stem for p in (REPO_ROOT / "bench").glob("*.py")) if (REPO_ROOT / "bench").is_dir() else []
        fail(f"no benchmark {name!r}; known: {known}")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *ctx.args], cwd=REPO_ROOT))


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(chat)
    app.command()(worker)
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)
