#!/usr/bin/env python
"""Analyse step-averaged attention dumps without loading any model (``--help`` for the flags).

    python analyse_stepavg.py --root out_sd35_stepavg --phrases "in front of|a barn"

The command lives in :mod:`attention_map_diffusers.analysis.cli` (also installed as
``sd35-analyse-stepavg`` by ``pip install .``); outputs and how to read them: docs/analysis.md.
"""

from attention_map_diffusers.analysis.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
