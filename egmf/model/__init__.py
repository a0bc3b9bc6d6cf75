"""The EGMF model: attention kernels, fusion experts and gating, pseudo tokens, prompts, the LoRA LLM, decoding."""
