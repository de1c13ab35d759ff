"""Memory planner for distillation (train/distill.py): per-GPU and per-host memory by component, a
verdict, hints when a run does not fit, and a rough time per iteration.

    python train/plan.py --config_path configs/hiar.yaml --gpus 8 --gpu_memory 80 [--gpus_per_node 8]
        [--host_memory 1000] [section.key=value ...]       # exit code 0: fits, 1: does not

`estimate(cfg, gpus, gpu_memory_gb, gpus_per_node, host_memory_gb)` -> `MemoryPlan`; `check_fits(cfg,
world_size, device_memory_bytes, gpus_per_node)` raises `ConfigError` with the table when the run
cannot fit (train/distill.py calls it before loading any weights). Capacities are GiB (2**30 bytes),
as torch reports them: an "80 GB" H100 has 79.6 GiB.

What is modelled (docs/memory.md has the formulas in words and the CPU validation):
* model states: parameter counts are exact (the Wan DiT built on the meta device; umT5-XXL from its
  architecture; LoRA adapters injected into it by peft); the generator and the critic are DeepSpeed engines (ZeRO stage and offload from the
  JSON at train.deepspeed) with a torch AdamW, in bf16 with fp32 master weights when train.bf16, laid
  out as DeepSpeed 0.19 does (`estimate_zero2/3_model_states_mem_needs`, FP16_UnfusedOptimizer at stage
  0); the frozen teacher as distill.teacher_sharding places it; the EMA in host memory of rank 0. A model
  with LoRA adapters (lora.rank > 0) holds its frozen weights as the engine places them and gradients,
  master weights and AdamW states for its adapters alone.
* activations: tensors saved for backward per token and layer, counted op by op from
  hiar/models/wan.py (bf16: 28 D bytes of float32 copies, 9 D of bf16 linear / attention inputs, the
  RMSNorms, 2 FFN hiddens; +2 D per context token of the concatenated K/V), or one block input per layer
  with activation checkpointing, plus one recomputed layer in backward; validated against
  `saved_tensors_hooks` on the CPU (tests/test_plan.py).
* KV caches: (exit step + 1) caches of the step-first wavefront, each at most the frames the block
  with the most context reads (a window of 21, blocks of 3: 18 frames), K and V per layer.
* the peak is the largest of the iteration's phases (rollout, DMD forwards, forward-KL, generator
  backward, critic rollout, critic update, optimizer step) on top of what lives throughout, plus a
  reserve for the CUDA context, NCCL and allocator fragmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

import torch

from hiar.config import Config, ConfigError, LoraConfig, ModelConfig, repo_path, teacher_model_config, with_overrides
from hiar.models.window import BlockCausalWindow
from hiar.text import UMT5_XXL

GiB = 2**30
MiB = 2**20

# Reserve on every GPU: the CUDA context, cuBLAS workspaces and NCCL buffers of DeepSpeed's process
# groups (a fixed amount), plus the caching allocator's fragmentation (a share of the modelled peak).
RESERVE_FIXED = int(2.5 * GiB)
RESERVE_FRACTION = 0.10
PROCESS_HOST_BASELINE = 3 * GiB  # host memory of one training process: Python, torch, CUDA and NCCL libraries
FLOAT32 = 4

# Sustained bf16 throughput assumed for the time estimate: ~35% of an H100 SXM's 989 TFLOP/s dense bf16
# peak, which is what this repository measured for the 1.3B model's cached forwards (docs/benchmarks.md:
# a 40 TFLOP full-window forward in 121 ms on an H100, 113 ms on an H200, PyTorch SDPA).
DEFAULT_TFLOPS = 350.0
# Per-GPU bandwidth assumed for the ZeRO-3 teacher's parameter all-gather (not overlapped: an upper bound).
ALLGATHER_GBPS = {"intra-node": 150.0, "inter-node": 40.0}

LABELS = {
    "generator.params": "generator weights",
    "generator.grads": "generator gradients",
    "generator.optimizer": "generator fp32 master + AdamW m, v",
    "critic.params": "critic weights",
    "critic.grads": "critic gradients",
    "critic.optimizer": "critic fp32 master + AdamW m, v",
    "teacher.params": "teacher weights",
    "teacher.gathered": "teacher layers gathered by ZeRO-3",
    "text_encoder": "text encoder",
    "vae": "Wan VAE (window re-encoding) + decode",
    "kv_caches": "KV caches",
    "kv_snapshot": "context K/V held for checkpoint recompute",
    "activations.rollout": "activations: rollout grad cells",
    "activations.fkl": "activations: forward-KL forward",
    "activations.critic": "activations: critic flow-matching forward",
    "forward_workspace": "forward working set (one layer)",
    "backward_workspace": "backward: recomputed layer + grads",
    "gradient_buckets": "ZeRO gradient reduction bucket",
    "optimizer_step": "optimizer step temporaries",
    "batch": "samples, prompt states, trajectories",
    "reserve": "reserve: CUDA context, NCCL, fragmentation",
    "ema": "generator EMA, fp32 (rank 0's node only)",
    "prompt_cache": "prompt-state caches",
    "teacher.offload": "teacher partitions (zero3_offload, pinned)",
    "generator.offload": "generator optimizer offload (pinned)",
    "critic.offload": "critic optimizer offload (pinned)",
    "processes": "training processes (Python, torch, CUDA libs)",
    "startup": "start-up: weights read on the host (transient)",
}


# -- sizes ------------------------------------------------------------------------------------------


def _model_key(m: ModelConfig) -> tuple:
    return tuple(dataclasses.astuple(m))


@functools.cache
def _wan_counts(key: tuple) -> tuple[int, int, tuple[int, ...]]:
    from hiar.models import WanModel

    with torch.device("meta"):
        model = WanModel(ModelConfig(*key))
    numels = tuple(p.numel() for p in model.parameters())
    largest_module = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    return sum(numels), largest_module, numels


@dataclass(frozen=True)
class Arch:
    """What the formulas need of a Wan DiT: its sizes and exact parameter count."""

    dim: int
    ffn: int
    heads: int
    head_dim: int
    layers: int
    text_dim: int
    text_len: int
    freq_dim: int
    in_channels: int
    out_channels: int
    patch: int  # pixels of a latent frame a token covers (ph x pw)
    params: int
    largest_module: int  # parameters of the largest module (its own, not its children's): a Linear
    numels: tuple[int, ...]

    @classmethod
    def of(cls, m: ModelConfig) -> Arch:
        params, largest, numels = _wan_counts(_model_key(m))
        return cls(m.dim, m.ffn_dim, m.num_heads, m.head_dim, m.num_layers, m.text_dim, m.text_len, m.freq_dim,
                   m.in_channels, m.out_channels, m.patch_size[1] * m.patch_size[2], params, largest, numels)

    def persistent(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps whole on every GPU (numel <= stage3_param_persistence_threshold)."""
        return sum(n for n in self.numels if n <= threshold)


@functools.cache
def adapter_numels(m: ModelConfig, lora: LoraConfig) -> tuple[int, ...]:
    """Sizes of the LoRA adapter tensors (A and B of every adapted layer) `lora` puts on a Wan DiT of
    sizes `m`: injected by peft into the model built on the meta device, as training injects them."""
    if not lora.rank:
        return ()
    from hiar import lora as adapters
    from hiar.models import WanModel

    with torch.device("meta"):
        model = adapters.add_adapters(WanModel(m), lora)
    return tuple(p.numel() for p in model.parameters() if p.requires_grad)


@functools.cache
def text_encoder_parameters(name: str) -> int:
    """Exact parameter count of a text encoder, from its architecture on the meta device: umT5-XXL's
    encoder as Wan2.1 uses it (d_model 4096, 24 layers, d_ff 10240, 64 heads of 64, vocab 256384,
    gated-gelu, relative attention bias in every layer; shared and encoder embeddings tied), or
    all-MiniLM-L6-v2 (BERT: 384 wide, 6 layers, 12 heads, FFN 1536, vocab 30522, with the pooler)."""
    import transformers

    with torch.device("meta"):
        if name == "umt5-xxl":
            model = transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5_XXL))
        elif name == "all-minilm-l6-v2":
            config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                             num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)
            model = transformers.BertModel(config)
        else:
            raise ValueError(f"unknown text encoder {name!r}")
    return sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once


@functools.cache
def vae_parameters() -> int:
    """Wan2.1's VAE (diffusers' AutoencoderKLWan, default configuration), counted on the meta device."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKLWan().parameters())


# -- DeepSpeed --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepSpeedSetup:
    """The parts of a DeepSpeed JSON that decide memory, with DeepSpeed 0.19's defaults."""

    path: str
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = 500_000_000  # elements
    overlap_comm: bool = False  # DeepSpeed's default: on for stage 3 only
    prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters
    param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold

    @classmethod
    def read(cls, path: str) -> DeepSpeedSetup:
        p = repo_path(path)
        if not p.is_file():
            raise ConfigError(f"train.deepspeed={path} does not exist")
        z = json.loads(p.read_text()).get("zero_optimization", {})
        stage = int(z.get("stage", 0))

        def device(key: str) -> bool:
            return str((z.get(key) or {}).get("device", "none")) in ("cpu", "nvme")

        return cls(path, stage, device("offload_optimizer"), device("offload_param"),
                   int(float(z.get("reduce_bucket_size", 5e8))), bool(z.get("overlap_comm", stage == 3)),
                   int(float(z.get("stage3_prefetch_bucket_size", 5e7))),
                   int(float(z.get("stage3_max_live_parameters", 1e9))),
                   int(float(z.get("stage3_param_persistence_threshold", 1e5))))


def engine_memory(params: int, arch: Arch, ds: DeepSpeedSetup, world: int, bf16: bool,
                  adapters: tuple[int, ...] = ()) -> dict[str, dict[str, int]]:
    """Bytes of one trained model's DeepSpeed engine (torch AdamW) per GPU and per rank on the host:
    {"gpu": {params, grads, optimizer}, "host": {optimizer}, "backward": {...}, "step": {...}}.
    `adapters`: sizes of LoRA adapter tensors (`adapter_numels`): the `params` are then frozen, the
    weights count both, and everything the optimizer adds (gradients, master weights, AdamW states,
    their partitions and step temporaries) the adapters alone. ZeRO-3 partitions the frozen weights too.

    bf16 weights p = 2 bytes, else 4. As DeepSpeed's estimators (stage_1_and_2.py / stage3.py
    `estimate_zero*_model_states_mem_needs`: 2 + 18 / N bytes a parameter at ZeRO-2, 18 = 2 bf16
    gradient partition + 4 fp32 gradient partition + 4 fp32 master + 8 AdamW m and v):
    * stage 0 (FP16_UnfusedOptimizer with bf16): p params + p grads + 4 master + 8 AdamW on every GPU,
      fp32 master gradients (4) made only for the step; without bf16 torch AdamW steps the fp32 params.
    * stage 1: p params, p grads (whole), (4 + 4 + 8) / N; stage 2: p params, (p + 4 + 8 + 4) / N.
    * stage 3: (p + 4 + 4 + 8) / N plus the small parameters kept whole; gathered layers while they run.
    * offload_optimizer: the fp32 partitions (gradients, master, m, v) in pinned host memory.
    Transients: the gradient reduction bucket during backward (reduce_bucket_size elements of p bytes,
    twice with overlap_comm; stage 0 flattens gradients for its all-reduce in buckets of up to 5e8
    elements at the end of backward), and AdamW's foreach temporaries at the step (one fp32 copy of what
    it updates, sqrt(v))."""
    p = 2 if bf16 else 4
    n = world
    gpu: dict[str, int] = {}
    host: dict[str, int] = {}
    step: dict[str, int] = {}
    backward: dict[str, int] = {}
    trained, weights = (sum(adapters), params + sum(adapters)) if adapters else (params, params)
    master = 4 if bf16 else 0  # stage 0 without bf16 steps the fp32 parameters themselves
    if ds.stage == 0:
        gpu["params"], gpu["grads"] = p * weights, p * trained
        gpu["optimizer"] = (master + 8) * trained
        step["master_grads"] = 4 * trained if bf16 else 0
        step["adam"] = 4 * trained
        step["allreduce_buffer"] = p * min(trained, 500_000_000)
        return {"gpu": gpu, "host": host, "backward": backward, "step": step}
    threshold = ds.param_persistence_threshold
    persistent = arch.persistent(threshold) + sum(a for a in adapters if a <= threshold) if ds.stage == 3 else 0
    shard = -(-trained // n)
    weight_shard = -(-weights // n)
    fp32_parts = (4 + 4 + 8) * shard  # fp32 gradient partition, master weights, AdamW m and v
    gpu["params"] = p * weights if ds.stage < 3 else p * (weight_shard + persistent)
    if ds.stage == 3 and ds.offload_param:
        host["params"] = p * weight_shard
        gpu["params"] = p * persistent
    gpu["grads"] = p * trained if ds.stage == 1 else p * shard if ds.stage == 2 else 0
    if ds.offload_optimizer:
        host["optimizer"] = fp32_parts
        gpu["optimizer"] = 0
    else:
        gpu["grads"] += 4 * shard
        gpu["optimizer"] = 12 * shard
        step["adam"] = 4 * shard
    backward["bucket"] = p * ds.reduce_bucket_size * (2 if ds.overlap_comm else 1)
    if ds.stage == 3:
        backward["gathered"] = p * min(ds.max_live_parameters, arch.largest_module + ds.prefetch_bucket_size)
    return {"gpu": gpu, "host": host, "backward": backward, "step": step}


# -- activations --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """Bytes that one forward of a Wan DiT keeps or briefly holds, per token, from hiar/models/wan.py.

    `act`: bytes of the activations (2 in bf16, 4 in float32); the norms, modulation and gates run in
    float32 whatever `act` is. `fused_rms`: RMSNorm saves its input and rstd (CUDA's _fused_rms_norm,
    what torch.rms_norm dispatches to on GPUs) instead of the float32 upcast and normalised copies of
    the composite kernel that runs on the CPU.
    """

    arch: Arch
    act: int
    fused_rms: bool = True

    @property
    def _copy(self) -> int:
        """Bytes of an `x.float()` copy per element: none when the activations are float32 already."""
        return FLOAT32 if self.act < FLOAT32 else 0

    def layer_saved_per_token(self) -> float:
        """Saved for backward by one transformer block, per query token (no context):
        * float32, 7 x 4 D: norm1's input copy and output, the self-attention branch before its gate,
          norm2's input copy, norm3's input copy and output, the FFN branch before its gate
          (in float32 these are the block input and tensors of their own: still 4 D each);
        * act, 9 x D: the input of q/k/v, SDPA's q, k, v and output, the cross-attention's query input,
          its SDPA q and output, the FFN input;
        * RMSNorms of q, k and the cross-attention's q: act x D each (fused), or 2 x 4 D (composite);
        * the FFN hidden before and after GELU: 2 x act x ffn; SDPA's log-sum-exp: 4 bytes a head, twice.
        """
        a, d = self.arch, self.arch.dim
        rms = 3 * (self.act * d + 4) if self.fused_rms else 3 * 2 * FLOAT32 * d
        return 7 * FLOAT32 * d + 9 * self.act * d + rms + 2 * self.act * a.ffn + 2 * 4 * a.heads

    def context_saved_per_token(self) -> int:
        """Per context token and layer: SDPA saves the concatenated [context | block] K and V."""
        return 2 * self.act * self.arch.dim

    def frame_saved_per_layer(self) -> int:
        """Per latent frame and layer: the float32 modulation table the gates and scales are views of."""
        return (6 + 2) * FLOAT32 * self.arch.dim

    def head_saved_per_token(self) -> int:
        """Saved (or kept by the checkpointed blocks) outside the blocks by every forward, per token: the
        patch embedding's input, RoPE's cos and sin (float32, head_dim / 2 each), the output norm's
        float32 input and output and the projection's input, and the loss's float64 difference on the
        output's pixels (x0 - target, squared)."""
        a = self.arch
        pixels = a.patch * a.out_channels
        return a.in_channels * a.patch * self.act + 4 * a.head_dim + (2 * FLOAT32 + self.act) * a.dim + pixels * 8

    def output_saved(self, tokens: int) -> int:
        """The part of `head_saved_per_token` saved after the last block (the output norm, projection and
        loss), which a forward saves after its last block's working set is freed and backward frees
        before it recomputes a block (one sample)."""
        a = self.arch
        return tokens * ((2 * FLOAT32 + self.act) * a.dim + 8 * a.patch * a.out_channels)

    def frame_saved_per_forward(self, checkpointing: bool) -> int:
        """Per latent frame, once a forward: the timestep embedding's saved inputs (the sinusoid, the MLP's
        hidden, SiLU's), the output head's float32 scale; with checkpointing also the per-frame
        modulation, which every checkpointed block holds as an argument."""
        a = self.arch
        return a.freq_dim * self.act + 4 * self.act * a.dim + FLOAT32 * a.dim + (6 * self.act * a.dim if checkpointing else 0)

    def prompt_saved(self) -> int:
        """A prompt built with grad (`WanModel.prompt`, one sample): the text embedder's input, hidden
        (before and after GELU) and output (the K/V projections' input), per layer the cross-attention's
        K (RMS-normed) and V and what norm_k keeps."""
        a = self.arch
        rms = self.act * a.dim if self.fused_rms else 2 * FLOAT32 * a.dim
        return a.text_len * (a.text_dim * self.act + 3 * a.dim * self.act + a.layers * (2 * self.act * a.dim + rms))

    def prompt_kv(self) -> int:
        """A prompt's cross-attention K and V for every layer (one sample), alive through a forward."""
        a = self.arch
        return a.text_len * a.layers * 2 * self.act * a.dim

    def forward_saved(self, tokens: int, frames: int, context_tokens: int = 0, checkpointing: bool = False,
                      groups: bool = False) -> int:
        """Bytes one forward with grad keeps for backward (one sample): every layer's saved tensors, or
        with activation checkpointing every block's input (act x D a token), plus the head's.
        `groups`: block-causal attention run as one SDPA call per block, whose outputs are concatenated
        (one more act x D a token and layer)."""
        a = self.arch
        if checkpointing:
            per_layer = tokens * self.act * a.dim
        else:
            per_layer = tokens * (self.layer_saved_per_token() + (self.act * a.dim if groups else 0)) \
                + context_tokens * self.context_saved_per_token() + frames * self.frame_saved_per_layer()
        return int(a.layers * per_layer + tokens * self.head_saved_per_token()
                   + frames * self.frame_saved_per_forward(checkpointing))

    def recompute(self, tokens: int, frames: int, context_tokens: int = 0, checkpointing: bool = True,
                  groups: bool = False) -> int:
        """Backward's working set above what the forward kept: with checkpointing one block recomputed
        (its saved tensors) plus the gradient of its FFN hidden; without, the larger of the gradients in
        flight in a layer (the FFN hidden's and a float32 residual's) and in the loss (float64 pixels)."""
        a = self.arch
        ffn_grad = tokens * self.act * a.ffn
        if not checkpointing:
            return tokens * max(self.act * a.ffn + FLOAT32 * a.dim, 4 * 8 * a.patch * a.out_channels)
        layers = self.forward_saved(tokens, frames, context_tokens, False, groups) - tokens * self.head_saved_per_token() \
            - frames * self.frame_saved_per_forward(False)
        return layers // a.layers + ffn_grad

    def workspace(self, tokens: int, context_tokens: int = 0) -> int:
        """Peak of one block's forward without saved tensors (no grad, or a checkpointed block) above its
        input, per sample: the largest of
        * RoPE of the keys (`q, k = apply_rope(q), apply_rope(k)` holds the old and rotated q): h, q,
          q rotated, k, v, the residual's float32 copy (taken before the attention runs) and RoPE's
          float32 temporaries (12 D in bf16, 8 D in float32);
        * the FFN: h, the residual's float32 copy, the hidden before and after GELU;
        * attention over a cached context: h, q, k, v, the concatenated [context | block] K and V, output."""
        a, d = self.arch, self.arch.dim
        rope_tmp = 12 * d if self.act < FLOAT32 else 8 * d
        rope = tokens * (5 * self.act * d + self._copy * d + rope_tmp)
        ffn = tokens * ((self.act + self._copy) * d + 2 * self.act * a.ffn)
        attention = tokens * (5 * self.act * d + self._copy * d) + 2 * self.act * d * (context_tokens + tokens) \
            if context_tokens else 0
        return max(rope, ffn, attention)

    def forward_peak(self, tokens: int, context_tokens: int = 0) -> int:
        """Peak of a forward without grad (one sample): the residual stream, RoPE's cos and sin, the
        prompt's K/V for every layer, and one block's working set."""
        a = self.arch
        return tokens * (self.act * a.dim + 4 * a.head_dim) + self.prompt_kv() + self.workspace(tokens, context_tokens)


# -- the rollout's geometry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """Block bookkeeping of a self-rollout (hiar.distill.self_rollout), the longest one drawn."""

    blocks: int  # rollout blocks
    k: int  # frames per block
    grad_blocks: tuple[int, ...]  # blocks whose exit-step cell runs with grad
    context: tuple[tuple[int, ...], ...]  # per block, the earlier blocks whose K/V it reads

    @classmethod
    def of(cls, cfg: Config, blocks: int | None = None) -> Rollout:
        d, k = cfg.distill, cfg.video.frames_per_block
        nb = blocks or d.num_rollout_frames // k
        window = BlockCausalWindow.from_config(cfg.video)
        first = nb - d.num_training_frames // k
        skip = 1 if nb > d.num_training_frames // k and d.window_start == "reencode" else 0
        context = tuple(tuple(sorted({f // k for f in window.context_frames(n * k, n * k + k)})) for n in range(nb))
        return cls(nb, k, tuple(range(first + skip, nb)), context)

    @property
    def held_frames(self) -> int:
        """Most frames one cache holds: the blocks the reader with the most context sees (a cache
        holds a block's frames in one storage, so a partly visible block counts whole)."""
        return max((len(c) for c in self.context), default=0) * self.k

    @property
    def snapshot_frames(self) -> int:
        """Frames the grad cells' forwards keep referenced until backward (checkpoint recompute)."""
        return len(set().union(*(self.context[n] for n in self.grad_blocks))) * self.k if self.grad_blocks else 0


def cache_count(cfg: Config, exit: int) -> int:
    """Live KV caches of a rollout stopping at step `exit`: one (block-first), else one per step level
    up to the exit step (hybrid: the frame-first blocks' frames shared by all, counted in each)."""
    return 1 if cfg.sampling.method == "frame_first" else exit + 1


def kv_frame_bytes(arch: Arch, tokens_per_frame: int, act: int) -> int:
    """K and V of one latent frame in every layer, one sample."""
    return arch.layers * tokens_per_frame * 2 * arch.dim * act


def rollout_kv_bytes(cfg: Config, arch: Arch, act: int, exit: int, batch: int = 1) -> int:
    """Most bytes the rollout's KV caches hold at once."""
    r = Rollout.of(cfg)
    return cache_count(cfg, exit) * r.held_frames * kv_frame_bytes(arch, cfg.geometry.tokens_per_frame, act) * batch


def rollout_saved_bytes(cfg: Config, acts: Activations, checkpointing: bool, batch: int = 1) -> int:
    """Saved for backward by a rollout with grad: its grad cells (k frames each, reading their context)
    and the prompt, built once with grad. The context K/V the checkpointed cells keep referenced are
    `kv_snapshot_bytes`."""
    r, tpf = Rollout.of(cfg), cfg.geometry.tokens_per_frame
    cells = sum(acts.forward_saved(r.k * tpf, r.k, len(r.context[n]) * r.k * tpf, checkpointing) for n in r.grad_blocks)
    return batch * (cells + acts.prompt_saved())


def kv_snapshot_bytes(cfg: Config, arch: Arch, act: int, checkpointing: bool, batch: int = 1) -> int:
    """Context frames the checkpointed grad cells keep alive until backward (their recompute reads the
    same K/V, `SelfAttentionContext`); none without checkpointing (SDPA's saved copies hold them)."""
    if not checkpointing:
        return 0
    return Rollout.of(cfg).snapshot_frames * kv_frame_bytes(arch, cfg.geometry.tokens_per_frame, act) * batch


def fkl_saved_bytes(cfg: Config, acts: Activations, checkpointing: bool, batch: int = 1) -> int:
    """The forward-KL term: distill.fkl_steps forwards with grad over the window (kept until backward)."""
    d, tpf = cfg.distill, cfg.geometry.tokens_per_frame
    if d.fkl_weight <= 0 or d.fkl_steps == 0:
        return 0
    groups = d.fkl_attention == "block_causal"
    one = acts.forward_saved(d.num_training_frames * tpf, d.num_training_frames, 0, checkpointing, groups)
    return batch * d.fkl_steps * (one + acts.prompt_saved())


# -- the plan -------------------------------------------------------------------------------------------


@dataclass
class TimeEstimate:
    flops_per_iteration: float  # one training step (accumulation micro-steps of the critic, 1 / ratio of the generator)
    seconds_per_iteration: float
    tflops: float
    breakdown: dict[str, float]  # FLOPs per iteration by part
    allgather_seconds: float  # ZeRO-3 teacher all-gathers per iteration at the assumed bandwidth (0: none)


@dataclass
class MemoryPlan:
    per_gpu: dict[str, int]  # bytes at the peak, by component (sums to the per-GPU total)
    per_host: dict[str, int]  # bytes on the busiest host (rank 0's node), by component
    fits: bool
    gpu_capacity: int
    host_capacity: int | None
    peak_phase: str
    phases: dict[str, dict[str, int]]  # transient bytes of every phase, by component
    setup: dict[str, str]  # what the plan is for, in words
    assumptions: list[str]
    hints: list[str] = field(default_factory=list)
    time: TimeEstimate | None = None

    @property
    def gpu_total(self) -> int:
        return sum(self.per_gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.per_host.values())

    def verdict(self) -> str:
        g = f"{self.gpu_total / GiB:.1f} of {self.gpu_capacity / GiB:.1f} GiB per GPU"
        h = f"; host {self.host_total / GiB:.0f} of {self.host_capacity / GiB:.0f} GiB" if self.host_capacity else ""
        if self.fits:
            return f"FITS: {g} ({(self.gpu_capacity - self.gpu_total) / GiB:.1f} GiB spare){h}"
        over = [] if self.gpu_total <= self.gpu_capacity else [f"{(self.gpu_total - self.gpu_capacity) / GiB:.1f} GiB over per GPU"]
        if self.host_capacity and self.host_total > self.host_capacity:
            over.append(f"{(self.host_total - self.host_capacity) / GiB:.0f} GiB over on the host")
        return f"DOES NOT FIT: {g}{h} ({', '.join(over)})"

    def table(self) -> str:
        width = 52
        lines = [f"memory plan: {self.setup['title']}"]
        lines += [f"  {key}: {value}" for key, value in self.setup.items() if key != "title"]
        lines.append(f"per GPU, at the peak phase ({self.peak_phase})".ljust(width) + "     GiB")
        for key, value in self.per_gpu.items():
            lines.append(f"  {LABELS.get(key, key)}".ljust(width) + f"{value / GiB:8.2f}")
        lines.append("  " + "-" * (width + 6))
        lines.append("  total".ljust(width) + f"{self.gpu_total / GiB:8.2f}")
        lines.append("  capacity".ljust(width) + f"{self.gpu_capacity / GiB:8.2f}")
        lines.append("transient per phase, GiB (on top of the weights and optimizer states):")
        for name, parts in self.phases.items():
            detail = ", ".join(f"{LABELS.get(k, k).split(':')[-1].strip()} {v / GiB:.2f}" for k, v in parts.items() if v)
            lines.append(f"  {name:<22} {sum(parts.values()) / GiB:7.2f}  ({detail})")
        lines.append("per host (rank 0's node, which also holds the EMA)".ljust(width) + "     GiB")
        for key, value in self.per_host.items():
            lines.append(f"  {LABELS.get(key, key)}".ljust(width) + f"{value / GiB:8.1f}")
        lines.append("  total".ljust(width) + f"{self.host_total / GiB:8.1f}")
        if self.host_capacity:
            lines.append("  capacity".ljust(width) + f"{self.host_capacity / GiB:8.1f}")
        if self.time is not None:
            tm = self.time
            parts = ", ".join(f"{k} {v / 1e15:.2f}" for k, v in tm.breakdown.items())
            lines.append(f"time per iteration (an estimate, not a measurement): ~{tm.seconds_per_iteration:.1f} s "
                         f"= {tm.flops_per_iteration / 1e15:.1f} PFLOP / {tm.tflops:.0f} TFLOP/s sustained bf16")
            lines.append(f"  PFLOP per iteration: {parts}")
            if tm.allgather_seconds:
                lines.append(f"  + up to {tm.allgather_seconds:.1f} s of ZeRO-3 teacher all-gathers if not overlapped")
        lines.append("assumptions:")
        lines += [f"  - {a}" for a in self.assumptions]
        if self.hints:
            lines.append("to make it fit:")
            lines += [f"  - {h}" for h in self.hints]
        lines.append(self.verdict())
        return "\n".join(lines)


def _dtype_bytes(cfg: Config, device: str) -> int:
    """Bytes per element of runtime.dtype on `device` ('auto': bf16 on CUDA, float32 on the CPU)."""
    if cfg.runtime.dtype == "auto":
        return 2 if device == "cuda" else 4
    return 4 if cfg.runtime.dtype == "float32" else 2


def _expected(values: list[float]) -> float:
    return sum(values) / len(values)


def forward_flops(arch: Arch, queries: int, keys: list[tuple[int, int]], with_prompt: bool = True) -> float:
    """FLOPs of one forward for one sample: the linear layers (2 per multiply-add), self-attention over
    `keys` ((query tokens, key tokens) per SDPA call: QK^T and AV, 4 q k D), cross-attention over the
    prompt, and with `with_prompt` the prompt's embedding and K/V projections."""
    a = arch
    d = a.dim
    linear = 2 * queries * a.layers * (6 * d * d + 2 * d * a.ffn) + 2 * queries * d * a.patch * (a.in_channels + a.out_channels)
    self_attention = 4 * d * a.layers * sum(q * k for q, k in keys)
    cross = 4 * queries * a.text_len * d * a.layers
    prompt = 2 * a.text_len * (a.text_dim * d + d * d + a.layers * 2 * d * d) if with_prompt else 0
    return float(linear + self_attention + cross + prompt)


def _rollout_flops(cfg: Config, arch: Arch, blocks: int, exit: int) -> tuple[float, float]:
    """(FLOPs of a rollout's forwards, FLOPs of its grad cells' forwards) for one sample."""
    r, tpf = Rollout.of(cfg, blocks), cfg.geometry.tokens_per_frame
    q = r.k * tpf
    cell = [forward_flops(arch, q, [(q, (len(r.context[n]) * r.k + r.k) * tpf)], False) for n in range(r.blocks)]
    forwards = (exit + 1) * (sum(cell) + sum(cell[:-1]))  # denoise every block at steps 0..e, writes but the last's
    prompt = forward_flops(arch, 0, [], True)
    return forwards + prompt, sum(cell[n] for n in r.grad_blocks)


def time_estimate(cfg: Config, gpus: int, gpus_per_node: int, tflops: float = DEFAULT_TFLOPS) -> TimeEstimate:
    """Model FLOPs of one training step (accumulation micro-steps of each update) over a sustained
    throughput. Forwards counted: the rollout's cells up to the exit step and its cache writes (expected
    over the uniform exit-step and rollout-length draws), the teacher's CFG forward and the critic's
    in the DMD loss, the forward-KL forwards, the critic's update; backward = 2 x the forward of the
    parts with grad, plus one more forward of them with activation checkpointing (the recompute)."""
    d, t, k = cfg.distill, cfg.train, cfg.video.frames_per_block
    student, teacher = Arch.of(cfg.model), Arch.of(teacher_model_config(cfg))
    tpf, b = cfg.geometry.tokens_per_frame, t.batch_size
    steps = len(cfg.schedule.denoising_steps)
    exits = list(range(d.min_exit_step, steps))
    low, high = d.num_training_frames // k, d.num_rollout_frames // k
    lengths = [high] if d.rollout_length == "max" else list(range(low, high + 1))
    grad_factor = 3 + (1 if t.gradient_checkpointing else 0)  # forward + 2 x backward (+ recompute)
    roll = [[_rollout_flops(cfg, student, n, e) for n in lengths] for e in exits]
    rollout = _expected([_expected([f for f, _ in row]) for row in roll])
    grad_cells = _expected([_expected([g for _, g in row]) for row in roll])
    window = d.num_training_frames * tpf
    full = [(window, window)]
    teacher_cfg = forward_flops(teacher, window, full) * 2  # the batched CFG forward: text and negative
    critic_fwd = forward_flops(student, window, full)
    if d.fkl_attention == "block_causal":
        fkl_keys = [(k * tpf, (n + 1) * k * tpf) for n in range(d.num_training_frames // k)]
    else:
        fkl_keys = full
    fkl = d.fkl_steps * forward_flops(student, window, fkl_keys) if d.fkl_weight > 0 else 0.0
    accumulation = max(1, (t.total_batch_size or t.batch_size * gpus) // (t.batch_size * gpus))
    ratio = d.dfake_gen_update_ratio
    parts = {
        "generator rollout": b * (rollout + (grad_factor - 1) * grad_cells) / ratio,
        "DMD teacher CFG": b * teacher_cfg / ratio,
        "DMD critic": b * critic_fwd / ratio,
        "forward-KL": b * grad_factor * fkl / ratio,
        "critic rollout": b * rollout,
        "critic update": b * grad_factor * critic_fwd,
    }
    parts = {key: value * accumulation for key, value in parts.items()}
    total = sum(parts.values())
    gather = 0.0
    if d.teacher_sharding != "replicated" and gpus > 1:
        link = "intra-node" if gpus <= gpus_per_node else "inter-node"
        p = 2 if t.bf16 else 4
        per_forward = p * teacher.params * (gpus - 1) / gpus / (ALLGATHER_GBPS[link] * 1e9)
        gather = per_forward * accumulation / ratio
    return TimeEstimate(total, total / (tflops * 1e12), tflops, parts, gather)


def estimate(cfg: Config, gpus: int, gpu_memory_gb: float, gpus_per_node: int = 8,
             host_memory_gb: float | None = None, *, tflops: float = DEFAULT_TFLOPS, hints: bool = True,
             fused_rms: bool = True) -> MemoryPlan:
    """The memory plan of train/distill.py for `cfg` on `gpus` GPUs of `gpu_memory_gb` GiB,
    `gpus_per_node` a host (whose memory, `host_memory_gb` GiB, is checked when given). `fused_rms`:
    RMSNorm saves as CUDA's fused kernel does (False: as the CPU's composite one, for validation)."""
    if gpus < 1 or gpus_per_node < 1:
        raise ConfigError(f"gpus={gpus} and gpus_per_node={gpus_per_node} must be at least 1")
    d, t, geo = cfg.distill, cfg.train, cfg.geometry
    ds = DeepSpeedSetup.read(t.deepspeed)
    bf16, ckpt, b = t.bf16, t.gradient_checkpointing, t.batch_size
    act = 2 if bf16 else 4
    student, teacher = Arch.of(cfg.model), Arch.of(teacher_model_config(cfg))
    s_acts, t_acts = Activations(student, act, fused_rms), Activations(teacher, act, fused_rms)
    tpf, k = geo.tokens_per_frame, cfg.video.frames_per_block
    steps = len(cfg.schedule.denoising_steps)
    worst_exit = steps - 1
    ranks_here = min(gpus, gpus_per_node)
    nodes = -(-gpus // gpus_per_node)
    r = Rollout.of(cfg)

    # -- what lives throughout -------------------------------------------------------------------
    per_gpu: dict[str, int] = {}
    per_host: dict[str, int] = {}
    lora = {"generator": adapter_numels(cfg.model, cfg.lora),
            "critic": adapter_numels(cfg.model, cfg.lora) if cfg.lora.critic == "lora" else ()}
    engines = {name: engine_memory(student.params, student, ds, gpus, bf16, lora[name]) for name in lora}
    for name, e in engines.items():
        for part, value in e["gpu"].items():
            per_gpu[f"{name}.{part}"] = value
    teacher_p = 2 if bf16 else 4
    shard = -(-teacher.params // gpus)
    persistent = teacher.persistent(ds.param_persistence_threshold)
    gathered = teacher_p * min(ds.max_live_parameters, teacher.largest_module + ds.prefetch_bucket_size)
    if d.teacher_sharding == "replicated":
        per_gpu["teacher.params"] = teacher_p * teacher.params
        gathered = 0
    elif d.teacher_sharding == "zero3":
        per_gpu["teacher.params"] = teacher_p * (shard + persistent)
    else:
        per_gpu["teacher.params"] = teacher_p * persistent
        per_host["teacher.offload"] = teacher_p * shard * ranks_here
    te_params = text_encoder_parameters(cfg.model.text_encoder)
    te_gpu_bytes = 4 if cfg.model.text_encoder == "all-minilm-l6-v2" else _dtype_bytes(cfg, "cuda")
    te_host_bytes = 4 if cfg.model.text_encoder == "all-minilm-l6-v2" else _dtype_bytes(cfg, "cpu")
    if cfg.runtime.offload_text_encoder:
        per_host["text_encoder"] = te_params * te_host_bytes * ranks_here
    else:
        per_gpu["text_encoder"] = te_params * te_gpu_bytes
    reencode = d.num_rollout_frames > d.num_training_frames and d.window_start == "reencode" \
        and cfg.video.codec == "wan_vae"
    if reencode:
        # weights, plus a rough decode working set: a few full-resolution 4-frame feature maps of the
        # decoder's widest full-resolution stage (96 channels), not validated
        per_gpu["vae"] = vae_parameters() * _dtype_bytes(cfg, "cuda") \
            + 8 * 4 * cfg.video.height * cfg.video.width * 96 * _dtype_bytes(cfg, "cuda") * b

    # -- the phases of an iteration ----------------------------------------------------------------
    window_tokens = d.num_training_frames * tpf
    kv = rollout_kv_bytes(cfg, student, act, worst_exit, b)
    roll_saved = rollout_saved_bytes(cfg, s_acts, ckpt, b)
    snapshot = kv_snapshot_bytes(cfg, student, act, ckpt, b)
    fkl = fkl_saved_bytes(cfg, s_acts, ckpt, b)
    critic_saved = b * (s_acts.forward_saved(window_tokens, d.num_training_frames, 0, ckpt) + s_acts.prompt_saved())
    cell_tokens = k * tpf
    max_ctx = max((len(c) for c in r.context), default=0) * k * tpf
    cell_ws = b * s_acts.workspace(cell_tokens, max_ctx) + b * s_acts.prompt_kv()
    sample = 4 * d.num_training_frames * cfg.model.in_channels * geo.latent_height * geo.latent_width * b
    prompts = 2 * b * cfg.model.text_len * cfg.model.text_dim * te_gpu_bytes  # the batch's and the negative prompt
    trajectories = (steps + 1) * sample if d.fkl_weight > 0 else 0
    grad_cell_recompute = max((s_acts.recompute(cell_tokens, k, len(r.context[n]) * k * tpf, ckpt) for n in r.grad_blocks),
                              default=0)
    window_recompute = s_acts.recompute(window_tokens, d.num_training_frames, 0, ckpt,
                                        d.fkl_attention == "block_causal")
    gen_backward = engines["generator"]["backward"]
    crit_backward = engines["critic"]["backward"]
    # A forward's output head is saved after its last block's working set is freed, and backward frees
    # it before recomputing a block: those phases hold "saved - output + max(working set, output)".
    fkl_out = b * s_acts.output_saved(window_tokens) if fkl else 0
    window_ws = b * (s_acts.workspace(window_tokens) + s_acts.prompt_kv())
    critic_out = b * s_acts.output_saved(window_tokens)
    critic_recompute = b * s_acts.recompute(window_tokens, d.num_training_frames, 0, ckpt)
    phases: dict[str, dict[str, int]] = {
        "generator rollout": {"kv_caches": kv, "activations.rollout": roll_saved, "forward_workspace": cell_ws,
                              "batch": prompts},
        "DMD forwards": {"activations.rollout": roll_saved, "kv_snapshot": snapshot,
                         "forward_workspace": max(2 * b * t_acts.forward_peak(window_tokens),
                                                  b * s_acts.forward_peak(window_tokens)),
                         "teacher.gathered": gathered, "batch": prompts + sample * 3},
        "forward-KL": {"activations.rollout": roll_saved, "kv_snapshot": snapshot, "activations.fkl": fkl - fkl_out,
                       "forward_workspace": max(window_ws, fkl_out), "batch": prompts + sample + trajectories},
        "generator backward": {"activations.rollout": roll_saved, "kv_snapshot": snapshot,
                               "activations.fkl": fkl - fkl_out,
                               "backward_workspace": b * window_recompute if fkl else b * grad_cell_recompute,
                               "gradient_buckets": gen_backward.get("bucket", 0) + gen_backward.get("gathered", 0),
                               "batch": prompts + sample + trajectories},
        "critic rollout": {"kv_caches": kv, "forward_workspace": cell_ws, "batch": prompts},
        "critic update": {"activations.critic": critic_saved - critic_out,
                          "backward_workspace": max(critic_recompute, window_ws, critic_out),
                          "gradient_buckets": crit_backward.get("bucket", 0) + crit_backward.get("gathered", 0),
                          "batch": prompts + sample},
        "optimizer step": {"optimizer_step": max(sum(e["step"].values()) for e in engines.values())},
    }
    if not fkl:
        del phases["forward-KL"]
    elif b * grad_cell_recompute > b * window_recompute + fkl - fkl_out:
        # the rollout's own backward (after the forward-KL graph is gone) can be the larger
        phases["generator backward"]["activations.fkl"] = 0
        phases["generator backward"]["backward_workspace"] = b * grad_cell_recompute
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    per_gpu.update({key: value for key, value in phases[peak_phase].items() if value})
    modelled = sum(per_gpu.values())
    per_gpu["reserve"] = RESERVE_FIXED + int(RESERVE_FRACTION * modelled)

    # -- the host ------------------------------------------------------------------------------------
    for name, e in engines.items():
        offload = sum(e["host"].values())
        if offload:
            per_host[f"{name}.offload"] = offload * ranks_here
    # a LoRA generator's EMA: the averaged adapter and the frozen base it rebuilds the model from
    per_host["ema"] = 4 * (student.params + sum(lora["generator"]))
    per_host["prompt_cache"] = t.prompt_cache_mb * MiB * ranks_here
    per_host["processes"] = PROCESS_HOST_BASELINE * ranks_here
    # train/distill.py reads the generator and critic in float32 (load_generator's default) and the
    # teacher in its training precision on every rank before placing them; later the text encoder is
    # built on the host (umT5 from Wan's bf16 file into a float32 model first). Gone once placed.
    weights = 2 * 4 * student.params + teacher_p * teacher.params
    text_load = te_params * (4 + 2) if cfg.model.text_encoder == "umt5-xxl" else te_params * 4
    per_host["startup"] = max(weights, text_load) * ranks_here

    capacity = int(gpu_memory_gb * GiB)
    host_capacity = int(host_memory_gb * GiB) if host_memory_gb else None
    fits = sum(per_gpu.values()) <= capacity and (host_capacity is None or sum(per_host.values()) <= host_capacity)

    accumulation = (t.total_batch_size or b * gpus) / (b * gpus)
    teacher_name = d.teacher_model or "the student's"
    setup = {
        "title": f"distillation on {gpus} GPU(s), {ranks_here} a node ({nodes} node(s)), {gpu_memory_gb:g} GiB each",
        "models": f"generator and critic {student.params / 1e9:.3f} B parameters each; teacher ({teacher_name}) "
                  f"{teacher.params / 1e9:.3f} B; text encoder {cfg.model.text_encoder} {te_params / 1e9:.3f} B"
                  + (f"; LoRA rank {cfg.lora.rank}: {sum(lora['generator']) / 1e6:.2f} M trained parameters on the "
                     f"frozen generator{' and critic each' if lora['critic'] else ', the critic trained whole'}"
                     if cfg.lora.rank else ""),
        "training": f"ZeRO stage {ds.stage} ({ds.path}{', optimizer offload' if ds.offload_optimizer else ''}), "
                    f"{'bf16' if bf16 else 'float32'}, activation checkpointing {'on' if ckpt else 'off'}, "
                    f"teacher {d.teacher_sharding}, text encoder on the "
                    f"{'host' if cfg.runtime.offload_text_encoder else 'GPU'}",
        "batch": f"{b} a GPU and micro-step, "
                 + (f"{accumulation:g} micro-steps an update (total {t.total_batch_size or b * gpus})"
                    if accumulation == int(accumulation) else
                    f"train.total_batch_size={t.total_batch_size} does not divide over {gpus} GPUs x {b}"),
        "geometry": f"{tpf} tokens a frame, blocks of {k} frames, window {cfg.video.window_frames or 'unbounded'}, "
                    f"gradient window {d.num_training_frames} frames of a rollout of up to {d.num_rollout_frames}; "
                    f"{steps} steps, {cfg.sampling.method}/{cfg.sampling.schedule}",
    }
    assumptions = [
        f"KV caches at the worst exit step (step {worst_exit}): {cache_count(cfg, worst_exit)} cache(s) x "
        f"{r.held_frames} frames x {student.layers} layers x K,V x {tpf} tokens x {student.dim} x {act} bytes",
        "activations counted per token and layer from hiar/models/wan.py (validated on the CPU within a few %); "
        "RMSNorm as CUDA's fused kernel (saves its bf16 input); attention by flash-attn / SDPA (no L^2 matrices)",
        "the rollout's graph stays alive through the DMD forwards and the forward-KL forward: one backward of "
        "their sum (train/distill.py); autograd runs the later forward-KL graph first, so its recompute "
        "happens with everything alive",
        f"reserve: {RESERVE_FIXED / GiB:.1f} GiB (CUDA context, cuBLAS, NCCL) + {RESERVE_FRACTION:.0%} of the "
        f"modelled peak for allocator fragmentation",
        f"DeepSpeed defaults unless the JSON sets them: reduce_bucket_size {ds.reduce_bucket_size:.0e} elements, "
        f"overlap_comm {ds.overlap_comm}; ZeRO-3 teacher: parameters <= {ds.param_persistence_threshold:.0e} "
        f"elements kept whole, live = the largest module + stage3_prefetch_bucket_size "
        f"({ds.prefetch_bucket_size:.0e}), at most stage3_max_live_parameters",
        "host: every rank reads its weights on the host before placing them (generator and critic in float32, "
        "the teacher in its training precision, all before any is placed); a host's ranks do so together",
    ]
    if cfg.lora.rank:
        assumptions.append("LoRA: activations as when training the whole model; the adapters' own saved tensors "
                           f"(rank {cfg.lora.rank} a token and adapted layer) are left out: a fraction of a percent")
    if cfg.runtime.offload_text_encoder and te_host_bytes == 4 and cfg.model.text_encoder == "umt5-xxl":
        assumptions.append("the offloaded umT5 runs on the CPU in float32 (runtime.dtype=auto): "
                           f"{te_params * 4 / GiB:.0f} GiB of host memory per rank")
    if reencode:
        assumptions.append("the Wan VAE's decode working set for window re-encoding is a rough guess, not validated")
    plan = MemoryPlan(per_gpu, per_host, fits, capacity, host_capacity, peak_phase, phases, setup, assumptions,
                      time=time_estimate(cfg, gpus, gpus_per_node, tflops))
    if hints and not plan.fits:
        plan.hints = _hints(cfg, plan, gpus, gpu_memory_gb, gpus_per_node, host_memory_gb)
    return plan


def _variants(cfg: Config) -> list[tuple[str, list[str]]]:
    """Single settings that lower per-GPU memory, relative to `cfg`."""
    d, t = cfg.distill, cfg.train
    out: list[tuple[str, list[str]]] = []
    if d.teacher_sharding == "replicated":
        out.append(("distill.teacher_sharding=zero3", ["distill.teacher_sharding=zero3"]))
    if d.teacher_sharding != "zero3_offload":
        out.append(("distill.teacher_sharding=zero3_offload", ["distill.teacher_sharding=zero3_offload"]))
    if not cfg.runtime.offload_text_encoder:
        out.append(("runtime.offload_text_encoder=true", ["runtime.offload_text_encoder=true"]))
    if not t.gradient_checkpointing:
        out.append(("train.gradient_checkpointing=true", ["train.gradient_checkpointing=true"]))
    stage = DeepSpeedSetup.read(t.deepspeed).stage
    for s in range(stage + 1, 4):
        path = f"configs/deepspeed/zero{s}.json"
        if repo_path(path).is_file():
            out.append((f"train.deepspeed={path}", [f"train.deepspeed={path}"]))
    if t.batch_size > 1:
        total = t.total_batch_size
        out.append(("train.batch_size=1" + (f" (train.total_batch_size={total} kept)" if total else ""),
                    ["train.batch_size=1"]))
    if not t.bf16:
        out.append(("train.bf16=true", ["train.bf16=true"]))
    return out


def _hints(cfg: Config, plan: MemoryPlan, gpus: int, gpu_memory_gb: float, gpus_per_node: int,
           host_memory_gb: float | None) -> list[str]:
    """Which settings free the most per-GPU memory, each alone, then the fewest of them that fit together."""
    def total(c: Config, n: int = gpus) -> MemoryPlan:
        return estimate(c, n, gpu_memory_gb, gpus_per_node, host_memory_gb, hints=False)

    rows = []
    for label, overrides in _variants(cfg):
        try:
            variant = with_overrides(cfg, overrides)
            p = total(variant)
        except ConfigError:
            continue
        rows.append((plan.gpu_total - p.gpu_total, label, overrides, p))
    rows.sort(key=lambda row: -row[0])
    hints = [f"{label}: {p.gpu_total / GiB:.1f} GiB per GPU{', fits' if p.fits else ''} ({-saving / GiB:+.1f})"
             for saving, label, _, p in rows if saving > 0]
    if not any(p.fits for *_, p in rows):
        chosen: list[str] = []
        current = cfg
        for saving, label, overrides, _ in rows:
            if saving <= 0:
                continue
            try:
                candidate = with_overrides(current, overrides)
            except ConfigError:
                continue
            if total(candidate).gpu_total < total(current).gpu_total:
                current, chosen = candidate, chosen + overrides
                if total(current).fits:
                    break
        if chosen:
            p = total(current)
            hints.append(f"together {' '.join(chosen)}: {p.gpu_total / GiB:.1f} GiB per GPU "
                         f"({'fits' if p.fits else 'still does not fit'})")
    tb, b = cfg.train.total_batch_size, cfg.train.batch_size
    for n in (gpus * 2, gpus * 4, gpus * 8):
        if tb and tb % (b * n):
            continue
        if total(cfg, n).fits:
            hints.append(f"or {n} GPUs with these settings ({total(cfg, n).gpu_total / GiB:.1f} GiB per GPU)")
            break
    return hints


def check_fits(cfg: Config, world_size: int, device_memory_bytes: int, gpus_per_node: int,
               host_memory_bytes: int | None = None) -> MemoryPlan:
    """The plan for this run; raises `ConfigError` carrying the table (and what to change) when it
    cannot fit on `world_size` devices of `device_memory_bytes` (and the host, when given)."""
    plan = estimate(cfg, world_size, device_memory_bytes / GiB, gpus_per_node,
                    host_memory_bytes / GiB if host_memory_bytes else None)
    if not plan.fits:
        raise ConfigError("this distillation run does not fit (python train/plan.py prints this table):\n" + plan.table())
    return plan
