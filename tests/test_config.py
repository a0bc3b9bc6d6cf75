"""Config tree: recipes load, includes merge, overrides apply, and every bad key or value is named at once."""

from __future__ import annotations

import glob
import os

import pytest

from egmf.errors import ConfigError
from egmf.train.config import Config, load_config

RECIPES = os.path.join(os.path.dirname(__file__), "..", "launch", "recipes")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(RECIPES, "**", "*.toml"), recursive=True)))
def test_every_shipped_recipe_loads(path):
    assert isinstance(load_config(path), Config)


def test_dataset_recipes_use_the_7b_backbone():
    cfg = load_config(os.path.join(RECIPES, "mosei.toml"))
    assert cfg.data.train == {"mosei": 1.0} and cfg.data.max_audio_frames == 500
    assert cfg.llm.path.endswith("Qwen2.5-7B-Instruct") and cfg.llm.gradient_checkpointing
    assert (cfg.fusion.width, cfg.fusion.heads, cfg.fusion.num_pseudo_tokens) == (512, 8, 8)
    assert cfg.lora.target_modules[-1] == "down_proj"
    llama = load_config(os.path.join(RECIPES, "backbones", "llama3-8b.toml"))
    assert llama.llm.pad_token == "<|end_of_text|>" and llama.fusion.width == 512  # merged from its include
    joint = load_config(os.path.join(RECIPES, "joint.toml"))
    assert joint.data.train == {"mosei": 1.0, "meld": 1.0, "cherma": 1.0, "sims2": 0.5}


def test_overrides_of_every_kind():
    cfg = load_config(
        os.path.join(RECIPES, "demo.toml"),
        [
            "--data.batch_size=4",
            "--lora.dropout=0.1",
            "--fusion.experts=['local', 'global']",
            "--llm.path=/models/My Model",
            "--data.train={demo_cls_en = 2}",
            "--prompt.text_only=true",
            "--prompt.label_words.demo_cls_en.joy=happy",
        ],
    )
    assert cfg.data.batch_size == 4 and cfg.lora.dropout == 0.1 and cfg.fusion.experts == ["local", "global"]
    assert cfg.llm.path == "/models/My Model" and cfg.prompt.text_only
    assert cfg.data.train == {"demo_cls_en": 2.0} and isinstance(cfg.data.train["demo_cls_en"], float)
    assert cfg.prompt.label_words == {"demo_cls_en": {"joy": "happy"}}


def test_no_recipe_gives_the_defaults():
    assert load_config() == Config()


def test_every_problem_is_named_at_once(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[data]\nbatch_size = "eight"\nshuffle = true\n[fusion]\nwidth = 30\n[optimiser]\nlr = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(recipe), ["--lora.rank=1.5"])
    message = str(info.value)
    for fragment in (
        "data.batch_size: expected int, got 'eight'",
        "unknown key data.shuffle",
        "unknown key optimiser",
        "lora.rank: expected int, got 1.5",
    ):
        assert fragment in message, message
    with pytest.raises(ConfigError, match="fusion.width 30 must be a multiple of fusion.heads 4"):
        load_config(None, ["--fusion.width=30"])


def test_values_are_validated_after_types():
    with pytest.raises(ConfigError, match=r"(?s)unknown dataset 'mosi'.*data.truncation"):
        load_config(None, ["--data.train={mosi = 1.0}", "--data.truncation=tail"])


def test_the_score_read_names_score_sets_that_train():
    recipe = "launch/recipes/demo.toml"
    assert load_config(recipe, ['--fusion.score_read_datasets=["demo_reg_en"]']).fusion.score_read_datasets == [
        "demo_reg_en"
    ]
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ['--fusion.score_read_datasets=["demo_cls_en", "mosei"]'])
    assert "'demo_cls_en' is a classification set" in str(info.value)
    assert "'mosei' does not train (data.train has no such dataset)" in str(info.value)


def test_a_new_adapter_without_a_saved_model_is_refused():
    with pytest.raises(ConfigError, match="train.init_from_adapter = false only applies with train.init_from"):
        load_config(None, ["--train.init_from_adapter=false"])
    both = load_config(None, ["--train.init_from=runs/a/best", "--train.init_from_adapter=false"])
    assert both.train.init_from == "runs/a/best" and not both.train.init_from_adapter


def test_bad_recipes_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.toml"))
    (tmp_path / "broken.toml").write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(tmp_path / "broken.toml"))
    (tmp_path / "a.toml").write_text('include = "b.toml"\n')
    (tmp_path / "b.toml").write_text('include = "a.toml"\n')
    with pytest.raises(ConfigError, match="include loop"):
        load_config(str(tmp_path / "a.toml"))
    with pytest.raises(ConfigError, match="not of the form --section.key=value"):
        load_config(None, ["data.batch_size=4"])
    with pytest.raises(ConfigError, match="names no key"):
        load_config(None, ["--data=3"])
    (tmp_path / "flat.toml").write_text("data = 3\n")
    with pytest.raises(ConfigError, match=r"data must be a table \(\[data\]\)"):
        load_config(str(tmp_path / "flat.toml"))
