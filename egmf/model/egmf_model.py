"""EGMF: the fusion module's pseudo tokens in a prompt for a LoRA-adapted causal LLM.

    model = EGMFModel.build(fusion_cfg, prompt_cfg, llm_cfg, lora_cfg, feature_dims, device)
    model.set_training_progress(step / total_steps)   # the gates' noise and warm-up (egmf.model.gates)
    out = model(batch)                      # out.loss: answer tokens + the gates' auxiliary losses
    preds = model.predict(batch, "constrained")   # labels (never unparseable), raw answers, gate weights

Trainable: the whole fusion module and the LoRA adapters; the LLM's own weights are frozen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from egmf.config import build as build_section
from egmf.data.collate import Batch
from egmf.datasets import CLASSIFICATION, REGRESSION, add_spec, get_spec, spec_from_dict
from egmf.errors import ConfigError
from egmf.model.config import DECODING_MODES, FusionConfig, LLMConfig, LoraConfig, PromptConfig
from egmf.model.decoding import greedy, score_candidates, weighted_median
from egmf.model.fusion import FusionModule
from egmf.model.gates import saved_router
from egmf.model.llm import load_llm
from egmf.model.prompt import IGNORE, PromptBatch, PromptBuilder

ADAPTER_DIR = "adapter"
FUSION_WEIGHTS = "fusion.safetensors"
FUSION_META = "fusion.json"
PACKAGE_RECORD = "egmf_package.json"
"""The record of an exported package (egmf-export): its base model, datasets and chosen model's metrics."""
PACKAGE_CONFIG = "config.json"
MERGED_DIR = "merged"
"""In a package exported with --merge-lora: the LLM with the adapter merged in."""


@dataclass
class EGMFOutput:
    loss: torch.Tensor
    """What training minimises: task_loss + fusion.balance_coef · balance + fusion.z_loss_coef · z
    (+ fusion.score_read_coef · score_read on score batches)."""
    task_loss: torch.Tensor
    """Cross-entropy on the answer tokens."""
    aux_losses: dict[str, torch.Tensor]
    """The level-2 gate's auxiliary losses and, on score batches with fusion.score_read_coef > 0, the score read's
    ("score_read"), unweighted ({} in the text-only ablation)."""
    expert_weights: torch.Tensor | None
    """[B, E] level-2 gate values (None in the text-only ablation)."""
    inner_gates: dict[str, torch.Tensor]
    num_tokens: int = 0
    """LLM positions processed (prompt, pseudo tokens and answers; padding excluded)."""


@dataclass
class Predictions:
    labels: list
    """Class names or scores; None where a generated answer did not parse."""
    answers: list[str]
    """The raw answer text (for the predictions file)."""
    num_unparseable: int
    expert_weights: list[list[float]] | None = None
    """Per sample, the level-2 gate weights (in fusion.experts order); None in the text-only ablation."""
    distributions: list[list[float]] | None = None
    """Constrained mode: per sample, the probability of each candidate answer (the softmax of their scores, in
    the verbaliser's candidates() order: classes, or every one-decimal score); None in generate mode."""


class EGMFModel(nn.Module):
    def __init__(self, llm, tokenizer, fusion: FusionModule | None, prompts: PromptBuilder):
        super().__init__()
        self.llm, self.tokenizer, self.fusion, self.prompts = llm, tokenizer, fusion, prompts

    @classmethod
    def build(
        cls,
        fusion_cfg: FusionConfig,
        prompt_cfg: PromptConfig,
        llm_cfg: LLMConfig,
        lora_cfg: LoraConfig,
        feature_dims: dict[str, tuple[int, int]],
        device: torch.device,
        feature_stats: dict[str, dict] | None = None,
    ) -> EGMFModel:
        """`feature_stats`: per dataset, the train split's feature statistics to standardise with (egmf.shards.stats;
        a loaded model brings its own)."""
        datasets = list(dict.fromkeys([*feature_dims, *fusion_cfg.shared_front_ends]))
        problems = fusion_cfg.problems() + prompt_cfg.problems(datasets)
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        llm, tokenizer = load_llm(llm_cfg, lora_cfg, fusion_cfg.attention, device)
        fusion = None
        if not prompt_cfg.text_only:
            embeddings = llm.get_input_embeddings().weight
            rms = float(embeddings.float().pow(2).mean().sqrt())
            fusion = FusionModule(fusion_cfg, feature_dims, embeddings.shape[1], rms, feature_stats).to(device)
        return cls(llm, tokenizer, fusion, PromptBuilder(prompt_cfg, tokenizer, fusion_cfg.num_pseudo_tokens))

    @classmethod
    def from_pretrained(
        cls, package: str, device: str | torch.device = "cpu", base_model: str = "", merged: bool = False
    ) -> EGMFModel:
        """The model of a package written by egmf-export, from the package alone and its base model (the one the
        package names, or `base_model`: a local folder); `merged`: the package's merged LLM instead of base model
        plus adapter (egmf-export --merge-lora)."""
        with open(os.path.join(package, PACKAGE_RECORD)) as f:
            record = json.load(f)
        with open(os.path.join(package, PACKAGE_CONFIG)) as f:
            table = json.load(f)
        problems: list[str] = []
        fusion_cfg, prompt_cfg, llm_cfg, lora_cfg = (
            build_section(section, table.get(name, {}), f"{name}.", problems)
            for name, section in (
                ("fusion", FusionConfig),
                ("prompt", PromptConfig),
                ("llm", LLMConfig),
                ("lora", LoraConfig),
            )
        )
        if problems:
            raise ConfigError(f"{package}/{PACKAGE_CONFIG}: " + "; ".join(problems))
        for name, spec in table.get("data", {}).get("specs", {}).items():  # its datasets that are not built in
            add_spec(spec_from_dict({**spec, "name": name}, f"{package}/{PACKAGE_CONFIG} data.specs.{name}"))
        llm_cfg.path = base_model or record["base_model"]
        if merged:
            llm_cfg.path, lora_cfg.enabled = os.path.join(package, MERGED_DIR), False
        dims = {name: tuple(d) for name, d in record["datasets"].items()}
        model = cls.build(fusion_cfg, prompt_cfg, llm_cfg, lora_cfg, dims, torch.device(device))
        model.load_exported(package)
        return model

    @property
    def has_lora(self) -> bool:
        """False in the ablation without LoRA (lora.enabled = false): the LLM is the frozen base model."""
        return hasattr(self.llm, "peft_config")

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def prompt_embeddings(self, batch: Batch, with_answers: bool, packed: bool = False):
        """(prompt batch, inputs_embeds with pseudo tokens in place, fusion output or None)."""
        if packed:
            prompt = self.prompts.build_packed(batch, self.prompts.cfg.pack_tokens)
        else:
            prompt = self.prompts.build(batch, with_answers)
        prompt = PromptBatch(*(t.to(self.device) for t in vars(prompt).values()))
        embeds = self.embed(prompt.input_ids)
        if self.fusion is None:
            return prompt, embeds, None
        batch = batch.to(self.device)
        with torch.no_grad():  # the text side reads the frozen token embeddings
            text_embeds = self.embed(prompt.text_ids)
        fused = self.fusion(
            batch.dataset,
            batch.audio.values,
            batch.audio.mask,
            batch.vision.values,
            batch.vision.mask,
            text_embeds,
            prompt.text_mask,
        )
        embeds = embeds.masked_scatter(prompt.pseudo_mask[..., None], fused.pseudo_tokens.to(embeds.dtype))
        return prompt, embeds, fused

    def forward(self, batch: Batch, packed: bool | None = None) -> EGMFOutput:
        """The loss on the answer tokens. `packed` (default: when prompt.pack_tokens is set) packs samples into
        rows; the LLM then gets no 2-D mask and separates the samples by their restarting positions."""
        packed = bool(self.prompts.cfg.pack_tokens) if packed is None else packed
        prompt, embeds, fused = self.prompt_embeddings(batch, with_answers=True, packed=packed)
        read = fused is not None and self.fusion.reads_scores_of(batch.dataset) and batch.task == REGRESSION
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=None if packed else prompt.attention_mask,
            position_ids=prompt.position_ids,
            labels=prompt.labels,
            use_cache=False,
            output_hidden_states=read,
        )
        num_tokens = int(prompt.attention_mask.sum())
        if fused is None:
            return EGMFOutput(out.loss, out.loss, {}, None, {}, num_tokens)
        loss = self.fusion.weighted_aux_loss(fused.aux_losses, onto=out.loss)
        aux = dict(fused.aux_losses)
        if read:
            aux["score_read"] = self.score_read_loss(out.hidden_states[-1], prompt.labels, batch)
            loss = loss + self.fusion.cfg.score_read_coef * aux["score_read"]
        return EGMFOutput(loss, out.loss, aux, fused.expert_weights, fused.inner_gates, num_tokens)

    def score_read_loss(self, hidden: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The score read's squared error (fusion.score_read_coef), in float32: a linear read of the LLM's last
        hidden state [B, T, H] at each sample's answer cue, the position that predicts its first answer token,
        against its score scaled to -1..1 by the dataset's label range. The cues come in batch order, row after
        row when packed, as the samples do."""
        first = (labels != IGNORE) & (F.pad(labels[:, :-1], (1, 0), value=IGNORE) == IGNORE)
        rows, columns = first.nonzero(as_tuple=True)
        if len(rows) != len(batch.labels):
            raise RuntimeError(f"found {len(rows)} answers for {len(batch.labels)} samples of {batch.dataset}")
        cues = hidden[rows, columns - 1]
        read = self.fusion.score_read(cues.to(self.fusion.score_read.weight.dtype)).squeeze(-1).float()
        low, high = get_spec(batch.dataset).label_range
        scores = torch.tensor(batch.labels, dtype=torch.float32, device=read.device)
        return (read - (scores - (low + high) / 2) / ((high - low) / 2)).pow(2).mean()

    @torch.no_grad()
    def sample_losses(self, batch: Batch) -> list[float]:
        """Each sample's teacher-forced loss: the mean cross-entropy over its answer tokens, the task loss that
        training minimises (evaluation reports it as `loss`)."""
        prompt, embeds, _ = self.prompt_embeddings(batch, with_answers=True)
        mask, positions = prompt.attention_mask, prompt.position_ids
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
        targets = prompt.labels[:, 1:]  # position t predicts token t + 1
        token_losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        counts = (targets != IGNORE).sum(1).clamp(min=1)
        return (token_losses.sum(1) / counts).cpu().tolist()

    def record_gate_usage(self, dataset: str, batch_mean: torch.Tensor | None) -> None:
        """After an optimizer step: its mean level-2 gate, averaged over micro-batches and ranks by the caller, for
        the balance loss (egmf.model.gates). Every rank must pass the same value."""
        if self.fusion is not None and batch_mean is not None:
            self.fusion.record_gate_usage(dataset, batch_mean)

    def set_training_progress(self, progress: float) -> None:
        """The fraction of training done (0 at the first step): the gates' noise and warm-up follow it."""
        if self.fusion is not None:
            self.fusion.set_training_progress(progress)

    @torch.no_grad()
    def predict(self, batch: Batch, mode: str, max_new_tokens: int = 8) -> Predictions:
        if mode not in DECODING_MODES:
            raise ValueError(f"decoding mode {mode!r} is not one of {', '.join(DECODING_MODES)}")
        verbaliser = self.prompts.verbaliser(batch.dataset)
        prompt, embeds, fused = self.prompt_embeddings(batch, with_answers=False)
        gates = None if fused is None else fused.expert_weights.float().cpu().tolist()
        args = (self.llm, self.embed, embeds, prompt.attention_mask, prompt.position_ids)
        if mode == "constrained":
            scores = score_candidates(*args, self.prompts.candidate_tokens(batch.dataset), self.tokenizer.pad_token_id)
            best = (scores.argmax(-1) if batch.task == CLASSIFICATION else weighted_median(scores)).tolist()
            labels = [verbaliser.candidate_label(i) for i in best]
            distributions = scores.float().softmax(-1).cpu().tolist()
            return Predictions(labels, [verbaliser.candidates()[i] for i in best], 0, gates, distributions)
        generated = greedy(*args, self.tokenizer.eos_token_id, max_new_tokens)
        answers = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
        labels = [verbaliser.parse(a) for a in answers]
        return Predictions(labels, answers, sum(label is None for label in labels), gates)

    def export(self, out_dir: str) -> None:
        """Write the trained parts in standard formats: a peft adapter folder and safetensors fusion weights.

        `PeftModel.from_pretrained(base_model, out_dir + "/adapter")` loads the adapter with plain peft.
        """
        os.makedirs(out_dir, exist_ok=True)
        if self.has_lora:
            self.llm.save_pretrained(os.path.join(out_dir, ADAPTER_DIR))
        if self.fusion is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.fusion.state_dict().items()}
            save_file(state, os.path.join(out_dir, FUSION_WEIGHTS))
            meta = {"config": asdict(self.fusion.cfg), "feature_dims": self.fusion.feature_dims}
            with open(os.path.join(out_dir, FUSION_META), "w") as f:
                json.dump(meta, f, indent=1)

    def load_exported(self, out_dir: str) -> None:
        """Load weights written by `export` into this model (same architecture)."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        if self.has_lora:
            set_peft_model_state_dict(self.llm, load_peft_weights(os.path.join(out_dir, ADAPTER_DIR)))
        if self.fusion is not None:
            path = os.path.join(out_dir, FUSION_WEIGHTS)
            state = load_file(path, device=str(self.device))
            check_fusion_weights(path, state, self.fusion.state_dict().keys())
            self.fusion.load_state_dict(state)


SWITCHED_WEIGHTS = {
    ".align.": ("semantic_alignment", "the semantic expert's aligned path", " = true", " = false"),
    "update_scale": ("normalised_updates", "normalised expert updates", " = true", " = false"),
    "score_read.": ("score_read_coef", "the score read", " > 0", " = 0"),
}
"""Fusion weights that exist only with a config switch on: key fragment -> (fusion field, what it is, the setting
that has them, the one that has not)."""


def check_fusion_weights(path: str, state: dict, expected: Collection[str]) -> None:
    """Saved fusion weights must have the `expected` keys of the module built from the config: say which config
    field differs, where known."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if not missing and not unexpected:
        return
    hints = []
    for fragment, (field_name, what, on, off) in SWITCHED_WEIGHTS.items():
        saved_with = any(fragment in k for k in unexpected)
        if saved_with or any(fragment in k for k in missing):
            hints.append(
                f"set fusion.{field_name}{on if saved_with else off} (the saved model was trained "
                f"{'with' if saved_with else 'without'} {what})"
            )
    router = saved_router(state)
    if router is not None and router != saved_router(expected):
        hints.append(f"set fusion.gate_router = {router!r} (the saved model's level-2 gate)")
    raise ConfigError(
        f"{path}: the saved fusion weights do not fit this model ({len(missing)} tensors missing, e.g. "
        f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): "
        + ("; ".join(hints) or "load it with the fusion config it was trained with")
    )
