"""PGD/FGSM: closed-form optima on linear models, budgets, determinism, no retracing, errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.attacks import fgsm, losses, multi_targeted_pgd, pgd
from jaxrobust.threat import ThreatModel


def min_linear_in_set(c, x0, norm, eps, box):
    """min_{x in B_p(x0, eps) ∩ box} c·x, exactly (greedy-in-box argument of Algorithm 3.4)."""
    lo = np.full_like(x0, -np.inf) if box is None else box[0] - x0
    hi = np.full_like(x0, np.inf) if box is None else box[1] - x0
    # the best direction for each coordinate is -sign(c); how far it may go: room
    room = np.where(c > 0, -lo, hi)
    if norm == "linf":
        return c @ x0 - np.sum(np.abs(c) * np.minimum(room, eps))
    if norm == "l1":  # spend the budget on the largest |c_i| first, each up to its room
        val, budget = c @ x0, eps
        for i in np.argsort(-np.abs(c)):
            step = min(room[i], budget)
            val -= abs(c[i]) * step
            budget -= step
            if budget <= 0:
                break
        return val
    # l2: d_i = min(lam |c_i|, room_i), ||d|| = eps, by bisection on lam
    a, b = 0.0, 1e6
    for _ in range(200):
        lam = 0.5 * (a + b)
        d = np.minimum(lam * np.abs(c), room)
        a, b = (lam, b) if np.sum(d ** 2) < eps ** 2 else (a, lam)
    d = np.minimum(b * np.abs(c), room)
    if np.sum(d ** 2) < eps ** 2 - 1e-9:  # box exhausted before the ball
        d = room.copy()
    return c @ x0 - np.sum(np.abs(c) * d)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("use_box", [False, True])
def test_pgd_reaches_closed_form_margin_on_linear_model(norm, use_box):
    rng = np.random.default_rng(0)
    d, k, n = 12, 3, 6
    W = rng.normal(size=(d, k)).astype(np.float32)
    b = rng.normal(size=k).astype(np.float32)
    x = rng.uniform(0.05, 0.95, size=(n, d)).astype(np.float32)
    f = lambda z: z @ W + b
    y = np.argmax(f(x), 1)
    eps = {"linf": 0.1, "l2": 0.5, "l1": 1.0}[norm]
    box = (0.0, 1.0) if use_box else None
    tm = ThreatModel(norm=norm, eps=eps, box=box)
    # multi-targeted PGD with a cosine step schedule (needed for l2 to converge, not to oscillate)
    def attack(x, y, key):
        keys = jax.random.split(key, k - 1)
        best = x
        for j in range(1, k):
            t = (y + j) % k
            xa = pgd(f, x, y, keys[j - 1], tm, steps=200, loss="cw", targeted=True, y_target=t,
                     step_size=eps / 10, step_schedule="cosine", random_start=False)
            better = losses.margin(f(xa), y) < losses.margin(f(best), y)
            best = jnp.where(better[:, None], xa, best)
        return best

    x_adv = jax.jit(attack)(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    assert bool(jnp.all(tm.contains(jnp.asarray(x), x_adv)))
    got = np.asarray(losses.margin(f(x_adv), jnp.asarray(y)))
    b_np = np.asarray(b)
    expected = []
    for i in range(n):
        vals = [min_linear_in_set(W[:, y[i]] - W[:, j], x[i].astype(np.float64), norm, eps,
                                  None if box is None else np.array(box)) + b_np[y[i]] - b_np[j]
                for j in range(k) if j != y[i]]
        expected.append(min(vals))
    np.testing.assert_allclose(got, expected, atol=2e-3 * max(1.0, eps))


def test_untargeted_pgd_on_binary_linear_model_and_fgsm_linf_exact():
    # For a binary linear classifier FGSM (l_inf, no box) is already optimal.
    rng = np.random.default_rng(1)
    W = rng.normal(size=(5, 2)).astype(np.float32)
    f = lambda z: z @ W
    x = rng.uniform(0.2, 0.8, size=(8, 5)).astype(np.float32)
    y = np.argmax(f(x), 1)
    tm = ThreatModel(norm="linf", eps=0.05, box=None)
    c = (W[:, y] - W[:, 1 - y]).T  # (8, 5)
    expected = np.sum(c * x, 1) - 0.05 * np.abs(c).sum(1)
    for attack in (lambda: fgsm(f, x, y, jax.random.PRNGKey(0), tm),
                   lambda: pgd(f, x, y, jax.random.PRNGKey(0), tm, steps=20, loss="ce")):
        got = losses.margin(f(attack()), y)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def _tiny_net(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    W1 = jax.random.normal(k1, (16, 32)) / 4
    W2 = jax.random.normal(k2, (32, 4)) / 5
    return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ W1) @ W2


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_pgd_points_in_budget_deterministic_and_no_retrace(norm):
    chex.clear_trace_counter()
    f = _tiny_net()
    x = jax.random.uniform(jax.random.PRNGKey(3), (8, 4, 4, 1))
    y = jnp.argmax(f(x), 1)
    tm = ThreatModel(norm=norm, eps=jnp.linspace(0.05, 0.5, 8),
                     per_feature_eps=jnp.linspace(0.5, 1.5, 16).reshape(4, 4, 1))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, y, key, tm):
        return pgd(f, x, y, key, tm, steps=10, restarts=2, early_stop=True)

    a = run(x, y, jax.random.PRNGKey(0), tm)
    b = run(x, y, jax.random.PRNGKey(0), tm)
    np.testing.assert_array_equal(a, b)
    run(x + 0.0, y, jax.random.PRNGKey(1), tm.replace(eps=tm.eps * 0.5))  # same shapes: no retrace
    assert bool(jnp.all(tm.contains(x, a)))
    # the attack never makes the margin larger than at the clean point
    assert bool(jnp.all(losses.margin(f(a), y) <= losses.margin(f(x), y) + 1e-5))


def test_multi_targeted_pgd_breaks_at_least_as_many_as_pgd():
    f = _tiny_net(2)
    x = jax.random.uniform(jax.random.PRNGKey(6), (64, 16))
    y = jnp.argmax(f(x), 1)
    tm = ThreatModel(norm="linf", eps=0.1)
    mt = multi_targeted_pgd(f, x, y, jax.random.PRNGKey(0), tm, num_classes=4, steps=20)
    pg = pgd(f, x, y, jax.random.PRNGKey(0), tm, steps=20, loss="cw")
    assert bool(jnp.all(tm.contains(x, mt)))
    assert int(jnp.sum(losses.margin(f(mt), y) < 0)) >= int(jnp.sum(losses.margin(f(pg), y) < 0))


def test_more_steps_and_restarts_are_not_weaker():
    f = _tiny_net(1)
    x = jax.random.uniform(jax.random.PRNGKey(5), (64, 16))
    y = jnp.argmax(f(x), 1)
    tm = ThreatModel(norm="linf", eps=0.15)
    m = lambda xa: float(jnp.mean(losses.margin(f(xa), y)))
    weak = m(pgd(f, x, y, jax.random.PRNGKey(0), tm, steps=5, restarts=1))
    strong = m(pgd(f, x, y, jax.random.PRNGKey(0), tm, steps=50, restarts=3, loss="cw"))
    assert strong <= weak + 1e-6


def test_bad_inputs():
    f = _tiny_net()
    x = jnp.ones((2, 16)) * 0.5
    with pytest.raises(ValueError, match="NaN"):
        pgd(f, x.at[0, 0].set(jnp.nan), jnp.zeros(2, jnp.int32), jax.random.PRNGKey(0),
            ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="y_target"):
        pgd(f, x, jnp.zeros(2, jnp.int32), jax.random.PRNGKey(0), ThreatModel("linf", 0.1),
            targeted=True)
    with pytest.raises(ValueError, match="loss"):
        pgd(f, x, jnp.zeros(2, jnp.int32), jax.random.PRNGKey(0), ThreatModel("linf", 0.1), loss="hinge9")
    with pytest.raises(ValueError, match="labels"):
        pgd(f, x, jnp.zeros(3, jnp.int32), jax.random.PRNGKey(0), ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="step_schedule"):
        pgd(f, x, jnp.zeros(2, jnp.int32), jax.random.PRNGKey(0), ThreatModel("linf", 0.1),
            step_schedule="zigzag")


def test_evaluate_robustness_pgd_step_size_setting():
    """``pgd_step_size`` reaches the PGD of the evaluator: on a binary linear model one step of 2ε
    from any start in the l∞ ball lands on the worst corner (the closed form), a negligible step
    stays at the random start, and a bad value is one clear error."""
    from jaxrobust.attacks.autoattack import evaluate_robustness
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    fn = lambda x: jnp.stack([jnp.zeros(x.shape[0]), x @ w], -1)  # class 1 iff w·x > 0
    x = rng.uniform(0.3, 0.7, size=(64, 6)).astype(np.float32)
    y = (x @ np.asarray(w) > 0).astype(np.int32)
    tm = ThreatModel("linf", 0.05, box=(0.0, 1.0))
    worst = np.abs(x @ np.asarray(w)) > 0.05 * np.abs(np.asarray(w)).sum()  # closed form
    kw = dict(attacks=("pgd",), batch_size=64, verbose=False, log=lambda *_: None, pgd_steps=1)
    big = evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), tm, pgd_step_size=0.1, **kw)
    np.testing.assert_array_equal(big["robust"], worst)
    tiny = evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), tm, pgd_step_size=1e-7, **kw)
    assert tiny["robust_accuracy"]["pgd"] > big["robust_accuracy"]["pgd"]
    with pytest.raises(ValueError, match="pgd_step_size must be a finite number"):
        evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), tm, pgd_step_size=float("nan"), **kw)
