"""Attention for the fusion experts: flash-attn's variable-length kernel or PyTorch SDPA.

`backend`: "auto" uses flash-attn when it is installed and the tensors are on
CUDA, SDPA otherwise; "flash" and "sdpa" force one. The same switch picks the
LLM's `attn_implementation` (`llm_attn_implementation`).

Experts keep padded [B, L, H, Dh] tensors with boolean masks. The flash path
packs the real positions into [total, H, Dh] with cumulative lengths, so no work
is spent on padding. The SDPA path masks padded keys. Both return zeros at
padded query positions, so padding never changes a result. Runs on a CPU (SDPA).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa")
INSTALL_HINT = "install it with `pip install .[gpu]` (flash-attn builds against CUDA and needs nvcc)"


@functools.cache
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'flash' or 'sdpa' for tensors on `device`; a clear error when 'flash' cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "sdpa":
        return "sdpa"
    usable = flash_attn_installed() and device.type == "cuda"
    if backend == "flash" and not usable:
        if not flash_attn_installed():
            raise ImportError(f"attention backend 'flash' needs the flash-attn package: {INSTALL_HINT}")
        raise ValueError(f"attention backend 'flash' needs CUDA tensors, these are on {device}; use 'sdpa' or 'auto'")
    return "flash" if usable else "sdpa"


def llm_attn_implementation(backend: str, device: torch.device) -> str:
    return "flash_attention_2" if resolve_backend(backend, device) == "flash" else "sdpa"


def cumulative_lengths(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    lengths = mask.sum(1, dtype=torch.int32)
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)), int(lengths.max())


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_mask: torch.Tensor, k_mask: torch.Tensor, backend: str
) -> torch.Tensor:
    """Attention of q [B, Lq, H, Dh] over k, v [B, Lk, H, Dh]; masks are [B, L] bool (True = real).

    Every sample needs at least one real key. Returns [B, Lq, H, Dh], zero at padded queries.
    """
    if resolve_backend(backend, q.device) == "flash":
        return _flash(q, k, v, q_mask, k_mask)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=k_mask[:, None, None, :]
    ).transpose(1, 2)
    return out * q_mask[:, :, None, None]


def _flash(q, k, v, q_mask, k_mask) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_q, max_q = cumulative_lengths(q_mask)
    cu_k, max_k = cumulative_lengths(k_mask)
    packed = flash_attn_varlen_func(q[q_mask], k[k_mask], v[k_mask], cu_q, cu_k, max_q, max_k)
    out = q.new_zeros(q.shape)
    out[q_mask] = packed
    return out
