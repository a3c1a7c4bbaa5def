"""After sampling: append a token, detokenize, check stop conditions, build the step's output."""
from __future__ import annotations

import time

from workers.engine.outputs import StepOutput, Usage
from workers.engine.sequence import Sequence


def append_token(seq: Sequence, token: int, source: str, logprob: dict | None) -> StepOutput:
    if seq.first_token_time is None:
        seq.first_token_time = time.monotonic()
    seq.token_ids.append(token)
    seq.output_token_ids.append(token)
    seq.output_sources.append(source)
    if logprob is not None:
        seq.output_logprobs.append(logprob)
    p = seq.params
    if p.detokenize:
        seq.text += seq.detokenizer.add(token)
    if token in seq.stop_ids or (p.stop and _cut_at_stop_string(seq)):
        seq.finish_reason = "stop"
    elif len(seq.output_token_ids) >= p.max_tokens or len(seq.token_ids) >= seq.max_len:
        seq.finish_reason = "length"
        if p.detokenize:
            seq.text += seq.detokenizer.flush()
    if seq.finish_reason is not None:
        done = finish_output(seq)
        done.new_token_ids, done.sources, done.logprobs = [token], [source], [logprob] if logprob else []
        return done
    out = StepOutput(seq.request_id, seq.model, [token], "", [source], [logprob] if logprob else [])
    visible = len(seq.text) - seq.stop_hold
    if visible > seq.emitted_chars:
        out.text_delta = seq.text[seq.emitted_chars : visible]
        seq.emitted_chars = visible
    return out


def _cut_at_stop_string(seq: Sequence) -> bool:
    stops = seq.params.stop
    if not stops:
        return False
    longest = max(len(s) for s in stops)
    window_start = max(0, seq.emitted_chars - longest)
    hits = [i for i in (seq.text.find(s, window_start) for s in stops) if i >= 0]
    if not hits:
        return False
    seq.text = seq.text[: min(hits)]
    return True


def finish_output(seq: Sequence) -> StepOutput:
    """The final message of a request: the rest of its text, finish reason, usage and timings."""
    now = time.monotonic()
    seq.finish_time = now
    delta = seq.text[seq.emitted_chars :]
    seq.emitted_chars = len(seq.text)
    timings = {"queue_s": (seq.first_scheduled_time or now) - seq.arrival_time, "total_s": now - seq.arrival_time}
    if seq.first_token_time is not None:
        timings["ttft_s"] = seq.first_token_time - seq.arrival_time
        if seq.num_output > 1:
            timings["per_token_s"] = (now - seq.first_token_time) / (seq.num_output - 1)
    return StepOutput(
        seq.request_id, seq.model, text_delta=delta, finished=True, finish_reason=seq.finish_reason,
        usage=Usage(seq.num_prompt_tokens, seq.num_output, seq.num_cached_tokens), timings=timings,
        stats=dict(seq.stats),
    )
