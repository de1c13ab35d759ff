"""Stand-ins for a rehearsal of full-scale distillation: the real geometry, random content, no downloads.

`train/distill.py --rehearse` runs the real training program on the config's model sizes with these
in place of the published weights, the umT5 text encoder and the data, so a user learns in a few
minutes whether a run fits their GPUs, and how long an iteration takes, before fetching 100 GB of
weights (launch/rehearse.sh). What it measures is memory and time, not quality: every weight is random.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Sequence

import torch

from hiar.checkpoints import empty_model
from hiar.config import Config, ModelConfig
from hiar.models import WanModel
from hiar.sampling import stable_hash
from hiar.text import UMT5_XXL, zero_padded


@torch.no_grad()
def random_wan(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> WanModel:
    """A Wan DiT of `cfg`'s sizes with small random weights, made directly on `device` in `dtype` (a
    14B model built in float32 first would not fit a GPU). Norm weights are one and biases zero, so
    bf16 forwards stay finite."""
    model = empty_model(cfg).to(dtype)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02 if p.ndim > 1 else 1 / math.sqrt(cfg.dim))
    return model


class RandomUMT5:
    """umT5-XXL's encoder (Wan2.1's text encoder) with random weights, fed random token ids: its memory
    and compute on the GPU without the 11 GB download or its tokenizer. States [B, text_len, 4096]."""

    def __init__(self, text_len: int, device: torch.device, dtype: torch.dtype = torch.bfloat16):
        from transformers import UMT5Config, UMT5EncoderModel

        config = UMT5Config(**UMT5_XXL)
        with torch.device(device):
            self.model = UMT5EncoderModel._from_config(config, torch_dtype=dtype).eval()
        self.text_len, self.device, self.vocab = text_len, device, config.vocab_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = [], []
        for p in prompts:  # as many tokens as the prompt has characters / 4 (a rough umT5 rate), at least 8
            g = torch.Generator().manual_seed(stable_hash("prompt", p) & (2**63 - 1))
            n = min(self.text_len, max(8, len(p) // 4))
            ids.append(torch.randint(1, self.vocab, (self.text_len,), generator=g))
            mask.append(torch.arange(self.text_len) < n)
        ids, mask = torch.stack(ids).to(self.device), torch.stack(mask).long().to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return zero_padded(states, mask, self.text_len)


def rehearsal_prompts(count: int = 256) -> list[str]:
    """Distinct prompts of a typical extended-prompt length (~80 words)."""
    words = ("a", "slow", "camera", "pans", "across", "the", "misty", "harbour", "at", "dawn", "while", "gulls",
             "circle", "over", "fishing", "boats", "and", "waves", "break", "on", "stones")
    return [f"prompt {i}: " + " ".join(words[(i + j) % len(words)] for j in range(80)) for i in range(count)]


class RandomTrajectories:
    """`hiar.trajectories.TrajectoryStore`'s interface over random tensors of the config's geometry: the points
    the forward-KL term reads (one per stored step), their timesteps and the clean end."""

    def __init__(self, cfg: Config, count: int = 256):
        self.cfg, self.count = cfg, count
        geo = cfg.geometry
        self.shape = (geo.num_latent_frames, cfg.model.in_channels, geo.latent_height, geo.latent_width)
        self.timesteps = torch.tensor(cfg.schedule.timesteps, dtype=torch.float32)
        self.prompts = rehearsal_prompts(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        points = torch.randn(len(self.timesteps), *self.shape, generator=g)
        return {"key": f"{i:08d}", "caption": self.prompts[i], "points": points, "timesteps": self.timesteps,
                "final": torch.randn(self.shape, generator=g)}


class MemoryLog:
    """Memory in use after each named stage of start-up, and the peak of the steps after `start_steps`:
    CUDA's allocator counters on a GPU, the process's resident set (its peak only) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stages: list[tuple[str, int]] = [("start", self._now())]

    def _now(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def mark(self, stage: str) -> None:
        self.stages.append((stage, self._now()))

    def start_steps(self) -> None:
        self.mark("ready")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._now()

    def table(self) -> str:
        """Each stage's growth in GiB, then the steps' peak."""
        gib = 2**30
        unit = "allocated" if self.device.type == "cuda" else "peak resident set (CPU: growth is approximate)"
        rows = [f"memory on {self.device} ({unit}):"]
        for (_, before), (stage, after) in zip(self.stages, self.stages[1:]):
            rows.append(f"  {stage:<28} +{(after - before) / gib:8.2f} GiB  (total {after / gib:.2f})")
        rows.append(f"  {'peak during the steps':<28} {self.peak() / gib:9.2f} GiB")
        return "\n".join(rows)
