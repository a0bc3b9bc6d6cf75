"""The rows egmf-predict writes and the MLflow model returns: one per sample, with class probabilities, a
score's spread and the level-2 gate (the keys are listed in egmf/train/predict_main.py).

    row = prediction_row(batch, i, model.predict(batch, "constrained"), verbaliser, experts)
    write_rows("predictions.csv", rows)            # .jsonl, or .csv with the dicts flattened
"""

from __future__ import annotations

import csv
import io
import json
import math
import os


def prediction_row(batch, i: int, preds, verbaliser, experts: list[str]) -> dict:
    """The output row of sample i of a batch (see the module docstring)."""
    row = {"id": batch.ids[i], "dataset": batch.dataset, "answer": preds.answers[i], "prediction": preds.labels[i]}
    distribution = preds.distributions[i] if preds.distributions is not None else None
    candidates = [verbaliser.candidate_label(j) for j in range(len(distribution or []))]
    if verbaliser.spec.labels:
        if distribution is not None:
            row["probabilities"] = dict(zip(candidates, distribution, strict=True))
    else:
        row["score"] = preds.labels[i]
        if distribution is not None:
            mean = sum(p * v for p, v in zip(distribution, candidates, strict=True))
            row["spread"] = math.sqrt(sum(p * (v - mean) ** 2 for p, v in zip(distribution, candidates, strict=True)))
    if preds.expert_weights is not None:
        row["gate"] = dict(zip(experts, preds.expert_weights[i], strict=True))
    if batch.labels[i] is not None:  # an unlabeled split's samples have none
        row["label"] = batch.labels[i]
    return row


def write_rows(out: str, rows: list[dict]) -> None:
    from egmf.atomic import write_atomically

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".jsonl"):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        text = csv_text(rows)
    write_atomically(out, text.encode("utf-8"))


def flat_row(row: dict) -> dict:
    """probabilities -> p_CLASS columns, gate -> gate_EXPERT columns."""
    flat = {}
    for key, value in row.items():
        if key == "probabilities":
            flat.update({f"p_{name}": p for name, p in value.items()})
        elif key == "gate":
            flat.update({f"gate_{name}": w for name, w in value.items()})
        else:
            flat[key] = value
    return flat


def csv_text(rows: list[dict]) -> str:
    flat = [flat_row(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()
