"""A Wan-shaped VAE for the toy world: diffusers' AutoencoderKLWan with a tiny configuration, trained on
rendered toy clips (train/toy_codec.py).

It has Wan2.1's geometry (16 latent channels, temporal stride 4 with a first frame of its own, spatial
stride 8, a causal decoder with a frame cache), so a toy recipe on it would exercise the same encode,
streaming decode and frame geometry as full scale. With one stage fewer its spatial stride is 4: the
toy's objects are 10 to 18 pixels wide, two latent pixels at stride 8 where a real object at 480p spans
dozens, and stride 4 with Wan's 2x2 patch still gives the DiT 8x8 tokens a 64x64 frame
(docs/toy_prompts.md measures both). It is exported the way Wan's is distributed, a
diffusers folder `vae/` whose config carries the latents' per-channel mean and std, so
`hiar.codecs.WanVAE.from_folder` loads it unchanged. Not wired into any toy preset yet.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from hiar.atomic import atomic_path
from hiar.config import ConfigError, build_dataclass, parse_override, yaml_message
from hiar.toyworld import Motion, clip_to_video, sample_clip


@dataclass(frozen=True)
class ToyCodecConfig:
    base_dim: int = 16  # channels of the first stage (Wan2.1: 96)
    # channels of each stage over base_dim (Wan2.1: 1, 2, 4, 4); each stage after the first halves the
    # frame, so 4 stages give Wan's spatial stride 8 and 3 stages stride 4 (`spatial_stride`)
    dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1  # per stage (Wan2.1: 2)
    num_frames: int = 9  # video frames of a training clip: 1 + 4 k, k = 2 -> 3 latent frames
    # the long-clip stage: from step long_from on, each batch's length is drawn from num_frames ..
    # max_frames (when above num_frames) and the rate is long_lr (0: lr)
    max_frames: int = 0
    long_from: int = 0
    long_lr: float = 0.0
    long_lr_from: int = 0  # the rate drops to long_lr from this step on, short clips too (0: at long_from)
    height: int = 64
    width: int = 64
    batch_size: int = 2
    lr: float = 3.0e-4
    warmup_steps: int = 0  # the learning rate rises linearly to lr over these steps (0: none)
    kl_weight: float = 1.0e-6  # a near-deterministic autoencoder: what matters is the round trip
    edge_weight: float = 0.0  # weight of the L1 between decoded and true spatial differences (`edge_l1`)
    object_weight: float = 0.0  # extra weight of the pixels on and around objects in the L1 (`object_mask`)
    steps: int = 2000
    seed: int = 0
    log_every: int = 10
    save_every: int = 50
    eval_every: int = 100  # held-out round trip in the log (`validate`); 0: never
    threads: int = 1  # torch CPU threads (the toy's machines have two cores for everything)
    output_dir: str = "runs/toy/codec"
    init_from: str = ""  # a state.pt, or a folder with an exported vae/, whose weights a fresh run starts from
    motion: Motion = "bounce"  # the toy world's rule at a border


def load_codec_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> ToyCodecConfig:
    """The YAML file's keys, then `key=value` overrides; an unknown key or a bad value is a ConfigError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {yaml_message(err)}") from None
    data.update(parse_override(text) for text in overrides)
    cfg = build_dataclass(ToyCodecConfig, data)
    lengths_ok = (cfg.num_frames - 1) % 4 == 0 and (cfg.max_frames == 0 or (cfg.max_frames - 1) % 4 == 0)
    if len(cfg.dim_mult) not in (3, 4):
        raise ConfigError(f"dim_mult={list(cfg.dim_mult)} needs 4 stages (Wan2.1's three spatial halvings, "
                          "stride 8) or 3 (stride 4)")
    stride = spatial_stride(cfg)
    if not lengths_ok or cfg.height % stride or cfg.width % stride:
        raise ConfigError(f"num_frames={cfg.num_frames} and max_frames={cfg.max_frames} must be 1 + 4 k and "
                          f"height, width multiples of {stride} (the VAE's strides)")
    if cfg.long_lr_from and (not cfg.long_lr or cfg.long_lr_from > cfg.long_from):
        raise ConfigError(f"long_lr_from={cfg.long_lr_from} needs a long_lr and must not pass long_from="
                          f"{cfg.long_from} (the rate drops before the long clips start, or with them)")
    if cfg.max_frames and cfg.max_frames < cfg.num_frames:
        raise ConfigError(f"max_frames={cfg.max_frames} is below num_frames={cfg.num_frames} "
                          "(0: every clip num_frames long)")
    return cfg


def spatial_stride(cfg: ToyCodecConfig) -> int:
    return 2 ** (len(cfg.dim_mult) - 1)


def build_toy_vae(cfg: ToyCodecConfig):
    """AutoencoderKLWan with a tiny width and Wan2.1's temporal stride 4 (the last two halvings also
    halve time); spatial stride 8 as Wan2.1's, or 4 with one stage fewer."""
    from diffusers import AutoencoderKLWan

    halvings = len(cfg.dim_mult) - 1
    vae = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=16, dim_mult=list(cfg.dim_mult),
                           num_res_blocks=cfg.num_res_blocks,
                           temperal_downsample=[False] * (halvings - 2) + [True, True])
    initialise(vae)
    return vae


def initialise(vae) -> None:
    """Weights for training from scratch (diffusers' class is meant to be loaded, and keeps PyTorch's
    layer defaults): He-normal convolutions, zero biases, and each residual block's last convolution zero,
    so that the block starts as its shortcut. With the defaults, a convolution's output shrinks to about
    a third of its input's variance while its uniform bias does not, so the encoder's latents barely
    depend on the clip and the decoder learns one flat colour for every clip first, a plateau every
    full-size run from those defaults stayed on or fell back to (docs/toy_prompts.md)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for module in vae.modules():
        if isinstance(module, WanResidualBlock):
            torch.nn.init.zeros_(module.conv2.weight)


def clip_length(cfg: ToyCodecConfig, step: int) -> int:
    """The video frames of training batch `step`: num_frames, or in the long-clip stage (step >= long_from,
    max_frames above num_frames) a length 1 + 4 k drawn uniformly between the two, a pure function of seed
    and step, so a resumed run draws the same. The causal decoder's frame cache only learns the lengths it
    is trained on; short clips first make the early steps, where the shapes are learnt, cheap."""
    if cfg.max_frames <= cfg.num_frames or step < cfg.long_from:
        return cfg.num_frames
    return random.Random(f"toycodec/{cfg.seed}/length/{step}").randrange(cfg.num_frames, cfg.max_frames + 1, 4)


def clip_batch(cfg: ToyCodecConfig, step: int, frames: int | None = None) -> torch.Tensor:
    """Training batch `step`: clips step * B .. of the world with cfg.seed, each from a start frame of its
    own (the world is stationary, so any start is a clip), `frames` long (default `clip_length`), as the
    VAE takes them: [B, 3, F, H, W]."""
    length = frames or clip_length(cfg, step)
    clips = []
    for i in range(cfg.batch_size):
        index = step * cfg.batch_size + i
        start = random.Random(f"toycodec/{cfg.seed}/{index}").randrange(1000)
        rendered = sample_clip(cfg.seed, index, cfg.height, cfg.width, motion=cfg.motion).render(length, start)
        clips.append(torch.from_numpy(clip_to_video(rendered)))
    return torch.stack(clips).transpose(1, 2)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode(z) before diffusers' final clamp to [-1, 1]: the decoder's outputs, one call a latent
    frame, caught by a forward hook and joined along time. The loss reads these: through the clamp, a
    pixel predicted beyond the range (the toy world's dark backgrounds and white objects sit near its
    ends) has no gradient and could stay there."""
    frames: list[torch.Tensor] = []
    hook = vae.decoder.register_forward_hook(lambda module, args, out: frames.append(out))
    try:
        clamped = vae.decode(z).sample
    finally:
        hook.remove()
    out = torch.cat(frames, 2)
    if out.shape != clamped.shape:  # e.g. a patchified or tiled decode: not this VAE's configuration
        raise RuntimeError(f"decoder outputs {tuple(out.shape)} do not join to the decode {tuple(clamped.shape)}")
    return out


def reconstruction_loss(vae, video: torch.Tensor, kl_weight: float, edge_weight: float = 0.0,
                        object_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + MSE of the decoded posterior mean, before the output clamp (`decode_unclamped`), against the
    video, plus edge_weight times `edge_l1` and kl_weight times the posterior's KL per latent element.
    With object_weight, each pixel's L1 counts 1 + object_weight on `object_mask` (1 elsewhere), so the
    few percent of pixels that carry the objects are not outvoted by the background.
    The mean, not a sample: at initialisation the posterior's std is about 1 against means near 0, so a
    sampled latent is noise the decoder can only learn to ignore; the KL term keeps the means' scale in
    check. No noise also makes a resumed run repeat an uninterrupted one. PSNR is of the clamped output,
    what the codec delivers. (Why the first runs did not learn, and what runs reach: docs/toy_prompts.md.)"""
    posterior = vae.encode(video).latent_dist
    decoded = decode_unclamped(vae, posterior.mode())
    error = (decoded - video).abs()
    l1, mse = error.mean(), (error ** 2).mean()
    weighted = l1 + object_weight * (error * object_mask(video)).mean() if object_weight else l1
    # diffusers' posterior.kl() sums over dims 1-3 only, which for video leaves the width out
    kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar).mean()
    edge = edge_l1(decoded, video)
    metrics = {"l1": float(l1.detach()), "edge": float(edge.detach()), "kl": float(kl.detach()),
               "psnr": psnr(decoded.detach().clamp(-1, 1), video)}
    return weighted + mse + edge_weight * edge + kl_weight * kl, metrics


def object_mask(video: torch.Tensor) -> torch.Tensor:
    """1 on the pixels of a toy clip ([B, 3, F, H, W]) that differ from their frame's background and on
    their neighbours (a 3x3 dilation: a blurred outline spills a pixel out), else 0; [B, 1, F, H, W]. The
    background is each frame's per-channel median, which the flat background colour is as long as it
    covers most of the frame (two of the world's largest squares cover a sixth of it)."""
    background = video.flatten(3).median(dim=3).values[..., None, None]
    differs = ((video - background).abs().amax(1, keepdim=True) > 0.05).float()
    frames = differs.transpose(1, 2).flatten(0, 1)  # [B F, 1, H, W]
    dilated = torch.nn.functional.max_pool2d(frames, 3, stride=1, padding=1)
    return dilated.unflatten(0, differs.shape[:1] + differs.shape[2:3]).transpose(1, 2)


def edge_l1(decoded: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the decoded and the true differences of neighbouring pixels, across and down
    ([..., H, W]). A toy object's shape lies in its outline, a few percent of the pixels, so a pixelwise
    loss is nearly as happy with a soft blob; this term is large exactly where an edge is blurred."""
    across = (decoded.diff(dim=-1) - video.diff(dim=-1)).abs().mean()
    down = (decoded.diff(dim=-2) - video.diff(dim=-2)).abs().mean()
    return across + down


def psnr(decoded: torch.Tensor, video: torch.Tensor) -> float:
    """PSNR in dB of `decoded` against `video`, both in [-1, 1] (a peak-to-peak range of 2)."""
    return float(10 * torch.log10(4 / ((decoded - video) ** 2).mean().clamp_min(1e-12)))


def learning_rate(cfg: ToyCodecConfig, step: int) -> float:
    """cfg.lr after a linear warm-up over cfg.warmup_steps, long_lr from long_lr_from (or the long-clip
    stage) on: a pure function of the step, so a resumed run sets the rate an uninterrupted one would."""
    if cfg.long_lr and step >= (cfg.long_lr_from or cfg.long_from):
        return cfg.long_lr
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


def held_back_batches(cfg: ToyCodecConfig, batches: int) -> list[torch.Tensor]:
    """The first `batches` batches of num_frames clips of the world with seed + 1, which training never
    draws: what `validate` and `latent_stats` measure."""
    held_back = dataclasses.replace(cfg, seed=cfg.seed + 1)
    return [clip_batch(held_back, b, cfg.num_frames) for b in range(batches)]


@torch.no_grad()
def validate(vae, cfg: ToyCodecConfig, clips: int = 8) -> dict[str, float]:
    """Round trip of `clips` held-back clips (seed + 1, as `latent_stats`): `held_psnr` of the clamped
    decode, and `held_spread`, how much the decodes differ from their mean over how much the clips do:
    about 0 on the flat-colour plateau (every clip decoded alike), 1 for a faithful codec."""
    video = torch.cat(held_back_batches(cfg, -(-clips // cfg.batch_size)))[:clips]
    decoded = vae.decode(vae.encode(video).latent_dist.mode()).sample
    spread = (decoded - decoded.mean(0)).abs().mean() / (video - video.mean(0)).abs().mean()
    return {"held_psnr": psnr(decoded, video), "held_spread": float(spread)}


@torch.no_grad()
def latent_stats(vae, cfg: ToyCodecConfig, batches: int = 8) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of held-back clips (seed + 1), as Wan publishes
    its latents' mean and std: the diffusion model sees unit-scale latents."""
    z = torch.cat([vae.encode(video).latent_dist.mode() for video in held_back_batches(cfg, batches)])
    z = z.transpose(0, 1).flatten(1)  # [16, N f h w]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-4).tolist()


def save_state(path: Path, vae, optimizer: torch.optim.Optimizer, step: int, cfg: ToyCodecConfig) -> None:
    """The training state as one file, replaced atomically: a crash keeps the previous one."""
    with atomic_path(path) as tmp:
        torch.save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "config": dataclasses.asdict(cfg)}, tmp)


def load_state(path: Path, vae, optimizer: torch.optim.Optimizer) -> int:
    """Restore a `save_state` file into `vae` and `optimizer`; the next step to run."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    vae.load_state_dict(state["vae"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def export(vae, folder: Path, mean: list[float], std: list[float]) -> Path:
    """folder/vae/, a diffusers folder with the latents' statistics in its config. It is written beside
    and renamed into place, so a reader never sees half of one."""
    vae.register_to_config(latents_mean=mean, latents_std=std)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".vae."))
    vae.save_pretrained(tmp)
    target, old = folder / "vae", folder / ".vae.old"
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target
