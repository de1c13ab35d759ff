"""The shared training loop (hiar.training) at the scale users run it, checked on the CPU: gradient
accumulation to a total batch, the collective non-finite guard on the loss's device, the frozen
teacher's ZeRO-3 placement, the EMA kept on the host of the main rank."""

import copy

import pytest
import torch

from hiar import distributed
from hiar.config import ConfigError, load_config
from hiar.training import EMA, Trainer, accumulation_steps, frozen, main_guard
from conftest import random_inputs, random_model

T = torch.tensor([937.5, 833.3, 625.0, 250.0], dtype=torch.float64)


def one_update(tmp_path, batch: int, total: int, poison: int | None = None) -> tuple[Trainer, dict]:
    """One update of a tiny model on 4 fixed samples, `batch` a micro-step; returns the gradient that
    reached the optimizer. Micro-step `poison` (if any) has a NaN loss."""
    cfg = load_config("tiny", [f"train.batch_size={batch}", f"train.total_batch_size={total}",
                               f"train.output_dir={tmp_path}", "train.grad_clip=1e9"])
    trainer = Trainer(cfg, random_model(cfg))
    engine, seen = trainer.engine, {}
    step = engine.step

    def recording_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            seen.update({n: p.grad.clone() for n, p in engine.module.named_parameters()})
        return step(*args, **kwargs)

    engine.step = recording_step
    x, text = random_inputs(cfg, batch=4, seed=3)

    def micro_loss(micro: int) -> torch.Tensor:
        rows = slice(micro * batch, (micro + 1) * batch)
        loss = trainer.model(x[rows], T[rows], text[rows]).square().mean()
        return loss * float("nan") if micro == poison else loss

    trainer.update(micro_loss)
    return trainer, seen


def test_accumulating_four_micro_steps_of_one_equals_a_batch_of_four(tmp_path):
    trainer, accumulated = one_update(tmp_path / "a", batch=1, total=4)
    assert trainer.accumulation == 4
    _, whole = one_update(tmp_path / "b", batch=4, total=4)
    assert accumulated.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6 * whole[name].abs().max())


def test_a_non_finite_micro_step_contributes_no_gradient(tmp_path):
    """Micro-step 1 of 2 is NaN: the update is made from micro-step 0 alone, at its 1/2 weight."""
    trainer, poisoned = one_update(tmp_path / "a", batch=1, total=2, poison=1)
    assert trainer.skipped == 1
    cfg = load_config("tiny", ["train.batch_size=1", f"train.output_dir={tmp_path / 'b'}"])
    alone = Trainer(cfg, random_model(cfg))
    engine = alone.engine
    x, text = random_inputs(cfg, batch=4, seed=3)
    engine.backward(alone.model(x[:1], T[:1], text[:1]).square().mean())
    for name, p in engine.module.named_parameters():
        torch.testing.assert_close(poisoned[name], p.grad / 2, rtol=1e-5, atol=1e-8)
        assert torch.isfinite(poisoned[name]).all()


def test_a_non_finite_single_micro_step_skips_the_update(tmp_path):
    cfg = load_config("tiny", ["train.batch_size=1", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg, random_model(cfg))
    before = copy.deepcopy(trainer.model.state_dict())
    metrics = trainer.update(lambda micro: torch.tensor(float("inf"), requires_grad=True))
    assert trainer.skipped == 1 and metrics["grad_norm"] != metrics["grad_norm"]
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_the_finite_flag_is_reduced_on_the_process_device():
    """The flag's all-reduce runs on World.device (NCCL reduces GPU tensors only); here gloo on the CPU."""
    world = distributed.init()
    assert world.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert distributed.all_true(True, world.device) and not distributed.all_true(False, world.device)


def test_a_program_that_ends_well_leaves_its_group_and_one_that_fails_does_not():
    """main_guard ends the group after a run (else gloo's threads can abort the exited process: a flaky
    SIGABRT under torchrun), and the next program in this process makes a new group of one; a failed run
    keeps the group, since other ranks may still be in a collective."""
    world = distributed.init()
    main_guard(lambda: None)
    assert not torch.distributed.is_initialized()
    world = distributed.init()  # again, on a fresh port
    assert torch.distributed.is_initialized() and distributed.all_true(True, world.device)

    def fails():
        raise ConfigError("a setting to change")
    with pytest.raises(SystemExit) as exit_info:
        main_guard(fails)
    assert exit_info.value.code == 2 and torch.distributed.is_initialized()


@pytest.mark.parametrize("total,world,want", [(0, 8, 1), (64, 8, 8), (64, 64, 1), (64, 1, 64)])
def test_accumulation_reaches_the_total_batch(total, world, want):
    cfg = load_config("tiny", ["train.batch_size=1", f"train.total_batch_size={total}"])
    assert accumulation_steps(cfg, world) == want


def test_a_total_batch_that_does_not_divide_is_refused():
    cfg = load_config("tiny", ["train.batch_size=2", "train.total_batch_size=64"])
    with pytest.raises(ConfigError, match=r"total_batch_size=64 is not a multiple .*=2 x 3 processes.*\[1, 2, 4"):
        accumulation_steps(cfg, 3)


@pytest.mark.parametrize("placement", ["zero3", "zero3_offload"])
def test_a_zero3_teacher_computes_what_a_replicated_one_does(placement):
    cfg = load_config("tiny")
    world = distributed.init()
    model = random_model(cfg)
    x, text = random_inputs(cfg, batch=2, seed=4)
    with torch.no_grad():
        want = frozen(copy.deepcopy(model), cfg, world, "replicated")(x, T[:2], text)
        sharded = frozen(model, cfg, world, placement)
        assert all(p.numel() == 0 for p in sharded.parameters())  # partitioned: this rank holds no whole tensor
        got = sharded(x, T[:2], text)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_ema_lives_on_the_host_of_the_main_rank_only():
    cfg = load_config("tiny")
    model = random_model(cfg)
    main, other = EMA(0.5, start=1, keep=True), EMA(0.5, start=1, keep=False)
    for ema in (main, other):
        ema.update(model, step=0)  # before the start: nothing
        assert not ema.started
        ema.update(model, step=1)
        assert ema.started
    assert other.shadow is None
    assert main.shadow["proj_out.weight"].device.type == "cpu"
    assert main.shadow["proj_out.weight"].data_ptr() != model.proj_out.weight.data_ptr()  # a copy, not the weights
    weight = model.proj_out.weight.detach().clone()
    with torch.no_grad():
        model.proj_out.weight.add_(1.0)
    main.update(model, step=2)
    torch.testing.assert_close(main.shadow["proj_out.weight"], weight + 0.5)


def test_the_prompt_cache_is_bounded_and_encodes_misses_together():
    """Full-scale prompts are mostly unique: the cache keeps at most its budget (least recently used out)
    and every call encodes the captions it lacks in one batch."""
    from hiar.text import PromptBank

    calls = []

    def encoder(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((2, 4), float(len(c))) for c in captions])  # 32 bytes a caption

    bank = PromptBank(encoder, max_bytes=3 * 32)
    states = bank(["a", "bb", "a", "ccc"])
    assert calls == [["a", "bb", "ccc"]] and states[:, 0, 0].tolist() == [1, 2, 1, 3]
    bank(["a"])  # held: no call; "a" becomes the most recent
    assert len(calls) == 1
    bank(["dddd"])  # over budget: the least recently used ("bb") goes
    bank(["bb", "a"])
    assert calls[-1] == ["bb"] and bank._bytes <= 3 * 32
