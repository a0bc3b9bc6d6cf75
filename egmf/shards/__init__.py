"""Shard format, builder and demo data: everything that writes WebDataset shards."""
