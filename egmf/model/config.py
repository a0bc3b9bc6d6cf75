"""The `fusion` section of the configuration: every architectural choice of the fusion module.

The paper publishes only an outline (DESIGN.md §1); docs/model.md says why each default is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from egmf.model.attention import BACKENDS

EXPERTS = ("local", "semantic", "global")
GATINGS = ("dynamic", "uniform")


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
    num_pseudo_tokens: int = 8
    """K: pseudo tokens handed to the LLM."""
    time_frequencies: int = 8
    """Fourier frequencies of the normalised-time encoding (0..1 over each sequence)."""
    dropout: float = 0.1
    """Dropout inside the experts."""
    experts: list[str] = field(default_factory=lambda: list(EXPERTS))
    """Experts switched on (ablation: drop any of local, semantic, global)."""
    gating: str = "dynamic"
    """'dynamic': context-dependent softmax over experts; 'uniform': equal weights (ablation)."""
    attention: str = "auto"
    """'auto' (flash-attn on CUDA when installed, else SDPA), 'flash' or 'sdpa'."""

    def problems(self) -> list[str]:
        found = []
        if self.width % self.heads:
            found.append(f"fusion.width {self.width} must be a multiple of fusion.heads {self.heads}")
        if self.local_kernel < 1 or self.local_kernel % 2 == 0:
            found.append(f"fusion.local_kernel must be odd and >= 1, got {self.local_kernel}")
        for key in ("width", "heads", "global_layers", "num_pseudo_tokens", "time_frequencies"):
            if getattr(self, key) < 1:
                found.append(f"fusion.{key} must be >= 1, got {getattr(self, key)}")
        unknown = [e for e in self.experts if e not in EXPERTS]
        if unknown or not self.experts or len(set(self.experts)) != len(self.experts):
            found.append(f"fusion.experts must be distinct names from {', '.join(EXPERTS)}, got {self.experts}")
        if self.gating not in GATINGS:
            found.append(f"fusion.gating {self.gating!r} is not one of {', '.join(GATINGS)}")
        if self.attention not in BACKENDS:
            found.append(f"fusion.attention {self.attention!r} is not one of {', '.join(BACKENDS)}")
        if not 0 <= self.dropout < 1:
            found.append(f"fusion.dropout must be in [0, 1), got {self.dropout}")
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
