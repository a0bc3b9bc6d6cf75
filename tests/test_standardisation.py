"""Feature standardisation: statistics over a split's finite values, stored in its manifest by the builder,
carried by the model (checkpoints, exports, any precision), applied to its inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_mmsa

from egmf.model.config import FusionConfig
from egmf.model.fusion import FrontEnd, FusionModule
from egmf.shards.cli import main as shards_main
from egmf.shards.manifest import load_manifest
from egmf.shards.stats import FeatureStats


def test_statistics_of_finite_values_merged_sample_by_sample():
    rng = np.random.default_rng(0)
    samples = [rng.normal(10000.0, 0.5, size=(n, 3)).astype(np.float32) for n in (5, 40, 1, 17)]
    for s in samples:
        s[:, 2] = 7.0  # a constant dimension
    samples[1][3, 0], samples[2][0, 1] = np.nan, np.inf
    stats = FeatureStats()
    for s in samples:
        stats.add(s, np.isfinite(s))
    result = stats.as_dict()
    values = np.concatenate(samples).astype(np.float64)
    finite = [values[np.isfinite(values[:, d]), d] for d in range(3)]
    assert result["mean"][:2] == pytest.approx([f.mean() for f in finite[:2]], rel=1e-7)
    assert result["std"][:2] == pytest.approx([f.std() for f in finite[:2]], rel=1e-4)  # no cancellation at 1e4
    assert result["mean"][2] == 7.0 and result["std"][2] == 1.0 and result["zero_variance_dims"] == 1
    assert result["frames"] == 63
    assert FeatureStats().as_dict() == {}


def test_the_builder_stores_each_splits_statistics(tmp_path):
    data = write_mmsa(str(tmp_path / "in.pkl"))
    out = str(tmp_path / "out")
    args = ["build", "--format", "mmsa", "--dataset", "mosei", "--input", str(tmp_path / "in.pkl"), "--out", out]
    assert shards_main(args) == 0
    stats = load_manifest(out, "mosei", "train").feature_stats
    split = data["train"]
    frames = np.concatenate([a[:n] for a, n in zip(split["audio"], split["audio_lengths"], strict=True)])
    frames = frames.astype(np.float64)
    frames[~np.isfinite(frames)] = np.nan  # the release's -inf / inf / NaN are not statistics
    assert stats["audio"]["mean"] == pytest.approx(np.nanmean(frames, 0).tolist(), rel=1e-5, abs=1e-6)
    assert stats["audio"]["std"] == pytest.approx(np.nanstd(frames, 0).tolist(), rel=1e-4)
    assert len(stats["vision"]["mean"]) == 35
    assert load_manifest(out, "mosei", "test").feature_stats["audio"]["frames"] > 0


def test_the_model_standardises_with_the_stats_and_keeps_them_in_float32():
    stats = {"mean": [10000.0, -3.0], "std": [2.0, 0.5]}
    front = FrontEnd(2, 4, stats).to(torch.bfloat16)  # what bf16 training does to the module
    assert front.mean.dtype == front.std.dtype == torch.float32
    raw = torch.tensor([[[10004.0, -2.0]]])
    same = FrontEnd(2, 4)  # no statistics: identity
    same.load_state_dict({k: v for k, v in front.state_dict().items() if k not in ("mean", "std")}, strict=False)
    standardised = torch.tensor([[[2.0, 2.0]]])
    torch.testing.assert_close(front(raw).float(), same.to(torch.bfloat16)(standardised).float())


def test_statistics_travel_with_the_fusion_weights():
    dims = {"mosei": (2, 3)}
    audio, vision = {"mean": [1.0, 2.0], "std": [3.0, 4.0]}, {"mean": [0.5] * 3, "std": [2.0] * 3}
    stats = {"mosei": {"audio": audio, "vision": vision}}
    cfg = FusionConfig(width=8, heads=2, num_pseudo_tokens=2, global_layers=1)
    trained = FusionModule(cfg, dims, 16, 0.05, stats).state_dict()
    loaded = FusionModule(cfg, dims, 16, 0.05)  # how evaluate/predict build it, then load the weights
    loaded.load_state_dict(trained)
    assert loaded.audio_front["mosei"].mean.tolist() == [1.0, 2.0]
    assert loaded.vision_front["mosei"].std.tolist() == [2.0] * 3
