"""The exact CPI simulator of experiments/theory/cpi.py: DP values, samplers, the A.3 construction, seeding."""

import numpy as np
import pytest

from experiments.theory import cpi


def two_state_mdp():
    """H = 2, two states, two actions; every number below is worked out by hand in the tests."""
    P = np.zeros((2, 2, 2, 2))
    P[0, 0, 0] = [0.5, 0.5]
    P[0, 0, 1] = [0.0, 1.0]
    P[0, 1, 0] = [1.0, 0.0]
    P[0, 1, 1] = [0.2, 0.8]
    P[1] = 0.5  # after the last step: unused
    r = np.array([[[1.0, 0.0], [0.5, 0.2]], [[0.0, 1.0], [1.0, 0.5]]])
    pi = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.25, 0.75], [0.0, 1.0]]])
    return cpi.MDP(P=P, r=r, mu=np.array([0.6, 0.4]), r_max=1.0), pi


def test_exact_values_match_hand_computation_on_two_state_mdp():
    mdp, pi = two_state_mdp()
    ev = cpi.evaluate(mdp, pi)
    # Last step: V_2(x0) = 0.75 * 1, V_2(x1) = 1 * 0.5.
    np.testing.assert_allclose(ev.v[1], [0.75, 0.5])
    # Q_1(x0, y0) = 1 + .5 * .75 + .5 * .5; Q_1(x0, y1) = 0 + .5; Q_1(x1, y0) = .5 + .75; Q_1(x1, y1) = .2 + .2 * .75
    # + .8 * .5.
    np.testing.assert_allclose(ev.q[0], [[1.625, 0.5], [1.25, 0.75]])
    np.testing.assert_allclose(ev.v[0], [1.0625, 1.25])
    np.testing.assert_allclose(ev.d, [[0.6, 0.4], [0.55, 0.45]])
    assert ev.j == pytest.approx(0.6 * 1.0625 + 0.4 * 1.25)
    np.testing.assert_allclose(ev.advantage[0, 0], [0.5625, -0.5625])
    # tau = 0.5: x0 at the first step (A = 0.5625) and x1 at the last (A(x1, y0) = 1 - 0.5) are improvable.
    G = cpi.improvable_set(ev, 0.5)
    np.testing.assert_array_equal(G, [[True, False], [False, True]])
    assert cpi.coverage(ev, G) == pytest.approx((0.6 + 0.45) / 2)
    assert not cpi.improvable_set(ev, 0.6).any()


def test_q_rollouts_are_unbiased_for_exact_q():
    mdp, pi = two_state_mdp()
    ev = cpi.evaluate(mdp, pi)
    rng = np.random.default_rng(3)
    n = 20000
    for h, x, y in [(0, 0, 0), (0, 1, 1), (1, 0, 0)]:
        returns = cpi.q_rollouts(rng, mdp, pi, np.full(n, h), np.full(n, x), np.full(n, y))
        assert abs(returns.mean() - ev.q[h, x, y]) < 4 * returns.std() / np.sqrt(n) + 1e-12


def test_credit_sampler_draws_only_improvable_states():
    mdp, pi = cpi.critical_chain(0.02, 4, 0.5)
    ev = cpi.evaluate(mdp, pi)
    G = cpi.improvable_set(ev, 0.5)
    assert cpi.coverage(ev, G) == pytest.approx(0.02)
    h, x, trials = cpi.credit_sampler(np.random.default_rng(0), ev, G, 2000)
    assert len(h) == 2000 and G[h, x].all()
    assert set(h.tolist()) == {0, 1, 2, 3}  # h ~ Unif[H] given x in G
    # Rejection costs 1/p_pi on-policy draws per accepted one: 100,000 expected, s.d. about 2,200.
    assert abs(trials - 2000 / 0.02) < 10000
    # The random sampler does draw the other states, and the per-cell law puts nothing outside G for the oracle.
    h_rr, x_rr = cpi.draw_resets(np.random.default_rng(0), ev, 2000)
    assert not G[h_rr, x_rr].all()
    counts, _ = cpi.draw_cell_stats(np.random.default_rng(0), mdp, ev, cpi.reset_weights(ev, G, "cpi-caro"), 5000)
    assert counts.sum() == 5000 and counts[~G].sum() == 0


def test_tight_construction_reproduces_appendix_a3():
    for n_actions in (2, 3, 5):
        p, tau, r_max = 0.05, 0.3, 1.0
        mdp, pi = cpi.tight_construction(p, tau, n_actions=n_actions, r_max=r_max)
        eps = tau * p / (100 * (1 - p))
        ev = cpi.evaluate(mdp, pi)
        np.testing.assert_allclose(ev.v[0], [r_max / 2, r_max / 2])
        expected = np.zeros((2, n_actions))
        expected[0, 1], expected[1, 1] = tau, eps
        np.testing.assert_allclose(ev.advantage[0], expected, atol=1e-15)
        G = cpi.improvable_set(ev, tau)
        np.testing.assert_array_equal(G, [[True, False]])
        assert cpi.coverage(ev, G) == pytest.approx(p)
        plus = cpi.greedy(ev.q, pi)
        np.testing.assert_array_equal(plus, [[1, 1]])
        w = cpi.reset_weights(ev, G, "cpi-rr")
        target = cpi.policy_advantage(ev, cpi.greedy_policy(pi, plus), w)
        assert target == pytest.approx(p * tau + (1 - p) * eps)
        # Y_i = |Y| (pi^+ - pi)(y_i|x_i) r(x_i, y_i) with x ~ mu, y uniform: mean A, variance >= |Y| R_max^2 / 4.
        y_values = n_actions * (cpi.greedy_policy(pi, plus) - pi) * ev.q
        cell_prob = w[..., None] / n_actions
        mean = (cell_prob * y_values).sum()
        variance = (cell_prob * y_values**2).sum() - mean**2
        assert mean == pytest.approx(target)
        assert variance >= n_actions * r_max**2 / 4


def test_tight_construction_random_resets_often_estimate_no_advantage():
    """Proposition 10: for C3 |Y|^2 <= n <= sigma^2 / (4 A^2), Pr(A_hat <= 0) >= 0.18 under random resets."""
    p, tau = 0.001, 0.5
    mdp, pi = cpi.tight_construction(p, tau)
    ev = cpi.evaluate(mdp, pi)
    G = cpi.improvable_set(ev, tau)
    w = cpi.reset_weights(ev, G, "cpi-rr")
    y_values = 2 * (cpi.greedy_policy(pi, np.ones((1, 2), int)) - pi) * ev.q
    target = (w[..., None] / 2 * y_values).sum()
    sigma2 = (w[..., None] / 2 * y_values**2).sum() - target**2
    n = int(sigma2 / (4 * target**2))
    assert n >= 80**2 * 2**2
    rng = np.random.default_rng(0)
    estimates = {}
    for algorithm in cpi.ALGORITHMS:
        counts, sums = cpi.draw_cell_stats(rng, mdp, ev, cpi.reset_weights(ev, G, algorithm), n, replicates=2000)
        q_hat = cpi.fit_q(counts, sums)
        estimates[algorithm] = cpi.advantage_estimate(counts, q_hat, pi, cpi.greedy(q_hat, pi))
    assert (estimates["cpi-rr"] <= 0).mean() >= 0.18
    # The oracle's estimate targets A^G = tau with the same n and is never that wrong.
    assert (estimates["cpi-caro"] <= tau / 2).mean() == 0


def test_sufficient_statistics_match_one_rollout_per_sample():
    mdp, pi = cpi.critical_chain(0.05, 4, 0.5)
    kwargs = {"n": 400, "tau": 0.5}
    for algorithm in cpi.ALGORITHMS:
        draws = {}
        for sampling in ("rollouts", "sufficient"):
            rng = np.random.default_rng(11)
            runs = [cpi.cpi_iteration(mdp, pi, algorithm=algorithm, rng=rng, sampling=sampling, **kwargs)
                    for _ in range(150)]
            draws[sampling] = np.array([run.a_hat for run in runs])
        a, b = draws["rollouts"], draws["sufficient"]
        se = np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se
        assert 0.75 < a.std() / b.std() < 1.33


def test_runs_are_seeded_and_repeatable():
    mdp, pi = cpi.critical_chain(0.05, 4, 0.5)
    for sampling in ("rollouts", "sufficient"):
        for algorithm in cpi.ALGORITHMS:
            first, again, other = (
                cpi.cpi_iteration(mdp, pi, algorithm=algorithm, n=300, tau=0.5, sampling=sampling,
                                  rng=np.random.default_rng(seed), tie_break="random")
                for seed in (1, 1, 2)
            )
            assert (first.a_hat, first.alpha, first.j_after, first.trials) == (
                again.a_hat, again.alpha, again.j_after, again.trials)
            np.testing.assert_array_equal(first.policy, again.policy)
            assert (first.a_hat, first.trials) != (other.a_hat, other.trials)


def test_updates_follow_algorithm_1_and_meet_theorem_1_bounds():
    p, horizon, tau = 0.02, 4, 0.5
    mdp, pi = cpi.critical_chain(p, horizon, tau)
    ev = cpi.evaluate(mdp, pi)
    G = cpi.improvable_set(ev, tau)
    rr = cpi.cpi_iteration(mdp, pi, algorithm="cpi-rr", n=10**7, tau=tau, rng=np.random.default_rng(0))
    caro = cpi.cpi_iteration(mdp, pi, algorithm="cpi-caro", n=10**4, tau=tau, rng=np.random.default_rng(0))
    # Line 13: CPI-CARO leaves pi untouched off G; line 11 halves line 10's step.
    np.testing.assert_array_equal(caro.policy[~G], pi[~G])
    assert caro.alpha == pytest.approx(caro.a_hat / (2 * horizon**2))
    assert rr.alpha == pytest.approx(rr.a_hat / horizon**2)
    assert rr.target == pytest.approx(p * tau) and caro.target == pytest.approx(tau)
    assert rr.gain >= tau**2 * p**2 / (8 * horizon) > 0
    assert caro.gain >= tau**2 * p / (16 * horizon)
    # Lemma 3 / Corollary 5 in the chain: the gain is alpha times the exact improvement of the greedy step.
    assert caro.gain == pytest.approx(caro.alpha * horizon * p * tau)


def test_no_improvable_state_means_no_update_and_bad_input_is_refused():
    mdp, pi = cpi.critical_chain(0.02, 4, 0.5)
    run = cpi.cpi_iteration(mdp, pi, algorithm="cpi-caro", n=100, tau=0.9, rng=np.random.default_rng(0))
    assert run.p_pi == 0 and run.alpha == 0 and run.gain == 0
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="algorithm='cpi'"):
        cpi.cpi_iteration(mdp, pi, algorithm="cpi", n=10, tau=0.5, rng=rng)
    with pytest.raises(ValueError, match="step_rule='kl'"):
        cpi.cpi_iteration(mdp, pi, algorithm="cpi-rr", n=10, tau=0.5, rng=rng, step_rule="kl")
    with pytest.raises(ValueError, match="n=0"):
        cpi.cpi_iteration(mdp, pi, algorithm="cpi-rr", n=0, tau=0.5, rng=rng)
    with pytest.raises(ValueError, match="tau=0"):
        cpi.cpi_iteration(mdp, pi, algorithm="cpi-rr", n=10, tau=0, rng=rng)
    with pytest.raises(ValueError, match="policy has shape"):
        cpi.cpi_iteration(mdp, pi[:2], algorithm="cpi-rr", n=10, tau=0.5, rng=rng)
    with pytest.raises(ValueError, match="p=0.5 must lie in"):
        cpi.critical_chain(0.5, 4, 0.5)
    with pytest.raises(ValueError, match="tau=0.8"):
        cpi.tight_construction(0.1, 0.8)
    two, two_pi = two_state_mdp()
    with pytest.raises(ValueError, match="sampling='sufficient' is not exact"):
        cpi.cpi_iteration(two, two_pi, algorithm="cpi-rr", n=10, tau=0.5, rng=rng, sampling="sufficient")


def test_value_baseline_keeps_the_mean_and_cuts_the_noise_off_g():
    p, tau = 0.01, 0.5
    mdp, pi = cpi.tight_construction(p, tau)
    ev = cpi.evaluate(mdp, pi)
    G = cpi.improvable_set(ev, tau)
    counts, sums = cpi.draw_cell_stats(np.random.default_rng(5), mdp, ev, cpi.reset_weights(ev, G, "cpi-rr"),
                                       20000, replicates=1000)
    q_hat = cpi.fit_q(counts, sums)
    actions = cpi.greedy(q_hat, pi)
    plain = cpi.advantage_estimate(counts, q_hat, pi, actions)
    based = cpi.advantage_estimate(counts, q_hat, pi, actions, baseline="value")
    target = p * tau + (1 - p) * tau * p / (100 * (1 - p))
    for estimate in (plain, based):
        assert abs(estimate.mean() - target) < 4 * estimate.std() / np.sqrt(len(estimate))
    # Off G the baseline leaves only the eps-sized differences: the spread falls by more than 10x here.
    assert based.std() < plain.std() / 10
    with pytest.raises(ValueError, match="baseline='mean'"):
        cpi.advantage_estimate(counts, q_hat, pi, actions, baseline="mean")


def test_samples_to_precision_needs_about_p_squared_more_without_the_oracle():
    from experiments.theory import sweep

    mdp, pi = sweep.family("tight", 0.05)
    n = {a: sweep.samples_to_precision(np.random.default_rng(0), mdp, pi, a, replicates=100) for a in cpi.ALGORITHMS}
    # CPI-CARO: A_hat's per-sample variance on x1 is 2.25, so 90% within tau/2 = 0.25 needs about
    # 1.645^2 * 2.25 / 0.25^2 = 97 samples; CPI-RR's tolerance is p = 0.05 times smaller.
    assert 50 <= n["cpi-caro"] <= 200
    assert n["cpi-rr"] >= 100 * n["cpi-caro"]
