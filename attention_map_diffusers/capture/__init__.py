"""Capture (torch): the recorder, the processors wrapping diffusers' own, exact probabilities, aggregation."""
