"""Side-by-side timing shared by the benchmarks: warm-up, then methods interleaved within each repeat."""

from __future__ import annotations

import statistics
from typing import Callable


def interleaved(methods: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every method ``warmup`` times, then ``repeats`` rounds in which each method runs once.

    The order alternates between rounds (forward, backward, ...) so that drifts (thermal, caches,
    other load) fall on every method alike. Each callable returns its own elapsed seconds.
    """
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(methods[name]())
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def table(times: dict[str, list[float]], unit: str = "s") -> str:
    """A plain-text table of median and min-max per method."""
    width = max(len(n) for n in times) + 2
    lines = [f"{'method':<{width}}{'median ' + unit:>12}{'min':>10}{'max':>10}   n"]
    for name, t in times.items():
        lines.append(f"{name:<{width}}{median(t):>12.3f}{min(t):>10.3f}{max(t):>10.3f}   {len(t)}")
    return "\n".join(lines)
