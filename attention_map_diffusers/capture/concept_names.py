"""Concept lists and the ``--concept-rule`` names: checks that need no model (standard library only).

A concept is a short text ("cat", "sky", "background") whose ConceptAttention map the capture
computes (see :mod:`~attention_map_diffusers.capture.concepts`). The dump command checks its
``--concepts`` here before any model loads.
"""

from __future__ import annotations

from typing import Iterable

from ..contract import UserError

#: More concepts than this are refused (each adds one token to a small side stream; the per-pixel
#: softmax over concepts makes very long lists meaningless long before memory runs out).
MAX_CONCEPTS = 64

#: ``--concept-rule``: which keys the concept queries attend to (the paper's ablation of its
#: cross- and self-attention terms; upstream ``concept_cross_attention`` / ``concept_self_attention``).
CONCEPT_RULES = {
    "concept": "concept queries over [concept keys, image keys] (ConceptAttention, the default)",
    "cross": "concept queries over the image keys only (cross-attention only)",
    "self": "concept queries over the concept keys only (self-attention only)",
    "none": "no attention: the concepts' value vectors are their attention outputs",
}
DEFAULT_RULE = "concept"


def check_concepts(concepts: Iterable[str], *, flag: str = "--concepts") -> tuple[str, ...]:
    """The concepts, stripped, as a tuple; raises :class:`~..contract.UserError` on an empty list,
    an empty concept, a duplicate (case-insensitive) or more than :data:`MAX_CONCEPTS`."""
    names = tuple(str(c).strip() for c in concepts)
    if not names:
        raise UserError(f"{flag}: give at least one concept, e.g. {flag} cat table background")
    seen: dict[str, str] = {}
    for name in names:
        if not name:
            raise UserError(f"{flag}: an empty concept; give words such as {flag} cat table background")
        key = name.casefold()
        if key in seen:
            raise UserError(f"{flag}: {name!r} is given twice (as {seen[key]!r} and {name!r}, case-insensitive); "
                            "give each concept once")
        seen[key] = name
    if len(names) > MAX_CONCEPTS:
        raise UserError(f"{flag}: {len(names)} concepts; at most {MAX_CONCEPTS} are accepted")
    return names


def check_rule(rule: str, *, flag: str = "--concept-rule") -> str:
    if rule not in CONCEPT_RULES:
        raise UserError(f"{flag} must be one of {', '.join(CONCEPT_RULES)}, got {rule!r}")
    return rule
