"""Synthetic bilingual, multi-task demo sets, one designed for each fusion expert.

Four sets, each with train/valid/test: demo_cls_en, demo_cls_zh (4 emotion
classes: neutral, joy, sadness, anger) and demo_reg_en, demo_reg_zh (scores in
[-3, 3] and [-1, 1]). Built in seconds; the embedded default for the main job
and the tests. Every feature value starts i.i.d. N(0, 1); audio has
La ~ U{24..64} frames, vision Lv ~ U{16..32} (dims: en audio 16 / vision 12, zh
12 / 20). Patterns are orthonormal unit vectors drawn per set. The text is a
sentence drawn from a fixed pool, independent of the label. How each label is
planted, and which expert it is designed for (shards/README.md says the same):

- demo_cls_en, fine-grained LOCAL timing: a motif of two patterns on
  neighbouring audio frames, P_m P_m P_m Q_m Q_m Q_m or the reverse
  (strength 5), at a random place. Class = 2 m + order, m in {0, 1}. Which
  motif (m) is visible to anything that pools the audio; the order inside six
  frames is what a short temporal convolution sees, and what attention over a
  clock normalised to the clip (1/16 of it at its finest) barely resolves.
  Vision holds a distractor event.
- demo_cls_zh, cross-modal SEMANTIC correlation: four audio events, two of
  pattern A0 and two of A1 in random order (3 frames each, strength 5, at least
  0.18 of the clip apart), and one vision event V_v (one frame) at the time of
  one of them. Class = 2 v + the pattern of the audio event seen at the same
  time. Vision alone knows v; audio alone gives even odds on the rest, and no
  summary of either modality on its own (which patterns, their mean times)
  says which audio event the vision event coincides with.
- demo_reg_en, GLOBAL context: score = 3 alpha, alpha ~ U(-1, 1), carried by a
  weak drift 0.8 alpha along one direction on every frame of both modalities
  (a single frame's signal is below its noise; the whole utterance's average is
  not), plus two distractor events.
- demo_reg_zh, all three: alpha ~ U(0, 1); an audio event (a distractor
  pattern) marks a time, a vision event V0 of strength 3 + 9 alpha gives the
  magnitude, and the order of the two events the sign (audio first: +):
  score = alpha (one decimal).

A fifth set, demo_key_en (scores in [-3, 3]), is not in the demo mix (the
model does not learn it there; docs/benchmarks.md):

- demo_key_en, GLOBAL context by a look-up: two audio value events, each with
  its own whole score (-3..3, the two distinct) along a value direction and an
  angle in a plane, and one key event whose angle is one of theirs, jittered;
  score = the value of the event the key names. The angles change from clip to
  clip, so no fixed query picks out the named event: a reader has to compare
  the key with each value event, frames far apart in one modality, as the
  global expert's self-attention can. 16384 training clips (egmf/demo_assets.py):
  from a few thousand the model fits the training clips instead.
"""

from __future__ import annotations

import numpy as np

from egmf.datasets import ALL_DEMO_DATASETS, DEMO_DATASETS, SPLITS, get_spec
from egmf.shards.clean import RawRecord
from egmf.shards.writer import ShardLimits, write_split

DIMS = {"en": (16, 12), "zh": (12, 20)}
AUDIO_FRAMES = (24, 64)
VISION_FRAMES = (16, 32)
"""At least 16: with 8 a vision frame spans 1/7 of the clip, close to COINCIDENCE_GAP, and the coincidence set's
errors all came from clips of 8-15 vision frames (docs/model.md)."""
STRENGTH = 5.0
EVENT_FRAMES = 3
MOTIF_FRAMES = 3
"""Frames of each half of a local motif: P P Q Q or Q Q P P."""
MIN_EVENT_GAP = 0.25
COINCIDENCE_EVENTS = 4
COINCIDENCE_GAP = 0.18
"""demo_cls_zh: audio events (two of each pattern) and the least relative time between two of them."""

DRIFT = 0.8
LOOKUP_SEPARATION, LOOKUP_JITTER, LOOKUP_GAP = np.pi / 2, 0.1, 0.25
LOOKUP_VALUE, LOOKUP_ANGLE = 6.0, 8.0
"""demo_key_en: the least angle between its two value events and the key angle's jitter (radians), the least
relative time between two of its events, and the strengths of a value event's value and of every event's angle."""

DEMO_DESIGN = 4
"""Written into each demo manifest (`source.design`); raise it when a change alters the samples, so that
existing demo shards are rebuilt (egmf/demo_assets.py) instead of trained on as if they were the new ones."""

TEXTS = {
    "en": [
        "I went to the store this morning.",
        "The meeting is at three o'clock.",
        "We talked about the weather.",
        "He put the book back on the shelf.",
        "The train leaves from platform two.",
        "She said the report is ready.",
        "They moved the table into the kitchen.",
        "It was a normal day at work.",
        "The bus was a little late.",
        "I think the window is open.",
        "We need to buy more paper.",
        "The office closes at six.",
    ],
    "zh": [
        "我今天早上去了商店。",
        "会议在三点开始。",
        "我们聊了聊天气。",
        "他把书放回了书架上。",
        "火车从二号站台出发。",
        "她说报告已经准备好了。",
        "他们把桌子搬进了厨房。",
        "这是工作中普通的一天。",
        "公交车晚了一点。",
        "我觉得窗户是开着的。",
        "我们需要再买一些纸。",
        "办公室六点关门。",
    ],
}


def orthonormal(rng: np.random.Generator, dim: int, count: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, count)))
    return q.T  # [count, dim], rows orthonormal


def frame_at(position: float, num_frames: int, width: int = 1) -> int:
    """First frame of a `width`-frame event centred at relative `position` (0: first frame, 1: last)."""
    center = int(round(position * (num_frames - 1)))
    return min(max(center - width // 2, 0), num_frames - width)


def add_event(features: np.ndarray, pattern: np.ndarray, position: float, strength: float, width: int) -> None:
    start = frame_at(position, features.shape[0], width)
    features[start : start + width] += strength * pattern


def local_motif(rng, audio, vision, patterns) -> int:
    """demo_cls_en: class 2 m + order of a 2-frame motif in audio."""
    motif, order = (int(b) for b in rng.integers(0, 2, size=2))
    first, second = patterns["motifs"][motif][::-1] if order else patterns["motifs"][motif]
    t = int(rng.integers(0, audio.shape[0] - 2 * MOTIF_FRAMES + 1))
    audio[t : t + MOTIF_FRAMES] += STRENGTH * first
    audio[t + MOTIF_FRAMES : t + 2 * MOTIF_FRAMES] += STRENGTH * second
    add_event(vision, patterns["vision"][rng.integers(0, 2)], rng.uniform(0.1, 0.9), STRENGTH, 1)  # distractor
    return 2 * motif + order


def event_times(rng: np.random.Generator) -> tuple[float, float]:
    """Relative times of an audio and a vision event, at least MIN_EVENT_GAP apart."""
    while True:
        p_a, p_v = rng.uniform(0.1, 0.9, size=2)
        if abs(p_a - p_v) >= MIN_EVENT_GAP:
            return float(p_a), float(p_v)


def spaced_times(rng: np.random.Generator, count: int, gap: float, low: float = 0.08, high: float = 0.92):
    """`count` sorted relative times in [low, high], neighbours at least `gap` apart (uniform spacings)."""
    slack = np.sort(rng.uniform(0.0, high - low - gap * (count - 1), size=count))
    return low + slack + gap * np.arange(count)


def coinciding_event(rng, audio, vision, patterns) -> int:
    """demo_cls_zh: class 2 v + the pattern of the audio event at the vision event's time.

    Audio holds four events, two of each pattern, in random order; vision holds one event (pattern V_v) at the
    time of one of them. Vision alone knows v; audio alone gives even odds between its two patterns."""
    times = spaced_times(rng, COINCIDENCE_EVENTS, COINCIDENCE_GAP)
    kinds = rng.permutation(np.repeat([0, 1], COINCIDENCE_EVENTS // 2))
    for time, kind in zip(times, kinds, strict=True):
        add_event(audio, patterns["audio"][kind], time, STRENGTH, EVENT_FRAMES)
    v, chosen = int(rng.integers(0, 2)), int(rng.integers(0, COINCIDENCE_EVENTS))
    add_event(vision, patterns["vision"][v], times[chosen], STRENGTH, 1)
    return 2 * v + int(kinds[chosen])


def global_drift(rng, audio, vision, patterns) -> float:
    """demo_reg_en: alpha in [-1, 1], spread thinly over every frame of both modalities."""
    alpha = rng.uniform(-1.0, 1.0)
    audio += DRIFT * alpha * patterns["drift_audio"]
    vision += DRIFT * alpha * patterns["drift_vision"]
    for _ in range(2):  # distractors: events that say nothing about the score
        add_event(audio, patterns["audio"][rng.integers(0, 2)], rng.uniform(0.1, 0.9), STRENGTH, EVENT_FRAMES)
    return alpha


def on_circle(angle: float, plane: np.ndarray) -> np.ndarray:
    return np.cos(angle) * plane[0] + np.sin(angle) * plane[1]


def key_lookup(rng, audio, vision, patterns) -> float:
    """demo_key_en: alpha in {-1, -2/3, ..., 1}, the value of the audio event whose angle the key event names.

    Two value events (a marker, their value along a direction, an angle in a plane) and one key event (another
    marker, an angle), 3 frames each, at least LOOKUP_GAP of the clip apart in random order. The value events'
    angles are anywhere on the circle but at least LOOKUP_SEPARATION apart; the key's is one of theirs, jittered."""
    first = rng.uniform(0.0, 2 * np.pi)
    angles = (first, first + LOOKUP_SEPARATION + rng.uniform(0.0, 2 * np.pi - 2 * LOOKUP_SEPARATION))
    alphas = (rng.permutation(7)[:2] - 3) / 3.0  # two distinct whole scores: the answer says which event was read
    target = int(rng.integers(2))
    key_angle = angles[target] + rng.uniform(-LOOKUP_JITTER, LOOKUP_JITTER)
    times = rng.permutation(spaced_times(rng, 3, LOOKUP_GAP))
    plane = patterns["lookup_plane"]
    for time, angle, alpha in zip(times[:2], angles, alphas, strict=True):
        event = STRENGTH * patterns["value_marker"] + LOOKUP_VALUE * alpha * patterns["value"]
        add_event(audio, event + LOOKUP_ANGLE * on_circle(angle, plane), time, 1.0, EVENT_FRAMES)
    key = STRENGTH * patterns["key_marker"] + LOOKUP_ANGLE * on_circle(key_angle, plane)
    add_event(audio, key, times[2], 1.0, EVENT_FRAMES)
    add_event(vision, patterns["vision"][rng.integers(0, 2)], rng.uniform(0.1, 0.9), STRENGTH, 1)  # a distractor
    return float(alphas[target])


def timed_strength(rng, audio, vision, patterns) -> float:
    """demo_reg_zh: alpha in [0, 1] from the vision event's strength, its sign from the events' order."""
    p_a, p_v = event_times(rng)
    alpha = rng.uniform(0.0, 1.0)
    add_event(audio, patterns["audio"][rng.integers(0, 2)], p_a, 5.0, EVENT_FRAMES)
    add_event(vision, patterns["vision"][0], p_v, 3.0 + 9.0 * alpha, EVENT_FRAMES)
    return alpha * (1 if p_a < p_v else -1)


PLANTERS = {
    "demo_cls_en": local_motif,
    "demo_cls_zh": coinciding_event,
    "demo_reg_en": global_drift,
    "demo_reg_zh": timed_strength,
    "demo_key_en": key_lookup,
}
DESIGNED_FOR = {
    "demo_cls_en": "local",
    "demo_cls_zh": "semantic",
    "demo_reg_en": "global",
    "demo_reg_zh": "all",
    "demo_key_en": "global",
}
"""The expert each demo set is designed to need (docs/model.md, ablations)."""


def make_record(rng: np.random.Generator, dataset: str, index: int, split: str, patterns: dict) -> RawRecord:
    spec = get_spec(dataset)
    audio_dim, vision_dim = DIMS[spec.lang]
    audio = rng.standard_normal((rng.integers(AUDIO_FRAMES[0], AUDIO_FRAMES[1] + 1), audio_dim))
    vision = rng.standard_normal((rng.integers(VISION_FRAMES[0], VISION_FRAMES[1] + 1), vision_dim))
    value = PLANTERS[dataset](rng, audio, vision, patterns)
    if spec.labels:
        label: object = spec.labels[value]
    else:
        label = round(spec.label_range[1] * value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = TEXTS[spec.lang][rng.integers(len(TEXTS[spec.lang]))]
    return RawRecord(id=f"{dataset}_{split}_{index:05d}", text=text, label=label, audio=audio, vision=vision)


def demo_patterns(dataset: str, seed: int) -> dict[str, np.ndarray]:
    """The planted patterns of one demo set (tests use them to decode the label): two audio and two vision
    patterns, two 2-pattern motifs (orthogonal to the audio ones), a drift direction per modality, and the
    look-up's markers, value direction and angle plane (orthonormal among themselves)."""
    rng = np.random.default_rng([seed, ALL_DEMO_DATASETS.index(dataset), 1000])
    audio_dim, vision_dim = DIMS[get_spec(dataset).lang]
    audio = orthonormal(rng, audio_dim, 7)
    vision = orthonormal(rng, vision_dim, 3)
    lookup = orthonormal(rng, audio_dim, 5)  # drawn after the others, which stay as they were
    return {
        "value_marker": lookup[0],
        "key_marker": lookup[1],
        "value": lookup[2],
        "lookup_plane": lookup[3:5],
        "audio": audio[:2],
        "motifs": audio[2:6].reshape(2, 2, audio_dim),
        "vision": vision[:2],
        "drift_audio": audio[6],
        "drift_vision": vision[2],
    }


def build_demo(
    out_dir: str,
    sizes: dict[str, int],
    seed: int = 0,
    shard_samples: int = 64,
    datasets: tuple[str, ...] = DEMO_DATASETS,
    set_sizes: dict[str, dict[str, int]] | None = None,
) -> list:
    """Write the demo `datasets` under out_dir; returns their manifests. `sizes`: samples per split; `set_sizes`:
    a dataset's own sizes for some splits ({"demo_key_en": {"train": 16384}}). A set's samples do not depend on
    which other sets are built with it."""
    manifests = []
    for dataset in datasets:
        patterns = demo_patterns(dataset, seed)
        own = {**sizes, **(set_sizes or {}).get(dataset, {})}
        for split_index, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, ALL_DEMO_DATASETS.index(dataset), split_index])
            records = [make_record(rng, dataset, i, split, patterns) for i in range(own[split])]
            manifests.append(
                write_split(
                    records,
                    get_spec(dataset),
                    split,
                    out_dir,
                    ShardLimits(max_samples=shard_samples),
                    source={"format": "demo", "seed": seed, "design": DEMO_DESIGN},
                )
            )
    return manifests
