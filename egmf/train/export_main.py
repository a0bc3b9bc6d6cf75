"""`egmf-export`: a trained model as one self-contained folder, loadable without the run that made it.

    egmf-export --model runs/mosei/best --out packages/egmf-mosei --base-model Qwen/Qwen2.5-7B-Instruct
    egmf-predict --model packages/egmf-mosei --data data/shards --out mosei.jsonl
    python -c "from egmf.model.egmf_model import EGMFModel; m = EGMFModel.from_pretrained('packages/egmf-mosei')"

--model is a run's best/ folder or a checkpoint. The package holds:

    adapter/                the LoRA adapter in peft's format; its base_model_name_or_path is --base-model (a
                            hub id or a path; default: the absolute llm.path of the run), so peft's
                            AutoPeftModelForCausalLM.from_pretrained(PKG/adapter) finds the base model
    fusion.safetensors      the fusion module's weights and its standardisation statistics
    fusion.json             its config and the feature dims per dataset
    tokenizer/              the base model's tokenizer
    config.json             the run's whole config (prompt templates and label words included)
    egmf_package.json       base model, datasets, and the chosen model's step, selection and metrics
    README.md               the model card
    merged/                 with --merge-lora: the base model with the adapter merged in (peft's
                            merge_and_unload, done on the CPU in float32, then saved in the base model's
                            dtype) and its tokenizer; load it with EGMFModel.from_pretrained(PKG,
                            merged=True) or egmf-predict --model PKG --merged

It is written as a whole (a partial package is never left looking complete).
A package needs its base model and nothing from the run directory. Exit code
2: a bad --model folder, reported before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from egmf.errors import CheckpointError, ConfigError
from egmf.train.package import export_package


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egmf-export",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    parser.add_argument("--model", required=True, help="a run's best/ folder or a checkpoint folder")
    parser.add_argument("--out", required=True, help="the package folder (replaced whole if it exists)")
    parser.add_argument("--base-model", help="the base model's hub id or path, as the package should name it")
    parser.add_argument("--merge-lora", action="store_true", help="also write the base model with the adapter merged")
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="also log the package as an MLflow pyfunc model to the run that trained it (its mlflow_run.json)",
    )
    parser.add_argument("--register-as", help="with --mlflow: register the model under this name in the registry")
    return parser


def training_run(model_dir: str) -> dict:
    """{"tracking_uri", "run_id"} of the run that wrote a best/ folder or a checkpoint (OUTPUT_DIR/mlflow_run.json)."""
    from egmf.tracking import RUN_RECORD

    folder = os.path.abspath(model_dir)
    for output_dir in (os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
        path = os.path.join(output_dir, RUN_RECORD)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise ConfigError(f"--mlflow: no {RUN_RECORD} of the run beside {model_dir} (was it trained with MLflow on?)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = training_run(args.model) if args.mlflow else None
        out = export_package(args.model, args.out, args.base_model or "", args.merge_lora)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"package written to {out}")
    if run:
        from egmf.train.pyfunc_model import log_package_model

        uri = log_package_model(os.path.abspath(out), run["run_id"], run["tracking_uri"], args.register_as or "")
        print(f"MLflow model {uri}" + (f", registered as {args.register_as}" if args.register_as else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
