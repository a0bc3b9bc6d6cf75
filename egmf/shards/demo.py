"""A synthetic bilingual, multi-task dataset whose label needs audio, vision and timing.

Four sets, each with train/valid/test: demo_cls_en, demo_cls_zh (4 emotion classes)
and demo_reg_en, demo_reg_zh (scores in [-3, 3] and [-1, 1]). Built in seconds;
the embedded default for the main job and the tests. The planting, exactly
(shards/README.md says the same):

- Background: every feature value is i.i.d. N(0, 1). Audio has La ~ U{24..64}
  frames, vision Lv ~ U{8..24} frames (dims: en audio 16 / vision 12, zh 12 / 20).
- Each set draws two audio patterns A0, A1 and two vision patterns V0, V1
  (orthonormal pairs). One *event* is added per modality: pattern x strength on the
  3 consecutive frames centred on frame round(p * (L - 1)) of that modality,
  with p_a, p_v ~ U(0.1, 0.9) redrawn until |p_a - p_v| >= 0.25.
  `audio_first` = p_a < p_v: the relative timing of the two events.
- Classification: audio pattern a and vision pattern v are fair coin flips, both
  events have strength 5; class index = 2 * a + audio_first over (neutral, joy,
  sadness, anger). Audio alone knows a but not the order (at most 50 %); vision
  alone (whose pattern is a distractor) and text alone are at chance.
- Regression: alpha ~ U(0, 1); the audio event (strength 5, pattern A0 or A1 at
  random, a distractor) marks a time; the vision event is V0 with strength
  3 + 9 * alpha; score = R * alpha * (+1 if audio_first else -1), rounded to one
  decimal, R = 3 (en) or 1 (zh). Vision alone gives the magnitude but not the
  sign; the sign is the order of the two events.
- Text: a sentence drawn uniformly from a fixed pool, independently of the label.
"""

from __future__ import annotations

import numpy as np

from egmf.datasets import CLASSIFICATION, DEMO_DATASETS, SPLITS, get_spec
from egmf.shards.clean import RawRecord
from egmf.shards.writer import ShardLimits, write_split

DIMS = {"en": (16, 12), "zh": (12, 20)}
AUDIO_FRAMES = (24, 64)
VISION_FRAMES = (8, 24)
EVENT_STRENGTH = 5.0
EVENT_FRAMES = 3
MIN_EVENT_GAP = 0.25

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


def orthonormal_pair(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    return q.T  # [2, dim], rows orthonormal


def event_times(rng: np.random.Generator) -> tuple[float, float]:
    while True:
        p_a, p_v = rng.uniform(0.1, 0.9, size=2)
        if abs(p_a - p_v) >= MIN_EVENT_GAP:
            return float(p_a), float(p_v)


def add_event(features: np.ndarray, pattern: np.ndarray, position: float, strength: float) -> None:
    num_frames = features.shape[0]
    center = int(round(position * (num_frames - 1)))
    start = min(max(center - EVENT_FRAMES // 2, 0), num_frames - EVENT_FRAMES)
    features[start : start + EVENT_FRAMES] += strength * pattern


def make_record(rng: np.random.Generator, dataset: str, index: int, split: str, patterns: dict) -> RawRecord:
    spec = get_spec(dataset)
    audio_dim, vision_dim = DIMS[spec.lang]
    audio = rng.standard_normal((rng.integers(AUDIO_FRAMES[0], AUDIO_FRAMES[1] + 1), audio_dim))
    vision = rng.standard_normal((rng.integers(VISION_FRAMES[0], VISION_FRAMES[1] + 1), vision_dim))
    p_a, p_v = event_times(rng)
    audio_first = p_a < p_v
    if spec.task == CLASSIFICATION:
        a, v = rng.integers(0, 2, size=2)
        add_event(audio, patterns["audio"][a], p_a, EVENT_STRENGTH)
        add_event(vision, patterns["vision"][v], p_v, EVENT_STRENGTH)
        label: object = spec.labels[2 * int(a) + int(audio_first)]
    else:
        alpha = rng.uniform(0.0, 1.0)
        add_event(audio, patterns["audio"][rng.integers(0, 2)], p_a, EVENT_STRENGTH)
        add_event(vision, patterns["vision"][0], p_v, 3.0 + 9.0 * alpha)
        sign = 1 if audio_first else -1
        label = round(spec.label_range[1] * alpha * sign, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = TEXTS[spec.lang][rng.integers(len(TEXTS[spec.lang]))]
    return RawRecord(id=f"{dataset}_{split}_{index:05d}", text=text, label=label, audio=audio, vision=vision)


def demo_patterns(dataset: str, seed: int) -> dict[str, np.ndarray]:
    """The planted patterns of one demo set (tests use them to decode the label)."""
    rng = np.random.default_rng([seed, DEMO_DATASETS.index(dataset), 1000])
    audio_dim, vision_dim = DIMS[get_spec(dataset).lang]
    return {"audio": orthonormal_pair(rng, audio_dim), "vision": orthonormal_pair(rng, vision_dim)}


def build_demo(out_dir: str, sizes: dict[str, int], seed: int = 0, shard_samples: int = 64) -> list:
    """Write all demo sets under out_dir; returns their manifests."""
    manifests = []
    for dataset in DEMO_DATASETS:
        patterns = demo_patterns(dataset, seed)
        for split_index, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, DEMO_DATASETS.index(dataset), split_index])
            records = [make_record(rng, dataset, i, split, patterns) for i in range(sizes[split])]
            manifests.append(
                write_split(
                    records,
                    get_spec(dataset),
                    split,
                    out_dir,
                    ShardLimits(max_samples=shard_samples),
                    source={"format": "demo", "seed": seed},
                )
            )
    return manifests
