"""Error types for what a user can cause (bad data, bad paths, bad config)."""


class DataError(ValueError):
    """Bad input data or shards. The message says what is wrong, where, and how to fix it."""
