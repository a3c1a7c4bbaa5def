"""Token alignment between a receiver and a sharer with different tokenizers: the receiver's tokens are
the base, and each is given exactly one sharer token, so both models prefill the same positions.

A normal token is decoded alone and re-encoded with the sharer's tokenizer; of several sharer tokens
the first (`first`) or the one covering the most text (`longest`) is kept. Special tokens map to the
sharer's token of the same role (bos, eos, pad, unk) or the same string. A token with no counterpart
(nothing encodes, or a partial character) gets the sharer's unk/pad/0 and is not fused. With chat
messages only the tokens inside message contents are fused, the template's own tokens are not (each
model has its own template). Pairs with one vocabulary need no alignment: ids pass unchanged."""
from __future__ import annotations

from dataclasses import dataclass

from workers.chat import render

STRATEGIES = ("first", "longest")
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass
class Aligned:
    receiver_ids: list[int]
    sharer_ids: list[int]
    fuse: list[bool]          # per position: does the receiver take fused entries there

    def __post_init__(self) -> None:
        assert len(self.receiver_ids) == len(self.sharer_ids) == len(self.fuse)


class TokenAligner:
    def __init__(self, receiver_tokenizer, sharer_tokenizer, strategy: str = "first"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown alignment strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        self.rtok, self.stok, self.strategy = receiver_tokenizer, sharer_tokenizer, strategy
        self.identity = receiver_tokenizer.get_vocab() == sharer_tokenizer.get_vocab()
        fallbacks = (sharer_tokenizer.unk_token_id, sharer_tokenizer.pad_token_id)
        self.fallback = next((i for i in fallbacks if i is not None), 0)
        self.specials = set(receiver_tokenizer.all_special_ids)
        self._memo: dict[int, int | None] = {}

    def sharer_token(self, token: int) -> int | None:
        """The sharer token standing for receiver token `token`, None when there is none."""
        if self.identity:
            return token
        if token not in self._memo:
            self._memo[token] = self._special(token) if token in self.specials else self._normal(token)
        return self._memo[token]

    def _special(self, token: int) -> int | None:
        for role in ROLES:
            if getattr(self.rtok, f"{role}_id", None) == token and getattr(self.stok, f"{role}_id", None) is not None:
                return getattr(self.stok, f"{role}_id")
        text = self.rtok.convert_ids_to_tokens(token)
        found = self.stok.convert_tokens_to_ids(text)
        return found if found is not None and found != self.stok.unk_token_id else None

    def _normal(self, token: int) -> int | None:
        text = self.rtok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not text or "\ufffd" in text:
            return None
        ids = self.stok.encode(text, add_special_tokens=False)
        if not ids:
            return None
        if self.strategy == "first" or len(ids) == 1:
            return ids[0]
        lengths = [len(self.stok.decode([i], clean_up_tokenization_spaces=False)) for i in ids]
        return ids[lengths.index(max(lengths))]

    def align_ids(self, receiver_ids: list[int], fuse: list[bool] | None = None) -> Aligned:
        mapped = [self.sharer_token(t) for t in receiver_ids]
        fuse = fuse or [True] * len(receiver_ids)
        ok = [f and (m is not None) and (self.identity or t not in self.specials)
              for t, m, f in zip(receiver_ids, mapped, fuse)]
        return Aligned(list(receiver_ids), [self.fallback if m is None else m for m in mapped], ok)

    def align_text(self, text: str) -> Aligned:
        return self.align_ids(list(self.rtok.encode(text, add_special_tokens=False)))

    def align_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> Aligned:
        """The receiver's own rendering of `messages`; without one vocabulary only content tokens fuse."""
        text = render(self.rtok, messages, add_generation_prompt)
        enc = self.rtok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if self.identity:
            return self.align_ids(ids)
        spans, at = [], 0
        for m in messages:
            content = m.get("content") or ""
            found = text.find(content, at) if content else -1
            if found >= 0:
                spans.append((found, found + len(content)))
                at = found + len(content)
        inside = [a < b and any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
        return self.align_ids(ids, inside)
