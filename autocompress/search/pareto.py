"""Pareto extraction for minimisation objectives."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when ``a`` is no worse than ``b`` everywhere and better somewhere (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Give the indices of the non-dominated points, in input order; duplicates keep the first."""
    front: list[int] = []
    for i, p in enumerate(points):
        if any(dominates(points[j], p) for j in range(len(points)) if j != i):
            continue
        if any(tuple(points[j]) == tuple(p) for j in front):
            continue
        front.append(i)
    return front
