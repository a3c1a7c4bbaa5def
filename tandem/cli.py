"""The `tandem` command line."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from tandem import cli_server
from tandem.cli_c2c import c2c_app
from tandem.cli_common import fail
from tandem.cli_eval import eval_app
from tandem.cli_models import models_app
from tandem.cli_r2r import r2r_app
from tandem.errors import TandemError

app = typer.Typer(help="Tandem: small and large language models working on one request together.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")
app.add_typer(r2r_app, name="r2r")
app.add_typer(c2c_app, name="c2c")



@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name or path (default: the built-in default model)."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the model's chat template."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32 or bfloat16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    server: Optional[str] = typer.Option(None, "--server", "-s", help="HOST:PORT of a Tandem server (default: in process)."),
) -> None:
    """Generate in process with the engine, or against a server with --server HOST:PORT."""
    if server is not None:
        return cli_server.generate_remote(server, prompt, model=model, chat=chat, as_json=as_json,
                                          max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          top_k=top_k, seed=seed, stop=stop or None)
    from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

    try:
        from tandem import assets

        path = str(assets.resolve(model or assets.DEFAULT_MODEL))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stop or [])
        engine = Engine(EngineConfig([ModelConfig("model", path, dtype=dtype)]))
        text = prompt
        tokenizer = engine.model().tokenizer
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        engine.add_request("cli", text, params)
    except TandemError as e:
        fail(str(e))
    from workers.engine import RequestOutput

    result = RequestOutput("cli")
    while engine.has_unfinished:
        for out in engine.step():
            result.add(out)
            if not as_json:
                sys.stdout.write(out.text_delta)
                sys.stdout.flush()
    if as_json:
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "usage": vars(result.usage) if result.usage else None, "timings": result.timings, "model": path,
        }))
    else:
        print()


@app.command()
def demo() -> None:
    """The main job: install the default model if missing, start the server, run a scripted SDK session, stop it."""
    from tandem.demo import run

    try:
        run()
    except TandemError as e:
        fail(str(e))


cli_server.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
