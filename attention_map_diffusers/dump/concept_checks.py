"""The dump command's ``--concepts`` checks: what can be refused before the model loads (the list
itself, and its T5 tokens when the tokenizer can be had without the model), and after it loads."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ..capture.concept_names import check_concepts, check_rule
from ..contract import UserError
from .loading import TINY_MODELS, TOY_SHAPES, _cached_config, _local_folder, guess_family


def check_concept_flags(args) -> None:
    """Checks of ``--concepts`` / ``--concept-blocks`` / ``--concept-steps`` / ``--concept-rule`` that need
    no model; normalises ``args.concepts``. ``args.steps`` must already be the run's step count."""
    if args.concepts is None:
        for flag, value in (("--concept-blocks", args.concept_blocks), ("--concept-steps", args.concept_steps),
                            ("--concept-rule", args.concept_rule)):
            if value is not None:
                raise UserError(f"{flag} applies to concept maps: add --concepts (e.g. --concepts cat table sky)")
        return
    args.concepts = list(check_concepts(args.concepts))
    check_rule(args.concept_rule or "concept")
    for flag, values in (("--concept-blocks", args.concept_blocks), ("--concept-steps", args.concept_steps)):
        if values is not None:
            bad = [v for v in values if v < 0]
            if bad:
                raise UserError(f"{flag}: indices count from 0, got {bad[0]}")
            if len(set(values)) != len(values):
                raise UserError(f"{flag}: an index is given twice ({values}); give each once")
    steps = args.steps
    if getattr(args, "strength", None) is not None:  # img2img runs the last steps of the schedule (diffusers' count)
        steps -= int(max(steps - min(steps * args.strength, steps), 0))
    if args.concept_steps is not None and max(args.concept_steps) >= steps:
        raise UserError(f"--concept-steps {max(args.concept_steps)}: the run has {steps} step(s), "
                        f"indices 0..{steps - 1}")
    tokenizer = t5_tokenizer_without_model(args.model)
    if tokenizer is not None:
        check_concept_tokens(tokenizer, args.concepts)


def t5_tokenizer_without_model(model: str):
    """The model's T5 tokenizer when it can be had without the weights (tiny models, a local folder, a
    cached hub id); None otherwise (the check then runs after loading)."""
    family = guess_family(model)
    if model in TINY_MODELS:
        from ..models.tiny import build_t5_tokenizer

        return build_t5_tokenizer()
    if family is None:
        return None
    sub = "tokenizer_2" if family == "flux" else "tokenizer_3"
    path = _local_folder(model)
    try:
        from transformers import AutoTokenizer

        if os.path.isdir(path) or model == TOY_SHAPES:
            if not os.path.isdir(os.path.join(path, sub)):
                return None
            return AutoTokenizer.from_pretrained(path, subfolder=sub)
        if _cached_config(model, sub, "tokenizer_config.json") is None:
            return None
        return AutoTokenizer.from_pretrained(model, subfolder=sub, local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer without the network: checked after loading
        return None


def check_concept_tokens(tokenizer, concepts: Sequence[str]) -> None:
    """Refuse a concept T5 tokenises to nothing; warn when two concepts share their first token (ConceptAttention
    keeps only that one, so their maps are the same)."""
    if tokenizer is None:
        raise UserError("--concepts needs the model's T5 text encoder and tokenizer (each concept is its first T5 "
                        "token); this pipeline has none")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    first: dict[int, str] = {}
    for c in concepts:
        ids = [i for i in tokenizer(c, add_special_tokens=False)["input_ids"] if i not in special]
        if not ids:
            raise UserError(f"--concepts: {c!r} tokenises to nothing in T5; give a word")
        if ids[0] in first:
            piece = tokenizer.convert_ids_to_tokens(ids[0])
            print(f"warning: --concepts {first[ids[0]]!r} and {c!r} begin with the same T5 token {piece!r}; "
                  "ConceptAttention keeps each concept's first token, so their maps are the same", file=sys.stderr)
        first.setdefault(ids[0], c)


def check_concepts_on_model(pipe, concepts: Optional[Sequence[str]], blocks: Optional[Sequence[int]]) -> None:
    """The checks that need the loaded model: its T5 encoder, the tokens, the joint block indices."""
    if not concepts:
        return
    from ..capture.concepts import t5_tokenizer

    flux = hasattr(pipe.transformer, "single_transformer_blocks")
    if getattr(pipe, "text_encoder_2" if flux else "text_encoder_3", None) is None:
        raise UserError("--concepts needs the model's T5 text encoder (each concept is its first T5 token); "
                        "this pipeline was loaded without it")
    check_concept_tokens(t5_tokenizer(pipe), concepts)
    n = len(pipe.transformer.transformer_blocks)
    if blocks is not None and max(blocks) >= n:
        raise UserError(f"--concept-blocks {max(blocks)}: this model has joint blocks 0..{n - 1} (the blocks with "
                        "a text stream)")
