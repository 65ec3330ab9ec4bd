"""Pipelines built in this repository: ``tiny-random`` (random weights, for tests and demos)."""
