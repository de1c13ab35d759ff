"""Codecs between pixel videos and latent videos, behind one interface.

Videos are [B, F, 3, H, W] in [-1, 1]; latents are [B, F', C, h, w]. `stream_decoder()` returns an
object whose `decode(latent_block)` yields the pixel frames of each latent block as it is produced,
so a long generation is written to disk while it runs.

* `ToyDCTCodec` (toy presets): no parameters, frame-wise.
* `WanVAE` (Wan2.1): diffusers' `AutoencoderKLWan` (16 channels, stride 4, 8, 8), from a diffusers folder
  (`vae/`) or the original `Wan2.1_VAE.pth` converted by diffusers' `convert_wan_vae_to_diffusers`. Its
  decoder is causal in time with a cache of each conv's last frames; `WanVAEStream` keeps that cache
  across blocks, so decoding block by block gives exactly the full decode.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from pathlib import Path

from hiar.config import Config, ConfigError, repo_path


class StreamDecoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class Codec(Protocol):
    latent_channels: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def stream_decoder(self) -> StreamDecoder: ...


def _dct_basis(n: int) -> torch.Tensor:
    """Orthonormal DCT-II basis [n (frequency), n (position)]."""
    pos = torch.arange(n, dtype=torch.float64)
    basis = torch.stack([torch.cos(math.pi * (pos + 0.5) * u / n) for u in range(n)])
    basis[0] /= math.sqrt(2)
    return basis * math.sqrt(2 / n)


class ToyDCTCodec:
    """Parameter-free codec of the toy world: 8x8 RGB patches -> 16 DCT coefficients.

    Colours go to an orthonormal opponent space (luma (r+g+b)/sqrt3, chroma (r-g)/sqrt2 and
    (r+g-2b)/sqrt6); each 8x8 patch keeps the low frequencies u + v <= 3 of luma (10 coefficients)
    and u + v <= 1 of each chroma channel (3 + 3). Rows of the resulting [16, 192] map are
    orthonormal, so decoding is its transpose: the least-squares reconstruction. Each coefficient is
    then standardised with the toy world's per-channel mean and std (`MEAN`, `STD`, measured on its
    clips; tests/test_codecs_and_io.py re-measures them), as Wan normalises its VAE latents: a
    diffusion model needs latents of unit scale (raw, the high frequencies of flat-shaded clips are
    30x smaller than the noise). Each latent frame is one video frame (temporal stride 1), so streaming
    decode is exact by construction.
    """

    latent_channels = 16
    patch = 8
    MEAN = (-8.42, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.19, 0.0, 0.0, -0.68, 0.0, 0.0)
    STD = (3.01, 0.95, 0.91, 0.45, 0.43, 0.43, 0.26, 0.27, 0.23, 0.28, 1.62, 0.42, 0.42, 1.82, 0.50, 0.48)

    def __init__(self) -> None:
        p = self.patch
        colour = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64)
        colour = colour / colour.norm(dim=1, keepdim=True)  # [3 opponent, 3 rgb]
        dct = _dct_basis(p)
        rows = []
        for channel, max_freq in ((0, 3), (1, 1), (2, 1)):
            for total in range(max_freq + 1):
                for u in range(total + 1):
                    v = total - u  # zig-zag: lower total frequency first
                    patch = torch.outer(dct[u], dct[v])  # [p, p]
                    rows.append(torch.einsum("c,hw->chw", colour[channel], patch).flatten())
        self.basis = torch.stack(rows).float()  # [16, 3 * p * p], orthonormal rows
        self.mean = torch.tensor(self.MEAN).view(1, -1, 1, 1)
        self.std = torch.tensor(self.STD).view(1, -1, 1, 1)

    def coefficients(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] -> raw orthonormal coefficients [B, F, 16, H/8, W/8] (before standardising)."""
        b, f = video.shape[:2]
        patches = F.pixel_unshuffle(video.flatten(0, 1).float(), self.patch)  # [B*F, 3*p*p, h, w]
        return torch.einsum("kc,nchw->nkhw", self.basis.to(video.device), patches).unflatten(0, (b, f))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        coeffs = self.coefficients(video)
        return (coeffs - self.mean.to(coeffs.device)) / self.std.to(coeffs.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, f = latents.shape[:2]
        dev = latents.device
        coeffs = latents.flatten(0, 1).float() * self.std.to(dev) + self.mean.to(dev)
        patches = torch.einsum("kc,nkhw->nchw", self.basis.to(dev), coeffs)
        return F.pixel_shuffle(patches, self.patch).clamp(-1, 1).unflatten(0, (b, f))

    def stream_decoder(self) -> ToyDCTCodec:
        return self  # frame-wise: a block decodes on its own


WAN_VAE_FILE = "Wan2.1_VAE.pth"


class WanVAE:
    """Wan2.1's VAE. Latents are normalised per channel with the model's published mean and std."""

    latent_channels = 16

    def __init__(self, vae):
        self.vae = vae.eval()
        param = next(vae.parameters())
        shape = (1, 1, -1, 1, 1)  # broadcast over [B, F, C, h, w]
        self.mean = torch.tensor(vae.config.latents_mean, dtype=param.dtype, device=param.device).view(shape)
        self.std = torch.tensor(vae.config.latents_std, dtype=param.dtype, device=param.device).view(shape)

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression: each stage after the first halves the frame, and the
        stages marked in `temperal_downsample` halve time too."""
        config = self.vae.config
        return 2 ** sum(config.temperal_downsample), 2 ** (len(config.dim_mult) - 1), 2 ** (len(config.dim_mult) - 1)

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> WanVAE:
        from diffusers import AutoencoderKLWan

        folder = Path(folder)
        if (folder / "vae").is_dir():
            vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=dtype)
        elif (folder / WAN_VAE_FILE).is_file():
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

            vae = AutoencoderKLWan()
            state = torch.load(folder / WAN_VAE_FILE, map_location="cpu", weights_only=True)
            vae.load_state_dict(convert_wan_vae_to_diffusers(state), strict=True)
        else:
            raise FileNotFoundError(f"{folder}: no Wan VAE (expected vae/ or {WAN_VAE_FILE}); "
                                    "see launch/download_weights.sh")
        return cls(vae.to(device, dtype))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = self.vae.encode(video.transpose(1, 2).to(p.device, p.dtype)).latent_dist.mode()
        return (z.transpose(1, 2) - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents.to(self.mean.dtype) * self.std + self.mean).transpose(1, 2)
        return self.vae.decode(z).sample.transpose(1, 2).float()

    def stream_decoder(self) -> WanVAEStream:
        return WanVAEStream(self)


class WanVAEStream:
    """Decodes latent blocks in order, carrying the causal convs' frame cache from block to block."""

    def __init__(self, codec: WanVAE):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.codec = codec
        self.cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in codec.vae.decoder.modules())
        self.first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.codec.vae
        x = vae.post_quant_conv((latents.to(self.codec.mean.dtype) * self.codec.std + self.codec.mean).transpose(1, 2))
        frames = []
        for i in range(x.shape[2]):  # one latent frame at a time, as diffusers' own decode does
            frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=self.first))
            self.first = False
        return torch.cat(frames, dim=2).clamp(-1, 1).transpose(1, 2).float()


def rendered_frames(cfg: Config) -> int:
    """Video frames of the config's latent length: a codec of temporal stride s decodes F latent frames
    to 1 + s (F - 1) (the toy codec: one a latent frame)."""
    return 1 + cfg.video.vae_stride[0] * (cfg.video.num_latent_frames - 1)


def build_codec(cfg: Config, device: torch.device | str = "cpu") -> Codec:
    if cfg.video.codec == "toy_dct":
        return ToyDCTCodec()
    codec = WanVAE.from_folder(repo_path(cfg.runtime.base_model), device, cfg.torch_dtype(torch.device(device)))
    if codec.stride != tuple(cfg.video.vae_stride):
        raise ConfigError(f"the VAE in {cfg.runtime.base_model} has strides {list(codec.stride)}, the config "
                          f"video.vae_stride={list(cfg.video.vae_stride)}: set video.vae_stride={list(codec.stride)}")
    return codec
