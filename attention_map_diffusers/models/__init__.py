"""Pipelines built in this repository: ``tiny-random`` and ``tiny-random-flux`` (random weights, for tests
and demos), and ``toy-shapes`` (a small SD3 trained here on synthetic shapes)."""
