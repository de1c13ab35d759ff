"""The stream (hiar/stream.py): pulling drives the generation, a live switch equals a schedule given
from the start, and continuation of an image or a video through a tiny Wan VAE in the published layout."""

import numpy as np
import pytest
import torch

from hiar.checkpoints import save_model
from hiar.codecs import ToyDCTCodec, WanVAE
from hiar.conditioning import Conditioning, Segment, context_latents, first_video_frame, read_prefix_video
from hiar.sampling import CellRunner, block_noise, sample_video
from hiar.stream import Stream
from hiar.text import build_text_encoder
from hiar.video import read_video, write_video

from conftest import random_model, rollout_inputs as setup
from test_text_and_vae import tiny_vae

BLOCKS = 6
S = len(setup()[0].schedule.timesteps)  # the tiny preset's denoising steps


@pytest.fixture(scope="module")
def model():
    cfg, _, _ = setup()
    return random_model(cfg)


def other_prompt(text):
    return torch.randn(text.shape, generator=torch.Generator().manual_seed(11))


def cells_until_out(method: str, schedule: str, n: int) -> int:
    """Cells an order must run before block n comes out: block-first, its blocks' S steps; step_major,
    every cell (every block runs step 0 before any runs step 1); the wavefront, the anti-diagonals
    before block n's last cell (m + j < n + S - 1), then that cell, the first of its pass."""
    if method == "frame_first":
        return S * (n + 1)
    if schedule == "step_major":
        return S * BLOCKS
    return sum(m + j < n + S - 1 for m in range(BLOCKS) for j in range(S)) + 1


def stream(model, cond, *overrides, on_cell=None, overlap=False):
    cfg, noise, _ = setup(*overrides, frames=3 * BLOCKS)
    return Stream.start(model, ToyDCTCodec(), cfg, Conditioning.of(cond), noise, BLOCKS, on_cell=on_cell,
                        overlap=overlap)


_PLAIN = {}


def plain(model, *order):
    """The uninterrupted, unswitched stream's (latents, frames) of one order, computed once."""
    if order not in _PLAIN:
        _, _, text = setup()
        _PLAIN[order] = joined(list(stream(model, text, *order)))
    return _PLAIN[order]


def joined(blocks):
    """(latents [B, F, C, h, w], frames [B, F', 3, H, W]) of a list of decoded blocks, in block order."""
    assert [b.index for b in blocks] == sorted(b.index for b in blocks)
    return torch.cat([b.latents for b in blocks], 1), torch.cat([b.frames for b in blocks], 1)


SCHEDULES = [("timestep_first", "step_major"), ("timestep_first", "wavefront"), ("frame_first", "wavefront")]


@pytest.mark.parametrize("method,schedule", SCHEDULES)
@pytest.mark.parametrize("overlap", [False, True])
def test_pulling_drives_the_generation(model, method, schedule, overlap):
    """A consumer that pulls 2 blocks, stops and resumes gets the uninterrupted stream's blocks, bit for
    bit; until it pulls, nothing runs, and each pull runs only the cells the order needs for the blocks
    pulled (with overlap: for one block more)."""
    _, _, text = setup()
    order = [f"sampling.method={method}", f"sampling.schedule={schedule}"]
    whole = plain(model, *order)
    cells = []
    s = stream(model, text, *order, on_cell=lambda: cells.append(None), overlap=overlap)
    assert not cells  # started, not pulled: nothing ran
    head = []
    for n in range(2):
        head.append(next(s))
        assert len(cells) == cells_until_out(method, schedule, n + overlap)
    rest = list(s)
    assert len(cells) == S * BLOCKS  # every cell ran once
    for a, b in zip(joined(head + rest), whole):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method,schedule", [s for s in SCHEDULES if s[1] == "wavefront"])
@pytest.mark.parametrize("mode", ["new_blocks", "recache"])
def test_a_live_switch_equals_a_schedule_given_from_the_start(model, method, schedule, mode):
    """Stream.switch after 2 pulled blocks returns the first block not yet started (block-first: the next;
    the wavefront: a block comes out of the first cell of its pass, when S - 2 later blocks have started);
    the whole video equals one generated from a Conditioning that switches at that block from the start."""
    _, _, text = setup()
    new = other_prompt(text)
    order = [f"sampling.method={method}", f"sampling.schedule={schedule}", f"sampling.switch={mode}"]
    s = stream(model, text, *order)
    head = [next(s), next(s)]
    b = s.switch(new)
    assert b == (2 if method == "frame_first" else 2 + S - 2)
    live = joined(head + list(s))
    scheduled = joined(list(stream(model, Conditioning([Segment(0, text), Segment(b, new)]), *order)))
    unswitched = plain(model, *order[:2])
    for a, c in zip(live, scheduled):
        assert torch.equal(a, c)
    assert torch.equal(live[0][:, :3 * b], unswitched[0][:, :3 * b]) and not torch.allclose(live[0], unswitched[0])


def test_a_switch_with_no_block_left_is_refused(model):
    """step_major starts every block (step 0) before the first comes out: a switch after a pull could only
    land beyond the video, so it is refused instead of dropped silently."""
    _, _, text = setup()
    s = stream(model, text, "sampling.method=timestep_first", "sampling.schedule=step_major")
    next(s)
    with pytest.raises(ValueError, match="every block"):
        s.switch(other_prompt(text))



def test_a_second_switch_before_its_block_starts_replaces_the_first(model):
    """Two prompts typed between pulls: the later one wins (no cell has read the first), including a
    switch before the first pull, which replaces the starting prompt."""
    _, _, text = setup()
    order = ["sampling.method=frame_first"]
    first, second = other_prompt(text), torch.randn(text.shape, generator=torch.Generator().manual_seed(12))
    s = stream(model, text, *order)
    assert s.switch(first) == 0 and s.switch(second) == 0
    head = [next(s)]
    assert s.switch(first) == 1 and s.switch(second) == 1
    live = joined(head + list(s))
    assert torch.equal(live[0], joined(list(stream(model, second, *order)))[0])

# -- continuation through a tiny Wan VAE (diffusers' AutoencoderKLWan, published layout) -------------

WAN = ["video.codec=wan_vae", "video.vae_stride=[4,8,8]"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A base-model folder holding only a tiny random Wan VAE in the diffusers layout (vae/)."""
    folder = tmp_path_factory.mktemp("wan")
    tiny_vae().save_pretrained(folder / "vae")
    return folder


def continued(model, codec, prefix, prefix_out, *overrides):
    """The stream continuing `prefix` [2, P, C, h, w], and the same blocks generated without a stream."""
    cfg, noise, text = setup(*WAN, *overrides, frames=3 * 2)
    cond = Conditioning([Segment(0, text)], prefix=prefix)
    blocks = list(Stream.start(model, codec, cfg, cond, noise, 2, prefix_out=prefix_out))
    with torch.no_grad():
        return joined(blocks), sample_video(model, cond, cfg, noise, 2), CellRunner(model, cond, cfg, noise)


def test_an_image_is_the_first_latent_frame_and_leads_the_video(model, wan_folder):
    """The block-alignment rule: a causal VAE encodes a lone first frame into a lone latent frame, so an
    image is latent frame 0, a block of its own, and generated block n covers latent frames 1 + 3n ..
    3 + 3n, video frames from 1 + 12n on. The stream decodes the image first and the blocks as its
    continuation: the same frames as one decode of the whole latent video."""
    codec = WanVAE.from_folder(wan_folder)
    image = torch.rand(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prefix = codec.encode(image).expand(2, -1, -1, -1, -1)  # [2, 1, C, h, w]
    assert prefix.shape[1] == 1
    (latents, frames), direct, runner = continued(model, codec, prefix, True)
    assert torch.equal(latents, direct)
    assert [runner.start_frame(n) for n in range(3)] == [1, 4, 7]
    assert [first_video_frame(runner.start_frame(n), 4) for n in range(3)] == [1, 13, 25]
    whole = codec.decode(torch.cat([prefix, latents], 1))  # [2, 1 + 4 * 6, 3, H, W]
    assert frames.shape[1] == 1 + 4 * 6 and torch.equal(frames, whole)
    assert torch.equal(frames[:, :1], codec.decode(prefix))  # the image's frame, untouched by what follows


def test_a_video_is_continued_after_its_last_frames(model, wan_folder, tmp_path):
    """A video keeps its last 1 + 4m frames, what a causal VAE encodes whole (14 -> 13 frames -> 4 latent
    frames); with a window of W, its last W - k latent frames are the context. The output holds only the
    new frames, decoded as the continuation of the given ones."""
    codec = WanVAE.from_folder(wan_folder)
    write_video(tmp_path / "clip.mp4", np.random.default_rng(0).integers(0, 256, (14, 32, 32, 3), np.uint8), 8)
    video = read_prefix_video(None, str(tmp_path / "clip.mp4"), 32, 32, 4)
    assert video.shape == (1, 13, 3, 32, 32)
    latents = codec.encode(video)
    assert latents.shape[1] == 4
    prefix = context_latents(latents, 6, 3).expand(2, -1, -1, -1, -1)
    assert torch.equal(prefix[:1], latents[:, 1:])
    (generated, out), direct, runner = continued(model, codec, prefix, False, "video.window_frames=6")
    assert torch.equal(generated, direct)
    assert [runner.start_frame(n) for n in range(3)] == [3, 6, 9]
    whole = codec.decode(torch.cat([prefix, generated], 1))  # [2, 1 + 4 * 8, 3, H, W]
    assert out.shape[1] == 4 * 6 and torch.equal(out, whole[:, 1 + 4 * 2:])


# -- the same through inference.py, a tiny Wan DiT checkpoint and the tiny VAE folder ----------------

import inference  # noqa: E402


@pytest.fixture(scope="module")
def wan_checkpoint(model, wan_folder):
    cfg, _, _ = setup(*WAN)
    return save_model(model, cfg, wan_folder / "model.safetensors")


@pytest.mark.parametrize("kind", ["image", "video"])
def test_inference_continues_through_the_wan_vae(model, wan_folder, wan_checkpoint, tmp_path, kind):
    """inference.py --image / --video with a Wan VAE: the latents it writes are the generation whose
    prefix is the encoded image (the whole clip, without a window), and its video has the frames the
    alignment rule gives (an image: its frame, then 4 a latent frame; a video: only the new frames)."""
    import imageio.v3 as iio
    from safetensors.torch import load_file

    frames = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), np.uint8)
    given = tmp_path / ("first.png" if kind == "image" else "clip.mp4")
    if kind == "image":
        iio.imwrite(given, frames[0])
    else:
        write_video(given, frames, 8)
    prompt = "a red circle moving left on a black background"
    assert inference.main(["--config_path", "tiny", "--checkpoint_path", str(wan_checkpoint), "--prompt", prompt,
                           f"--{kind}", str(given), "--output_folder", str(tmp_path / "out"), "--num_output_frames",
                           "6", "--save_latents", *WAN, f"runtime.base_model={wan_folder}"]) == 0
    cfg, _, _ = setup(*WAN, frames=6)
    codec = WanVAE.from_folder(wan_folder)
    paths = (str(given), None) if kind == "image" else (None, str(given))
    pixels = read_prefix_video(*paths, 32, 32, 4)  # the frames inference.py read
    cond = Conditioning([Segment(0, build_text_encoder(cfg)([prompt]))], prefix=codec.encode(pixels))
    assert cond.prefix_frames == (1 if kind == "image" else 2)  # 6 frames keep 5: 2 latent frames
    with torch.no_grad():
        expected = sample_video(model, cond, cfg, block_noise(cfg, 0, [0]), 2)
    (latents_file,), (video_file,) = (tmp_path / "out").glob("*.latents.safetensors"), (tmp_path / "out").glob("*.mp4")
    assert torch.equal(load_file(latents_file)["latents"], expected[0])
    assert read_video(video_file).shape[0] == (1 + 4 * 6 if kind == "image" else 4 * 6)
