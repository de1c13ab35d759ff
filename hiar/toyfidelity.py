"""Does a toy model draw what its captions say? Held-out captions sampled by a checkpoint, every frame
measured against the caption (eval.toy_fidelity).

Samplers: "codec", no model, the held-out clips themselves through the toy codec (the ceiling every model
is measured against); "teacher", the bidirectional teacher's ODE with CFG (`hiar.toyteacher`); "student",
the causal student in its config's order, one video of the config's length. A clip passes colour
fidelity and moves as `hiar.toyworld.fidelity_verdict` says.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hiar.atomic import atomic_path
from hiar.checkpoints import checkpoint_config, load_generator
from hiar.codecs import Codec, build_codec
from hiar.config import Config, with_overrides
from hiar.models import WanModel
from hiar.sampling import block_noise, sample_video
from hiar.text import build_text_encoder
from hiar.toyteacher import teacher_samples
from hiar.toyworld import ToyClip, caption_fidelity, clip_to_video, fidelity_verdict, sample_clip, speed_census
from hiar.video import to_uint8

HELD_OUT_SEED = 424242  # captions of clips the teacher never trained on
SAMPLERS = ("student", "teacher", "codec")


def sample_held_out(checkpoint: str, overrides: list[str], sampler: str, num_clips: int,
                    batch_size: int) -> tuple[list[str], list[np.ndarray]]:
    """The captions of `num_clips` held-out clips and the videos (uint8 [F, H, W, 3]) `sampler` makes of
    them, in batches of `batch_size`, with the checkpoint's own config and `overrides`."""
    cfg = with_overrides(checkpoint_config(checkpoint), overrides)
    model, cfg = load_generator(checkpoint, cfg)
    model.eval()
    codec, encoder = build_codec(cfg), build_text_encoder(cfg)
    held_out = [sample_clip(HELD_OUT_SEED, i, cfg.video.height, cfg.video.width) for i in range(num_clips)]
    captions = [clip.caption for clip in held_out]
    negative = encoder([cfg.train.negative_prompt])
    videos = []
    for start in range(0, len(captions), batch_size):
        text = encoder(captions[start:start + batch_size])
        x0 = sampled_latents(sampler, model, cfg, codec, held_out[start:start + batch_size], text, negative, start)
        videos += [to_uint8(v) for v in codec.decode(x0)]
    return captions, videos


def sampled_latents(sampler: str, model: WanModel, cfg: Config, codec: Codec, clips: list[ToyClip],
                    text: torch.Tensor, negative: torch.Tensor, start: int) -> torch.Tensor:
    """The clean latents `sampler` makes for one batch of clips, the first of them held-out clip `start`."""
    if sampler == "codec":  # the toy codec is frame-wise: one latent frame a video frame
        return codec.encode(torch.stack([torch.from_numpy(clip_to_video(clip.render(cfg.video.num_latent_frames)))
                                         for clip in clips]))
    if sampler == "teacher":
        return teacher_samples(model, cfg, text, negative, seed=start)
    with torch.no_grad():
        noise = block_noise(cfg, 0, range(start, start + len(text)))
        return sample_video(model, text, cfg, noise, cfg.geometry.num_blocks)


def fidelity(captions: list[str], videos: list[np.ndarray]) -> dict:
    """Per clip the caption's measurement and verdict; the fractions of clips that pass each check."""
    clips = []
    for caption, video in zip(captions, videos):
        f = caption_fidelity(video, caption)
        clips.append({"caption": caption, **f, **fidelity_verdict(f)})
    return {"clips": len(clips), "colour_fidelity": float(np.mean([c["colours_ok"] for c in clips])),
            "moving": float(np.mean([c["moves"] for c in clips])),
            "object_speeds": speed_census([s for c in clips for s in c["speed"].values()]), "per_clip": clips}


def write_fidelity(out: Path, result: dict, videos: list[np.ndarray]) -> None:
    """out/results.json and out/contact_sheet.png (six frames of each of the first eight videos)."""
    import imageio.v3 as iio

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    sheet = np.concatenate([np.concatenate(list(v[:: max(1, len(v) // 6)][:6]), axis=1) for v in videos[:8]], axis=0)
    with atomic_path(out / "contact_sheet.png") as tmp:
        iio.imwrite(tmp, sheet, extension=".png")
