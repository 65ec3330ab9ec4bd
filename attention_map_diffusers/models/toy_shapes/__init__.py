"""toy-shapes: a small SD3 pipeline trained in this repository on flat coloured shapes.

``data`` renders the scenes and captions, ``build`` makes the untrained parts, ``train`` is the one
training command, ``evaluate`` scores images and attention maps against the rendered truth (numpy).
The trained pipeline lives in ``weights/`` and loads with ``StableDiffusion3Pipeline.from_pretrained``.
"""

import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
