"""LoRA adapters (hiar/lora.py, docs/lora.md): what an adapter computes, merged and unmerged, its file,
a LoRA distillation run (only the adapters change; resume is exact; ZeRO-3 on two processes), the
memory planner's accounting and inference.py --lora / --merge_lora."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import inference
from conftest import random_inputs, random_model
from eval import lora_long
from hiar import lora
from hiar import plan as P
from hiar.checkpoints import CheckpointError, load_adapters, load_generator, read_adapter, save_adapter, save_model
from hiar.config import ConfigError, config_to_dict, load_config
from hiar.models import WanModel

ROOT = Path(__file__).resolve().parent.parent
RANK = 4


@pytest.fixture
def adapted():
    """(tiny config with lora.rank=4, its random base model, the base with a trained-looking adapter)."""
    cfg = load_config("tiny", [f"lora.rank={RANK}", "lora.alpha=8"])
    base = random_model(cfg)
    model = lora.add_adapters(copy.deepcopy(base), cfg.lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return cfg, base, model


def outputs(model, cfg, seed=1):
    x, text = random_inputs(cfg, batch=2, seed=seed)
    t = torch.tensor([[937.5] * 3 + [833.3] * 3 + [625.0] * 3, [1000.0] * 3 + [250.0] * 3 + [0.0] * 3])
    with torch.no_grad():
        return model(x, t, text)


def test_zero_initialised_b_leaves_the_outputs_unchanged():
    cfg = load_config("tiny", [f"lora.rank={RANK}", "lora.alpha=16"])
    base = random_model(cfg)
    model = lora.add_adapters(copy.deepcopy(base), cfg.lora)
    a = {k: v for k, v in lora.adapter_state(model).items() if "lora_A" in k}
    assert a and all(v.abs().sum() > 0 for v in a.values())  # A is random: only B's zeros keep the output
    assert torch.equal(outputs(model, cfg), outputs(base, cfg))
    # and only A and B train: 10 adapted linears a block, r (in + out) each
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    d, f = cfg.model.dim, cfg.model.ffn_dim
    per_block = RANK * (8 * 2 * d + (d + f) + (f + d))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == cfg.model.num_layers * per_block


def test_an_adapter_adds_scale_b_a_to_its_layers(adapted):
    cfg, base, model = adapted
    layer = model.blocks[1].attn2.to_v
    delta = lora.merged_state(model)["blocks.1.attn2.to_v.weight"] - base.blocks[1].attn2.to_v.weight
    a, b = layer.lora_A[lora.ADAPTER].weight, layer.lora_B[lora.ADAPTER].weight
    assert torch.allclose(delta, 8 / RANK * b @ a, atol=1e-6) and delta.abs().max() > 1e-3


def test_merged_equals_unmerged(adapted):
    cfg, base, model = adapted
    unmerged = outputs(model, cfg)
    assert not torch.allclose(unmerged, outputs(base, cfg), atol=1e-3)  # the adapter does something
    plain = WanModel(cfg.model)
    plain.load_state_dict(lora.merged_state(model))  # strict: the base model's names
    assert torch.allclose(outputs(plain, cfg), unmerged, atol=1e-5)
    merged = lora.merge(model)
    assert not lora.has_adapters(merged) and list(merged.state_dict()) == list(base.state_dict())
    assert torch.allclose(outputs(merged, cfg), unmerged, atol=1e-5)


def test_several_adapters_with_scales_add_up(adapted, tmp_path):
    cfg, base, model = adapted
    path = save_adapter(model, cfg, tmp_path / "adapter.safetensors")
    halves = load_adapters(copy.deepcopy(base), [(path, 0.5), (path, 0.5)])
    assert torch.allclose(outputs(halves, cfg), outputs(model, cfg), atol=1e-5)
    doubled = load_adapters(copy.deepcopy(base), [(path, 2.0)], merge=True)
    expected = {k: 2 * v - base.state_dict()[k] for k, v in lora.merged_state(model).items()}  # W + 2 s B A
    assert all(torch.allclose(doubled.state_dict()[k], v, atol=1e-6) for k, v in expected.items())


def test_adapter_file_round_trip(adapted, tmp_path):
    cfg, base, model = adapted
    path = save_adapter(model, cfg, tmp_path / "adapter.safetensors")
    adapter = read_adapter(path)
    assert adapter.lora == cfg.lora and adapter.base == cfg.model
    assert adapter.state.keys() == lora.adapter_state(model).keys()
    assert all(torch.equal(adapter.state[k], v) for k, v in lora.adapter_state(model).items())
    loaded = load_adapters(copy.deepcopy(base), [(path, 1.0)])
    assert torch.equal(outputs(loaded, cfg), outputs(model, cfg))
    with pytest.raises(CheckpointError, match="is a LoRA adapter, not a model.*--lora"):
        load_generator(path)


def test_an_adapter_for_another_architecture_is_refused_naming_both(adapted, tmp_path):
    cfg, _, model = adapted
    path = save_adapter(model, cfg, tmp_path / "adapter.safetensors")
    other = load_config("tiny", ["model.num_layers=3"])
    with pytest.raises(CheckpointError, match=r"adapter for a Wan DiT \(2 layers.*the model is a Wan DiT \(3 layers"):
        load_adapters(random_model(other), [(path, 1.0)])
    toy = load_config("toy")  # the CLI refuses it before any model is built
    with pytest.raises(CheckpointError, match=r"Wan DiT \(2 layers, 2 heads x 16.*Wan DiT \(4 layers, 4 heads x 32"):
        read_adapter(path, tensors=False).check_fits(toy.model)


def test_activation_checkpointing_gives_the_adapters_the_same_gradients():
    """Recomputed blocks redraw the same adapter dropout (torch's checkpoint restores the RNG state)."""
    from hiar.training import enable_activation_checkpointing

    cfg = load_config("tiny", [f"lora.rank={RANK}", "lora.dropout=0.2"])
    grads = []
    for checkpointing in (False, True):
        model = lora.add_adapters(random_model(cfg), cfg.lora).train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        if checkpointing:
            enable_activation_checkpointing(model)
        x, text = random_inputs(cfg, batch=2, seed=1)
        torch.manual_seed(0)
        model(x, torch.full((2, 9), 500.0), text).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) and grads[0][n].abs().sum() > 0 for n in grads[0])


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="lora.critic=lora needs adapters"):
        load_config("tiny", ["lora.critic=lora"])
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_config("tiny", ["lora.rank=2", "lora.dropout=1.5"])
    cfg = load_config("tiny", ["lora.rank=2", "lora.target_modules=[attn1.to_q, attn3.to_q]"])
    with pytest.raises(ConfigError, match=r"\['attn3.to_q'\] name no linear layer.*attn1.to_q"):
        lora.add_adapters(WanModel(cfg.model), cfg.lora)


# -- the memory planner -------------------------------------------------------------------------------------


def test_the_planner_counts_the_adapters_and_trains_them_alone():
    cfg = load_config("tiny", [f"lora.rank={RANK}"])
    model = lora.add_adapters(WanModel(cfg.model), cfg.lora)
    numels = P.adapter_numels(cfg.model, cfg.lora)
    assert sorted(numels) == sorted(p.numel() for p in model.parameters() if p.requires_grad)
    arch = P.Arch.of(cfg.model)
    # a real AdamW over the adapters alone (stage 0, float32): m and v of the adapters, nothing for the base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    state = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    ds0 = P.DeepSpeedSetup("x", stage=0)
    gpu = P.engine_memory(arch.params, arch, ds0, 1, bf16=False, adapters=numels)["gpu"]
    assert gpu["optimizer"] == state and gpu["grads"] == 4 * sum(numels)
    assert gpu["params"] == sum(p.nbytes for p in model.parameters())
    # ZeRO-3: the frozen weights are partitioned too; the adapters (small) stay whole on every GPU
    full = P.engine_memory(arch.params, arch, P.DeepSpeedSetup("x", stage=3), 4, bf16=True)["gpu"]
    adapted = P.engine_memory(arch.params, arch, P.DeepSpeedSetup("x", stage=3), 4, bf16=True, adapters=numels)["gpu"]
    assert adapted["optimizer"] == 12 * -(-sum(numels) // 4) < full["optimizer"]


def test_lora_lowers_the_planned_memory_at_full_scale():
    full = P.estimate(load_config("configs/hiar.yaml"), 1, 141)
    generator = P.estimate(load_config("configs/hiar.yaml", ["lora.rank=64"]), 1, 141)
    both = P.estimate(load_config("configs/hiar.yaml", ["lora.rank=64", "lora.critic=lora"]), 1, 141)
    assert both.gpu_total < generator.gpu_total < full.gpu_total
    saved = sum(full.per_gpu[k] - generator.per_gpu[k] for k in ("generator.grads", "generator.optimizer"))
    assert saved > 0.9 * 14 * 1.419e9 / 2  # ZeRO-2 on one GPU: most of 2 + 12 bytes a frozen parameter
    assert "LoRA rank 64" in generator.table()


# -- the training program -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_inputs(distill_inputs):
    return [*distill_inputs, "train.save_every=2", "distill.ema_start=1", "distill.ema_decay=0.5",
            f"lora.rank={RANK}", "lora.critic=lora", "train.deepspeed=configs/deepspeed/zero2.json"]


def test_a_lora_run_changes_only_the_adapters_and_resumes_exactly(lora_inputs, tmp_path):
    from train import distill

    args = ["--config_path", "tiny", *lora_inputs]
    distill.main([*args, "--max_steps", "3", f"train.output_dir={tmp_path / 'straight'}"])
    distill.main([*args, "--max_steps", "2", f"train.output_dir={tmp_path / 'split'}"])
    distill.main([*args, "--max_steps", "3", f"train.output_dir={tmp_path / 'split'}", "--resume"])
    straight, split = (tmp_path / "straight", tmp_path / "split")
    read = [line for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert read[-1] == (straight / "metrics.jsonl").read_text().splitlines()[-1]  # every metric of step 3
    for name in ("adapter.safetensors", "model.safetensors"):  # the EMA's, resumed from extra.pt
        a, b = load_file(straight / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # only the adapters changed: every weight no adapter touches is the start's, bit for bit, and an
    # adapted one moved by a matrix of rank <= r (singular values past the r-th at float32 rounding)
    start = load_file(lora_inputs[0].split("=", 1)[1])  # distill.generator
    blob = torch.load(straight / "checkpoints" / "step-00000003" / "model.pt", weights_only=True)
    cfg = load_config("tiny", [f"lora.rank={RANK}"])
    targets = {f"{n}.weight" for n in lora.linear_names(WanModel(cfg.model))
               if any(n.endswith("." + t) for t in cfg.lora.target_modules)}
    for weights in (blob["generator"], blob["generator_ema"], load_file(straight / "model.safetensors")):
        assert weights.keys() == start.keys()
        assert all(torch.equal(weights[k], start[k]) for k in start if k not in targets)
        moved = [k for k in targets if not torch.equal(weights[k], start[k])]
        singular = [torch.linalg.svdvals((weights[k] - start[k]).double()) for k in moved]
        assert moved and all(sv[RANK] < 1e-4 * sv[0] for sv in singular)
    # the exported adapter on the base is the exported merged model
    adapter = read_adapter(straight / "adapter.safetensors")
    assert adapter.lora == load_config("tiny", lora_inputs[-3:]).lora
    model = load_adapters(load_generator(lora_inputs[0].split("=", 1)[1], cfg)[0], [(adapter.path, 1.0)], merge=True)
    exported = load_file(straight / "model.safetensors")
    assert all(torch.allclose(model.state_dict()[k], exported[k], atol=1e-6) for k in exported)


def test_a_lora_run_under_zero3_on_two_processes(lora_inputs, tmp_path):
    """ZeRO-3 partitions the frozen weights and the adapters; export gathers them (gloo, CPU)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train/distill.py",
           "--config_path", "tiny", *lora_inputs, "--max_steps", "2", f"train.output_dir={out}",
           "train.deepspeed=configs/deepspeed/zero3.json", "distill.ema_start=100"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    start, merged = load_file(lora_inputs[0].split("=", 1)[1]), load_file(out / "model.safetensors")
    assert torch.equal(merged["proj_out.weight"], start["proj_out.weight"])  # not adapted: frozen
    assert not torch.equal(merged["blocks.0.attn1.to_q.weight"], start["blocks.0.attn1.to_q.weight"])
    assert read_adapter(out / "adapter.safetensors").state


# -- inference.py --------------------------------------------------------------------------------------------


def test_inference_applies_adapters_merged_or_not(adapted, tmp_path):
    cfg, base, model = adapted
    checkpoint = save_model(base, cfg, tmp_path / "base.safetensors")
    adapter = save_adapter(model, cfg, tmp_path / "adapter.safetensors")
    common = ["--config_path", "tiny", "--checkpoint_path", str(checkpoint), "--prompt", "a red circle moving left",
              "--num_output_frames", "9", "--save_latents", "--seed", "3"]
    runs = {"none": [], "lora": ["--lora", str(adapter)], "merged": ["--lora", f"{adapter}:1", "--merge_lora"],
            "halves": ["--lora", f"{adapter}:0.5", "--lora", f"{adapter}:0.5"]}
    latents = {}
    for name, flags in runs.items():
        assert inference.main([*common, *flags, "--output_folder", str(tmp_path / name)]) == 0
        latents[name] = load_file(tmp_path / name / "a red circle moving left-0.latents.safetensors")["latents"]
    assert not torch.allclose(latents["lora"], latents["none"], atol=1e-3)
    assert torch.allclose(latents["merged"], latents["lora"], atol=1e-4)
    assert torch.allclose(latents["halves"], latents["lora"], atol=1e-4)
    assert inference.main([*common, "--merge_lora", "--output_folder", str(tmp_path / "x")]) == 2


def test_the_long_tuning_table_reads_the_runs_files(adapted, tmp_path):
    """eval.lora_long: drift and presence from report.json, peak memory from GNU time's report, the planner's
    estimate from each run's config, and the bytes each run ships."""
    cfg, base, model = adapted
    for name, run_cfg in (("lora", cfg), ("full", load_config("tiny"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config_to_dict(run_cfg)))
        save_model(base, run_cfg, tmp_path / name / "model.safetensors")
    save_adapter(model, cfg, tmp_path / "lora" / "adapter.safetensors")
    (tmp_path / "lora.time").write_text("\tMaximum resident set size (kbytes): 1048576\n")
    (tmp_path / "eval_60s").mkdir()
    methods = {m: {"drift_score": d, "per_segment": {"toy_presence": [0.5, p]}}
               for m, d, p in (("none", 0.1, 0.7), ("lora", 0.05, 0.8), ("full", 0.2, 0.6))}
    (tmp_path / "eval_60s" / "report.json").write_text(json.dumps({"methods": methods}))
    costs = lora_long.summarise(tmp_path)
    assert costs["lora"]["peak_rss_gib"] == 1.0 and costs["full"]["peak_rss_gib"] is None
    assert costs["lora"]["ships"] == (tmp_path / "lora" / "adapter.safetensors").stat().st_size
    assert costs["lora"]["planned_generator_states_gib"] < costs["full"]["planned_generator_states_gib"]
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / "summary.md").read_text().splitlines()[2:]}
    assert rows["lora"].startswith("| lora | 0.0500 | 0.80 | 1.00 |")
    assert rows["full"].startswith("| full | 0.2000 | 0.60 | - |")
