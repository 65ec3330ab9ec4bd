#!/usr/bin/env python
"""Generate images with Stable Diffusion 3 / 3.5 and dump step-averaged image->text attention
(``--help`` for the flags).

    python sd_35_stepavg_dump.py --prompt "A furry cat beneath a table" --steps 28
    python sd_35_stepavg_dump.py --model tiny-random --steps 8 --height 512 --width 512   # no GPU
    accelerate launch sd_35_stepavg_dump.py --prompts-file prompts.txt --seed 1 2 3      # many GPUs

The command lives in :mod:`attention_map_diffusers.dump.cli` (also installed as
``sd35-stepavg-dump`` by ``pip install .``); the files it writes: docs/FORMAT.md.
"""

from attention_map_diffusers.dump.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
