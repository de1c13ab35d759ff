"""Speed options of sampling that a CPU can check (issue 33): decoding overlapped with generation
(hiar.stream.Stream(overlap=True)) gives the same frames and stays pull-driven; FP8 linear layers
(hiar/fp8.py) round as float8 e4m3 does and refuse, before any compute, to run where they cannot.
Their GPU halves (side-stream decode, torchao's fp8 kernels) are in tests/test_cuda.py."""

import threading
import sys

import pytest
import torch
from torch import nn

from hiar.codecs import ToyDCTCodec
from hiar.conditioning import Conditioning, Segment
from hiar.config import ConfigError, load_config
from hiar.fp8 import E4M3_MAX, FP8Unavailable, block_linears, check_torchao, fp8_linears, round_fp8
from hiar.sampling import generate
from hiar.stream import Stream

from conftest import random_model, rollout_inputs as setup

BLOCKS = 4


@pytest.fixture(scope="module")
def model():
    return random_model(load_config("tiny"))


class Counted:
    """The blocks of a generation, counting how many the consumer's pulls have made it produce."""

    def __init__(self, blocks):
        self.blocks, self.made = blocks, 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.blocks)
        self.made += 1
        return item


class RunningSum:
    """A causal decoder with state, like the Wan VAE's: each block's frames depend on every block before
    it, so blocks decoded out of order or twice give other frames."""

    def __init__(self):
        self.total, self.threads = 0.0, []

    def stream_decoder(self):
        return self

    def decode(self, latents):
        self.threads.append(threading.current_thread())
        self.total = self.total + latents.sum(dim=(2, 3, 4), keepdim=True)
        return ToyDCTCodec().decode(latents) + self.total.mean()


def decoded(model, overlap, *overrides, codec=None, prefix=None):
    cfg, noise, text = setup(*overrides, frames=3 * BLOCKS)
    stream = Stream(generate(model, Conditioning([Segment(0, text)], prefix=prefix), cfg, noise, BLOCKS),
                    codec or ToyDCTCodec(), prefix=prefix, overlap=overlap)
    return [(b.index, b.latents, b.frames) for b in stream]


@pytest.mark.parametrize("extra", [["sampling.method=frame_first"], ["sampling.schedule=wavefront"]])
def test_overlapped_decoding_gives_the_same_frames(model, extra):
    inline, overlapped = decoded(model, False, *extra), decoded(model, True, *extra)
    assert [n for n, _, _ in overlapped] == list(range(BLOCKS))
    for (_, x_a, f_a), (_, x_b, f_b) in zip(inline, overlapped, strict=True):
        assert torch.equal(x_a, x_b) and torch.equal(f_a, f_b)


def test_overlap_keeps_a_causal_decoder_in_order(model):
    prefix = torch.randn(2, 1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    inline_codec, overlap_codec = RunningSum(), RunningSum()
    inline = decoded(model, False, codec=inline_codec, prefix=prefix)
    overlapped = decoded(model, True, codec=overlap_codec, prefix=prefix)
    for (_, _, f_a), (_, _, f_b) in zip(inline, overlapped, strict=True):
        assert torch.equal(f_a, f_b)
    assert inline[0][2].shape[1] == 1 + 3  # the prefix's frame leads the first block's
    assert set(inline_codec.threads) == {threading.current_thread()}
    assert threading.current_thread() not in overlap_codec.threads  # the worker decoded


@pytest.mark.parametrize("overlap,ahead", [(False, 0), (True, 1)])
def test_pulling_drives_the_generation(model, overlap, ahead):
    """The consumer's k-th pull has made the generation produce k blocks, k + 1 with overlap (the
    block decoded while the consumer was served), never more."""
    cfg, noise, text = setup(frames=3 * BLOCKS)
    blocks = Counted(generate(model, text, cfg, noise, BLOCKS))
    stream = Stream(blocks, ToyDCTCodec(), overlap=overlap)
    assert blocks.made == 0  # nothing runs before the first pull
    for k in range(1, BLOCKS + 1):
        next(stream)
        assert blocks.made == min(k + ahead, BLOCKS)
    with pytest.raises(StopIteration):
        next(stream)


def test_a_block_decodes_while_the_next_is_generated(model):
    """Block 0's decode waits until block 1's generation has started: it finishes only if the two run
    at the same time (run one after the other, the wait would time out)."""
    cfg, noise, text = setup(frames=3 * BLOCKS)
    generating_next = threading.Event()

    def blocks():
        for n, x0 in generate(model, text, cfg, noise, BLOCKS):
            if n == 1:
                generating_next.set()
            yield n, x0

    class WaitsForTheNextBlock(ToyDCTCodec):
        def stream_decoder(self):
            return self

        def decode(self, latents):
            overlapped.append(generating_next.wait(timeout=30))
            return super().decode(latents)

    overlapped = []
    frames = [b.frames for b in Stream(blocks(), WaitsForTheNextBlock(), overlap=True)]
    assert len(frames) == BLOCKS and overlapped[0]


def test_a_decode_error_reaches_the_consumer(model):
    cfg, noise, text = setup(frames=3 * BLOCKS)

    class Broken(ToyDCTCodec):
        def stream_decoder(self):
            return self

        def decode(self, latents):
            raise OSError("decoder out of memory")

    with pytest.raises(OSError, match="decoder out of memory"):
        next(Stream(generate(model, text, cfg, noise, BLOCKS), Broken(), overlap=True))


# -- FP8 linear layers ---------------------------------------------------------------------------------


def test_fp8_rounding():
    x = torch.tensor([0.0, 1.0, -3.0, 448.0 / 1.5, 1e-9, 0.3])  # amax 298.67: scale 2/3
    q = round_fp8(x)
    assert q[3] == x[3] and q[0] == 0  # the largest magnitude maps to e4m3's 448 exactly
    assert q.dtype == x.dtype and torch.isfinite(q).all()
    # e4m3 keeps 3 mantissa bits: a normal value moves by at most half a step, 2^-4 of itself
    normal = x.abs() / (x.abs().amax() / E4M3_MAX) >= 2**-6
    assert ((q - x).abs() <= 2**-4 * x.abs() + 1e-12)[normal].all()
    assert torch.equal(round_fp8(q), q)  # on the grid: rounding again changes nothing
    assert round_fp8(torch.zeros(3)).eq(0).all()
    # the coarsest step of e4m3 is 32 (from 256 to 448): at most 16 / 448 of the largest magnitude
    ramp = torch.linspace(-1, 1, 1001)
    assert 0.03 < (round_fp8(ramp) - ramp).abs().max() <= 16 / 448 + 1e-6
    grid = torch.tensor([448.0, 1.0, -2.0, 3.0, 0.25, 288.0])  # representable at scale 1: unchanged
    assert torch.equal(round_fp8(grid), grid)


def test_emulated_fp8_rounds_the_block_linears_only(model):
    cfg = load_config("tiny", ["runtime.fp8_linear=emulate"])
    fp8 = random_model(cfg)
    linears = block_linears(fp8)
    assert len(linears) == cfg.model.num_layers * 10  # q, k, v, out of both attentions, 2 in the FFN
    head = fp8.proj_out.weight.clone()
    fp8_linears(fp8, cfg.runtime.fp8_linear)
    assert all(torch.equal(round_fp8(m.weight), m.weight) for m in linears)
    assert torch.equal(fp8.proj_out.weight, head)  # the output head keeps its dtype
    weights = [m.weight.clone() for m in linears]
    fp8_linears(fp8, "emulate")  # a second runner: nothing changes
    assert all(torch.equal(w, m.weight) for w, m in zip(weights, linears))
    with pytest.raises(ValueError, match="already fp8"):
        fp8_linears(fp8, "torchao")

    seen = []
    hook = linears[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # runs after the rounding
    cfg_, noise, text = setup("sampling.method=frame_first", frames=6)
    with torch.no_grad():
        out = torch.cat([x for _, x in generate(fp8, text, cfg_, noise, 2)], dim=1)
        ref = torch.cat([x for _, x in generate(model, text, cfg_, noise, 2)], dim=1)
    hook.remove()
    assert seen and all(torch.equal(round_fp8(a), a) for a in seen)  # inputs are rounded too
    err = float((out - ref).norm() / ref.norm())
    assert 1e-4 < err < 0.2, err  # fp8 moves the video, not far


def test_fp8_config():
    assert load_config("tiny").runtime.fp8_linear == "off"
    with pytest.raises(ConfigError):
        load_config("tiny", ["runtime.fp8_linear=fp4"])


def test_torchao_fp8_is_refused_before_compute_where_it_cannot_run(monkeypatch):
    with pytest.raises(FP8Unavailable, match="emulate"):
        check_torchao(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(FP8Unavailable, match=r"Tesla V100 has 7\.0"):
        check_torchao(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(FP8Unavailable, match="pip install torchao=="):
        check_torchao(torch.device("cuda"))
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(FP8Unavailable):
        fp8_linears(model, "torchao")  # on the CPU: refused, nothing converted
    assert type(model.blocks[0].weight) is nn.Parameter


def test_the_runtime_option_converts_the_sampled_model(model):
    """runtime.fp8_linear reaches the model through the cell runner, as compile_blocks does."""
    import copy

    from hiar.sampling import CellRunner

    cfg, noise, text = setup("runtime.fp8_linear=emulate", frames=6)
    fresh = copy.deepcopy(model)
    CellRunner(fresh, text, cfg, noise)
    assert all(torch.equal(round_fp8(m.weight), m.weight) for m in block_linears(fresh))
    assert not all(torch.equal(round_fp8(m.weight), m.weight) for m in block_linears(model))


def test_eager_torchao_fp8_warns_that_it_is_slower(model, monkeypatch):
    """Measured on an H200, eager torchao fp8 is 3-4x slower than bf16: asking for it without compiled
    blocks warns (the conversion itself is stubbed: torchao cannot run on the CPU)."""
    import hiar.sampling
    from hiar.sampling import CellRunner

    converted = []
    monkeypatch.setattr(hiar.sampling, "fp8_linears", lambda m, mode: converted.append(mode))
    cfg, noise, text = setup("runtime.fp8_linear=torchao", frames=6)
    with pytest.warns(UserWarning, match="without runtime.compile_blocks"):
        CellRunner(model, text, cfg, noise)
    assert converted == ["torchao"]


def test_training_refuses_fp8():
    """fp8 rounds the weights in place, so the sample videos a training run makes (CellRunner without
    grad) would round the weights it trains: every trainer refuses it before it starts."""
    from hiar.training import Trainer

    with pytest.raises(ConfigError, match="fp8_linear=emulate is a sampling option"):
        Trainer(load_config("tiny", ["runtime.fp8_linear=emulate"]), torch.nn.Linear(2, 2))
