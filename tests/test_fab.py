"""FAB: exact hyperplane projections inside the box, minimal norms on linear models, FAB-T."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxrobust.attacks import fab, losses, pgd
from jaxrobust.attacks.fab import project_hyperplane
from jaxrobust.threat import ThreatModel, lp_norm


def _lp_min_step(w, c, lo, hi, norm):
    """Reference: min ||d||_p s.t. w·d = c, lo <= d <= hi (LP for l_inf/l_1, SLSQP for l_2)."""
    n = len(w)
    if norm == "linf":  # variables (d, t): min t, -t <= d_i <= t
        A_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
        res = scipy.optimize.linprog(np.r_[np.zeros(n), 1.0], A_ub=A_ub, b_ub=np.zeros(2 * n),
                                     A_eq=np.r_[w, 0.0][None], b_eq=[c],
                                     bounds=list(zip(lo, hi)) + [(0, None)])
        return res.fun if res.status == 0 else np.inf
    if norm == "l1":  # d = a - b
        res = scipy.optimize.linprog(np.ones(2 * n), A_eq=np.r_[w, -w][None], b_eq=[c],
                                     A_ub=np.block([[np.eye(n), -np.eye(n)], [-np.eye(n), np.eye(n)]]),
                                     b_ub=np.r_[hi, -lo], bounds=[(0, None)] * (2 * n))
        return res.fun if res.status == 0 else np.inf
    res = scipy.optimize.minimize(lambda d: np.sum(d ** 2), np.zeros(n), jac=lambda d: 2 * d,
                                  constraints=[{"type": "eq", "fun": lambda d: w @ d - c,
                                                "jac": lambda d: w}],
                                  bounds=list(zip(lo, hi)), method="SLSQP",
                                  options={"ftol": 1e-14, "maxiter": 500})
    return np.sqrt(res.fun) if res.success else np.inf


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_hyperplane_projection_is_minimal_inside_box(norm):
    rng = np.random.default_rng(0)
    for trial in range(6):
        n = 7
        x = rng.uniform(0, 1, n)
        w = rng.normal(size=n)
        c = rng.normal() * 0.5
        lo, hi = -x, 1 - x
        d = np.asarray(project_hyperplane(jnp.asarray(x[None], jnp.float32), jnp.asarray(w[None], jnp.float32),
                                          jnp.asarray([c], jnp.float32), jnp.asarray(lo[None], jnp.float32),
                                          jnp.asarray(hi[None], jnp.float32), norm))[0]
        ref = _lp_min_step(w, c, lo, hi, norm)
        assert np.all(d >= lo - 1e-6) and np.all(d <= hi + 1e-6)
        if np.isfinite(ref):
            assert abs(w @ d - c) < 1e-4
            ours = {"linf": np.max(np.abs(d)), "l2": np.linalg.norm(d), "l1": np.sum(np.abs(d))}[norm]
            assert ours == pytest.approx(ref, rel=2e-3, abs=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fab_minimal_norm_on_linear_model(norm):
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=3), jnp.float32)
    f = lambda z: z @ W + bias
    x = jnp.asarray(rng.uniform(0.1, 0.9, size=(6, 10)), jnp.float32)
    y = jnp.argmax(f(x), 1)
    big = ThreatModel(norm, 10.0)
    _, norms = jax.jit(lambda x, y, k: fab(f, x, y, k, big, targeted=False, n_iter=30,
                                            return_norms=True))(x, y, jax.random.PRNGKey(0))
    # exact minimal distance to the decision boundary inside the box
    exact = []
    for i in range(6):
        best = np.inf
        for j in range(3):
            if j == int(y[i]):
                continue
            wv = np.asarray(W[:, j] - W[:, y[i]], np.float64)
            c = -float(f(x[i:i + 1])[0, j] - f(x[i:i + 1])[0, y[i]])
            best = min(best, _lp_min_step(wv, c, -np.asarray(x[i], np.float64),
                                          1 - np.asarray(x[i], np.float64), norm))
        exact.append(best)
    np.testing.assert_allclose(np.asarray(norms), exact, rtol=0.01)
    # PGD's adversarial points at a budget just above FAB's norm are never smaller than FAB's norm
    tm = ThreatModel(norm, jnp.asarray(norms) * 1.2)
    xa = pgd(f, x, y, jax.random.PRNGKey(0), tm, steps=100, loss="cw", step_schedule="cosine")
    broken = losses.margin(f(xa), y) < 0
    pgd_norms = lp_norm(xa - x, norm)
    assert bool(jnp.all(jnp.where(broken, pgd_norms >= norms * (1 - 0.01), True)))


def test_fab_targeted_on_tanh_net_respects_budget_and_breaks_points():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    W1, W2 = jax.random.normal(k1, (16, 24)) / 3, jax.random.normal(k2, (24, 5)) / 4
    f = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) @ W1) @ W2
    x = jax.random.uniform(jax.random.PRNGKey(3), (32, 4, 4, 1))
    y = jnp.argmax(f(x), 1)
    tm = ThreatModel("linf", 0.2)
    xa = jax.jit(lambda x, y, k: fab(f, x, y, k, tm, n_iter=30, n_target_classes=4))(
        x, y, jax.random.PRNGKey(1))
    assert bool(jnp.all(tm.contains(x, xa)))
    assert float(jnp.mean(jnp.argmax(f(xa), -1) == y)) < 0.9
