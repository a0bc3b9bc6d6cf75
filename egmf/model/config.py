"""The model's sections of the configuration: fusion, prompt, llm, lora.

The paper publishes only an outline of the method (docs/method.md); every
architectural choice is a field here, and docs/model.md says why each default
is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from egmf.config import range_problems
from egmf.datasets import CLASSIFICATION, get_spec
from egmf.errors import ConfigError
from egmf.labels import Verbaliser
from egmf.model.attention import BACKENDS
from egmf.model.gates import ROUTERS

EXPERTS = ("local", "semantic", "global")
GATINGS = ("dynamic", "uniform")
GLOBAL_SCOPES = ("modality", "joint")
DECODING_MODES = ("generate", "constrained")


@dataclass
class FusionConfig:
    width: int = 256
    """Hidden size d of the fusion module."""
    heads: int = 4
    """Attention heads in the semantic and global experts and the pseudo-token queries."""
    local_kernel: int = 5
    """Frames covered by the local expert's depthwise temporal convolution (odd)."""
    global_layers: int = 2
    """Transformer blocks in the global context expert."""
    global_scope: str = "joint"
    """What the global expert's self-attention spans. 'joint': the concatenated text+audio+vision sequence, which
    relates the modalities too (overlapping the semantic expert); 'modality': each modality's own sequence plus an
    utterance-context token, which leaves the cross-modal relations to the semantic expert (docs/model.md)."""
    semantic_alignment: bool = False
    """The semantic expert also reads the other modalities' frames at the same moment (the nearest frame on the
    shared normalised clock) beside its cross-attention. Off by default: it is what lets the demo's coincidence set
    be learned, but in bench/learn_demo.py's smaller configuration it kept both sets from being learned
    (docs/model.md); the demo recipe turns it on."""
    normalised_updates: bool = False
    """Each expert's update (its output minus its input) is scaled to RMS 1 per sample before the level-2 gate
    mixes them, and the mix times one learned scale shared by the experts is added to the input. An expert then
    cannot outweigh the others by growing its own output: the gate's weights are the experts' real shares of the
    fused update. False: the updates are mixed as they come (docs/model.md)."""
    num_pseudo_tokens: int = 8
    """K: pseudo tokens handed to the LLM."""
    normalised_tokens: bool = True
    """Each pseudo token is rescaled to the RMS of the LLM's own embeddings on every forward pass. False: the
    tokens start at that RMS and their magnitude is learned, free to differ from token to token. Free tokens let
    the global expert learn a look-up that rescaled ones kept it from, but on the demo as it is they scored a
    little lower (docs/model.md)."""
    time_frequencies: int = 8
    """Fourier frequencies of the normalised-time encoding (0..1 over each sequence)."""
    dropout: float = 0.1
    """Dropout inside the experts."""
    experts: list[str] = field(default_factory=lambda: list(EXPERTS))
    """Experts switched on (ablation: drop any of local, semantic, global)."""
    gating: str = "dynamic"
    """'dynamic': context-dependent softmax over experts; 'uniform': equal weights (ablation)."""
    gate_router: str = "mlp"
    """What computes the dynamic level-2 gate's logits from the pooled expert outputs and the context: 'mlp' (one
    hidden layer), 'norm_mlp' (a LayerNorm, then that hidden layer) or 'linear' (a LayerNorm, then one linear
    layer). A hidden layer on the raw input can die, every unit off for every sample, and leave a constant gate
    (docs/model.md)."""
    inner_gating: bool = True
    """Level-1 gates inside the experts; false: each expert's update is added ungated (ablation)."""
    balance_coef: float = 0.01
    """Weight of the level-2 balance loss N·Σ M_i² over the mean gate M of the training mix (egmf/model/gates.py);
    0: off."""
    usage_momentum: float = 0.9
    """Decay per optimizer step of each dataset's moving-average gate that the balance loss's mix mean M is made
    of."""
    z_loss_coef: float = 1e-4
    """Weight of the level-2 router z-loss mean(logsumexp(logits)²) over centred logits (egmf/model/gates.py;
    ST-MoE); 0: off. Small on purpose: it only has to win where a saturated softmax passes no task gradient."""
    score_read_coef: float = 0.0
    """Weight of the score read: a squared error between a linear read of the LLM's last hidden state at the answer
    cue and the sample's score (scaled to -1..1 by the dataset's label range), added to the loss of score datasets
    in training. The answer stays the LLM's text; the read only teaches. Trained on the text answer alone, the
    fusion module does not learn a relation such as a look-up between distant frames; with the read it does
    (docs/model.md). 0: off."""
    score_read_datasets: list[str] = field(default_factory=list)
    """The score datasets the score read trains on; empty: every score dataset. A relation the text answer does not
    teach may lie in one set only; on the others the read adds a loss they do not need."""
    gate_noise: float = 0.3
    """Std of the Gaussian noise on the level-2 gate's logits at the start of training; 0: no noise."""
    gate_noise_ratio: float = 0.5
    """Fraction of training over which the gate noise falls linearly to 0."""
    gate_warmup_ratio: float = 0.05
    """Fraction of training over which the gates are mixed with the uniform gate, (1-λ)·uniform + λ·g, λ 0 -> 1;
    0: no warm-up."""
    attention: str = "auto"
    """'auto' (flash-attn on CUDA when installed, else SDPA), 'flash' or 'sdpa'."""
    shared_front_ends: dict[str, str] = field(default_factory=dict)
    """Dataset -> another dataset whose audio and vision front ends (and gate statistics) it uses; the feature
    dims must match. Lets a trained model take a new dataset featurised like one it knows."""

    def problems(self) -> list[str]:
        found = []
        chained = [name for name, other in self.shared_front_ends.items() if other in self.shared_front_ends]
        if chained:
            found.append(f"fusion.shared_front_ends: {', '.join(chained)} must name a dataset with its own front ends")
        if self.width % self.heads:
            found.append(f"fusion.width {self.width} must be a multiple of fusion.heads {self.heads}")
        if self.local_kernel < 1 or self.local_kernel % 2 == 0:
            found.append(f"fusion.local_kernel must be odd and >= 1, got {self.local_kernel}")
        found += range_problems(
            "fusion", self, ("width", "heads", "global_layers", "num_pseudo_tokens", "time_frequencies"), low=1
        )
        unknown = [e for e in self.experts if e not in EXPERTS]
        if unknown or not self.experts or len(set(self.experts)) != len(self.experts):
            found.append(f"fusion.experts must be distinct names from {', '.join(EXPERTS)}, got {self.experts}")
        if self.global_scope not in GLOBAL_SCOPES:
            found.append(f"fusion.global_scope {self.global_scope!r} is not one of {', '.join(GLOBAL_SCOPES)}")
        if self.gating not in GATINGS:
            found.append(f"fusion.gating {self.gating!r} is not one of {', '.join(GATINGS)}")
        if self.gate_router not in ROUTERS:
            found.append(f"fusion.gate_router {self.gate_router!r} is not one of {', '.join(ROUTERS)}")
        if self.attention not in BACKENDS:
            found.append(f"fusion.attention {self.attention!r} is not one of {', '.join(BACKENDS)}")
        found += range_problems("fusion", self, ["dropout", "usage_momentum"], low=0, high=1, high_open=True)
        found += range_problems("fusion", self, ("balance_coef", "z_loss_coef", "score_read_coef", "gate_noise"), low=0)
        found += range_problems("fusion", self, ("gate_noise_ratio", "gate_warmup_ratio"), low=0, high=1)
        return found


@dataclass
class LLMConfig:
    path: str = ""
    """Local directory of an AutoModelForCausalLM and its tokenizer (Qwen2/2.5, Llama, ...)."""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float16' or 'float32'."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in the backward pass (non-reentrant, so LoRA still gets gradients)."""
    pad_token: str = ""
    """Token used for padding when the tokenizer has none (Llama 3: "<|end_of_text|>"); padding is always masked."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train LoRA adapters on the LLM; false: the LLM stays frozen and only the fusion module trains (ablation)."""
    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers of the LLM that get LoRA adapters."""


DEFAULT_TEMPLATES = {
    "classification_en": "Task: recognise the speaker's emotion. Answer with one of: {labels}.\n"
    "Signals: {signals}\nUtterance: {text}\nEmotion:",
    "regression_en": "Task: rate the sentiment intensity from {low} (most negative) to {high} (most positive), "
    "with one decimal.\nSignals: {signals}\nUtterance: {text}\nIntensity:",
    "classification_zh": "任务：识别说话人的情绪，从以下选项中选一个：{labels}。\n"
    "信号：{signals}\n话语：{text}\n情绪：",
    "regression_zh": "任务：判断情感强度，范围从 {low}（最消极）到 {high}（最积极），保留一位小数。\n"
    "信号：{signals}\n话语：{text}\n强度：",
}


@dataclass
class PromptConfig:
    templates: dict[str, str] = field(default_factory=dict)
    """Template per dataset name, overriding the default per task and language (DEFAULT_TEMPLATES)."""
    label_words: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per dataset: class name -> the word the model answers with (default: English names, CHERMA's words in zh)."""
    signals_open: str = "<signals>"
    """Marker before the pseudo tokens."""
    signals_close: str = "</signals>"
    """Marker after the pseudo tokens."""
    max_text_tokens: int = 64
    """Utterance tokens kept (in the prompt and as the fusion module's text input)."""
    text_only: bool = False
    """Ablation: no pseudo tokens, no markers; the LLM sees only the text prompt."""
    pack_tokens: int = 0
    """Training: pack consecutive samples into rows of at most this many tokens, without attention between them
    (0: one left-padded sample per row). A sample longer than this gets a row of its own."""

    def template_for(self, dataset: str) -> str:
        spec = get_spec(dataset)
        return self.templates.get(dataset, DEFAULT_TEMPLATES[f"{spec.task}_{spec.lang}"])

    def problems(self, datasets: list[str]) -> list[str]:
        found = []
        for dataset in datasets:
            template, spec = self.template_for(dataset), get_spec(dataset)
            needed = ["{signals}", "{text}"] + (["{labels}"] if spec.task == CLASSIFICATION else ["{low}", "{high}"])
            missing = [p for p in needed if p not in template]
            if missing:
                found.append(f"prompt template for {dataset} lacks {', '.join(missing)}")
            elif template.index("{signals}") > template.index("{text}"):
                found.append(f"prompt template for {dataset}: {{signals}} must come before {{text}}")
            try:
                Verbaliser.for_dataset(dataset, self.label_words.get(dataset))
            except ConfigError as exc:
                found.append(str(exc))
        found += range_problems("prompt", self, ["max_text_tokens"], low=1)
        found += range_problems("prompt", self, ["pack_tokens"], low=0)  # 0: no packing
        return found
