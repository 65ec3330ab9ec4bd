"""Exact, streaming capture of Stable Diffusion 3 / 3.5 image->text attention, and its analysis.

Layers (each a sub-package; the arrows are the only imports between them):

- ``contract`` (standard library): what a dump is -- file names, format version, what makes a run
  complete, ``runs.jsonl``, the tokenizer call with offsets, the user-error class. Both sides import it.
- ``capture/`` (torch): the recorder, the processors that wrap diffusers' own, the exact probabilities
  and the on-device aggregation. -> ``contract``
- ``dump/`` (torch, diffusers): loading a pipeline, planning runs, writing run folders. -> ``capture``,
  ``contract``, ``models``
- ``analysis/`` (numpy and matplotlib, never torch): reading dumps, words, statistics, tables, plots,
  the HTML report. -> ``contract``
- ``models/``: pipelines built here (``tiny-random``) for tests and demos.

Public names (imported lazily, so that ``analysis`` can be used without importing torch):

- :class:`StepAverageRecorder` / :class:`CaptureResult`: the streaming recorder (context manager).
- :func:`init_pipeline` / :data:`attn_maps` / :func:`restore_pipeline`: upstream-compatible raw maps.
- :class:`KernelPaths`: the capture paths and their self-checks, shareable by several recorders.
- :func:`concept_maps` / :class:`ConceptResult`: ConceptAttention maps of concepts for one generated
  image (:class:`ConceptOptions` for the recorder's ``concepts=``).
- :class:`Dump`: a run in memory (from a folder, or from a ``CaptureResult``), for notebooks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # real names for editors and type checkers; at run time they load on first use
    from .analysis.dumpfile import Dump
    from .capture.aggregate import CaptureResult
    from .capture.compat import attn_maps, init_pipeline, restore_pipeline
    from .capture.concept_maps import ConceptResult, concept_maps
    from .capture.concepts import ConceptOptions
    from .capture.paths import KernelPaths
    from .capture.recorder import StepAverageRecorder

_LAZY = {
    "StepAverageRecorder": "capture.recorder",
    "CaptureResult": "capture.aggregate",
    "init_pipeline": "capture.compat",
    "restore_pipeline": "capture.compat",
    "attn_maps": "capture.compat",
    "Dump": "analysis.dumpfile",
    "KernelPaths": "capture.paths",
    "concept_maps": "capture.concept_maps",
    "ConceptResult": "capture.concept_maps",
    "ConceptOptions": "capture.concepts",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
