"""Exact, streaming capture of Stable Diffusion 3 / 3.5 image->text attention.

Public names (imported lazily, so that the model-free analysis modules of this package can be used
without importing torch):

- :class:`StepAverageRecorder` / :class:`CaptureResult`: the streaming recorder (context manager).
- :func:`init_pipeline` / :data:`attn_maps` / :func:`restore_pipeline`: upstream-compatible raw maps.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "StepAverageRecorder": "recorder",
    "CaptureResult": "aggregate",
    "init_pipeline": "compat",
    "restore_pipeline": "compat",
    "attn_maps": "compat",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
