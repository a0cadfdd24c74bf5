import numpy as np
import pytest
import torch

from ddpm_codec.diffusion import (VarianceType, ddim_sample, l_simple, model_variance, predict_x0,
                                  q_mean_var, q_posterior_mean_var, q_sample, q_step_mean_var, sample)
from ddpm_codec.schedule import ScheduleKind, make_schedule


def point_mass_net(sched_full, c):
    """The exact ε-predictor when all data is the constant c: ε = (x_t − √ᾱ_t c) / √(1 − ᾱ_t)."""
    ab = torch.tensor(sched_full.alpha_bar)

    def net(x, t):
        a = ab[t.long()].reshape(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    return net


def gaussian_net(sched_full, s):
    """The exact ε-predictor for data N(0, s² I): E[ε | x_t] = √(1 − ᾱ) x_t / (ᾱ s² + 1 − ᾱ)."""
    ab = torch.tensor(sched_full.alpha_bar)

    def net(x, t):
        a = ab[t.long()].reshape(-1, 1, 1, 1).to(x.dtype)
        return (1 - a).sqrt() * x / (a * s * s + 1 - a)

    return net


@pytest.mark.parametrize("kind", list(ScheduleKind))
def test_composed_steps_give_the_marginal(kind):
    s = make_schedule(kind, 1000)
    # closed form: mean coefficient ∏√(1−β), variance v_t = (1−β_t) v_{t−1} + β_t
    coef, var = 1.0, 0.0
    for t in range(1, 1001):
        coef *= np.sqrt(1 - s.betas[t])
        var = (1 - s.betas[t]) * var + s.betas[t]
        if t in (1, 10, 300, 1000):
            assert coef == pytest.approx(np.sqrt(s.alpha_bar[t]), rel=1e-10)
            assert var == pytest.approx(1 - s.alpha_bar[t], rel=1e-10)
    # and by simulation, through the functions themselves
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7, dtype=torch.float64)
    x = x0
    for t in range(1, 51):
        k = torch.full((x.shape[0],), t)
        m, v = q_step_mean_var(s, x, k)
        x = m + v.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean, var = q_mean_var(s, x0[:1], torch.tensor([50]))
    assert x.mean().item() == pytest.approx(mean.item(), abs=4 * np.sqrt(var.item() / 20000))
    assert x.var().item() == pytest.approx(var.item(), rel=0.05)


@pytest.mark.parametrize("t", [2, 10, 500, 1000])
def test_posterior_is_bayes_rule_on_a_grid(t):
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    x0, xt = 0.3, -0.2
    grid = np.linspace(-6, 6, 400001)
    # q(x_{t−1} | x_0) q(x_t | x_{t−1}), normalised numerically
    logp = (-(grid - np.sqrt(s.alpha_bar[t - 1]) * x0) ** 2 / (2 * (1 - s.alpha_bar[t - 1]))
            - (xt - np.sqrt(1 - s.betas[t]) * grid) ** 2 / (2 * s.betas[t]))
    w = np.exp(logp - logp.max())
    w /= w.sum()
    num_mean = (w * grid).sum()
    num_var = (w * (grid - num_mean) ** 2).sum()
    mean, var = q_posterior_mean_var(s, torch.tensor([[[[x0]]]], dtype=torch.float64),
                                     torch.tensor([[[[xt]]]], dtype=torch.float64), torch.tensor([t]))
    assert mean.item() == pytest.approx(num_mean, abs=1e-6)
    assert var.item() == pytest.approx(num_var, rel=1e-4)


def test_posterior_at_step_one_is_the_data():
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    x0 = torch.tensor([[[[0.5]]]], dtype=torch.float64)
    mean, var = q_posterior_mean_var(s, x0, torch.tensor([[[[0.1]]]], dtype=torch.float64), torch.tensor([1]))
    assert mean.item() == pytest.approx(0.5, abs=1e-12) and var.item() == 0.0


def test_predict_x0_inverts_q_sample():
    s = make_schedule(ScheduleKind.COSINE, 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    k = torch.tensor([1, 10, 500, 999])
    torch.testing.assert_close(predict_x0(s, q_sample(s, x0, k, noise), k, noise), x0, rtol=0, atol=1e-9)


def test_model_variances():
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    large = model_variance(s, VarianceType.FIXED_LARGE)
    small = model_variance(s, VarianceType.FIXED_SMALL)
    np.testing.assert_array_equal(large[1:], s.betas[1:])
    assert small[1] == s.beta_tilde[2] > 0
    assert np.all(small[2:] <= large[2:])


def test_l_simple_is_zero_for_the_exact_predictor():
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    x0 = torch.full((8, 1, 2, 2), -0.4)
    loss = l_simple(point_mass_net(s, -0.4), s, x0, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


@pytest.mark.parametrize("K", [1000, 50])
def test_samplers_recover_a_point_mass(K):
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    r = s if K == 1000 else s.respace_to(K)
    net = point_mass_net(s, 0.25)
    x = sample(net, r, (3, 1, 2, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, torch.full_like(x, 0.25), rtol=0, atol=1e-4)
    x = ddim_sample(net, r, (3, 1, 2, 2), torch.Generator().manual_seed(0), eta=0.0)
    torch.testing.assert_close(x, torch.full_like(x, 0.25), rtol=0, atol=1e-4)


def test_samplers_reproduce_gaussian_data_variance():
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    r = s.respace_to(200)
    net = gaussian_net(s, 0.3)
    n = 4000
    for x in [sample(net, r, (n, 1, 1, 1), torch.Generator().manual_seed(0)),
              ddim_sample(net, r, (n, 1, 1, 1), torch.Generator().manual_seed(0), eta=0.0),
              ddim_sample(net, r, (n, 1, 1, 1), torch.Generator().manual_seed(0), eta=1.0)]:
        assert abs(x.mean().item()) < 4 * 0.3 / np.sqrt(n)
        assert x.std().item() == pytest.approx(0.3, rel=0.06)


def test_ddim_eta_zero_is_deterministic_given_x_T():
    s = make_schedule(ScheduleKind.LINEAR, 1000).respace_to(20)
    net = gaussian_net(make_schedule(ScheduleKind.LINEAR, 1000), 0.3)
    a = ddim_sample(net, s, (5, 1, 2, 2), torch.Generator().manual_seed(7), eta=0.0)
    b = ddim_sample(net, s, (5, 1, 2, 2), torch.Generator().manual_seed(7), eta=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
