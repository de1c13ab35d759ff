"""Typed configuration: a dataclass tree filled from a YAML preset, then `key.sub=value` overrides.

Every run goes through `load_config`, which is strict (an unknown key is an error naming the closest
valid one, a wrong type is an error naming the expected type) and validates once, so the rest of the
code can trust a `Config`. `save_config` writes the resolved tree next to every output.

A loaded config is immutable (frozen dataclasses): a program that needs other values derives a new,
validated config with `with_overrides` instead of changing one that other code already trusts.

Derived values are computed from the frozen fields, never written in a preset: `Config.geometry`
(tokens per frame, cache length, blocks) from the resolution, the VAE stride and the patch size;
`ScheduleConfig.timesteps` (the warped step list) from the schedule. Both are computed once per config.
The distillation lengths left at 0 are resolved at validation and stored, so saved configs say them.

Paths: a relative path in a config (runtime.base_model, runtime.prompts, runtime.checkpoint,
train.output_dir, train.deepspeed, train.init_weights, ode.teacher, ode.prompts, ode.output_dir,
distill.generator, distill.teacher, distill.critic, distill.prompts, distill.teacher_model) is taken from the repository
root, wherever the program runs: `repo_path` resolves it. Paths given as command-line flags
(--config_path, --data_path, --checkpoint_path, --output_folder, ...) are the user's, taken from the
current directory; a preset's `base:` is looked up beside the preset first.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from hiar.atomic import atomic_path
from hiar.flow import NUM_TRAIN_TIMESTEPS, FlowMatching
from hiar.toyworld import Motion

ROOT = Path(__file__).resolve().parent.parent  # the repository: relative config paths start here
PRESET_DIR = ROOT / "configs"


# What each codec and text encoder produces, checked against the model's sizes in `Config.validate`:
# latent channels and the strides it may have (Wan2.1's VAE: 4, 8, 8; the toy world's Wan-shaped VAE may
# have one spatial halving fewer, hiar/toycodec.py; hiar.codecs.build_codec checks the weights' own).
CODEC_LAYOUT = {"wan_vae": (16, ((4, 8, 8), (4, 4, 4))), "toy_dct": (16, ((1, 8, 8),))}
TEXT_DIMS = {"umt5-xxl": 4096, "all-minilm-l6-v2": 384}


class ConfigError(ValueError):
    """A configuration the user must change; the message says what to change."""


def repo_path(path: str | os.PathLike) -> Path:
    """A path written in a config: absolute as given, relative from the repository root (module docstring)."""
    return ROOT / path


def whole_blocks(name: str, frames: int, k: int) -> int:
    """How many blocks of k latent frames `frames` makes; a ConfigError naming the nearest valid lengths
    when it is not a positive multiple of k (every length the model generates or trains on)."""
    if frames < k:
        raise ConfigError(f"{name}={frames} must be at least video.frames_per_block={k} (one block)")
    if frames % k:
        fix = frames // k * k
        raise ConfigError(f"{name}={frames} is not a multiple of video.frames_per_block={k}: use {fix} or {fix + k}")
    return frames // k


@dataclass(frozen=True)
class ModelConfig:
    """Wan DiT sizes (docs/design.md, section 3); defaults are Wan2.1-T2V-1.3B."""

    num_layers: int = 30
    num_heads: int = 12
    head_dim: int = 128
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_encoder: Literal["umt5-xxl", "all-minilm-l6-v2"] = "umt5-xxl"
    text_dim: int = 4096  # the text encoder's hidden size
    text_len: int = 512  # prompts are zero-padded to this many tokens
    freq_dim: int = 256  # sinusoidal timestep embedding width
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # "auto": flash-attn when installed and on CUDA (half precision); SDPA otherwise (and always on CPU).
    # "sdpa": PyTorch SDPA, PyTorch picks the kernel; "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
    # "sdpa_math": SDPA held to that kernel; "flash_attn": the flash-attn package. A backend that cannot
    # run on the device and dtype fails at the first forward, saying why (hiar/models/attention.py).
    attention_backend: Literal["auto", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math",
                               "flash_attn"] = "auto"

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class VideoConfig:
    """Pixel resolution, VAE stride and the block structure of the causal student."""

    height: int = 480
    width: int = 832
    # wan_vae: Wan2.1's VAE (16 channels, stride 4, 8, 8); toy_dct: the toy world's parameter-free codec.
    codec: Literal["wan_vae", "toy_dct"] = "wan_vae"
    vae_stride: tuple[int, int, int] = (4, 8, 8)  # (time, height, width) compression of the codec
    fps: int = 16  # frames per second of the decoded video
    num_latent_frames: int = 21  # training / default generation length
    frames_per_block: int = 3  # k in the paper
    # Local attention window W in latent frames, counted back from the end of the current block, the
    # block included (W = 21, k = 3: a block sees the 18 frames before it). 0 = unbounded.
    window_frames: int = 0
    sink_frames: int = 0  # first frames that stay visible to every block (attention sink)
    # The toy world's rule at a border (hiar.toyworld): "bounce" (every toy checkpoint before the wrap
    # world) or "wrap" (objects leave one border and re-enter at the opposite one, so they move the way
    # the caption says for the whole video). Toy training and evaluation only.
    toy_motion: Motion = "bounce"


@dataclass(frozen=True)
class ScheduleConfig:
    """The student's denoising steps (docs/design.md, section 1)."""

    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    # Warp the step list through the shifted-sigma map: [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625].
    warp: bool = True
    shift: float = 5.0

    @functools.cached_property  # frozen fields: computed once, on first use (validation's ODE check)
    def timesteps(self) -> tuple[float, ...]:
        """The student's timesteps t_0 > ... > t_{S-1} the model is told, as floats (never rounded)."""
        return tuple(FlowMatching(self.shift).denoising_timesteps(self.denoising_steps, self.warp).tolist())


@dataclass(frozen=True)
class SamplingConfig:
    """How the (block, step) cells are ordered and stepped at inference (docs/design.md, section 1)."""

    # frame_first: Self-Forcing's block-first order; timestep_first: HiAR's step-first order;
    # hybrid_block0: the first `num_frame_first_blocks` blocks frame-first, the rest step-first;
    # hybrid_steps: the first `frame_first_steps` steps of every block block-first, the rest step-first.
    method: Literal["frame_first", "timestep_first", "hybrid_block0", "hybrid_steps"] = "timestep_first"
    # Execution of the step-first cells: step_major sweeps every block at step 0, then step 1, ...
    # (the reference); wavefront runs anti-diagonals, keeps S caches of one window each and streams
    # blocks out S cells after they start. Both give the same video.
    schedule: Literal["step_major", "wavefront"] = "wavefront"
    num_frame_first_blocks: int = 1
    # hybrid_steps: K in [0, S]; steps 0..K-1 read earlier blocks at t_K (0: timestep_first, S: frame_first).
    frame_first_steps: int = 1
    # Noise level of the step-first context written at step j: "next" = t_{j+1} (HiAR; clean after the
    # last step), "current" = t_j, "clean" = 0 (ablations).
    context_level: Literal["next", "current", "clean"] = "next"
    # Timestep of the context that frame_first writes after a block's last step (Self-Forcing: 0).
    frame_first_context_t: float = 0.0
    # sde: re-noise x0 with fresh noise to the next level (the default); ode: deterministic Euler step.
    stepping: Literal["sde", "ode"] = "sde"
    # Paper section 3.2: one forward for block n's cache write and block n+1's denoise at a step.
    fused: bool = False
    # After a prompt switch at block b (hiar/conditioning.py): new_blocks keeps the earlier blocks' cached
    # K/V as written under the old prompt; recache re-runs the frames each cache holds under the new prompt,
    # at their level, before block b reads it (the old prompt does not linger in the context).
    switch: Literal["new_blocks", "recache"] = "recache"


@dataclass(frozen=True)
class RuntimeConfig:
    """Where the base model's text encoder and VAE live, and the numeric precision. Relative paths are
    taken from the repository root (module docstring)."""

    # Folder with the text encoder and VAE, in the original Wan2.1 layout or the diffusers layout.
    base_model: str = "wan_models/Wan2.1-T2V-1.3B"
    # auto: bfloat16 weights and activations on CUDA, float32 on the CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # KV cache of sampling without grad: dict (per-frame tensors, concatenated on each read) or static
    # (preallocated per-layer buffers written in place: fixed shapes once the window is full, the same
    # video). Cells that need grad (training's gradient window) always use dict (hiar/models/cache.py).
    kv_cache: Literal["dict", "static"] = "dict"
    # torch.compile the transformer blocks' pure-tensor parts for sampling (hiar.models.wan.compile_blocks);
    # the first forwards of each shape compile. Same video up to float rounding.
    compile_blocks: bool = False
    # FP8 linear layers in the transformer blocks for sampling (hiar/fp8.py): "torchao" computes them in
    # float8 on CUDA GPUs of compute capability >= 8.9; "emulate" rounds weights and inputs through float8
    # in the model's dtype on any device (the quality cost, not the speed).
    fp8_linear: Literal["off", "torchao", "emulate"] = "off"
    # Encode prompts on the CPU and keep the text encoder there (saves ~11 GB of GPU memory for umT5-XXL).
    offload_text_encoder: bool = False
    # Prompt file (one a line) used when a program is given no prompt.
    prompts: str = "data/prompts.txt"
    # Weights inference.py uses when given no --checkpoint_path ("": none, random weights); the toy
    # presets point at the embedded default.
    checkpoint: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """A training run (teacher, ODE initialisation, distillation): optimisation, DeepSpeed, bookkeeping.
    Relative paths (output_dir, deepspeed) are taken from the repository root (module docstring)."""

    output_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 4  # per rank and micro-step
    # Samples per update over all ranks (0: batch_size x world size). Larger totals accumulate
    # gradients over total / (batch_size x world) micro-steps, each on fresh samples.
    total_batch_size: int = 0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 0  # learning rate decays linearly to zero over the last decay_steps steps (0: constant)
    seed: int = 0
    deepspeed: str = "configs/deepspeed/zero0.json"  # ZeRO stage, offload; batch, clip and precision come from here
    bf16: bool = False
    # The forwards of training in bfloat16 autocast, weights and optimizer in float32: the mixed precision
    # of CPU cores with AVX512-BF16 (DeepSpeed's bf16, above, is the GPUs'); the toy teacher's step 1.18x
    # faster on the 2-core VM (docs/training.md, "Training on CPU cores").
    autocast: bool = False
    # torch.compile the transformer blocks of each model training runs (hiar.models.wan.compile_blocks; the
    # first steps of each shape compile, about 30 s): the toy teacher's step 1.13x faster on the VM, 1.39x
    # with train.autocast.
    compile_blocks: bool = False
    gradient_checkpointing: bool = False
    log_every: int = 10
    save_every: int = 500
    # Checkpoints kept under checkpoints/ (the newest; 0 keeps every one, e.g. to evaluate a run's generator
    # step by step with eval.toy_fidelity --checkpoint .../model.pt)
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: no sample videos during training
    max_nonfinite: int = 10  # skipped steps with a non-finite loss before the run aborts
    # Prompt states kept by caption (toy captions repeat; full-scale prompts mostly do not), per rank.
    prompt_cache_mb: int = 1024
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    caption_dropout: float = 0.1  # teacher: empty prompt this often, for classifier-free guidance
    # How the toy world's clips are captioned wherever a stage trains on them: the teacher's batches and
    # the "toyworld" prompts of ode.prompts and distill.prompts (`hiar.data.toy_caption`). "template": the
    # one sentence of every toy checkpoint so far; "varied": `hiar.captions`' training generator, the words
    # a pure function of (world seed, clip index). The held-out phrasings are evaluation's, never a choice.
    captions: Literal["template", "varied"] = "template"
    timestep_shift: float = 3.0  # teacher: noise levels sigma = shift(u), u ~ U(0, 1)
    # teacher: this share of samples draws a level per latent frame (diffusion forcing), so a legible frame
    # beside illegible ones, the causal student's case, is a training case; the rest one level a sample
    frame_noise: float = 0.0
    # teacher: this share of samples gets its first latent frame nearly clean (a level in [0, 0.2]) and the
    # others one level: the case in which only the caption says which way the objects go next, the one
    # case that teaches the direction word (docs/toy_prompts.md, "The direction word, learnt")
    context_noise: float = 0.0
    # teacher: in those samples the other frames' level, drawn as every sample's, is mapped into [this, 1]:
    # the higher, the less of the motion is legible in them, so the more the caption alone has to say
    # (0: drawn exactly as every other sample's)
    context_noise_min: float = 0.0
    negative_prompt: str = ""
    guidance_scale: float = 3.0  # teacher samples and ODE trajectories
    sample_steps: int = 48  # Euler steps of teacher sampling
    sample_shift: float = 8.0
    # teacher: exponential moving average of the weights from step ema_start (0 = off); when on, the
    # EMA is what samples and model.safetensors hold (distillation has its own distill.ema_*)
    ema_decay: float = 0.0
    ema_start: int = 0
    # teacher: start from these weights (a teacher's model.safetensors of the same architecture) instead of
    # random ones, to train an existing teacher further on other settings ("": from scratch)
    init_weights: str = ""


@dataclass(frozen=True)
class ODEConfig:
    """Teacher ODE trajectories (for ODE initialisation and the forward-KL regulariser). Relative paths
    (teacher, prompts, output_dir) are taken from the repository root (module docstring)."""

    teacher: str = "runs/toy/teacher_long/model.safetensors"
    prompts: str = "toyworld"  # "toyworld" (captions of the world's clips) or a prompt file
    num_trajectories: int = 1000
    steps: int = 48  # Euler steps of the teacher
    shift: float = 8.0
    guidance_scale: float = 6.0
    output_dir: str = "runs/toy/ode_pairs"
    per_shard: int = 64
    # The points of the teacher's `steps`-step grid a trajectory keeps besides its final latent, one per
    # student step (forward-KL step j regresses the chord from point j to point j + 1, or to the final
    # latent after the last; `hiar.config.kept_indices`). "uniform": every (steps / S)-th point, [0, 12, 24,
    # 36] of 48 for S = 4 student steps, the reference's (scripts/generate_ode_pairs.py --save_indices
    # 0,12,24,36,-1; teacher timesteps 1000, 960, 888.9, 727.3); "aligned": the points nearest the
    # student's timesteps ([0, 17, 30, 40] of 48: 1000, 935.9, 827.6, 615.4 for 1000, 937.5, 833.3, 625).
    keep: Literal["uniform", "aligned"] = "uniform"
    keep_indices: tuple[int, ...] = ()  # explicit grid indices instead (S of them, increasing); (): by `keep`
    # Latents on disk. float32 is the reference's; bfloat16 halves the disk, but its rounding adds rms
    # noise to the chord target, a difference of two close points over their small sigma gap: ~5.7% on
    # the first chord with keep=uniform (sigma 1 -> 0.96), ~3.4% with aligned (float16: ~0.7%, 0.4%).
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    batch_size: int = 4  # trajectories integrated together


@dataclass(frozen=True)
class DistillConfig:
    """DMD distillation with the forward-KL regulariser (docs/design.md, section 2). The rollout order and
    the context level are `sampling.method` and `sampling.context_level`; the generator's learning
    rate, betas, weight decay and clipping are `train.*`. Relative paths (generator, teacher, critic,
    prompts, a teacher_model file) are taken from the repository root (module docstring)."""

    generator: str = "runs/toy/ode_init/model.safetensors"  # the student's initialisation
    teacher: str = "runs/toy/teacher_long/model.safetensors"  # real score, frozen
    # A preset (a name such as wan14b, or a YAML file) whose `model` section is the teacher's
    # (`teacher_model_config`); "": the student's.
    teacher_model: str = ""
    # The frozen teacher's placement (its precision is train.bf16's): a whole copy on every rank, or
    # sharded over the ranks by a DeepSpeed ZeRO-3 engine without optimizer (zero3_offload: parameters
    # on the host, streamed in layer by layer). A 14B teacher needs zero3 on 80 GB cards.
    teacher_sharding: Literal["replicated", "zero3", "zero3_offload"] = "replicated"
    critic: str = "runs/toy/teacher_long/model.safetensors"  # fake score's initialisation (the base model)
    prompts: str = "toyworld"  # "toyworld" (captions of the world's clips) or a prompt file
    num_training_frames: int = 0  # the gradient window, the last frames of the rollout (0: video.num_latent_frames)
    num_rollout_frames: int = 0  # longer than the window: earlier blocks are context only (0: the window)
    min_exit_step: int = 0
    dfake_gen_update_ratio: int = 5  # critic updates per generator update
    critic_lr: float = 3.0e-7
    # The real score's CFG against train.negative_prompt, v_neg + s (v_text - v_neg). The reference's
    # `guidance_scale: 3.0` means cond + 3 (cond - uncond) (model/dmd.py _compute_kl_grad), s = 4 here.
    guidance_scale: float = 4.0
    timestep_shift: float = 5.0  # DMD and critic noise levels: shift(u), clamped to [t_min, t_max]
    # How u is drawn. "clamp_after_shift" (the reference, model/dmd.py compute_distribution_matching_loss):
    # u = k / 1000 for an integer k ~ U{0, ..., 999}, shifted, then clamped, so t spans [20, 980] with
    # 0.5% of draws at 20 and 9.2% at 980 (shift 5); "range_before_shift": u ~ U(t_min, t_max),
    # continuous, then shifted: t never goes below 92.6 (shift 5), the low noise levels go untrained.
    timestep_draw: Literal["clamp_after_shift", "range_before_shift"] = "clamp_after_shift"
    t_min: float = 0.02
    t_max: float = 0.98
    # The share of DMD's samples (and of the critic's) whose first latent frame is given nearly clean
    # (hiar.flow.CONTEXT_LEVEL) and the rest noised to the sample's level: the real score is then the
    # teacher continuing the student's own first frame. For a teacher trained with that case (the toy
    # teacher's train.context_noise), which draws the prompted direction more often continuing a frame
    # than from noise (docs/toy_prompts.md, "DMD on continuations"); a base model never shown a clean
    # first frame beside noisy ones (Wan2.1 T2V) has no such case, hence 0.
    context_share: float = 0.0
    # Rollouts longer than the gradient window (num_rollout_frames > num_training_frames), as the
    # reference's model/base.py _run_generator runs them. rollout_length "uniform": each rollout is
    # num_training_frames ... num_rollout_frames long, in whole blocks, uniformly (a pure function of its
    # noise seed, `hiar.distill.rollout_blocks`); "max": always num_rollout_frames.
    rollout_length: Literal["uniform", "max"] = "uniform"
    # window_start "reencode": in a rollout longer than the window, the window's first latent frame is
    # replaced by the codec's encoding, as a lone image, of the last pixel frame decoded from the rollout
    # up to it (so teacher and critic see a window that starts as a video does), and the window's first
    # block carries no gradient and is left out of the DMD loss; "slice": the plain last frames, all in it.
    window_start: Literal["reencode", "slice"] = "reencode"
    fkl_weight: float = 0.1  # 0 turns the forward-KL regulariser off
    fkl_steps: int = 1  # regress the teacher's chord on the first K student steps
    fkl_attention: Literal["bidirectional", "block_causal"] = "bidirectional"
    # The timestep the student is told at forward-KL step j: "student", its own t_j (the reference,
    # model/timestep_forcing_dmd.py pd_segments' input_timestep), whatever the stored point's level; or
    # "stored", the point's exact teacher timestep. The chord target always uses the stored levels.
    fkl_timestep: Literal["student", "stored"] = "student"
    ema_decay: float = 0.99
    ema_start: int = 200  # the training step at which the EMA starts


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters through peft (hiar/lora.py, docs/lora.md): with rank r > 0 the generator's weights are
    frozen and each linear layer that `target_modules` names computes W x + (alpha / r) B A x, B [out, r]
    zero at the start (training starts from the base model's outputs), A [r, in] random; only A and B
    are trained, and a run exports them as an adapter file (`hiar.checkpoints.save_adapter`)."""

    rank: int = 0  # 0: no adapters, the generator trains whole
    alpha: float = 0.0  # the update's scale is alpha / rank; 0: alpha = rank (scale 1)
    dropout: float = 0.0  # dropout on the adapters' input (peft's lora_dropout)
    # nn.Linear modules of hiar/models/wan.py by name (a module is adapted when its path ends with one):
    # the self- and cross-attention projections and the FFN of every transformer block.
    target_modules: tuple[str, ...] = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                       "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
    # The critic (distillation's fake score): trained whole ("full") or through adapters of the same
    # shape on its frozen initialisation ("lora").
    critic: Literal["full", "lora"] = "full"

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank if self.rank else 0.0


@dataclass(frozen=True)
class Geometry:
    """Token geometry derived from a `Config`; the only place token counts come from."""

    latent_height: int
    latent_width: int
    tokens_per_frame: int
    frames_per_block: int
    num_latent_frames: int
    window_frames: int  # 0 = unbounded
    sink_frames: int

    @property
    def num_blocks(self) -> int:
        return self.num_latent_frames // self.frames_per_block

    @property
    def cache_frames(self) -> int:
        """Frames a KV cache must hold: the window, or the whole video without one."""
        return self.window_frames or self.num_latent_frames

    @property
    def cache_tokens(self) -> int:
        return self.cache_frames * self.tokens_per_frame


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.runtime.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.runtime.dtype)

    @functools.cached_property  # frozen fields: computed once, on first use
    def geometry(self) -> Geometry:
        v, m = self.video, self.model
        latent_height = v.height // v.vae_stride[1]
        latent_width = v.width // v.vae_stride[2]
        tokens = (latent_height // m.patch_size[1]) * (latent_width // m.patch_size[2])
        return Geometry(
            latent_height=latent_height,
            latent_width=latent_width,
            tokens_per_frame=tokens,
            frames_per_block=v.frames_per_block,
            num_latent_frames=v.num_latent_frames,
            window_frames=v.window_frames,
            sink_frames=v.sink_frames,
        )

    def validate(self) -> Config:
        """This config with distill's 0 lengths resolved, once every section and their consistency is
        checked; a `ConfigError` saying what to change (the first problem, in this order)."""
        m, v, s = self.model, self.video, self.schedule
        check_model(m)
        check_frame_size(m, v)
        check_codec_and_text(m, v)
        check_blocks(v)
        check_schedule(s)
        check_sampling(self.sampling)
        check_train(self.train)
        cfg = dataclasses.replace(self, distill=resolved_lengths(self.distill, v.num_latent_frames))
        check_distill(cfg.distill, v.frames_per_block, len(s.denoising_steps))
        check_ode(cfg)
        check_lora(cfg.lora)
        return cfg


# -- what `Config.validate` checks, section by section ---------------------------------------------


def check_model(m: ModelConfig) -> None:
    if m.head_dim % 2 or m.head_dim < 6:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even and at least 6 (3-axis RoPE)")
    if m.patch_size[0] != 1:
        raise ConfigError(f"model.patch_size={list(m.patch_size)}: the temporal patch must be 1 "
                          "so that blocks are made of whole latent frames")


def check_frame_size(m: ModelConfig, v: VideoConfig) -> None:
    """A frame must cut into whole patches of whole latent pixels."""
    for axis, pixels in (("height", v.height), ("width", v.width)):
        i = 1 if axis == "height" else 2
        unit = v.vae_stride[i] * m.patch_size[i]
        if pixels % unit:
            raise ConfigError(
                f"video.{axis}={pixels} must be divisible by vae_stride[{i}] * patch_size[{i}] = {unit}: "
                f"use {max(unit, pixels // unit * unit)}")


def check_codec_and_text(m: ModelConfig, v: VideoConfig) -> None:
    """The model's input and text sizes must be what the codec and the text encoder produce."""
    channels, strides = CODEC_LAYOUT[v.codec]
    if m.in_channels != channels or m.out_channels != channels or tuple(v.vae_stride) not in strides:
        raise ConfigError(
            f"video.codec={v.codec} makes {channels}-channel latents with stride "
            f"{' or '.join(str(list(s)) for s in strides)}: set model.in_channels/out_channels={channels} "
            f"and video.vae_stride to one of them")
    if m.text_dim != TEXT_DIMS[m.text_encoder]:
        raise ConfigError(f"model.text_encoder={m.text_encoder} gives {TEXT_DIMS[m.text_encoder]}-d states: "
                          f"set model.text_dim={TEXT_DIMS[m.text_encoder]}")


def check_blocks(v: VideoConfig) -> None:
    """Whole blocks of k frames, and an attention window that holds the sink and the current block."""
    k = v.frames_per_block
    if k < 1:
        raise ConfigError(f"video.frames_per_block={k} must be at least 1")
    whole_blocks("video.num_latent_frames", v.num_latent_frames, k)
    if v.sink_frames < 0 or v.window_frames < 0:
        raise ConfigError("video.window_frames and video.sink_frames must be >= 0 (0 window = unbounded)")
    if v.window_frames and v.window_frames < k + v.sink_frames:
        raise ConfigError(
            f"video.window_frames={v.window_frames} must be at least frames_per_block + sink_frames = "
            f"{k + v.sink_frames} (the window holds the sink and the current block)")
    if v.sink_frames and not v.window_frames:
        raise ConfigError("video.sink_frames only makes sense with a window: set video.window_frames")


def check_schedule(s: ScheduleConfig) -> None:
    steps = list(s.denoising_steps)
    if not steps or any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in steps) or steps != sorted(steps, reverse=True) \
            or len(set(steps)) != len(steps):
        raise ConfigError(f"schedule.denoising_steps={steps} must be strictly decreasing within "
                          f"(0, {NUM_TRAIN_TIMESTEPS}]")
    if s.shift <= 0:
        raise ConfigError(f"schedule.shift={s.shift} must be positive")


def check_sampling(p: SamplingConfig) -> None:
    if p.num_frame_first_blocks < 0:
        raise ConfigError(f"sampling.num_frame_first_blocks={p.num_frame_first_blocks} must be >= 0")
    if not 0 <= p.frame_first_context_t < NUM_TRAIN_TIMESTEPS:
        raise ConfigError(f"sampling.frame_first_context_t={p.frame_first_context_t} must lie in "
                          f"[0, {NUM_TRAIN_TIMESTEPS})")


def check_train(t: TrainConfig) -> None:
    for name, low in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("total_batch_size", 0), ("save_every", 0),
                      ("keep_checkpoints", 0), ("sample_every", 0), ("max_nonfinite", 0), ("prompt_cache_mb", 0)):
        if getattr(t, name) < low:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be at least {low}")
    if t.warmup_steps < 0 or t.decay_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} and train.decay_steps={t.decay_steps} must be >= 0")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must lie in [0, 1) (0: no EMA)")
    if not 0 <= t.frame_noise <= 1:
        raise ConfigError(f"train.frame_noise={t.frame_noise} must lie in [0, 1] (the share of samples with a "
                          "noise level per latent frame)")
    if not 0 <= t.context_noise <= 1 - t.frame_noise:
        raise ConfigError(f"train.context_noise={t.context_noise} must lie in [0, 1 - train.frame_noise] (the "
                          "share of samples with a nearly clean first latent frame; the shares add up)")
    if not 0 <= t.context_noise_min < 1:
        raise ConfigError(f"train.context_noise_min={t.context_noise_min} must lie in [0, 1) (the lowest level of "
                          "the other frames of a sample with a nearly clean first latent frame)")


def resolved_lengths(d: DistillConfig, num_latent_frames: int) -> DistillConfig:
    """distill's 0 lengths made explicit: the gradient window defaults to the video, the rollout to the window."""
    training = d.num_training_frames or num_latent_frames
    return dataclasses.replace(d, num_training_frames=training, num_rollout_frames=d.num_rollout_frames or training)


def check_distill(d: DistillConfig, k: int, num_steps: int) -> None:
    """`d` with its lengths resolved; k frames a block, num_steps student steps."""
    for name in ("num_training_frames", "num_rollout_frames"):
        whole_blocks(f"distill.{name}", getattr(d, name), k)
    if d.num_rollout_frames < d.num_training_frames:
        raise ConfigError(f"distill.num_rollout_frames={d.num_rollout_frames} must be at least "
                          f"distill.num_training_frames={d.num_training_frames} (the gradient window)")
    if not 0 <= d.min_exit_step < num_steps:
        raise ConfigError(f"distill.min_exit_step={d.min_exit_step} must lie in [0, {num_steps - 1}]")
    if not 0 < d.t_min < d.t_max < 1:
        raise ConfigError(f"distill.t_min={d.t_min} and t_max={d.t_max} must satisfy 0 < t_min < t_max < 1")
    if not 0 <= d.context_share <= 1:
        raise ConfigError(f"distill.context_share={d.context_share} must lie in [0, 1] (a share of DMD's samples)")
    if d.dfake_gen_update_ratio < 1:
        raise ConfigError(f"distill.dfake_gen_update_ratio={d.dfake_gen_update_ratio} must be >= 1")
    if not 0 <= d.ema_decay < 1:
        raise ConfigError(f"distill.ema_decay={d.ema_decay} must lie in [0, 1)")
    if not 0 <= d.fkl_steps <= num_steps:
        raise ConfigError(f"distill.fkl_steps={d.fkl_steps} must lie in [0, {num_steps}] (student steps)")


def check_lora(lo: LoraConfig) -> None:
    """Which modules the targets name is checked where the adapters are made (`hiar.lora.add_adapters`)."""
    if lo.rank < 0 or lo.alpha < 0:
        raise ConfigError(f"lora.rank={lo.rank} and lora.alpha={lo.alpha} must be >= 0 (rank 0: no adapters)")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout={lo.dropout} must lie in [0, 1)")
    if lo.rank and not lo.target_modules:
        raise ConfigError("lora.target_modules is empty: name the linear layers to adapt (docs/lora.md)")
    if lo.critic == "lora" and not lo.rank:
        raise ConfigError("lora.critic=lora needs adapters: set lora.rank > 0")


def check_ode(cfg: Config) -> None:
    if cfg.ode.steps < 1:
        raise ConfigError(f"ode.steps={cfg.ode.steps} must be at least 1")
    kept_indices(cfg)  # raises what to change


# -- which teacher points an ODE trajectory keeps (hiar/trajectories.py stores them) -----------------------


def aligned_indices(teacher_timesteps: torch.Tensor, student_timesteps: typing.Sequence[float]) -> list[int]:
    """For each student timestep, the index of the nearest point of the teacher's schedule."""
    grid = teacher_timesteps[:-1]  # the last point is t = 0, the output
    return [int((grid - t).abs().argmin()) for t in student_timesteps]


def kept_indices(cfg: Config) -> list[int]:
    """The teacher grid points (indices into `FlowMatching(ode.shift).sampling_timesteps(ode.steps)`) a
    trajectory keeps, one per student step: ode.keep_indices, else the rule ode.keep names. Raises a
    ConfigError saying what to change when they are not S increasing points of the grid."""
    o, s = cfg.ode, cfg.schedule
    num = len(s.denoising_steps)
    if o.keep_indices:
        indices, source = list(o.keep_indices), f"ode.keep_indices={list(o.keep_indices)}"
    elif o.keep == "uniform":
        if o.steps % num:
            low = max(num, o.steps // num * num)
            raise ConfigError(f"ode.keep=uniform keeps every (ode.steps / {num})-th teacher point, one per student "
                              f"step: ode.steps={o.steps} is not a multiple of {num}; use {low} or {low + num}, "
                              "or ode.keep=aligned")
        indices, source = [j * (o.steps // num) for j in range(num)], "ode.keep=uniform"
    else:
        grid = FlowMatching(o.shift).sampling_timesteps(o.steps)
        indices = aligned_indices(grid, s.timesteps)
        source = f"ode.keep=aligned (ode.steps={o.steps})"
    if len(indices) != num or indices[0] < 0 or indices[-1] >= o.steps or indices != sorted(set(indices)):
        raise ConfigError(f"{source} gives teacher points {indices}: a trajectory needs {num} increasing points in "
                          f"[0, {o.steps}) (one a student step; the final latent is always kept). Set "
                          f"ode.keep_indices to {num} such indices, or use more ode.steps")
    return indices


# ---------------------------------------------------------------------------------------------
# Building a dataclass tree from plain data, strictly.


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` as type `tp`, or raise a ConfigError naming `path` and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong() -> ConfigError:
        return ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return build_dataclass(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise wrong()
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """`cls(**data)` with every value checked against its field's type (and coerced where YAML's reading
    differs, e.g. "1e-6" to a float); an unknown key or a bad value is a ConfigError naming it."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` in a nested dict, checking every name against the Config schema."""
    cls: Any = Config
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key '{dotted}': no '{part}' in {where}{_closest(part, names)}")
        if i == len(parts) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
        node = node.setdefault(part, {})


def parse_override(text: str) -> tuple[str, Any]:
    """'model.num_layers=4' -> ('model.num_layers', 4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': {yaml_message(err)}; quote the value or fix its YAML") from None


def yaml_message(err: Exception) -> str:
    """One line from a YAML (or decoding) error: its problem and where, without the parser's excerpt."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem or err.context}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def preset_path(preset: str | os.PathLike) -> Path:
    """A preset name ('toy') resolves to configs/toy.yaml; anything else is a path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    named = PRESET_DIR / f"{preset}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{preset}'{_closest(str(preset), known)}; presets: {', '.join(known)}")
    return named


def config_from_dict(data: dict[str, Any]) -> Config:
    return build_dataclass(Config, data).validate()


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's data; `base: name-or-path` pulls in another preset underneath it."""
    if path in seen:
        raise ConfigError(f"{path}: 'base' presets form a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: {yaml_message(err)}; fix the file's YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    relative = path.parent / str(base)
    base_path = relative if relative.suffix in (".yaml", ".yml") and relative.is_file() else preset_path(base)
    return _merge(_read_preset(base_path, (*seen, path)), data)


def load_config(preset: str | os.PathLike = "toy", overrides: typing.Iterable[str] = ()) -> Config:
    """Preset YAML (with its `base` presets), then `key.sub=value` overrides, strictly typed and
    validated once."""
    path = preset_path(preset)
    data = _read_preset(path)
    for text in overrides:
        _set_path(data, *parse_override(text))
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def with_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """A new config: `cfg` with `key.sub=value` overrides applied, validated again (configs are frozen)."""
    data = config_to_dict(cfg)
    for text in overrides:
        _set_path(data, *parse_override(text))
    return config_from_dict(data)


def teacher_model_config(cfg: Config) -> ModelConfig:
    """The DMD teacher's sizes: the `model` section of distill.teacher_model (a preset name, or a YAML
    file from the repository root), or the student's when that is empty."""
    preset = cfg.distill.teacher_model
    if not preset:
        return cfg.model
    return load_config(repo_path(preset) if Path(preset).suffix in (".yaml", ".yml") else preset).model


def choices(section: type, name: str) -> tuple[str, ...]:
    """The values a Literal field of a config section allows, e.g. `choices(SamplingConfig, "method")`:
    a command line offers exactly what the config accepts, so an order added to the config reaches its flag."""
    tp = typing.get_type_hints(section)[name]
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{section.__name__}.{name} is not a Literal field")
    return typing.get_args(tp)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (a crash never leaves half a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return Path(path)
