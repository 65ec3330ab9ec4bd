"""Finding SD3's joint-attention blocks and swapping their processors through diffusers' API."""

from __future__ import annotations

from typing import Any, Callable

from ..contract import JOINT_BLOCK
from .processor import CaptureProcessor

# Keys of ``transformer.attn_processors`` are "<module path>.processor". SD3.5 medium's MMDiT-X
# blocks also have ``attn2`` (image-only self-attention); it never matches and is never touched.
_SUFFIX = ".processor"


def joint_attention_blocks(transformer) -> list[tuple[int, str]]:
    """``[(i, "transformer_blocks.{i}.attn"), ...]`` in index order, from the model itself."""
    found = []
    for key in transformer.attn_processors:
        m = JOINT_BLOCK.fullmatch(key[: -len(_SUFFIX)]) if key.endswith(_SUFFIX) else None
        if m:
            found.append((int(m.group(1)), m.group(0)))
    if not found:
        raise ValueError(
            f"{type(transformer).__name__} has no transformer_blocks.{{i}}.attn modules: "
            "expected an SD3-family transformer (SD3Transformer2DModel)"
        )
    return sorted(found)


def install_capture(transformer, make_sink_for: Callable[[int], Any]) -> dict:
    """Wrap every joint-attention processor in a :class:`CaptureProcessor`.

    Args:
        make_sink_for: block index -> the sink its processor reports to.
    Returns:
        the processors the transformer had (``attn_processors``), for :func:`restore_processors`.
    Raises:
        RuntimeError: when a capture is already installed on this transformer.
    """
    saved = dict(transformer.attn_processors)
    if any(isinstance(p, CaptureProcessor) for p in saved.values()):
        raise RuntimeError(
            "attention capture is already installed on this transformer (another recorder is active, "
            "or init_pipeline(pipe) was called): leave the other `with` block, or call "
            "restore_pipeline(pipe), first"
        )
    blocks = {name + ".processor": i for i, name in joint_attention_blocks(transformer)}
    new = {
        key: CaptureProcessor(proc, make_sink_for(blocks[key]), blocks[key]) if key in blocks else proc
        for key, proc in saved.items()
    }
    transformer.set_attn_processor(new)
    return saved


def restore_processors(transformer, saved: dict) -> None:
    """Put back the processors returned by :func:`install_capture`."""
    # set_attn_processor pops from the dict it is given: pass a copy.
    transformer.set_attn_processor(dict(saved))
