#!/usr/bin/env python
"""Zero-shot segmentation with attention dumps, scored against ground-truth masks (``--help`` for the flags).

    python evaluate_segmentation.py --dumps out_dumps --masks masks --out seg
    python evaluate_segmentation.py --dumps voc_dumps --masks VOCdevkit/VOC2012/SegmentationClass --voc --out seg

The command lives in :mod:`attention_map_diffusers.segmentation.cli` (also installed as
``sd35-evaluate-segmentation`` by ``pip install .``).
"""

from attention_map_diffusers.segmentation.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
