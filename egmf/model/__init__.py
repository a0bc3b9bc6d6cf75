"""The EGMF model: attention kernels, fusion experts and gating, pseudo tokens (and, next, the LoRA LLM)."""
