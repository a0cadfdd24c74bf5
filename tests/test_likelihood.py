import math

import numpy as np
import pytest
import torch
from scipy import stats

from ddpm_codec.diffusion import VarianceType, model_variance
from ddpm_codec.likelihood import (LN2, bound_full, bound_mc, discretized_gaussian_log_prob,
                                   discretized_gaussian_log_probs, level_values, log_normal_interval, normal_kl)
from ddpm_codec.schedule import ScheduleKind, make_schedule
from test_diffusion import gaussian_net


def test_normal_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 1.7
    x = m1 + math.sqrt(v1) * torch.randn(400000, generator=g, dtype=torch.float64)
    logq = -0.5 * (x - m1) ** 2 / v1 - 0.5 * math.log(2 * math.pi * v1)
    logp = -0.5 * (x - m2) ** 2 / v2 - 0.5 * math.log(2 * math.pi * v2)
    mc = (logq - logp).mean().item()
    kl = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, v1, m2, v2))).item()
    assert kl == pytest.approx(mc, abs=4 * (logq - logp).std().item() / math.sqrt(len(x)))
    assert normal_kl(*(torch.tensor(v) for v in (0.1, 0.2, 0.1, 0.2))).item() == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("mean,std", [(0.0, 0.1), (0.37, 0.004), (-0.99, 0.02), (0.5, 3.0), (1.3, 0.05)])
def test_decoder_probabilities_are_cdf_differences_and_sum_to_one(mean, std):
    logp = discretized_gaussian_log_probs(torch.tensor(mean, dtype=torch.float64),
                                          torch.tensor(std, dtype=torch.float64))
    assert logp.shape == (256,)
    p = logp.exp().numpy()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    levels = level_values().numpy()
    edges = np.concatenate([[-np.inf], (levels[:-1] + levels[1:]) / 2, [np.inf]])
    ref = np.diff(stats.norm.cdf(edges, loc=mean, scale=std))
    np.testing.assert_allclose(p, ref, rtol=1e-9, atol=1e-15)


def test_decoder_log_probabilities_are_exact_far_in_the_tails():
    # bins hundreds of standard deviations away: the tanh approximation gives -inf or garbage here
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    mean = torch.tensor([0.5, 0.9, -0.5], dtype=torch.float64)
    std = torch.tensor([0.01, 0.01, 0.02], dtype=torch.float64)
    got = discretized_gaussian_log_prob(x, mean, std).numpy()
    ref = [stats.norm.logcdf((-1 + 1 / 255 - 0.5) / 0.01),  # open lower end bin
           # Φ(b) − Φ(a) with a 0.8σ wide bin 90σ out: Φ(a)/Φ(b) ≈ e^−71, so log Φ(b) is exact here
           stats.norm.logcdf((0 + 1 / 255 - 0.9) / 0.01),
           stats.norm.logsf((1 - 1 / 255 + 0.5) / 0.02)]  # open upper end bin
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # both sides of the symmetric flip agree
    a, b = torch.tensor([-3.0, 2.0]), torch.tensor([-2.5, 2.5])
    torch.testing.assert_close(log_normal_interval(a, b), log_normal_interval(-b, -a))


def _binned_gaussian(n, s, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) * s
    x0 = torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    true_bpd = -discretized_gaussian_log_prob(x0, torch.zeros_like(x0), torch.full_like(x0, s))
    return x0, true_bpd.flatten(1).sum(1) / (16 * LN2)


def test_bound_of_gaussian_data_is_above_the_true_nll_and_tightens_with_steps():
    s = 0.3
    full = make_schedule(ScheduleKind.LINEAR, 1000)
    net = gaussian_net(full, s)
    x0, true = _binned_gaussian(1000, s, 0)
    gaps = {}
    for K in [10, 100, 1000]:
        sched = full.respace_to(K)
        b = bound_full(net, sched, x0, torch.Generator().manual_seed(K), model_variance(sched, VarianceType.FIXED_LARGE),
                       clip=False)
        gap = b.total - true
        se = gap.std().item() / math.sqrt(len(gap))
        gaps[K] = gap.mean().item()
        assert gaps[K] > -3 * se, (K, gaps[K], se)  # a bound: never below the true NLL
        assert b.prior.mean().item() < 1e-4  # L_T is negligible for the linear schedule
    assert gaps[10] > gaps[100] > gaps[1000] - 0.02
    assert gaps[10] > 0.2  # a 10-step chain is visibly loose …
    assert gaps[1000] < 0.05  # … the 1000-step chain nearly exact (bits/dim)


def test_mc_estimate_is_unbiased():
    s = 0.3
    full = make_schedule(ScheduleKind.LINEAR, 1000)
    sched = full.respace_to(20)
    net = gaussian_net(full, s)
    x0, _ = _binned_gaussian(64, s, 1)
    exact = bound_full(net, sched, x0, torch.Generator().manual_seed(0), clip=False).total.mean().item()
    est = bound_mc(net, sched, x0.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1), clip=False).total
    se = est.std().item() / math.sqrt(len(est))
    assert est.mean().item() == pytest.approx(exact, abs=4 * se)


def test_respaced_chain_with_all_steps_gives_the_same_bound():
    full = make_schedule(ScheduleKind.LINEAR, 1000)
    small = make_schedule(ScheduleKind.LINEAR, 60)
    net = gaussian_net(small, 0.3)
    x0, _ = _binned_gaussian(50, 0.3, 2)
    a = bound_full(net, small, x0, torch.Generator().manual_seed(3))
    b = bound_full(net, small.respace(range(1, 61)), x0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.total, b.total, rtol=1e-12, atol=1e-12)
    assert full.K == 1000


def test_x0_error_table_matches_the_gaussian_posterior_variance():
    from ddpm_codec.likelihood import x0_mse_per_step

    s = 0.2  # so that x_0 practically never leaves [-1, 1], where x̂_0 is clipped
    full = make_schedule(ScheduleKind.LINEAR, 1000)
    sched = full.respace_to(50)
    x0 = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * s
    e = x0_mse_per_step(gaussian_net(full, s), sched, x0, torch.Generator().manual_seed(1))
    ab = sched.alpha_bar[1:]
    exact = s * s * (1 - ab) / (ab * s * s + 1 - ab)  # Var(x_0 | x_t) for Gaussian data
    np.testing.assert_allclose(e[1:], exact, rtol=0.1)


def test_calibrated_variance_is_the_exact_reverse_variance_for_gaussian_data():
    """With e(t) = Var(x_0 | x_t), σ_k² = β̃_k + c_k² e is the true variance of q(x_{k−1} | x_k) for
    Gaussian data, so the bound beats both fixed variances, most of all on a short chain."""
    s = 0.3
    full = make_schedule(ScheduleKind.LINEAR, 1000)
    e = np.concatenate([[0.0], s * s * (1 - full.alpha_bar[1:]) / (full.alpha_bar[1:] * s * s + 1 - full.alpha_bar[1:])])
    net = gaussian_net(full, s)
    x0, true = _binned_gaussian(1000, s, 5)
    sched = full.respace_to(10)
    gaps = {}
    for vt in (VarianceType.FIXED_LARGE, VarianceType.FIXED_SMALL, VarianceType.CALIBRATED):
        b = bound_full(net, sched, x0, torch.Generator().manual_seed(0), model_variance(sched, vt, e), clip=False)
        gaps[vt] = (b.total - true).mean().item()
    assert gaps[VarianceType.CALIBRATED] < 0.5 * gaps[VarianceType.FIXED_LARGE] < gaps[VarianceType.FIXED_SMALL]
    assert gaps[VarianceType.CALIBRATED] > -0.01
