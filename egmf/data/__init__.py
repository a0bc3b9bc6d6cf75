"""Streaming data: WebDataset shards -> batches for training and evaluation (see loader.py)."""
