"""Checkpoints: complete or absent, never half-written.

    OUTPUT_DIR/checkpoints/
      latest                      text: the folder name of the newest complete checkpoint
      step_00000200/
        deepspeed/                every rank's part of the DeepSpeed save (trainable weights, optimizer
                                  partitions, scheduler); frozen base weights excluded (peft #746)
        export/                   adapter/ (peft) + fusion.safetensors: usable without this trainer
        trainable_state.pt        the trainable weights and Adam moments whole, for a resume on another number
                                  of ranks (egmf.train.elastic_state)
        loader_rank{R}.json       each rank's data-stream position (the same on every rank but for its count
                                  of bad samples)
        rng_rank{R}.pt            each rank's torch RNG states (loaded with weights_only=True)
        config.json               the resolved config
        ds_config.json            the DeepSpeed config the engine ran with
        meta.json                 step, metrics, MLflow run id, world size, every file's size (written last)

A save goes to `.partial-step_N/` (`egmf.atomic`); rank 0 renames it to
`step_N/` only when every rank has finished, then replaces `latest` atomically. A crash at any
point leaves `latest` naming the previous complete checkpoint. Assumes a file
system shared by all nodes, as Slurm clusters have.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from egmf.atomic import partial_folder, publish, remove_partials, start_partial, write_atomically, write_json
from egmf.distributed import WorldInfo, barrier
from egmf.errors import CheckpointError
from egmf.model.egmf_model import PACKAGE_CONFIG, PACKAGE_RECORD
from egmf.train.elastic_state import TRAINABLE_STATE, gather_trainable_state, restore_trainable_state

CHECKPOINTS = "checkpoints"
LATEST = "latest"
DEEPSPEED_TAG = "deepspeed"
EXPORT = "export"
META = "meta.json"
BEST = "best"
BEST_RECORD = "best.json"


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(output_dir: str) -> list[str]:
    """A run's complete checkpoints, the one `latest` names first, then the others newest first."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    complete = sorted(
        (os.path.join(root, n) for n in os.listdir(root) if n.startswith("step_")),
        key=lambda path: os.path.basename(path),
        reverse=True,
    )
    complete = [path for path in complete if os.path.isfile(os.path.join(path, META))]
    try:
        with open(os.path.join(root, LATEST)) as f:
            named = os.path.join(root, f.read().strip())
    except FileNotFoundError:
        return complete
    return [named] * (named in complete) + [path for path in complete if path != named]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of a run, or None."""
    candidates = complete_checkpoints(output_dir)
    return candidates[0] if candidates else None


def resume_candidates(resume: str, output_dir: str) -> list[str]:
    """The checkpoints to try, in order, to continue from: checkpoint.resume 'auto' (every complete checkpoint,
    newest first: the trainer falls back from one that does not load), 'never' (none) or one checkpoint folder."""
    if resume == "never":
        return []
    if resume == "auto":
        return complete_checkpoints(output_dir)
    if not os.path.isfile(os.path.join(resume, META)):
        raise CheckpointError(
            f"checkpoint.resume={resume} is not a complete checkpoint (no {META}); use a folder under "
            f"{checkpoints_dir(output_dir)}, 'auto' or 'never'"
        )
    return [resume]


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint a run would continue from first (see `resume_candidates`), or None."""
    candidates = resume_candidates(resume, output_dir)
    return candidates[0] if candidates else None


def verify_checkpoint(checkpoint: str) -> None:
    """A CheckpointError naming every file that is missing or has another size than when it was saved (a
    truncated copy, a disk that filled up); checkpoints saved before sizes were recorded pass."""
    recorded = read_meta(checkpoint).get("files", {})
    problems = []
    for name, size in recorded.items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{path} has {os.path.getsize(path)} bytes, {size} when it was saved")
    if problems:
        raise CheckpointError("; ".join(problems))


def file_sizes(folder: str) -> dict[str, int]:
    """{relative path: bytes} of every file under `folder`."""
    sizes = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def saved_weights(folder: str) -> tuple[dict, str]:
    """(saved config table, folder with the exported weights) of a checkpoint, a run's best/ folder or a package
    written by egmf-export (whose config names its base model as llm.path)."""
    if os.path.isfile(os.path.join(folder, PACKAGE_RECORD)):
        with open(os.path.join(folder, PACKAGE_CONFIG)) as f:
            return json.load(f), folder
    if os.path.isfile(os.path.join(folder, BEST_RECORD)):
        with open(os.path.join(folder, BEST_RECORD)) as f:
            return json.load(f)["config"], folder
    if os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, EXPORT)):
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f), os.path.join(folder, EXPORT)
    raise CheckpointError(
        f"{folder} is neither a checkpoint (config.json + {EXPORT}/), a {BEST}/ folder ({BEST_RECORD}) nor a "
        f"package ({PACKAGE_RECORD}); pass a folder under OUTPUT_DIR/{CHECKPOINTS}, OUTPUT_DIR/{BEST} or egmf-export's"
    )


def read_meta(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, META)) as f:
        return json.load(f)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    engine,
    world: WorldInfo,
    output_dir: str,
    step: int,
    loader_state: dict,
    keep_last: int,
    config: dict,
    ds_config: dict,
    meta: dict,
) -> str:
    """Every rank calls this; returns the complete checkpoint's folder. The dicts are written by rank 0."""
    root = checkpoints_dir(output_dir)
    final = os.path.join(root, step_name(step))
    partial = partial_folder(final)
    if world.is_logging_rank:
        start_partial(final)  # also clears what a crash during an earlier save of this step left
    barrier()
    engine.save_checkpoint(partial, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    trainable = gather_trainable_state(engine)  # collectives: every rank
    if world.is_logging_rank:
        torch.save(trainable, os.path.join(partial, TRAINABLE_STATE))
    write_json(os.path.join(partial, f"loader_rank{world.rank}.json"), loader_state)
    torch.save(rng_state(), os.path.join(partial, f"rng_rank{world.rank}.pt"))
    if world.is_logging_rank:
        engine.module.export(os.path.join(partial, EXPORT))
        write_json(os.path.join(partial, "config.json"), config)
        write_json(os.path.join(partial, "ds_config.json"), ds_config)
    barrier()  # every rank's files are in place
    if world.is_logging_rank:
        files = file_sizes(partial)  # so that a resume finds a truncated or missing file by name
        write_json(os.path.join(partial, META), {"step": step, "world_size": world.world_size, **meta, "files": files})
        publish(partial, final)
        write_atomically(os.path.join(root, LATEST), f"{step_name(step)}\n".encode())
        prune(root, keep_last)
    barrier()
    return final


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints."""
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    for name in names[:-keep_last]:
        shutil.rmtree(os.path.join(root, name))


def remove_partial_saves(output_dir: str) -> None:
    remove_partials(checkpoints_dir(output_dir))


def load_checkpoint(engine, world: WorldInfo, checkpoint: str) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the loader state.

    On another number of ranks than the checkpoint's, the optimizer comes from the whole trainable state
    (`egmf.train.elastic_state`) instead of DeepSpeed's per-rank partitions; a rank the checkpoint did not have
    takes rank 0's loader state (the stream's position is the same on every rank) and keeps its own RNG.
    """
    saved_ranks = read_meta(checkpoint)["world_size"]
    resized = saved_ranks != world.world_size
    # frozen base weights are not in the checkpoint: non-strict loading (peft #746, #1395)
    engine.load_checkpoint(checkpoint, tag=DEEPSPEED_TAG, load_module_strict=False, load_optimizer_states=not resized)
    if resized:
        state_file = os.path.join(checkpoint, TRAINABLE_STATE)
        if not os.path.isfile(state_file):
            raise CheckpointError(
                f"{checkpoint} was saved on {saved_ranks} rank(s) without {TRAINABLE_STATE}: resume it on "
                f"{saved_ranks} rank(s)"
            )
        restore_trainable_state(engine, torch.load(state_file, weights_only=True, map_location="cpu"))
    rng_file = os.path.join(checkpoint, f"rng_rank{world.rank}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    loader_file = os.path.join(checkpoint, f"loader_rank{world.rank}.json")
    if not os.path.exists(loader_file):
        loader_file = os.path.join(checkpoint, "loader_rank0.json")
    with open(loader_file) as f:
        return json.load(f)
