"""Evaluation across ranks: every sample exactly once, both decoding modes, the field's metrics.

    results, rows = evaluate(model, cfg, "valid", world)     # results[dataset][mode] -> metrics (rank 0)
    score = selection_score(results, cfg.eval, cfg.data.eval)
    write_evaluation(folder, rows, flat_metrics(results, "valid"))    # SPLIT.jsonl per split, metrics.json last

Each rank decodes its share of each split (EvalLoader), the prediction rows
are gathered on rank 0, which scores them with `egmf.metrics.score`. Decoding
runs no collectives (ZeRO-2 keeps full weights on every rank), so ranks skip
their padding batches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace

import torch.distributed as dist

from egmf.atomic import write_atomically, write_json
from egmf.data.loader import EvalLoader
from egmf.datasets import CLASSIFICATION, get_spec
from egmf.distributed import WorldInfo
from egmf.metrics import score
from egmf.train.config import Config, EvalConfig

METRICS_FILE = "metrics.json"


@dataclass
class PredictionRow:
    id: str
    dataset: str
    split: str
    mode: str
    target: str | float | None
    """None in an unlabeled split."""
    prediction: str | float | None
    """None where a generated answer did not parse."""
    answer: str
    """The raw answer text."""
    gate: dict[str, float] | None = None
    """The sample's level-2 gate: expert -> weight (None in the text-only ablation)."""
    loss: float | None = None
    """The sample's teacher-forced answer loss, training's task loss (the same in every mode; None unlabeled)."""


def evaluate(model, cfg: Config, split: str, world: WorldInfo, modes: list[str] | None = None):
    """(results, rows): results[dataset][mode] holds the metrics plus 'loss' (the mean teacher-forced answer loss,
    the same in every mode), 'unparseable' and 'samples'; rank 0 only."""
    data_cfg = replace(cfg.data, batch_size=cfg.eval.batch_size or cfg.data.batch_size)
    was_training = model.training
    model.eval()
    experts = list(model.fusion.cfg.experts) if model.fusion is not None else []
    rows: list[PredictionRow] = []
    for dataset in cfg.data.eval:
        for batch in EvalLoader(data_cfg, dataset, split, world.rank, world.world_size):
            valid = batch.valid.tolist()
            if not any(valid):
                continue
            labeled = batch.labels[0] is not None
            losses = model.sample_losses(batch) if labeled else [None] * len(valid)
            for mode in modes or cfg.eval.modes:
                preds = model.predict(batch, mode, cfg.eval.max_new_tokens)
                for i, ok in enumerate(valid):
                    if ok:
                        gate = dict(zip(experts, preds.expert_weights[i], strict=True)) if experts else None
                        row = (batch.ids[i], dataset, split, mode, batch.labels[i], preds.labels[i], preds.answers[i])
                        rows.append(PredictionRow(*row, gate, losses[i]))
    model.train(was_training)
    rows = gather_rows(rows, world)
    if not world.is_logging_rank:
        return {}, []
    return score_rows(rows), rows


def gather_rows(rows: list[PredictionRow], world: WorldInfo) -> list[PredictionRow]:
    if world.world_size == 1:
        return rows
    gathered = [None] * world.world_size if world.is_logging_rank else None
    dist.gather_object(rows, gathered, dst=0)
    return [row for part in gathered for row in part] if world.is_logging_rank else []


def score_rows(rows: list[PredictionRow]) -> dict[str, dict[str, dict[str, float]]]:
    grouped: dict[tuple[str, str], list[PredictionRow]] = {}
    for row in sorted(rows, key=lambda r: r.id):
        grouped.setdefault((row.dataset, row.mode), []).append(row)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for (dataset, mode), group in grouped.items():
        unparseable = sum(r.prediction is None for r in group)
        metrics = {}
        if group[0].target is not None:  # an unlabeled split (no targets) gets its counts only
            metrics = score(dataset, [scored_prediction(dataset, r) for r in group], [r.target for r in group])
            losses = [r.loss for r in group if r.loss is not None]
            if losses:
                metrics["loss"] = sum(losses) / len(losses)
        metrics.update(unparseable=unparseable, samples=len(group))
        results.setdefault(dataset, {})[mode] = metrics
    return results


def scored_prediction(dataset: str, row: PredictionRow) -> str | float | None:
    """What an answer counts as in the metrics. An unparseable answer is an error, never dropped: for a class it
    stays None, which matches no label; for a score it is the end of the dataset's range farthest from the true
    score, the largest error an answer in range can make (so it also lands on the wrong side in Acc-2)."""
    if row.prediction is not None or get_spec(dataset).task == CLASSIFICATION:
        return row.prediction
    low, high = get_spec(dataset).label_range
    return low if row.target - low >= high - row.target else high


def mean_gates(rows: list[PredictionRow], mode: str) -> dict[str, dict[str, float]]:
    """{dataset: {expert: mean level-2 weight}} over the rows of one decoding mode (the gate does not depend on
    the mode); {} in the text-only ablation."""
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        if row.mode != mode or row.gate is None:
            continue
        by_expert = sums.setdefault(row.dataset, dict.fromkeys(row.gate, 0.0))
        for expert, weight in row.gate.items():
            by_expert[expert] += weight
        counts[row.dataset] = counts.get(row.dataset, 0) + 1
    return {d: {e: total / counts[d] for e, total in by_expert.items()} for d, by_expert in sums.items()}


def default_selection(datasets: list[str]) -> dict[str, float]:
    """wf1 for classification sets, -mae for regression sets, averaged: higher is better."""
    selection = {}
    for d in datasets:
        if get_spec(d).task == CLASSIFICATION:
            selection[f"{d}/wf1"] = 1.0 / len(datasets)
        else:
            selection[f"{d}/mae"] = -1.0 / len(datasets)
    return selection


def selection_score(results: dict, cfg: EvalConfig, datasets: list[str]) -> float:
    """The best-checkpoint score of one evaluation (higher is better); -inf if a metric is missing."""
    total = 0.0
    for key, weight in (cfg.select or default_selection(datasets)).items():
        dataset, metric = key.split("/", 1)
        value = results.get(dataset, {}).get(cfg.select_mode, {}).get(metric, float("nan"))
        if math.isnan(value):
            return float("-inf")
        total += weight * value
    return total


def describe_selection(cfg: EvalConfig, datasets: list[str]) -> str:
    """How the best model is chosen, in words: 'valid (constrained): 0.5 meld/wf1 - 0.5 mosei/mae'."""
    weights = cfg.select or default_selection(datasets)
    terms = [f"{'-' if w < 0 else '+'} {abs(w):g} {key}" for key, w in weights.items()]
    return f"{cfg.select_split} ({cfg.select_mode}): " + " ".join(terms).removeprefix("+ ")


def flat_metrics(results: dict, split: str, prefix: str = "eval") -> dict[str, float]:
    """MLflow keys: eval/SPLIT/DATASET/MODE/METRIC."""
    return {
        f"{prefix}/{split}/{dataset}/{mode}/{name}": value
        for dataset, by_mode in results.items()
        for mode, metrics in by_mode.items()
        for name, value in metrics.items()
        if not (isinstance(value, float) and math.isnan(value))
    }


def read_rows(folder: str) -> list[PredictionRow]:
    """The prediction rows of every SPLIT.jsonl that `write_evaluation` wrote to `folder`."""
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                rows += [PredictionRow(**json.loads(line)) for line in f]
    return rows


def write_evaluation(folder: str, rows: list[PredictionRow], metrics: dict[str, float]) -> None:
    """One evaluation's results: FOLDER/SPLIT.jsonl (a prediction row per sample and mode) for each split in
    `rows`, then FOLDER/metrics.json. Each file is written atomically and metrics.json last, so a folder with a
    metrics.json is complete. The same layout for training's predictions/TAG/ and for egmf-evaluate's output."""
    os.makedirs(folder, exist_ok=True)
    for split in dict.fromkeys(row.split for row in rows):
        lines = [json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in rows if row.split == split]
        write_atomically(os.path.join(folder, f"{split}.jsonl"), "".join(lines).encode("utf-8"))
    write_json(os.path.join(folder, METRICS_FILE), metrics)
