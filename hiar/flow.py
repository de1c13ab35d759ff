"""Flow-matching math of Wan2.1, in one place (docs/design.md, section 2).

Conventions used everywhere in HiAR:
* A timestep t lives in [0, NUM_TRAIN_TIMESTEPS] and is the model's input *after* any shift.
* Its noise level is sigma = t / NUM_TRAIN_TIMESTEPS: continuous, never looked up by nearest entry in a
  table (the reference's table look-ups mis-scale the critic target by up to 20% for t < 100).
* x_t = (1 - sigma) x0 + sigma * eps, and the network predicts the flow v = eps - x0, so
  x0 = x_t - sigma * v.
* Latent videos are [B, F, C, H, W]; a timestep tensor is a scalar, [B] (one per sample) or
  [B, F] (one per frame).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
# The level of frames given as context to a model trained with a nearly clean first frame (the toy
# teacher's train.context_noise): its samples continuing a clip, the word probe (hiar.toywords) and
# DMD's continuation case (distill.context_share).
CONTEXT_LEVEL = 0.05


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The 'shifted' noise level of SD3/Wan: shift * s / (1 + (shift - 1) * s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _per_frame(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a timestep tensor (scalar, [B] or [B, F]) to broadcast against x [B, F, ...]."""
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(*t.shape, *([1] * (x.ndim - t.ndim)))


class FlowMatching:
    """Sigmas, shift, noising and x0 / flow conversions for one shift value.

    All arithmetic runs in at least float32 (float64 stays float64) and returns x's dtype, so bf16
    training does not lose the conversions' precision.
    """

    def __init__(self, shift: float):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)

    # -- timesteps and noise levels ---------------------------------------------------------------

    @staticmethod
    def sigma(t: torch.Tensor | float) -> torch.Tensor:
        t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
        return t.to(torch.promote_types(t.dtype, torch.float32)) / NUM_TRAIN_TIMESTEPS

    @staticmethod
    def timestep(sigma: torch.Tensor) -> torch.Tensor:
        return sigma * NUM_TRAIN_TIMESTEPS

    def shifted(self, sigma: torch.Tensor) -> torch.Tensor:
        return shift_sigma(sigma, self.shift)

    def warp(self, steps: Sequence[float]) -> torch.Tensor:
        """Map a raw step list through the shifted-sigma map.

        [1000, 750, 500, 250] with shift 5 -> [1000, 937.5, 833.33.., 625]: the student's timesteps.
        """
        raw = torch.tensor([float(s) for s in steps], dtype=torch.float64)
        return self.timestep(self.shifted(self.sigma(raw)))

    def denoising_timesteps(self, steps: Sequence[float], warp: bool) -> torch.Tensor:
        """The student's step list t_0 > ... > t_{S-1}, float64 (the model sees floats, never rounded)."""
        return self.warp(steps) if warp else torch.tensor([float(s) for s in steps], dtype=torch.float64)

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """An N-step Euler schedule from pure noise: N shifted timesteps, then 0 (N + 1 values).

        Uniform in unshifted sigma over (0, 1], as the teacher ODE trajectories use.
        """
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        return torch.cat([self.timestep(self.shifted(sigmas)), torch.zeros(1, dtype=torch.float64)])

    # -- noising and conversions ------------------------------------------------------------------

    @staticmethod
    def _compute(*xs: torch.Tensor) -> list[torch.Tensor]:
        dtype = torch.promote_types(xs[0].dtype, torch.float32)
        return [x.to(dtype) for x in xs]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma * noise. Also the SDE re-noise step of a cell."""
        a, n = self._compute(x0, noise)
        s = _per_frame(self.sigma(t), a).to(a.dtype)
        return ((1 - s) * a + s * n).to(x0.dtype)

    def x0_from_flow(self, xt: torch.Tensor, flow: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        a, v = self._compute(xt, flow)
        s = _per_frame(self.sigma(t), a).to(a.dtype)
        return (a - s * v).to(xt.dtype)

    def flow_from_x0(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `x0_from_flow`; undefined at sigma = 0 (a clean input carries no flow)."""
        a, b = self._compute(xt, x0)
        s = _per_frame(self.sigma(t), a).to(a.dtype)
        return ((a - b) / s).to(xt.dtype)

    @staticmethod
    def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of flow matching, v = eps - x0."""
        return noise - x0

    def ode_step(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float,
                 t_next: torch.Tensor | float) -> torch.Tensor:
        """Euler step of the probability-flow ODE from t to t_next, given the x0 prediction at t.

        x_next = x0 + (sigma_next / sigma) (x_t - x0): the same noise direction, rescaled.
        """
        a, b = self._compute(xt, x0)
        ratio = _per_frame(self.sigma(t_next) / self.sigma(t), a).to(a.dtype)
        return (b + ratio * (a - b)).to(xt.dtype)

    def sde_step(self, x0: torch.Tensor, noise: torch.Tensor, t_next: torch.Tensor | float) -> torch.Tensor:
        """Stochastic step: re-noise the x0 prediction to t_next with fresh noise."""
        return self.add_noise(x0, noise, t_next)
