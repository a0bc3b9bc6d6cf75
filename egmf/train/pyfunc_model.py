"""The trained model as an MLflow pyfunc model: a table of samples in, the prediction rows of egmf-predict out.

    log_package_model(package, run_id, tracking_uri, register_as="egmf-mosei")   # egmf-export --mlflow-run
    model = mlflow.pyfunc.load_model("models:/egmf-mosei/1")                      # anywhere, later
    rows = model.predict(pandas.DataFrame([{"id": "a", "dataset": "mosei", "text": "...",
                                            "audio": "a.npy", "vision": [[0.1, ...], ...]}]))

The model's artifact is an egmf-export package; loading it needs the base
model the package names (a hub id or a path reachable where it is loaded).
Input columns: `id`, `dataset` (one the model was trained on), `text`,
`audio` and `vision` (a [frames, dims] array, nested lists, or the path of a
.npy file), and optionally `label`. The output is a DataFrame with one row per
input row, in input order, the columns of egmf-predict's rows (probabilities
and gate as dicts).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
from mlflow.pyfunc import PythonModel

PACKAGE_ARTIFACT = "package"
PIP_REQUIREMENTS = ["egmf", "torch", "transformers", "peft", "safetensors", "sentencepiece", "pandas"]
"""Written into the logged model as given: MLflow's inference of requirements would load the model to find them."""


def feature_array(value, where: str) -> np.ndarray:
    """A [frames, dims] float16 array from an array, nested lists or a .npy path (never a pickle)."""
    if isinstance(value, str):
        array = np.load(value, allow_pickle=False)
    else:
        array = np.asarray(value, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] < 1:
        raise ValueError(f"{where}: features must be [frames, dims] with at least one frame, got {array.shape}")
    return np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float16)


def batch_of(dataset: str, records: list[dict], data_cfg):
    """A Batch of input records of one dataset (labels, where given, only travel through to the output)."""
    from egmf.data.collate import collate
    from egmf.datasets import get_spec
    from egmf.shards.format import Sample

    spec = get_spec(dataset)
    samples = [
        Sample(
            {"id": str(r["id"]), "text": str(r["text"]), "label": None},
            feature_array(r["audio"], f"sample {r['id']} audio"),
            feature_array(r["vision"], f"sample {r['id']} vision"),
        )
        for r in records
    ]
    shape = SimpleNamespace(
        dataset=dataset, split="predict", lang=spec.lang, task=spec.task, labels=spec.labels, labeled=False
    )
    batch = collate(samples, shape, data_cfg.max_audio_frames, data_cfg.max_vision_frames, data_cfg.truncation)
    batch.labels = [r.get("label") for r in records]
    return batch


class EGMFPyfuncModel(PythonModel):
    """MLflow's handle on an exported package (see the module docstring)."""

    batch_size = 16

    def load_context(self, context) -> None:
        import json

        from egmf.model.egmf_model import PACKAGE_CONFIG, EGMFModel
        from egmf.train.config import config_from_table

        package = context.artifacts[PACKAGE_ARTIFACT]
        self.model = EGMFModel.from_pretrained(package)
        self.model.eval()
        with open(os.path.join(package, PACKAGE_CONFIG)) as f:
            self.cfg = config_from_table(json.load(f))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from egmf.train.prediction_rows import prediction_row

        records = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        experts = list(self.model.fusion.cfg.experts) if self.model.fusion is not None else []
        mode = (params or {}).get("mode", self.cfg.eval.select_mode)
        out: dict[int, dict] = {}
        by_dataset: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            by_dataset.setdefault(record["dataset"], []).append(index)
        for dataset, indices in by_dataset.items():
            verbaliser = self.model.prompts.verbaliser(dataset)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = batch_of(dataset, [records[i] for i in chunk], self.cfg.data)
                preds = self.model.predict(batch, mode, self.cfg.eval.max_new_tokens)
                for i, index in enumerate(chunk):
                    out[index] = prediction_row(batch, i, preds, verbaliser, experts)
        return pd.DataFrame([out[i] for i in range(len(records))])


def log_package_model(package: str, run_id: str, tracking_uri: str, register_as: str = "") -> str:
    """Log `package` as the pyfunc model `model` of the run (and register it as `register_as`); its model URI."""
    import mlflow

    # MLflow's fluent API needs a global tracking URI, which it also writes to $MLFLOW_TRACKING_URI; it is put
    # back afterwards, or a later run in this process would log to this store.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=EGMFPyfuncModel(),
                artifacts={PACKAGE_ARTIFACT: package},
                pip_requirements=PIP_REQUIREMENTS,
                registered_model_name=register_as or None,
            )
    finally:
        mlflow.set_tracking_uri(before)  # None unsets what was set here
    return info.model_uri
