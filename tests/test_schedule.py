import numpy as np
import pytest

from ddpm_codec.schedule import ScheduleKind, even_steps, make_schedule, schedule_from_spec


def test_linear_matches_paper():
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    assert s.K == 1000 and s.T == 1000
    assert s.betas[0] == 0 and s.betas[1] == pytest.approx(1e-4) and s.betas[1000] == pytest.approx(0.02)
    assert s.alpha_bar.dtype == np.float64
    assert s.alpha_bar[0] == 1.0
    np.testing.assert_allclose(s.alpha_bar[1:], np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-12)


def test_tables_are_read_only():
    s = make_schedule(ScheduleKind.LINEAR, 10 * 10)
    with pytest.raises(ValueError):
        s.alpha_bar[3] = 0.5


def test_cosine_is_a_valid_decreasing_schedule():
    s = make_schedule(ScheduleKind.COSINE, 1000)
    assert np.all(np.diff(s.alpha_bar) < 0)
    assert s.alpha_bar[-1] < 1e-4
    # Nichol & Dhariwal eq. 17 at an interior point
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    assert s.alpha_bar[500] == pytest.approx(f(500) / f(0), rel=1e-9)


def test_respace_with_all_steps_is_the_original():
    s = make_schedule(ScheduleKind.LINEAR, 200)
    r = s.respace(range(1, 201))
    for name in ["betas", "alpha_bar", "alpha_bar_prev", "beta_tilde", "post_coef_x0", "post_coef_xt", "timesteps"]:
        np.testing.assert_allclose(getattr(r, name), getattr(s, name), rtol=1e-12, atol=0)


def test_respaced_chain_is_a_diffusion_with_the_same_marginals():
    s = make_schedule(ScheduleKind.LINEAR, 1000)
    steps = even_steps(1000, 25)
    r = s.respace(steps)
    assert r.K == 25 and list(r.timesteps[1:]) == steps and steps[0] == 1 and steps[-1] == 1000
    np.testing.assert_allclose(r.alpha_bar[1:], s.alpha_bar[steps], rtol=1e-12)
    np.testing.assert_allclose(np.cumprod(1 - r.betas), r.alpha_bar, rtol=1e-12)
    assert np.all((r.betas[1:] > 0) & (r.betas[1:] < 1))


def test_respace_rejects_bad_steps():
    s = make_schedule(ScheduleKind.LINEAR, 100)
    with pytest.raises(ValueError):
        s.respace([0, 50, 100])
    with pytest.raises(ValueError):
        s.respace([10, 50])  # must end at T
    with pytest.raises(ValueError):
        even_steps(100, 0)


def test_spec_round_trip():
    s = make_schedule(ScheduleKind.COSINE, 500).respace(even_steps(500, 50))
    r = schedule_from_spec(s.spec())
    np.testing.assert_array_equal(r.alpha_bar, s.alpha_bar)
    assert r.kind is ScheduleKind.COSINE


def test_optimal_steps_is_the_least_cost_path():
    import itertools

    from ddpm_codec.schedule import optimal_steps, step_costs

    T = 40
    sched = make_schedule(ScheduleKind.LINEAR, T)
    rng = np.random.default_rng(0)
    e = np.concatenate([[0.0], np.sort(rng.uniform(0.001, 0.5, T))])  # x̂_0 error grows with t
    C = step_costs(sched, e)

    def cost(steps):
        p = sorted(steps)[::-1]
        return sum(C[a, b] for a, b in zip(p, p[1:]))

    for K in (2, 3, 5):
        got = optimal_steps(sched, e, K)
        assert got[0] == 1 and got[-1] == T and len(got) == K
        brute = min(cost([1, *mid, T]) for mid in itertools.combinations(range(2, T), K - 2))
        assert cost(got) == pytest.approx(brute)
        assert cost(got) <= cost(even_steps(T, K)) + 1e-12
    # a one-step jump t → s costs ½ log2(1 + c² e(t) / β̃) per dimension
    ab = sched.alpha_bar
    beta = 1 - ab[7] / ab[3]
    bt = (1 - ab[3]) / (1 - ab[7]) * beta
    c = np.sqrt(ab[3]) * beta / (1 - ab[7])
    assert C[7, 3] == pytest.approx(0.5 * np.log2(1 + c**2 * e[7] / bt))
    assert np.isinf(C[3, 7]) and np.isinf(C[5, 0])
