"""Finding the attention blocks to record and swapping their processors through diffusers' API."""

from __future__ import annotations

from typing import Any, Callable, Optional

from .family import SD3, Block, Family, family_of
from .processor import CaptureProcessor

# Keys of ``transformer.attn_processors`` are "<module path>.processor". SD3.5 medium's MMDiT-X
# blocks also have ``attn2`` (image-only self-attention); it never matches and is never touched.
_SUFFIX = ".processor"


def joint_attention_blocks(transformer) -> list[tuple[int, str]]:
    """``[(i, "transformer_blocks.{i}.attn"), ...]`` of an SD3 transformer, in index order."""
    return [(b.position, b.name) for b in SD3.blocks(transformer)]


def attention_blocks(transformer, family: Optional[Family] = None) -> list[Block]:
    """The blocks to record, in recording order (FLUX.1: joint blocks, then single blocks)."""
    return (family or family_of(transformer)).blocks(transformer)


def install_capture(transformer, make_sink_for: Callable[[int], Any], family: Optional[Family] = None) -> dict:
    """Wrap every recorded block's processor in a :class:`CaptureProcessor`.

    Args:
        make_sink_for: block position -> the sink its processor reports to.
    Returns:
        the processors the transformer had (``attn_processors``), for :func:`restore_processors`.
    Raises:
        RuntimeError: when a capture is already installed on this transformer.
    """
    family = family or family_of(transformer)
    saved = dict(transformer.attn_processors)
    if any(isinstance(p, CaptureProcessor) for p in saved.values()):
        raise RuntimeError(
            "attention capture is already installed on this transformer (another recorder is active, "
            "or init_pipeline(pipe) was called): leave the other `with` block, or call "
            "restore_pipeline(pipe), first"
        )
    blocks = {b.name + _SUFFIX: b for b in family.blocks(transformer)}
    new = {}
    for key, proc in saved.items():
        b = blocks.get(key)
        new[key] = proc if b is None else CaptureProcessor(
            proc, make_sink_for(b.position), b.position, b.name, single=b.single, text_first=family.text_first
        )
    transformer.set_attn_processor(new)
    return saved


def restore_processors(transformer, saved: dict) -> None:
    """Put back the processors returned by :func:`install_capture`."""
    # set_attn_processor pops from the dict it is given: pass a copy.
    transformer.set_attn_processor(dict(saved))
