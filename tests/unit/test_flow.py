import torch

from models.flow import euler_sample, guided, heun_sample, noisy_pair, sample_timesteps, shift_timesteps


def test_timesteps_are_in_the_open_unit_interval_and_reproducible():
    t1 = sample_timesteps(1000, torch.Generator().manual_seed(1))
    t2 = sample_timesteps(1000, torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    assert 0 < t1.min() and t1.max() < 1
    assert abs(t1.mean().item() - 0.5) < 0.03


def test_longer_sequences_get_more_noise():
    t = torch.full((3,), 0.5)
    shifted = shift_timesteps(t, torch.tensor([64, 256, 4096]), reference_tokens=256)
    assert shifted[0] < 0.5 and torch.isclose(shifted[1], torch.tensor(0.5)) and shifted[2] > 0.5
    ends = shift_timesteps(torch.tensor([0.0, 1.0]), 4096, 256)
    assert torch.allclose(ends, torch.tensor([0.0, 1.0]))


def test_euler_with_the_true_velocity_recovers_the_data():
    x0 = [torch.randn(3, 2, 4, 4), torch.randn(3, 1, 8, 4)]
    noise = [torch.randn_like(x) for x in x0]
    xt, v = noisy_pair(x0[0], noise[0], 0.3)
    assert torch.allclose(xt, 0.7 * x0[0] + 0.3 * noise[0]) and torch.allclose(v, noise[0] - x0[0])

    def true_velocity(x, t, conditional):
        return [n - d for n, d in zip(noise, x0)]

    out = euler_sample(guided(true_velocity, 1.0), noise, steps=7, reference_tokens=256, tokens=[32, 512])
    for got, want in zip(out, x0):
        assert torch.allclose(got, want, atol=1e-5)


def test_guidance_extrapolates_from_unconditional_to_conditional():
    def fn(x, t, conditional):
        if conditional:
            return [torch.ones_like(xi) for xi in x]
        half = len(x) // 2
        return [torch.ones_like(xi) for xi in x[:half]] + [torch.zeros_like(xi) for xi in x[half:]]

    v = guided(fn, 3.0)([torch.zeros(2)], torch.tensor([0.5]))
    assert torch.allclose(v[0], torch.full((2,), 3.0))


def test_heun_is_more_accurate_than_euler_on_a_curved_path():
    # dx/dt = x has the exact solution x(0) = x(1) * e^{-1} when integrating from t = 1 to 0
    start = [torch.ones(3)]

    def velocity(x, t):
        return [xi.clone() for xi in x]

    exact = torch.exp(torch.tensor(-1.0))
    euler = euler_sample(velocity, start, steps=8, reference_tokens=1, tokens=[1])[0]
    heun = heun_sample(velocity, start, steps=8, reference_tokens=1, tokens=[1])[0]
    assert (heun - exact).abs().max() < (euler - exact).abs().max() / 3
