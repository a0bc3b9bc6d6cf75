"""Start a new run from a trained model's weights (`train.init_from`): fine-tuning on new data, or a run whose
first phase taught the model one set before the mix.

    init_from_saved(model, "runs/first/best")

The folder is anything `egmf-evaluate` reads (a checkpoint, a run's best/ folder, an egmf-export package). The
LoRA adapter and the fusion module's shared weights must fit the new model exactly. A dataset's own front end
(audio_front.NAME, vision_front.NAME, with its standardisation statistics) comes from the saved model when both
train that dataset and starts new otherwise. The adapter may be left out (`train.init_from_adapter = false`): it
then starts new, as in a fresh run. The level-2 gate's per-dataset usage (a running mean that the balance loss
reads) starts uniform. The optimizer, the schedule and the data position start new: this is not a resume.
"""

from __future__ import annotations

import os

from safetensors.torch import load_file

from egmf.errors import ConfigError
from egmf.model.egmf_model import ADAPTER_DIR, FUSION_WEIGHTS, EGMFModel, check_fusion_weights
from egmf.train.checkpoint import saved_weights

PER_DATASET = ("audio_front.", "vision_front.")
"""Fusion weights that belong to one dataset (or one shared front-end group): PREFIX + NAME + '.' + tensor."""
RESTARTED = ("gate.usage",)
"""Fusion buffers that start new in every run: their shape follows the run's dataset list."""
TEACHING = ("score_read.",)
"""Fusion weights that only teach in training (the score read, fusion.score_read_coef): taken when both models have
them, left out when the new run has none, new when the saved model had none. A first phase may need the read to
learn a relation that a second phase, without it, keeps."""


def front_end_name(key: str) -> str | None:
    """The dataset (or front-end group) a fusion weight belongs to, None for a shared weight."""
    for prefix in PER_DATASET:
        if key.startswith(prefix):
            return key.removeprefix(prefix).split(".", 1)[0]
    return None


def must_fit(key: str) -> bool:
    """A fusion weight that both models must have, of the same shape: shared, kept from run to run, not teaching."""
    return front_end_name(key) is None and key not in RESTARTED and not key.startswith(TEACHING)


def init_from_saved(model: EGMFModel, folder: str, adapter: bool = True) -> dict[str, list[str]]:
    """Load the saved weights into `model` (the LoRA adapter only if `adapter`); returns the front ends taken and
    started new ({"loaded": [...], "new": [...]}) for the run's log."""
    _, weights = saved_weights(folder)
    if adapter:
        load_adapter(model, folder, weights)
    if model.fusion is None:
        return {"loaded": [], "new": []}
    path = os.path.join(weights, FUSION_WEIGHTS)
    if not os.path.isfile(path):
        raise ConfigError(
            f"train.init_from {folder}: no {FUSION_WEIGHTS} (a text-only model); train.init_from needs a saved "
            "model with the fusion module, or drop it"
        )
    saved = load_file(path, device=str(model.device))
    own = model.fusion.state_dict()
    shared_saved = {k: v for k, v in saved.items() if must_fit(k)}
    shared_own = {k: v for k, v in own.items() if must_fit(k)}
    check_fusion_weights(path, shared_saved, shared_own.keys())
    reshaped = [k for k, v in shared_saved.items() if v.shape != shared_own[k].shape]
    if reshaped:
        raise ConfigError(
            f"train.init_from {path}: {len(reshaped)} fusion tensors have another shape than this model's, e.g. "
            f"{reshaped[0]} {tuple(saved[reshaped[0]].shape)} against {tuple(own[reshaped[0]].shape)}: set the "
            "fusion config (width, heads, experts, num_pseudo_tokens, ...) and the LLM the saved model was trained with"
        )
    fronts_own = {front_end_name(k) for k in own} - {None}
    fronts_saved = {front_end_name(k) for k in saved} - {None}
    taken = {k: v for k, v in saved.items() if k in own and k not in RESTARTED}  # others' front ends are left out
    mismatched = sorted({front_end_name(k) for k, v in taken.items() if v.shape != own[k].shape} - {None})
    if mismatched:
        raise ConfigError(
            f"train.init_from {path}: the front ends of {', '.join(mismatched)} were trained on features of other "
            "dimensions than this run's shards hold; train those datasets under new names or without train.init_from"
        )
    model.fusion.load_state_dict(taken, strict=False)
    return {"loaded": sorted(fronts_own & fronts_saved), "new": sorted(fronts_own - fronts_saved)}


def load_adapter(model: EGMFModel, folder: str, weights: str) -> None:
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    adapter = os.path.join(weights, ADAPTER_DIR)
    if os.path.isdir(adapter) != model.has_lora:
        saved_has = "has" if os.path.isdir(adapter) else "has no"
        raise ConfigError(
            f"train.init_from {folder}: the saved model {saved_has} LoRA adapter and this run "
            f"{'trains' if model.has_lora else 'has'} {'one' if model.has_lora else 'none'}; set lora.enabled as "
            "the saved model was trained"
        )
    if not model.has_lora:
        return
    fix = "set lora.rank and lora.target_modules as the saved model was trained"
    try:
        result = set_peft_model_state_dict(model.llm, load_peft_weights(adapter))
    except RuntimeError as exc:  # a tensor of another shape: another rank, or another base model
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ConfigError(f"train.init_from {adapter}: the adapter does not fit this model ({first}); {fix}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"train.init_from {adapter}: the adapter does not fit this model's LoRA layers ({len(missing)} missing, "
            f"e.g. {missing[:1]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:1]}): {fix}"
        )
