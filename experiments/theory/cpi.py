"""Algorithm 1 of the paper (CPI-RR and CPI-CARO), run exactly on small finite-horizon MDPs.

The paper's Section 3 and Appendix A, as code a reader can hold beside the text:

- `MDP`: a finite-horizon MDP (X, Y, P, r, H, mu) with finite states and actions; times are 0-based here
  (the paper's h = 1..H is h = 0..H-1).
- `evaluate`: Q^pi, V^pi, the state distributions d_pi^h and J(pi), exactly, by dynamic programming.
- `improvable_set`, `coverage`: the tau-improvable sets G_{h,tau} and the coverage p_pi.
- Phase 1 (Q-sampling): `draw_resets` (the on-policy SAMPLER, h ~ Unif[H], x ~ d_pi^h), `credit_sampler`
  (the CREDIT_SAMPLER by rejection, Algorithm 3), `q_rollouts` (QROLLOUT: play y at (x, h), then pi to the
  horizon), `cell_stats`; and `draw_cell_stats`, which draws the same per-cell counts and return sums in one go
  where the MDP allows it exactly (see its docstring).
- Phase 2: `fit_q` (least squares over the tabular class), `greedy`, `advantage_estimate` (line 9).
- Phase 3: `step_size` (lines 10 and 11), `mix` (lines 12 and 13).
- `cpi_iteration`: one pass of Algorithm 1, reporting J before and after.
- `tight_construction` (Appendix A.3, Figure 5) and `critical_chain` (a chain whose p_pi is a dial).

Phase 2 and 3 functions take arrays with any leading batch axes, so many replicates run at once.
Choices the paper leaves open are named in the docstrings and in docs/theory.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALGORITHMS = ("cpi-rr", "cpi-caro")
STEP_RULES = ("kakade-langford", "credit-aware")
TIE_BREAKS = ("policy", "random")
BASELINES = ("none", "value")
SAMPLINGS = ("auto", "rollouts", "sufficient")
DEFAULT_STEP_RULE = {"cpi-rr": "kakade-langford", "cpi-caro": "credit-aware"}
# Advantages are differences of sums of at most H rewards; a state whose best advantage equals tau up to
# rounding is improvable.
_TOL = 1e-12


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}; pass one of them.")


@dataclass(frozen=True)
class MDP:
    """Finite-horizon MDP: P[h, x, y, x'] = P_h(x'|x, y), r[h, x, y] in [0, r_max], mu[x]; P[H-1] is unused."""

    P: np.ndarray
    r: np.ndarray
    mu: np.ndarray
    r_max: float
    name: str = "mdp"

    def __post_init__(self):
        P, r, mu = np.asarray(self.P, float), np.asarray(self.r, float), np.asarray(self.mu, float)
        if r.ndim != 3:
            raise ValueError(f"r has shape {r.shape}; it must be (H, n_states, n_actions).")
        H, S, A = r.shape
        if P.shape != (H, S, A, S):
            raise ValueError(f"P has shape {P.shape}; with r of shape {r.shape} it must be {(H, S, A, S)}.")
        if mu.shape != (S,):
            raise ValueError(f"mu has shape {mu.shape}; it must be ({S},), one probability per state.")
        if self.r_max <= 0:
            raise ValueError(f"r_max={self.r_max} must be positive.")
        if (P < 0).any() or not np.allclose(P.sum(-1), 1.0):
            raise ValueError("every P[h, x, y] must be a probability vector over next states.")
        if (mu < 0).any() or not np.isclose(mu.sum(), 1.0):
            raise ValueError(f"mu={mu} must be a probability vector.")
        if (r < 0).any() or (r > self.r_max).any():
            raise ValueError(f"rewards must lie in [0, r_max={self.r_max}]; seen [{r.min()}, {r.max()}].")
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "r", r)
        object.__setattr__(self, "mu", mu)

    @property
    def horizon(self) -> int:
        return self.r.shape[0]

    @property
    def n_states(self) -> int:
        return self.r.shape[1]

    @property
    def n_actions(self) -> int:
        return self.r.shape[2]

    def return_law(self) -> str | None:
        """How a Q-rollout's return is distributed, when that is known in closed form.

        "deterministic" (H = 1: the return is r(x, y)) or "binary" (rewards only at the last step, each 0 or one
        value c: the return is c times a Bernoulli of mean Q/c); None otherwise.
        """
        if self.horizon == 1:
            return "deterministic"
        last = np.unique(self.r[-1])
        if not self.r[:-1].any() and len(last[last > 0]) <= 1:
            return "binary"
        return None


@dataclass(frozen=True)
class Evaluation:
    """Exact quantities of a policy: q[h, x, y], v[h, x], d[h, x] = d_pi^h(x), and j = J(pi)."""

    q: np.ndarray
    v: np.ndarray
    d: np.ndarray
    j: float

    @property
    def advantage(self) -> np.ndarray:
        return self.q - self.v[..., None]


def check_policy(mdp: MDP, pi) -> np.ndarray:
    pi = np.asarray(pi, float)
    shape = (mdp.horizon, mdp.n_states, mdp.n_actions)
    if pi.shape != shape:
        raise ValueError(f"policy has shape {pi.shape}; for this MDP it must be (H, n_states, n_actions) = {shape}.")
    if (pi < 0).any() or not np.allclose(pi.sum(-1), 1.0):
        raise ValueError("every pi[h, x] must be a probability vector over actions.")
    return pi


def evaluate(mdp: MDP, pi) -> Evaluation:
    """Q^pi, V^pi backwards from V_{H+1} = 0, d_pi^h forwards from mu, and J(pi) = E_mu[V_1(x)]."""
    pi = check_policy(mdp, pi)
    H, S, A = pi.shape
    q, v, d = np.zeros((H, S, A)), np.zeros((H + 1, S)), np.zeros((H, S))
    for h in reversed(range(H)):
        q[h] = mdp.r[h] + (mdp.P[h] @ v[h + 1] if h + 1 < H else 0.0)
        v[h] = (pi[h] * q[h]).sum(-1)
    d[0] = mdp.mu
    for h in range(H - 1):
        d[h + 1] = np.einsum("x,xy,xyz->z", d[h], pi[h], mdp.P[h])
    return Evaluation(q=q, v=v[:H], d=d, j=float(mdp.mu @ v[0]))


def improvable_set(ev: Evaluation, tau: float) -> np.ndarray:
    """G[h, x] = 1{max_y A_h^pi(x, y) >= tau}."""
    if tau <= 0:
        raise ValueError(f"tau={tau} must be positive (the improvable set is defined for tau > 0).")
    return ev.advantage.max(-1) >= tau - _TOL * max(1.0, tau)


def coverage(ev: Evaluation, G: np.ndarray) -> float:
    """p_pi = (1/H) sum_h P_{x ~ d_pi^h}[x in G_{h,tau}]."""
    return float((ev.d * G).sum() / ev.d.shape[0])


def reset_weights(ev: Evaluation, G: np.ndarray, algorithm: str) -> np.ndarray:
    """The law of (h, x) that Phase 1 draws from: d_pi^h(x)/H (random resets), or that law given x in G (oracle)."""
    _choice("algorithm", algorithm, ALGORITHMS)
    w = ev.d / ev.d.shape[0]
    if algorithm == "cpi-caro":
        w = w * G
        if w.sum() == 0:
            raise ValueError("p_pi = 0: no improvable state is reachable, so the credit sampler has nothing to draw.")
    return w / w.sum()


def greedy_policy(pi: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The deterministic policy playing actions[..., h, x], as probabilities over the last axis."""
    return (np.arange(pi.shape[-1]) == actions[..., None]).astype(float)


def policy_advantage(ev: Evaluation, pi_new: np.ndarray, weights: np.ndarray) -> float:
    """A_d(pi') = E_{(h,x) ~ weights} E_{y ~ pi'} [A_h^pi(x, y)] (weights sum to 1 over (h, x))."""
    return float((weights * (pi_new * ev.advantage).sum(-1)).sum())


# Phase 1: Q-sampling -----------------------------------------------------------------------------------------------


def draw_resets(rng: np.random.Generator, ev: Evaluation, n: int) -> tuple[np.ndarray, np.ndarray]:
    """SAMPLER(pi, mu), n times: h ~ Unif[H] and x ~ d_pi^h (drawn from the exact d_pi^h, which has the law of
    a state reached by rolling pi out from mu)."""
    H, S = ev.d.shape
    h = rng.integers(H, size=n)
    u = rng.random(n)
    cdf = np.cumsum(ev.d, axis=1)
    x = np.minimum((u[:, None] > cdf[h]).sum(1), S - 1)
    return h, x


def credit_sampler(rng: np.random.Generator, ev: Evaluation, G: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """CREDIT_SAMPLER by rejection (Appendix B, Algorithm 3): on-policy draws, kept where the oracle says x in G.

    Returns (h, x, trials): the n accepted pairs and the number of on-policy draws (cheap calls) it took.
    """
    if coverage(ev, G) == 0:
        raise ValueError("p_pi = 0: no improvable state is reachable, so the credit sampler has nothing to draw.")
    hs, xs, trials = [], [], 0
    while sum(len(h) for h in hs) < n:
        h, x = draw_resets(rng, ev, max(n, 64))
        keep = G[h, x]
        need = n - sum(len(a) for a in hs)
        idx = np.flatnonzero(keep)
        if len(idx) > need:  # stop at the draw that completed the n-th acceptance
            trials += int(idx[need - 1]) + 1
            idx = idx[:need]
        else:
            trials += len(h)
        hs.append(h[idx])
        xs.append(x[idx])
    return np.concatenate(hs), np.concatenate(xs), trials


def q_rollouts(rng: np.random.Generator, mdp: MDP, pi, h: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """QROLLOUT(pi, x, y, h) for each sample: play y at (x, h), then pi to the horizon; return the sum of rewards."""
    pi = check_policy(mdp, pi)
    H = mdp.horizon
    state, action = x.copy(), y.copy()
    total = np.zeros(len(h))
    for t in range(H):
        live = h <= t
        if not live.any():
            continue
        first = h == t
        act = np.where(first, action, _draw_rows(rng, pi[t][state]))
        total[live] += mdp.r[t, state[live], act[live]]
        if t + 1 < H:
            nxt = _draw_rows(rng, mdp.P[t][state, act])
            state = np.where(live, nxt, state)
    return total


def _draw_rows(rng, probs: np.ndarray) -> np.ndarray:
    """One index per row of a (n, k) array of probability rows."""
    return np.minimum((rng.random(len(probs))[:, None] > np.cumsum(probs, axis=1)).sum(1), probs.shape[1] - 1)


def cell_stats(mdp: MDP, h, x, y, returns) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell sample counts and return sums, shaped (H, n_states, n_actions): all a tabular fit needs."""
    shape = (mdp.horizon, mdp.n_states, mdp.n_actions)
    flat = np.ravel_multi_index((h, x, y), shape)
    size = int(np.prod(shape))
    counts = np.bincount(flat, minlength=size).reshape(shape)
    sums = np.bincount(flat, weights=returns, minlength=size).reshape(shape)
    return counts, sums


def draw_cell_stats(rng, mdp: MDP, ev: Evaluation, weights: np.ndarray, n: int, replicates: int | None = None):
    """The per-cell counts and return sums of n Q-samples, drawn directly instead of one sample at a time.

    Exact in law, not an approximation: the cells (h, x, y) of n i.i.d. samples are multinomial with
    probabilities weights[h, x] / |Y|, and the returns in a cell are i.i.d.; with a deterministic return (H = 1)
    a cell's sum is count * r(x, y), with a binary return (0 or c) it is c * Binomial(count, Q/c). Other MDPs
    must use `q_rollouts`. With `replicates`, a leading axis of that many independent draws.
    """
    law = mdp.return_law()
    if law is None:
        raise ValueError(f"{mdp.name}: returns are neither deterministic nor binary; draw them with q_rollouts.")
    cells = np.repeat(weights[..., None] / mdp.n_actions, mdp.n_actions, axis=-1).ravel()
    size = None if replicates is None else (replicates,)
    counts = rng.multinomial(n, cells, size=size).reshape(
        (() if replicates is None else (replicates,)) + ev.q.shape
    )
    if law == "deterministic":
        return counts, counts * ev.q
    c = mdp.r[-1].max()
    if c == 0:
        return counts, np.zeros(counts.shape)
    return counts, c * rng.binomial(counts, np.clip(ev.q / c, 0.0, 1.0))


# Phase 2: fit, greedy, estimated advantage ------------------------------------------------------------------------


def fit_q(counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Least squares over the tabular class: each visited cell's mean return.

    The argmin leaves unvisited cells free; they are set to 0 (no evidence of reward), so an action never tried
    at a visited state is not preferred to one tried with a positive return.
    """
    return np.divide(sums, counts, out=np.zeros(np.shape(sums)), where=counts > 0)


def greedy(q_hat: np.ndarray, pi: np.ndarray, tie_break: str = "policy", rng=None) -> np.ndarray:
    """pi^+_h(x) = argmax_y Q_hat(x, y, h), as action indices.

    Ties (the paper leaves them open) go to the action pi plays most ("policy"; then the lowest index), so where
    the fit sees no difference the greedy policy keeps pi's action; or uniformly at random ("random").
    """
    _choice("tie_break", tie_break, TIE_BREAKS)
    best = q_hat >= q_hat.max(-1, keepdims=True)
    if tie_break == "policy":
        return np.where(best, np.broadcast_to(pi, best.shape), -1.0).argmax(-1)
    if rng is None:
        raise ValueError("tie_break='random' needs an rng; pass rng=np.random.default_rng(seed).")
    return np.where(best, rng.random(best.shape), -1.0).argmax(-1)


def advantage_estimate(counts, q_hat, pi, actions, baseline: str = "none") -> np.ndarray:
    """Line 9: A_hat = (1/n) sum_i |Y| (pi^+(y_i|x_i) - pi(y_i|x_i)) Q_hat(x_i, y_i, h_i), from cell counts.

    baseline="value" (not in the paper; opt-in) subtracts V_hat(x) = sum_y pi(y|x) Q_hat(x, y, h) from Q_hat,
    which keeps the mean (sum_y (pi^+ - pi) = 0) and removes the noise a constant return level adds.
    """
    _choice("baseline", baseline, BASELINES)
    n_actions = counts.shape[-1]
    diff = greedy_policy(pi, actions) - pi
    value = q_hat
    if baseline == "value":
        value = q_hat - (pi * q_hat).sum(-1, keepdims=True)
    axes = tuple(range(-3, 0))
    n = counts.sum(axis=axes)
    return n_actions * (counts * diff * value).sum(axis=axes) / n


# Phase 3: conservative update -------------------------------------------------------------------------------------


def step_size(a_hat, horizon: int, r_max: float, rule: str):
    """Line 10 ("kakade-langford"): min{1, A_hat / (H^2 R_max)}; line 11 ("credit-aware", Cor. 5): half of that.

    A non-positive A_hat gives no valid mixture (Proposition 10); the step is then 0 (no update).
    """
    _choice("step_rule", rule, STEP_RULES)
    scale = horizon**2 * r_max * (2.0 if rule == "credit-aware" else 1.0)
    return np.clip(np.asarray(a_hat) / scale, 0.0, 1.0)


def mix(pi: np.ndarray, actions: np.ndarray, alpha: float, on: np.ndarray | None = None) -> np.ndarray:
    """pi_alpha = (1 - alpha) pi + alpha pi^+ on every state (line 12), or only where `on` is true (line 13)."""
    mixed = (1.0 - alpha) * pi + alpha * greedy_policy(pi, actions)
    return mixed if on is None else np.where(on[..., None], mixed, pi)


# One iteration ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Iteration:
    """One pass of Algorithm 1: what it estimated and what it bought, J computed exactly."""

    algorithm: str
    n: int
    trials: int  # on-policy draws (cheap calls); equals n for random resets
    p_pi: float
    a_hat: float
    target: float  # A_d(pi^+) under the sampling law, exact: what a_hat estimates
    alpha: float
    j_before: float
    j_after: float
    policy: np.ndarray
    greedy: np.ndarray  # pi_hat^+ as action indices [h, x]

    @property
    def gain(self) -> float:
        return self.j_after - self.j_before


def cpi_iteration(
    mdp: MDP,
    pi,
    *,
    algorithm: str,
    n: int,
    tau: float,
    rng: np.random.Generator,
    step_rule: str | None = None,
    tie_break: str = "policy",
    baseline: str = "none",
    sampling: str = "auto",
) -> Iteration:
    """Algorithm 1 once: n Q-samples (random or oracle resets), tabular fit, greedy, A_hat, conservative step.

    step_rule defaults to the algorithm's own line (10 for CPI-RR, 11 for CPI-CARO). sampling="rollouts" runs
    one Q-rollout per sample; "sufficient" draws the per-cell statistics directly (`draw_cell_stats`); "auto"
    takes the latter where it is exact. With p_pi = 0, CPI-CARO makes no update (Section 3.1).
    """
    _choice("algorithm", algorithm, ALGORITHMS)
    _choice("sampling", sampling, SAMPLINGS)
    step_rule = DEFAULT_STEP_RULE[algorithm] if step_rule is None else step_rule
    _choice("step_rule", step_rule, STEP_RULES)
    _choice("tie_break", tie_break, TIE_BREAKS)
    _choice("baseline", baseline, BASELINES)
    if int(n) != n or n < 1:
        raise ValueError(f"n={n} must be a positive integer number of Q-samples.")
    if sampling == "sufficient" and mdp.return_law() is None:
        raise ValueError(f"sampling='sufficient' is not exact for {mdp.name}; use sampling='rollouts'.")
    pi = check_policy(mdp, pi)
    ev = evaluate(mdp, pi)
    G = improvable_set(ev, tau)
    p_pi = coverage(ev, G)
    if algorithm == "cpi-caro" and p_pi == 0:
        return Iteration(algorithm, int(n), 0, 0.0, 0.0, 0.0, 0.0, ev.j, ev.j, pi, greedy(ev.q, pi))
    weights = reset_weights(ev, G, algorithm)
    if sampling == "rollouts" or (sampling == "auto" and mdp.return_law() is None):
        if algorithm == "cpi-caro":
            h, x, trials = credit_sampler(rng, ev, G, int(n))
        else:
            (h, x), trials = draw_resets(rng, ev, int(n)), int(n)
        y = rng.integers(mdp.n_actions, size=int(n))
        counts, sums = cell_stats(mdp, h, x, y, q_rollouts(rng, mdp, pi, h, x, y))
    else:
        counts, sums = draw_cell_stats(rng, mdp, ev, weights, int(n))
        trials = int(n) + (int(rng.negative_binomial(int(n), p_pi)) if algorithm == "cpi-caro" else 0)
    q_hat = fit_q(counts, sums)
    actions = greedy(q_hat, pi, tie_break, rng)
    a_hat = float(advantage_estimate(counts, q_hat, pi, actions, baseline))
    alpha = float(step_size(a_hat, mdp.horizon, mdp.r_max, step_rule))
    new = mix(pi, actions, alpha, on=G if algorithm == "cpi-caro" else None)
    exact_greedy = greedy(ev.q, pi, "policy")
    target = policy_advantage(ev, greedy_policy(pi, exact_greedy), weights)
    return Iteration(algorithm, int(n), trials, p_pi, a_hat, target, alpha, ev.j, evaluate(mdp, new).j, new, actions)


# Instances ---------------------------------------------------------------------------------------------------------


def tight_construction(p: float, tau: float, *, n_actions: int = 2, r_max: float = 1.0, eps: float | None = None):
    """Appendix A.3 (Figure 5): H = 1, states x1 (prob p) and x2, base policy y0 everywhere.

    r(x, y_k) = R_max/2 for k != 1, r(x1, y1) = R_max/2 + tau, r(x2, y1) = R_max/2 + eps. eps defaults to
    tau p / (100 (1 - p)), well below the paper's eps << tau p / (1 - p). Returns (mdp, pi).
    """
    if not 0 < p < 1:
        raise ValueError(f"p={p} must lie in (0, 1): it is the probability of the improvable state x1.")
    if not 0 < tau <= r_max / 2:
        raise ValueError(f"tau={tau} must lie in (0, r_max/2 = {r_max / 2}] so every reward is in [0, r_max].")
    if n_actions < 2:
        raise ValueError(f"n_actions={n_actions} must be at least 2 (y0 and y1).")
    eps = tau * p / (100 * (1 - p)) if eps is None else eps
    if not 0 <= eps < tau:
        raise ValueError(f"eps={eps} must lie in [0, tau={tau}) so that x2 is not improvable.")
    r = np.full((1, 2, n_actions), r_max / 2)
    r[0, 0, 1] += tau
    r[0, 1, 1] += eps
    P = np.full((1, 2, n_actions, 2), 0.5)  # unused at H = 1
    pi = np.zeros((1, 2, n_actions))
    pi[..., 0] = 1.0
    return MDP(P=P, r=r, mu=np.array([p, 1 - p]), r_max=r_max, name="tight"), pi


PRE, CRIT, POST, FAIL = range(4)


def critical_chain(p: float, horizon: int, tau: float, *, n_actions: int = 2, r_max: float = 1.0):
    """A reasoning chain with at most one critical step, reached with a set probability: p_pi = p exactly.

    States: on track before the critical step (PRE), at it (CRIT), on track after it (POST), failed (FAIL).
    Each trajectory meets the critical step with probability rho = p H, at a uniformly random time (the
    environment decides, not the policy). At CRIT, y1 keeps the chain on track and every other action fails;
    elsewhere actions do not matter. The reward is R_max at the end if the chain is on track. The base policy
    plays y0 everywhere except at CRIT, where it finds y1 with probability 1 - tau/R_max, so
    A(CRIT, y1) = tau and every other state has zero advantage: G = {CRIT} and p_pi = rho / H = p.
    Returns (mdp, pi).
    """
    if horizon < 1:
        raise ValueError(f"horizon={horizon} must be at least 1.")
    if not 0 < p <= 1 / horizon:
        raise ValueError(f"p={p} must lie in (0, 1/horizon = {1 / horizon}]: one critical step per trajectory.")
    if not 0 < tau <= r_max:
        raise ValueError(f"tau={tau} must lie in (0, r_max={r_max}].")
    if n_actions < 2:
        raise ValueError(f"n_actions={n_actions} must be at least 2.")
    H, A, per_step = horizon, n_actions, p
    P = np.zeros((H, 4, A, 4))
    for h in range(H):
        # P(critical at h+1 | no critical step up to h): a uniform critical time over the H steps.
        hazard = per_step / (1 - (h + 1) * per_step) if (h + 1) * per_step < 1 else 1.0
        P[h, PRE, :, CRIT] = min(hazard, 1.0)
        P[h, PRE, :, PRE] = 1 - P[h, PRE, 0, CRIT]
        P[h, CRIT, :, FAIL] = 1.0
        P[h, CRIT, 1, FAIL] = 0.0
        P[h, CRIT, 1, POST] = 1.0
        P[h, POST, :, POST] = 1.0
        P[h, FAIL, :, FAIL] = 1.0
    r = np.zeros((H, 4, A))
    r[-1, [PRE, POST], :] = r_max
    r[-1, CRIT, 1] = r_max
    pi = np.zeros((H, 4, A))
    pi[..., 0] = 1.0
    found = 1 - tau / r_max
    pi[:, CRIT, 0], pi[:, CRIT, 1] = 1 - found, found
    mu = np.array([1 - per_step, per_step, 0.0, 0.0])
    return MDP(P=P, r=r, mu=mu, r_max=r_max, name="chain"), pi
