import pytest

from hiar.config import Config, ConfigError, load_config, preset_path, save_config


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
    with pytest.raises(ConfigError, match=r"model.attention_backend: expected one of \['auto', 'sdpa'\]"):
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


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'tiyn'.*did you mean 'tiny'"):
        preset_path("tiyn")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("toy", ["video.window_frames=9", "schedule.shift=3.0"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert not list(path.parent.glob("*.tmp"))
