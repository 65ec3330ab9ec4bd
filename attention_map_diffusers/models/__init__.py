"""Pipelines built in this repository: ``tiny-random`` (random weights, for tests and demos) and
``toy-shapes`` (a small SD3 trained here on flat coloured shapes, whose maps mean something)."""
