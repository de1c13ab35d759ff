
import os

# Set before torch loads MKL. MKL's sgemm may round differently with the memory alignment of its
# operands (seen on an AMD EPYC with AVX-512), which breaks the suite's bitwise comparisons of two code
# paths that run the same arithmetic; conditional numerical reproducibility makes results independent
# of alignment (docs/design.md, "Bit for bit").
os.environ.setdefault("MKL_CBWR", "AUTO")

import pytest  # noqa: E402
import torch  # noqa: E402

from hiar.config import load_config
from hiar.models import WanModel
from hiar.sampling import CellNoise


def random_model(cfg, seed: int = 0) -> WanModel:
    """A model whose every parameter (norm weights included) is random, so a misplaced one shows."""
    torch.manual_seed(seed)
    model = WanModel(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def compile_unavailable() -> str | None:
    """Why torch.compile (inductor) cannot run on this machine, or None when it can."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as err:  # a missing C++ compiler, an unsupported platform: the machine, not HiAR
        return f"torch.compile cannot run here: {type(err).__name__}: {err}"
    return None


def random_inputs(cfg, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random latents [B, F, C, h, w] of the config's geometry and prompt states [B, Lt, D]."""
    g = torch.Generator().manual_seed(seed)
    m, geo = cfg.model, cfg.geometry
    x = torch.randn(batch, geo.num_latent_frames, m.in_channels, geo.latent_height, geo.latent_width, generator=g)
    return x, torch.randn(batch, m.text_len, m.text_dim, generator=g)


def rollout_inputs(*overrides, frames=18):
    """The tiny preset for a rollout of `frames` latent frames, two prompts and their cell noise (drawn
    on the CPU, so any device sees the same numbers)."""
    cfg = load_config("tiny", [f"video.num_latent_frames={frames}", *overrides])
    geo = cfg.geometry
    noise = CellNoise(7, [0, 1], (3, cfg.model.in_channels, geo.latent_height, geo.latent_width))
    text = torch.randn(2, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(5))
    return cfg, noise, text


@pytest.fixture
def tiny():
    return load_config("tiny")


@pytest.fixture
def tiny_model(tiny):
    return random_model(tiny)


@pytest.fixture
def tiny_inputs(tiny):
    """Latents [2, 9, C, h, w], per-frame timesteps that differ by block, prompt states [2, Lt, D]."""
    x, text = random_inputs(tiny, batch=2, seed=1)
    t = torch.tensor([[937.5] * 3 + [833.3] * 3 + [625.0] * 3, [1000.0] * 3 + [250.0] * 3 + [0.0] * 3])
    return x, t, text


@pytest.fixture(scope="session")
def distill_inputs(tmp_path_factory):
    """train/distill.py overrides for a random tiny teacher (also the generator's and the critic's start)
    and 4 of its ODE trajectories in 2 shards: one prompt a micro-step, a generator update every 2nd step."""
    from train import ode_pairs
    from hiar.checkpoints import save_model

    folder = tmp_path_factory.mktemp("distill_inputs")
    cfg = load_config("tiny")
    teacher = save_model(random_model(cfg), cfg, folder / "teacher.safetensors")
    ode_pairs.main(["--config_path", "tiny", f"ode.teacher={teacher}", f"ode.output_dir={folder / 'pairs'}",
                    "ode.num_trajectories=4", "ode.per_shard=2", "ode.steps=4", "ode.batch_size=2"])
    return [f"distill.generator={teacher}", f"distill.teacher={teacher}", f"distill.critic={teacher}",
            f"ode.output_dir={folder / 'pairs'}", "train.batch_size=1", "train.log_every=1",
            "distill.dfake_gen_update_ratio=2", "train.lr=1e-3", "distill.critic_lr=1e-3"]
