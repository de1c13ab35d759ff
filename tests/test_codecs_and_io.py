import numpy as np
import torch

from hiar.codecs import ToyDCTCodec
from hiar.text import MiniLMEncoder, zero_padded
from hiar.video import VideoWriter, read_video



def test_toy_codec_is_an_orthonormal_projection():
    codec = ToyDCTCodec()
    torch.testing.assert_close(codec.basis @ codec.basis.T, torch.eye(16), atol=1e-5, rtol=0)
    # flat-shaded content aligned to the 8x8 grid survives exactly
    video = torch.full((1, 2, 3, 32, 32), -0.6)
    video[:, :, 0, 8:24, 16:32] = 0.8
    torch.testing.assert_close(codec.decode(codec.encode(video)), video, atol=1e-5, rtol=0)
    # any latent is a fixed point of decode -> encode (while decoding stays within [-1, 1])
    z = 0.05 * torch.randn(1, 2, 16, 4, 4)
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, atol=1e-4, rtol=0)


def test_toy_codec_statistics_are_the_worlds():
    """MEAN and STD standardise the toy world's latents: re-measured on its clips, each channel has
    mean about 0 and std about 1."""
    from hiar.toyworld import clip_to_video, sample_clip

    codec = ToyDCTCodec()
    latents = torch.cat([codec.encode(torch.from_numpy(clip_to_video(sample_clip(11, i).render(4)))[None])
                         for i in range(200)], dim=1)
    std = latents.std(dim=(0, 1, 3, 4))
    assert (latents.mean(dim=(0, 1, 3, 4)).abs() < 0.2).all()
    assert ((std > 0.8) & (std < 1.25)).all(), std


def test_video_round_trip(tmp_path):
    frames = torch.linspace(-1, 1, 6)[:, None, None, None].expand(6, 3, 32, 48).clone()
    with VideoWriter(tmp_path / "v.mp4", fps=8, height=32, width=48) as writer:
        writer.write(frames[:3])
        writer.write(frames[3:])
    video = read_video(tmp_path / "v.mp4")
    assert video.shape == (6, 32, 48, 3)
    expected = ((frames[:, 0, 0, 0] + 1) * 127.5).numpy()
    assert np.abs(video.mean(axis=(1, 2, 3)) - expected).max() < 3


def test_minilm_states_are_zero_padded():
    encoder = MiniLMEncoder(text_len=16)
    states = encoder(["a red circle moving left on a dark blue background", "a square"])
    assert states.shape == (2, 16, 384)
    real = states.abs().sum(-1) > 0
    assert real[0, :12].all() and real[1, :4].all() and not real[1, 5:].any()
    torch.testing.assert_close(encoder(["a square"])[0], states[1], atol=1e-5, rtol=0)
    states = torch.ones(1, 3, 2)
    assert zero_padded(states, torch.tensor([[1, 1, 0]]), 4)[0].sum(-1).tolist() == [2, 2, 0, 0]
