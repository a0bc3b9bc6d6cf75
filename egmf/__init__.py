"""EGMF: expert-guided multimodal fusion with a LoRA-adapted LLM, trained with DeepSpeed."""

__version__ = "0.1.0"
