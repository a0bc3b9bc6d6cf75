"""Moving batches from DataLoader workers to the training process through shared memory.

Sending a batch through the DataLoader's result pipe costs about 4.6 ms per MB
on a 2-core machine (pickle, pipe, unpickle), as much as making the batch
(docs/benchmarks.md). Here each worker owns a ring of shared-memory slots: its
stream collates the two large feature arrays straight into a free slot (the
stream's `allocate_features`), the worker sends only the small rest through the
pipe, and the training process copies the arrays out (one memcpy, so a batch
stays valid however long it is kept) and hands the slot back.

Slots live for one pass over a DataLoader (`run_in_workers`) and are unlinked at
its end, also when the consumer stops early, so no stale slot can outlive the
workers that write it.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from egmf.data.collate import Batch
from egmf.shards.manifest import SplitManifest

FEATURE_ITEMSIZE = 2  # float16


def max_batch_bytes(manifests: list[SplitManifest], batch_size: int, max_audio: int, max_vision: int) -> int:
    """The largest feature payload one batch of these splits can have (frame maxima from the manifests)."""
    largest = 0
    for m in manifests:
        audio = min(max_audio, m.length_stats["audio"]["max"]) * m.audio_dim
        vision = min(max_vision, m.length_stats["vision"]["max"]) * m.vision_dim
        largest = max(largest, batch_size * (audio + vision) * FEATURE_ITEMSIZE)
    return largest


@dataclass
class _SlotRef:
    """What crosses the pipe: the batch without its feature values, and where they are."""

    batch: Batch
    worker: int
    slot: int
    audio: tuple[int, tuple[int, ...]]
    """(byte offset in the slot, shape) of the audio values."""
    vision: tuple[int, tuple[int, ...]]


class _SlotRing:
    """`num_slots` shared-memory buffers for one worker, and the queue of free ones."""

    def __init__(self, num_slots: int, slot_bytes: int):
        self.slot_bytes = max(slot_bytes, 1)
        self.memory = SharedMemory(create=True, size=num_slots * self.slot_bytes)
        self.free = multiprocessing.get_context().SimpleQueue()
        for slot in range(num_slots):
            self.free.put(slot)

    def view(self, slot: int, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        start = slot * self.slot_bytes + offset
        return np.ndarray(shape, dtype=np.float16, buffer=self.memory.buf, offset=start)

    def offset_in(self, slot: int, values: torch.Tensor) -> int:
        """Where in `slot` these values lie (they were collated into it)."""
        base = np.frombuffer(self.memory.buf, np.uint8).ctypes.data + slot * self.slot_bytes
        offset = values.data_ptr() - base
        assert 0 <= offset and offset + values.nbytes <= self.slot_bytes, "batch values are not in its slot"
        return offset

    def release_worker(self) -> None:
        """Wake this ring's worker if it waits for a free slot, and tell it to stop (the consumer is done)."""
        self.free.put(None)

    def close(self) -> None:
        self.memory.close()
        self.memory.unlink()


class _ConsumerStopped(Exception):
    """The training process stopped reading before the stream ended: the worker ends too."""


class _SlotAllocator:
    """A worker stream's `allocate_features`: a batch's padded arrays, one after the other, in one free slot."""

    def __init__(self, ring: _SlotRing):
        self.ring, self.slot, self.used = ring, None, 0

    def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        assert np.dtype(dtype) == np.float16, f"features are float16, got {dtype}"
        if self.slot is None:
            slot = self.ring.free.get()  # blocks only while the consumer holds every slot
            if slot is None:
                raise _ConsumerStopped
            self.slot, self.used = slot, 0
        nbytes = math.prod(shape) * FEATURE_ITEMSIZE
        assert self.used + nbytes <= self.ring.slot_bytes, "batch larger than max_batch_bytes"
        view = self.ring.view(self.slot, self.used, shape)
        self.used += nbytes
        return view

    def take_slot(self) -> int:
        """The slot the last batch was collated into; the next batch gets another."""
        assert self.slot is not None, "a batch that was not collated with the stream's allocate_features"
        slot, self.slot = self.slot, None
        return slot


class _SlotStream(IterableDataset):
    """Runs `inner` in a worker, collating its batches into that worker's slots."""

    def __init__(self, inner: IterableDataset, rings: list[_SlotRing]):
        self.inner, self.rings = inner, rings

    def __iter__(self):
        worker = get_worker_info().id
        ring = self.rings[worker]
        allocate = _SlotAllocator(ring)
        self.inner.allocate_features = allocate  # this worker's copy of the stream
        try:
            for item in self.inner:
                if not isinstance(item, Batch):
                    yield item
                    continue
                slot = allocate.take_slot()
                audio, vision = item.audio.values, item.vision.values
                where_audio = (ring.offset_in(slot, audio), tuple(audio.shape))
                where_vision = (ring.offset_in(slot, vision), tuple(vision.shape))
                empty = torch.empty(0, dtype=torch.float16)
                light = replace(
                    item, audio=replace(item.audio, values=empty), vision=replace(item.vision, values=empty)
                )
                yield _SlotRef(light, worker, slot, where_audio, where_vision)
        except _ConsumerStopped:  # end here rather than wait to be killed
            return


def _copy_out(view: np.ndarray, pin: bool) -> torch.Tensor:
    # Pinned on CUDA machines so the host-to-device copy can be asynchronous.
    out = torch.empty(view.shape, dtype=torch.float16, pin_memory=pin)
    out.numpy()[...] = view
    return out


def _receive(ref: _SlotRef, rings: list[_SlotRing], pin: bool) -> Batch:
    ring = rings[ref.worker]
    audio = _copy_out(ring.view(ref.slot, *ref.audio), pin)
    vision = _copy_out(ring.view(ref.slot, *ref.vision), pin)
    ring.free.put(ref.slot)
    batch = ref.batch
    return replace(batch, audio=replace(batch.audio, values=audio), vision=replace(batch.vision, values=vision))


def _leave_stop_signals_to_the_parent(worker_id: int) -> None:
    """SIGTERM/SIGINT/SIGUSR1 reach the whole process tree (the launcher terminates children first; scancel,
    Slurm's time-limit warning and a terminal's Ctrl-C signal the whole group). The training process handles
    them and ends the run cleanly; a worker that died first would turn that stop into a 'DataLoader worker
    killed' error. Workers end when the consumer releases them (`release_worker`), or through the DataLoader's
    watchdog when their parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def kill_leftover_workers() -> None:
    """Kill loader workers still alive after an error left their loader unclosed. They ignore SIGTERM, so
    the interpreter's exit, which terminates and then joins them, would otherwise wait forever."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(10)


def run_in_workers(
    stream: IterableDataset, num_workers: int, prefetch_batches: int, slot_bytes: int
) -> Iterator[Batch | dict]:
    """Everything `stream` yields, made by `num_workers` processes (or in this one when 0)."""
    if num_workers == 0:
        yield from stream
        return
    rings = [_SlotRing(prefetch_batches + 1, slot_bytes) for _ in range(num_workers)]
    loader = DataLoader(
        _SlotStream(stream, rings),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_batches,
        persistent_workers=False,
        worker_init_fn=_leave_stop_signals_to_the_parent,
    )
    pin = torch.cuda.is_available()
    items = iter(loader)
    try:
        for item in items:
            yield _receive(item, rings, pin) if isinstance(item, _SlotRef) else item
    finally:
        for ring in rings:
            ring.release_worker()
        stop_workers(items)  # before their shared memory goes away
        del items
        for ring in rings:
            ring.close()


def stop_workers(items) -> None:
    """Shut a DataLoader iterator's workers down now. Garbage collection would not do it while an exception's
    traceback still holds the iterator, and the workers ignore SIGTERM: the interpreter's exit would then
    wait for them forever."""
    shutdown = getattr(items, "_shutdown_workers", None)  # what the iterator's __del__ calls
    if shutdown is not None:
        shutdown()
    for worker in getattr(items, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(10)
