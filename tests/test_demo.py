"""The demo's label is recoverable from audio + vision + their timing, and from nothing less."""

from __future__ import annotations

from collections import Counter

import numpy as np

from egmf.data.tar_samples import BadSamples, decode_valid, read_shard
from egmf.shards.demo import EVENT_FRAMES, demo_patterns
from egmf.shards.manifest import load_manifest


def load(root, dataset, split="train"):
    manifest = load_manifest(root, dataset, split)
    bad = BadSamples(0)
    return manifest, [
        decode_valid(raw, manifest, bad)
        for i, shard in enumerate(manifest.shards)
        for raw in read_shard(manifest.shard_url(i), shard.num_samples, bad)
    ]


def find_event(features: np.ndarray, patterns: np.ndarray) -> tuple[int, float, float]:
    """(pattern id, relative time, strength) of the strongest planted event (3 frames wide)."""
    scores = features.astype(np.float32) @ patterns.T  # [L, 2]
    window = np.stack([np.convolve(scores[:, p], np.ones(EVENT_FRAMES) / EVENT_FRAMES, "valid") for p in (0, 1)], 1)
    start, pattern = np.unravel_index(np.argmax(window), window.shape)
    center = start + EVENT_FRAMES // 2
    return int(pattern), center / (len(features) - 1), float(window[start, pattern])


def test_classification_needs_both_modalities_and_timing(demo_root):
    for dataset in ("demo_cls_en", "demo_cls_zh"):
        manifest, samples = load(demo_root, dataset)
        patterns = demo_patterns(dataset, seed=0)
        decoded, audio_ids, vision_ids, truth = [], [], [], []
        for s in samples:
            a, t_a, _ = find_event(s.audio, patterns["audio"])
            v, t_v, _ = find_event(s.vision, patterns["vision"])
            decoded.append(manifest.labels[2 * a + int(t_a < t_v)])
            audio_ids.append(a)
            vision_ids.append(v)
            truth.append(s.meta["label"])
        assert np.mean(np.array(decoded) == np.array(truth)) > 0.97
        for a in (0, 1):  # audio alone: two classes left, equally likely (the order bit is missing)
            counts = Counter(label for label, aid in zip(truth, audio_ids, strict=True) if aid == a)
            assert len(counts) == 2 and min(counts.values()) > 0.3 * sum(counts.values())
        for v in (0, 1):  # the vision pattern is a distractor: all four classes under each
            counts = Counter(label for label, vid in zip(truth, vision_ids, strict=True) if vid == v)
            assert len(counts) == 4 and min(counts.values()) > 0.1 * sum(counts.values())


def test_regression_sign_needs_timing_and_magnitude_needs_vision(demo_root):
    manifest, samples = load(demo_root, "demo_reg_en")
    patterns = demo_patterns("demo_reg_en", seed=0)
    errors, audio_id_vs_sign, strength_vs_sign = [], [], []
    for s in samples:
        a, t_a, _ = find_event(s.audio, patterns["audio"])
        # Only V0 is planted in regression sets: look for it alone.
        _, t_v, strength = find_event(s.vision, np.stack([patterns["vision"][0], -patterns["vision"][0]]))
        alpha = np.clip((strength - 3.0) / 9.0, 0, 1)
        estimate = 3.0 * alpha * (1 if t_a < t_v else -1)
        errors.append(abs(estimate - s.meta["label"]))
        if s.meta["label"] != 0:
            audio_id_vs_sign.append((1 - 2 * a) == np.sign(s.meta["label"]))
            strength_vs_sign.append((strength > 7.5) == (s.meta["label"] > 0))
    assert np.mean(errors) < 0.3  # range is [-3, 3]; chance MAE is about 1.5
    assert 0.3 < np.mean(audio_id_vs_sign) < 0.7  # the audio pattern says nothing about the sign
    assert 0.3 < np.mean(strength_vs_sign) < 0.7  # nor does the vision event's strength


def test_text_carries_no_label(demo_root):
    _, samples = load(demo_root, "demo_cls_en")
    by_text: dict[str, Counter] = {}
    for s in samples:
        by_text.setdefault(s.meta["text"], Counter())[s.meta["label"]] += 1
    assert len(by_text) > 5
    total = Counter(s.meta["label"] for s in samples)
    majority = max(total.values()) / len(samples)
    best_by_text = sum(max(c.values()) for c in by_text.values()) / len(samples)
    assert best_by_text < majority + 0.25  # small-sample noise only
