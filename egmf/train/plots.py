"""Evaluation figures for MLflow: a confusion matrix per classification set, predicted-vs-true per regression set,
the level-2 gate per dataset over the evaluations."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from egmf.datasets import CLASSIFICATION, get_spec  # noqa: E402
from egmf.train.evaluation import PredictionRow  # noqa: E402

UNPARSEABLE = "(unparseable)"


def confusion_figure(dataset: str, rows: list[PredictionRow]):
    labels = list(get_spec(dataset).labels)
    columns = labels + ([UNPARSEABLE] if any(r.prediction is None for r in rows) else [])
    counts = np.zeros((len(labels), len(columns)), dtype=int)
    for row in rows:
        predicted = UNPARSEABLE if row.prediction is None else row.prediction
        counts[labels.index(row.target), columns.index(predicted)] += 1
    size = 2.5 + 0.6 * len(columns)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > counts.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{dataset} {rows[0].split} ({rows[0].mode}), n={len(rows)}")
    fig.tight_layout()
    return fig


def scatter_figure(dataset: str, rows: list[PredictionRow]):
    parsed = [r for r in rows if r.prediction is not None]
    low, high = get_spec(dataset).label_range
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter([r.target for r in parsed], [r.prediction for r in parsed], s=10, alpha=0.5)
    ax.plot([low, high], [low, high], color="grey", linewidth=1)
    ax.set_xlim(low - 0.1, high + 0.1)
    ax.set_ylim(low - 0.1, high + 0.1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    missing = len(rows) - len(parsed)
    ax.set_title(
        f"{dataset} {rows[0].split} ({rows[0].mode}), n={len(parsed)}" + (f", {missing} unparseable" if missing else "")
    )
    fig.tight_layout()
    return fig


def evaluation_figures(rows: list[PredictionRow], mode: str, folder: str = "plots"):
    """(artifact file under `folder`, figure) per dataset and split, for one decoding mode; close them after
    logging."""
    grouped: dict[tuple[str, str], list[PredictionRow]] = {}
    for row in rows:
        if row.mode == mode:
            grouped.setdefault((row.split, row.dataset), []).append(row)
    for (split, dataset), group in sorted(grouped.items()):
        if get_spec(dataset).task == CLASSIFICATION:
            yield f"{folder}/{split}/{dataset}_confusion.png", confusion_figure(dataset, group)
        else:
            yield f"{folder}/{split}/{dataset}_scatter.png", scatter_figure(dataset, group)


def gate_history_figure(history: list, split: str):
    """The mean level-2 gate per dataset over the evaluations: one panel per dataset, one line per expert.
    `history`: [step, {dataset: {expert: weight}}] per evaluation."""
    datasets = sorted({d for _, gates in history for d in gates})
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.2 * len(datasets), 2.8), squeeze=False, sharey=True)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        points = [(step, gates[dataset]) for step, gates in history if dataset in gates]
        for expert in points[0][1]:
            ax.plot([s for s, _ in points], [g[expert] for _, g in points], marker="o", label=expert)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"mean gate ({split})")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig
