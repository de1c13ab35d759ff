import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from hiar.flow import NUM_TRAIN_TIMESTEPS, FlowMatching


def test_warped_step_list():
    t = FlowMatching(shift=5.0).warp([1000, 750, 500, 250])
    torch.testing.assert_close(t, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))


def test_unwarped_step_list_is_unchanged():
    t = FlowMatching(shift=5.0).denoising_timesteps([1000, 750, 500, 250], warp=False)
    assert t.tolist() == [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("shift", [1.0, 5.0, 8.0])
def test_shifted_sigmas_agree_with_diffusers(shift):
    flow = FlowMatching(shift)
    # Training table: diffusers shifts the sigmas k / 1000 for k = 1000 .. 1.
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    raw = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas.double(), flow.shifted(flow.sigma(raw)), atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.timesteps.double(), flow.timestep(flow.shifted(flow.sigma(raw))),
                               atol=1e-3, rtol=0)
    # Inference: given the same unshifted sigmas, both shift them identically and end at 0.
    ours = flow.sampling_timesteps(48)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.0, 49)[:-1].tolist())
    torch.testing.assert_close(sched.timesteps.double(), ours[:-1], atol=1e-3, rtol=0)
    torch.testing.assert_close(sched.sigmas.double(), flow.sigma(ours), atol=1e-6, rtol=0)


def test_sampling_timesteps_shape():
    t = FlowMatching(8.0).sampling_timesteps(48)
    assert len(t) == 49 and t[0] == 1000 and t[-1] == 0 and bool((t[1:] < t[:-1]).all())


def test_x0_flow_round_trip_is_exact_at_every_timestep():
    # One continuous sigma for every model: converting flow -> x0 -> flow returns the input at every
    # integer t and at the student's fractional ones (the reference's table look-ups do not).
    flow = FlowMatching(5.0)
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64), flow.warp([750, 500, 250])])
    x0 = torch.randn(len(t), 3, 2, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    xt = flow.add_noise(x0, eps, t)
    v = flow.flow_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_flow(xt, v, t), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.flow_from_x0(xt, x0, t), v, atol=1e-9, rtol=0)
    # In float32 (the training dtype) the round trip holds to float32 precision, also for t < 100.
    x32, v32 = xt.float(), v.float()
    torch.testing.assert_close(flow.flow_from_x0(x32, flow.x0_from_flow(x32, v32, t.float()), t.float()), v32,
                               atol=2e-2, rtol=1e-3)


def test_add_noise_endpoints_and_per_frame_timesteps():
    flow = FlowMatching(5.0)
    x0, eps = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    torch.testing.assert_close(flow.add_noise(x0, eps, 0.0), x0)
    torch.testing.assert_close(flow.add_noise(x0, eps, 1000.0), eps)
    t = torch.tensor([[1000.0, 500.0, 0.0], [0.0, 0.0, 250.0]])  # [B, F]
    out = flow.add_noise(x0, eps, t)
    torch.testing.assert_close(out[0, 1], 0.5 * x0[0, 1] + 0.5 * eps[0, 1])
    torch.testing.assert_close(out[1, 0], x0[1, 0])
    torch.testing.assert_close(out[1, 2], 0.75 * x0[1, 2] + 0.25 * eps[1, 2])


def test_ode_step_follows_the_straight_path_and_sde_step_renoises():
    flow = FlowMatching(5.0)
    x0, eps, fresh = torch.randn(3, 1, 4, 2, 2, dtype=torch.float64).unbind(0)
    xt = flow.add_noise(x0, eps, 937.5)
    # With the exact x0, an Euler step lands on the same trajectory at t_next.
    torch.testing.assert_close(flow.ode_step(xt, x0, 937.5, 625.0), flow.add_noise(x0, eps, 625.0))
    torch.testing.assert_close(flow.ode_step(xt, x0, 937.5, 0.0), x0)
    torch.testing.assert_close(flow.sde_step(x0, fresh, 625.0), 0.375 * x0 + 0.625 * fresh)


def test_low_precision_inputs_keep_their_dtype():
    flow = FlowMatching(5.0)
    x = torch.randn(1, 3, 4, 2, 2, dtype=torch.bfloat16)
    assert flow.add_noise(x, x, 500.0).dtype == torch.bfloat16
    assert flow.x0_from_flow(x, x, torch.tensor([500.0])).dtype == torch.bfloat16
