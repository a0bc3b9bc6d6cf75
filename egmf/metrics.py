"""The field's standard metrics (definitions and sources: docs/method.md), so results compare with published ones.

    score("meld", ["joy", "anger"], ["joy", "joy"])      -> {"acc": 0.5, "wf1": ...}
    score("mosei", [0.4, -1.2], [0.6, 0.0])              -> {"has0_acc2": ..., "acc7": ..., "mae": ...}

Classification predictions are class names; None (an unparseable answer)
counts as wrong, never as some class. Regression predictions must be numbers:
deal with unparseable answers before scoring (count them; constrained decoding
has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from egmf.datasets import CLASSIFICATION, get_spec

SIMS_ACC2_EDGES = (-1.01, 0.0, 1.01)
SIMS_ACC3_EDGES = (-1.01, -0.1, 0.1, 1.01)
SIMS_ACC5_EDGES = (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01)


def score(dataset: str, predictions: Sequence, targets: Sequence) -> dict[str, float]:
    """Metrics of one dataset; see the module docstring for what predictions may hold."""
    spec = get_spec(dataset)
    if len(predictions) != len(targets) or not len(targets):
        raise ValueError(f"{dataset}: {len(predictions)} predictions for {len(targets)} targets (need equal, > 0)")
    if spec.task == CLASSIFICATION:
        return classification_metrics(predictions, targets, spec.labels)
    if any(p is None for p in predictions):
        raise ValueError(
            f"{dataset}: regression predictions hold None (unparseable answers); score them as errors first "
            "(egmf.train.evaluation.scored_prediction), or use constrained decoding"
        )
    preds, truth = np.asarray(predictions, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    return mosei_metrics(preds, truth) if spec.label_range[1] == 3.0 else sims_metrics(preds, truth)


CLASSIFICATION_METRICS = ("acc", "wf1")
MOSEI_METRICS = ("has0_acc2", "has0_f1", "non0_acc2", "non0_f1", "acc5", "acc7", "mae", "corr")
SIMS_METRICS = ("acc2", "acc3", "acc5", "f1", "mae", "corr")


def metric_names(dataset: str) -> tuple[str, ...]:
    """The names `score` returns for this dataset."""
    spec = get_spec(dataset)
    if spec.task == CLASSIFICATION:
        return CLASSIFICATION_METRICS
    return MOSEI_METRICS if spec.label_range[1] == 3.0 else SIMS_METRICS


def classification_metrics(predictions: Sequence, targets: Sequence, labels: Sequence[str]) -> dict[str, float]:
    preds = ["<unparseable>" if p is None else p for p in predictions]
    return {
        "acc": float(accuracy_score(targets, preds)),
        # labels= keeps an unparseable answer from becoming a class of its own in the average.
        "wf1": float(f1_score(targets, preds, labels=sorted(set(targets)), average="weighted", zero_division=0)),
    }


def mosei_metrics(preds: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    non0 = truth != 0
    return {
        "has0_acc2": float(np.mean((preds >= 0) == (truth >= 0))),
        "has0_f1": weighted_f1(truth >= 0, preds >= 0),
        "non0_acc2": float(np.mean((preds[non0] > 0) == (truth[non0] > 0))) if non0.any() else float("nan"),
        "non0_f1": weighted_f1(truth[non0] > 0, preds[non0] > 0) if non0.any() else float("nan"),
        # np.round sends ties to the even integer (0.5 -> 0, -2.5 -> -2), as the field's code does.
        "acc5": float(np.mean(np.round(np.clip(preds, -2, 2)) == np.round(np.clip(truth, -2, 2)))),
        "acc7": float(np.mean(np.round(np.clip(preds, -3, 3)) == np.round(np.clip(truth, -3, 3)))),
        "mae": float(np.mean(np.abs(preds - truth))),
        "corr": pearson(preds, truth),
    }


def sims_metrics(preds: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    preds, truth = np.clip(preds, -1, 1), np.clip(truth, -1, 1)

    def same_bin(edges):
        return float(np.mean(bin_index(preds, edges) == bin_index(truth, edges)))

    return {
        "acc2": same_bin(SIMS_ACC2_EDGES),
        "acc3": same_bin(SIMS_ACC3_EDGES),
        "acc5": same_bin(SIMS_ACC5_EDGES),
        "f1": weighted_f1(bin_index(truth, SIMS_ACC2_EDGES), bin_index(preds, SIMS_ACC2_EDGES)),
        "mae": float(np.mean(np.abs(preds - truth))),
        "corr": pearson(preds, truth),
    }


def bin_index(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Index of the bin (lo, hi] holding each value: open on the left, closed on the right."""
    return np.searchsorted(np.asarray(edges), values, side="left") - 1


def weighted_f1(truth: np.ndarray, preds: np.ndarray) -> float:
    return float(f1_score(truth, preds, average="weighted", zero_division=0))


def pearson(preds: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (undefined, not 0)."""
    if np.std(preds) == 0 or np.std(truth) == 0:
        return float("nan")
    return float(np.corrcoef(preds, truth)[0, 1])
