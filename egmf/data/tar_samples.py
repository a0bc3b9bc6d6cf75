"""Pipeline stage "tar to samples": read one shard sequentially, from a sample offset on.

Bad data never stops the stream by itself: an unreadable shard, a truncated or
corrupt tar, or a sample that fails decoding/validation is skipped and counted
in a `BadSamples` log, which raises a clear DataError once its limit is passed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from egmf.data.tar_members import iter_members
from egmf.errors import DataError, TarFormatError
from egmf.shards.format import Sample, check_sample, decode_sample
from egmf.shards.manifest import SplitManifest, is_url

logger = logging.getLogger("egmf.data")
MAX_LOGGED = 20


class BadSamples:
    """Counts skipped samples and stops loading once more than `limit` were skipped. The first MAX_LOGGED events
    (a sample, or a whole unreadable or truncated shard) are logged with their place."""

    def __init__(self, limit: int, count: int = 0):
        self.limit = limit
        self.count = count
        self.events = 0

    def add(self, where: str, reason: str, num_samples: int = 1) -> None:
        self.count += num_samples
        self.events += 1
        if self.events <= MAX_LOGGED:
            logger.warning("skipped %d bad sample(s) at %s: %s", num_samples, where, reason)
        elif self.events == MAX_LOGGED + 1:
            logger.warning("more bad samples; logging stops here, the count goes on")
        if self.count > self.limit:
            raise DataError(
                f"{self.count} bad samples skipped, more than data.max_bad_samples={self.limit} (last at {where}: "
                f"{reason}). Check the shards with `python -m egmf.shards inspect ROOT --verify` and rebuild the "
                "broken split, or raise data.max_bad_samples"
            )


@dataclass
class RawSample:
    offset: int
    """Position of the sample inside its shard (0-based)."""
    key: str
    members: dict[str, bytes]
    where: str


def open_stream(url: str):
    if not is_url(url):
        return open(url, "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def read_shard(
    url: str, num_samples: int, bad: BadSamples, start: int = 0, stop: int | None = None
) -> Iterator[RawSample]:
    """Yield the samples of one shard with start <= offset < stop (earlier ones are skipped undecoded).

    `num_samples` comes from the manifest; a shard that ends early (truncated,
    corrupt header) reports the missing samples of [start, stop) as bad.
    """
    stop = num_samples if stop is None else stop
    offset = -1  # offset of the sample being assembled
    try:
        with open_stream(url) as stream:
            key, members = None, {}
            for path, data in iter_members(stream):
                name = path.rsplit("/", 1)[-1]
                member_key, _, suffix = name.partition(".")
                if member_key != key:
                    if key is not None and offset >= start:
                        yield RawSample(offset, key, members, f"{url} sample #{offset} ({key})")
                    key, members = member_key, {}
                    offset += 1
                    if offset >= stop:
                        if offset >= num_samples:
                            bad.add(url, f"holds more samples than the {num_samples} its manifest lists; rebuild it", 0)
                        return
                if offset >= start:
                    members[suffix] = data
            if key is not None and offset >= start:
                yield RawSample(offset, key, members, f"{url} sample #{offset} ({key})")
    except (OSError, TarFormatError) as exc:
        missing = stop - max(offset, start)
        bad.add(url, f"unreadable from sample #{max(offset, 0)} on ({type(exc).__name__}: {exc})", missing)
        return
    if offset + 1 < stop:
        bad.add(
            url,
            f"ends after {offset + 1} of {num_samples} samples (truncated or corrupt tar)",
            stop - max(offset + 1, start),
        )


def decode_valid(raw: RawSample, manifest: SplitManifest, bad: BadSamples) -> Sample | None:
    """Stages "decode" (json + npy, never pickle) and "validate"; None for a skipped sample."""
    try:
        sample = decode_sample(raw.members)
        check_sample(sample, manifest)
    except DataError as exc:
        bad.add(raw.where, str(exc))
        return None
    return sample
