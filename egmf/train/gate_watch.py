"""A dead level-2 router, seen in the logging windows' per-dataset gate telemetry.

A router whose hidden units have all gone negative (docs/model.md, "the gate's
hidden layer can die") gives every input the same weights: the per-dataset charts
`gate/DATASET/EXPERT` of the datasets it had told apart merge into one and stay
there. The entropies do not show it (a batch holds one dataset), and a gate that
has never told two datasets apart (the uniform start, `fusion.gating = "uniform"`)
is not dead, so a pair of datasets counts only once its gates have differed.
"""

from __future__ import annotations

import itertools

APART_SPREAD = 0.02
"""Two datasets' gates count as told apart once they differ by more than this on some expert."""
MERGED_SPREAD = 0.002
"""...and as merged in a window where they differ by less than this on every expert."""
DEAD_WINDOWS = 3
"""Logging windows in a row a told-apart pair must stay merged before the warning."""


def dataset_gates(metrics: dict[str, float], experts: list[str]) -> dict[str, list[float]]:
    """{dataset: mean level-2 weight of each expert} of the datasets a window's `gate/DATASET/EXPERT` metrics hold."""
    gates: dict[str, list[float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "gate" and parts[1] != "argmax_share" and parts[2] in experts:
            gates.setdefault(parts[1], [0.0] * len(experts))[experts.index(parts[2])] = value
    return gates


def pair_spreads(gates: dict[str, list[float]]) -> dict[str, float]:
    """{"A & B": the largest difference between the two datasets' weights of one expert}, every pair once."""
    return {
        f"{a} & {b}": max(abs(x - y) for x, y in zip(gates[a], gates[b], strict=True))
        for a, b in itertools.combinations(sorted(gates), 2)
    }


def newly_merged(spreads: dict[str, float], told_apart: list[str], merged_windows: dict[str, int]) -> list[str]:
    """Update `told_apart` and `merged_windows` (a run's state, saved with its checkpoints) with one window's
    spreads; return the pairs that have just stayed merged for DEAD_WINDOWS windows. Such a pair is reported again
    only after the gate has told it apart once more. A pair the window does not hold (a dataset it did not sample)
    keeps its count."""
    merged = []
    for pair, spread in spreads.items():
        if spread > APART_SPREAD and pair not in told_apart:
            told_apart.append(pair)
        count = merged_windows.get(pair, 0) + 1 if spread < MERGED_SPREAD and pair in told_apart else 0
        merged_windows[pair] = count
        if count == DEAD_WINDOWS:
            merged.append(pair)
            told_apart.remove(pair)
    return merged
