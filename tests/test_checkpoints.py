"""Every published layout, written for a tiny random model, loads to the same network."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from hiar.checkpoints import CheckpointError, load_generator, load_weights, save_model
from hiar.config import load_config, with_overrides
from hiar.models.wan import diffusers_transformer_config

from conftest import random_inputs, random_model

# diffusers name -> Wan2.1's original name (the published layout of Wan2.1 and of HiAR .pt files)
ORIGINAL_NAMES = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."), ("attn1.", "self_attn."), ("attn2.", "cross_attn."),
    (".norm2.", ".norm3."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    (".scale_shift_table", ".modulation"), ("proj_out", "head.head"),
]


def original_layout(state):
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            key = "head.modulation"
        for ours, theirs in ORIGINAL_NAMES:
            key = key.replace(ours, theirs)
        out[key] = value
    return out


@pytest.fixture
def tiny_and_model():
    cfg = load_config("tiny")
    return cfg, random_model(cfg, seed=3)


def same_network(a, b, cfg):
    x, text = random_inputs(cfg, batch=1, seed=0)
    with torch.no_grad():
        return torch.equal(a(x, 700.0, text), b(x, 700.0, text))


def test_original_wan_folder(tmp_path, tiny_and_model):
    cfg, model = tiny_and_model
    m = cfg.model
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": m.dim, "eps": 1e-6, "ffn_dim": m.ffn_dim, "freq_dim": m.freq_dim,
        "in_dim": m.in_channels, "model_type": "t2v", "num_heads": m.num_heads, "num_layers": m.num_layers,
        "out_dim": m.out_channels, "text_len": m.text_len}))
    state = original_layout(model.state_dict())
    assert "blocks.0.self_attn.q.weight" in state and "head.modulation" in state
    keys = sorted(state)  # two shards, as the 14B model ships
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[len(keys) // 2:]}, tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    loaded, _ = load_generator(tmp_path, cfg)
    assert same_network(loaded, model, cfg)
    with pytest.raises(CheckpointError, match=r"config.json describes another model.*num_layers=2 in config.json, 3"):
        load_generator(tmp_path, load_config("tiny", ["model.num_layers=3"]))


def test_diffusers_folder(tmp_path, tiny_and_model):
    cfg, model = tiny_and_model
    ref = WanTransformer3DModel(**diffusers_transformer_config(cfg.model))
    ref.load_state_dict(model.state_dict())
    ref.save_pretrained(tmp_path / "transformer")  # the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    for path in (tmp_path, tmp_path / "transformer"):
        loaded, _ = load_generator(path, cfg)
        assert same_network(loaded, model, cfg)


def test_hiar_training_checkpoint_with_prefixes_and_ema(tmp_path, tiny_and_model):
    cfg, model = tiny_and_model
    ema = random_model(cfg, seed=9)

    def wrapped(m):  # Self-Forcing's wrapper module, FSDP and torch.compile prefixes, Wan names
        return {f"model._fsdp_wrapped_module.{k}".replace("blocks.", "blocks._orig_mod."): v
                for k, v in original_layout(m.state_dict()).items()}

    torch.save({"generator": wrapped(model), "generator_ema": wrapped(ema), "critic": {}}, tmp_path / "hiar.pt")
    assert same_network(load_generator(tmp_path / "hiar.pt", cfg)[0], model, cfg)
    assert same_network(load_generator(tmp_path / "hiar.pt", cfg, use_ema=True)[0], ema, cfg)
    torch.save({"generator": wrapped(model)}, tmp_path / "no_ema.pt")
    with pytest.warns(UserWarning, match="no 'generator_ema'.*falls back"):
        assert same_network(load_generator(tmp_path / "no_ema.pt", cfg, use_ema=True)[0], model, cfg)


def test_own_checkpoint_needs_only_the_file(tmp_path, tiny_and_model):
    cfg, model = tiny_and_model
    path = save_model(model, cfg, tmp_path / "m.safetensors")
    loaded, stored = load_generator(path)
    assert stored == cfg and same_network(loaded, model, cfg)
    # A caller's config with the same architecture keeps its own sampling settings (eval.toy_fidelity's
    # `sampling.method=...` overrides once vanished here, so two orders measured the same).
    other = with_overrides(cfg, ["sampling.method=frame_first", "sampling.context_level=clean"])
    assert other.sampling != cfg.sampling and load_generator(path, other)[1] == other
    with pytest.raises(CheckpointError, match=r"another architecture.*model.num_layers: 2 in file, 3 in config"):
        load_generator(path, load_config("tiny", ["model.num_layers=3"]))


def test_error_paths_name_the_file_and_the_keys(tmp_path, tiny_and_model):
    cfg, model = tiny_and_model
    with pytest.raises(CheckpointError, match="does not exist"):
        load_generator(tmp_path / "missing.pt", cfg)
    path = save_model(model, cfg, tmp_path / "m.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_generator(tmp_path / "cut.safetensors")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match=r"cut.pt: not a readable PyTorch checkpoint"):
        load_generator(tmp_path / "cut.pt", cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"expected config.json and diffusion_pytorch_model"):
        load_generator(tmp_path / "empty", cfg)
    state = model.state_dict()
    del state["proj_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["blocks.0.ffn.net.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"test.pt does not match the expected Wan DiT \(2 layers.*"
                                              r"missing keys \(1\): proj_out.bias; unexpected keys \(1\): extra.weight; "
                                              r"wrong shapes .*blocks.0.ffn.net.2.weight \(3, 3\)"):
        load_weights(random_model(cfg), state, "test.pt")
    torch.save(state, tmp_path / "bad.pt")  # a bare state dict is accepted as a layout, then checked
    with pytest.raises(CheckpointError, match="bad.pt does not match"):
        load_generator(tmp_path / "bad.pt", cfg)
