"""Zero-shot segmentation with attention maps: scoring word maps of dumps against ground-truth masks.

Layers: :mod:`.metrics` (IoU, AP, accuracy; numpy), :mod:`.maps` (word maps -> image-sized maps and
the baselines; numpy), :mod:`.masks` (reading ground truth; numpy + Pillow), :mod:`.evaluate`
(the per-run loop), :mod:`.tables` (the numbers), :mod:`.plots` (matplotlib), :mod:`.page`
(``index.html``), :mod:`.write` (the output folder) and :mod:`.cli` (``evaluate_segmentation.py``,
``sd35-evaluate-segmentation``).
"""
