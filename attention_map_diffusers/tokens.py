"""The tokens a text encoder saw for a prompt, with their character spans, for the dump's metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PromptTokens:
    """One prompt through one tokenizer, as the pipeline feeds it (truncated, unpadded).

    Attributes:
        tokens: token strings, specials included; position j is text position ``start + j`` of the
            encoder's span.
        special: 1 for special tokens, else 0.
        offsets: per token, [start, end) in the prompt, None for special tokens; None altogether when
            the tokenizer cannot give offsets (a slow tokenizer).
        truncated: whether the prompt had more tokens than ``max_length``.
    """

    tokens: list[str]
    special: list[int]
    offsets: Optional[list[Optional[list[int]]]]
    truncated: bool


def prompt_tokens(tokenizer, prompt: str, max_length: int) -> PromptTokens:
    """Tokenize ``prompt`` the way SD3's pipeline does (specials added, truncated at ``max_length``)."""
    full = tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    kwargs = dict(add_special_tokens=True, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(prompt, return_offsets_mapping=fast, **kwargs)
    ids = enc["input_ids"]
    special = [int(s) for s in enc["special_tokens_mask"]]
    offsets = None
    if fast:
        offsets = [None if s else [int(a), int(b)] for (a, b), s in zip(enc["offset_mapping"], special)]
    return PromptTokens(
        tokens=list(tokenizer.convert_ids_to_tokens(ids)),
        special=special,
        offsets=offsets,
        truncated=len(full) > len(ids),
    )
