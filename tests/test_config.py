import dataclasses
import re
import typing
from pathlib import Path

import pytest

from hiar.config import (ROOT, Config, ConfigError, ModelConfig, SamplingConfig, choices, load_config, preset_path,
                         repo_path, save_config, teacher_model_config, with_overrides)


@pytest.mark.parametrize("preset", ["tiny", "toy", "wan1.3b", "wan14b"])
def test_presets_load_and_validate(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.geometry.num_blocks * cfg.video.frames_per_block == cfg.video.num_latent_frames


def test_wan_geometry_is_derived():
    # The reference hard-codes these two numbers; here they follow from 480x832, stride 8 and patch 2.
    geo = load_config("wan1.3b").geometry
    assert (geo.latent_height, geo.latent_width) == (60, 104)
    assert geo.tokens_per_frame == 1560
    assert geo.cache_tokens == 32760
    assert load_config("wan1.3b", ["video.window_frames=12"]).geometry.cache_tokens == 12 * 1560


def test_overrides_are_typed():
    cfg = load_config("tiny", ["model.num_layers=3", "schedule.shift=1e-1", "model.patch_size=[1, 2, 2]",
                               "video.window_frames=6", "schedule.warp=false"])
    assert cfg.model.num_layers == 3 and cfg.schedule.shift == 0.1
    assert cfg.model.patch_size == (1, 2, 2) and cfg.video.window_frames == 6 and cfg.schedule.warp is False


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"model.num_layer.*did you mean 'num_layers'"):
        load_config("tiny", ["model.num_layer=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'video'"):
        load_config("tiny", ["vidoe.height=64"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layers: 2\n  hed_dim: 16\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.hed_dim.*did you mean 'head_dim'"):
        load_config(path)


def test_wrong_type_says_what_was_expected():
    with pytest.raises(ConfigError, match=r"model.num_layers: expected int, got 'four'"):
        load_config("tiny", ["model.num_layers=four"])
    with pytest.raises(ConfigError, match=r"schedule.warp: expected bool"):
        load_config("tiny", ["schedule.warp=3"])
    backends = re.escape(str(list(choices(ModelConfig, "attention_backend"))))
    with pytest.raises(ConfigError, match=rf"model.attention_backend: expected one of {backends}, got 'triton'"):
        load_config("tiny", ["model.attention_backend=triton"])


def test_inconsistent_geometry_says_what_to_change():
    with pytest.raises(ConfigError, match=r"num_latent_frames=10 is not a multiple of video.frames_per_block=3: "
                                          r"use 9 or 12"):
        load_config("tiny", ["video.num_latent_frames=10"])
    with pytest.raises(ConfigError, match=r"distill.num_rollout_frames=10 is not a multiple of "
                                          r"video.frames_per_block=3: use 9 or 12"):
        load_config("tiny", ["distill.num_rollout_frames=10"])
    with pytest.raises(ConfigError, match=r"video.height=40 must be divisible by .* = 16: use 32"):
        load_config("tiny", ["video.height=40"])
    with pytest.raises(ConfigError, match=r"window_frames=4 must be at least .* = 5"):
        load_config("tiny", ["video.window_frames=4", "video.sink_frames=2"])
    with pytest.raises(ConfigError, match=r"strictly decreasing"):
        load_config("tiny", ["schedule.denoising_steps=[250, 500]"])
    with pytest.raises(ConfigError, match=r"train.decay_steps=-1 must be >= 0"):
        load_config("tiny", ["train.decay_steps=-1"])
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.0 must lie in \[0, 1\)"):
        load_config("tiny", ["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match=r"toy_dct makes 16-channel latents with stride \[1, 8, 8\]: "):
        load_config("toy", ["video.vae_stride=[4,8,8]"])
    with pytest.raises(ConfigError, match=r"wan_vae .* stride \[4, 8, 8\] or \[4, 4, 4\]"):
        load_config("toy", ["video.codec=wan_vae", "video.vae_stride=[4,2,2]"])
    assert load_config("toy", ["video.codec=wan_vae", "video.vae_stride=[4,4,4]"]).video.vae_stride == (4, 4, 4)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'tiyn'.*did you mean 'tiny'"):
        preset_path("tiyn")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("toy", ["video.window_frames=9", "schedule.shift=3.0"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert not list(path.parent.glob("*.tmp"))


def test_a_loaded_config_is_frozen():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.video.num_latent_frames = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.video = cfg.video
    assert cfg.video.num_latent_frames == 9


def test_with_overrides_derives_a_new_validated_config():
    cfg = load_config("tiny")
    longer = with_overrides(cfg, ["video.num_latent_frames=12"])
    assert (cfg.video.num_latent_frames, longer.video.num_latent_frames) == (9, 12)
    assert longer.geometry.num_blocks == 4 and cfg.geometry.num_blocks == 3
    # the distillation lengths were resolved from the loaded length and stay as they were
    assert longer.distill.num_training_frames == longer.distill.num_rollout_frames == 9
    with pytest.raises(ConfigError, match=r"num_latent_frames=10 is not a multiple"):
        with_overrides(cfg, ["video.num_latent_frames=10"])


def test_distill_lengths_are_resolved_at_validation():
    cfg = load_config("tiny", ["video.num_latent_frames=12", "distill.num_rollout_frames=15"])
    assert (cfg.distill.num_training_frames, cfg.distill.num_rollout_frames) == (12, 15)
    assert load_config("tiny").distill.num_rollout_frames == 9


def test_derived_values_are_computed_once():
    cfg = load_config("wan1.3b")
    assert cfg.schedule.timesteps == pytest.approx((1000.0, 937.5, 833.333, 625.0), abs=1e-3)  # docs/design.md 1
    assert cfg.schedule.timesteps is cfg.schedule.timesteps and cfg.geometry is cfg.geometry
    unwarped = with_overrides(cfg, ["schedule.warp=false"])
    assert unwarped.schedule.timesteps == (1000.0, 750.0, 500.0, 250.0)


def test_choices_are_the_literal_of_the_field():
    assert choices(SamplingConfig, "method") == typing.get_args(typing.get_type_hints(SamplingConfig)["method"])
    assert "timestep_first" in choices(SamplingConfig, "method")
    with pytest.raises(TypeError, match="not a Literal"):
        choices(SamplingConfig, "num_frame_first_blocks")


def test_config_paths_are_taken_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_path("data/prompts.txt") == ROOT / "data" / "prompts.txt"
    assert repo_path(tmp_path / "x") == tmp_path / "x"  # absolute: as given
    for preset in ("toy/hiar", "hiar"):
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
        assert repo_path(cfg.runtime.prompts).is_file() and repo_path(cfg.train.deepspeed).is_file()
    wan14b = load_config("wan14b").model
    assert teacher_model_config(load_config("hiar")) == wan14b  # configs/hiar.yaml: teacher_model wan14b
    by_file = with_overrides(load_config("hiar"), ["distill.teacher_model=configs/wan14b.yaml"])
    assert not Path("configs").exists() and teacher_model_config(by_file) == wan14b
    assert teacher_model_config(load_config("tiny")) == load_config("tiny").model
