"""jaxrobust.bounds.geometry: the capped l_p solvers behind CROWN concretisation and PEC (issue #10).

Exactness against independent references (LP / bisection in float64) on small and MNIST-sized rows,
soundness of the returned dual value, gradients (envelope theorem), the closed forms without a box
(``c=None``), and the absence of a per-row sort in the hot path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxrobust.bounds import geometry


def _ref_gain(w, c, t, norm):
    """float64 references: interval rule (linf), LP (l1), bisection on the KKT multiplier (l2)."""
    n = len(w)
    if norm == "linf":
        return float(np.sum(w * np.minimum(c, t)))
    if norm == "l1":
        if t == 0:
            return 0.0
        ub = [None if cj >= 1e14 else cj for cj in c]
        r = linprog(-w, A_ub=np.ones((1, n)), b_ub=[t], bounds=list(zip([0] * n, ub)), method="highs")
        assert r.status == 0
        return -r.fun
    pos = w > 0
    if not pos.any():
        return 0.0
    if np.sqrt(np.sum(c[pos] ** 2)) <= t:
        return float(np.sum(w * c))
    a, b = 0.0, float(t / np.min(w[pos])) + 1.0
    for _ in range(300):
        lam = 0.5 * (a + b)
        if np.sqrt(np.sum(np.minimum(lam * w[pos], c[pos]) ** 2)) > t:
            b = lam
        else:
            a = lam
    return float(np.sum(w[pos] * np.minimum(a * w[pos], c[pos])))


def _instances(n_inst=60, n=9, seed=0, huge=False):
    rng = np.random.default_rng(seed)
    w = rng.exponential(1.0, (n_inst, n)) * (rng.uniform(size=(n_inst, n)) > 0.2)
    c = rng.uniform(0.0, 2.0, (n_inst, n)) * (rng.uniform(size=(n_inst, n)) > 0.2)
    if huge:
        c = np.where(c > 0, 1e15, 0.0)
    w[0], c[0] = 0.0, 1.0  # all-zero weights
    c[1] = 0.0  # all-zero caps
    w[2, :3] = 0.0  # zero weights with positive caps
    w[3] = 1.0  # ties everywhere (l1 threshold on a plateau)
    w[4, :4] = 0.7
    t = rng.uniform(0.0, 3.0, n_inst)
    t[5] = 0.0
    t[6] = 50.0  # every movement at its cap (unless huge)
    return w.astype(np.float32), c.astype(np.float32), t.astype(np.float32)


def _mnist_like_rows(rows=24, n=784, seed=1):
    """First-layer rows at an MNIST-like image under the [0, 1] box: most pixels are 0 (caps 0 on one
    side), weights of mixed scale."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.uniform(size=n) < 0.8, 0.0, rng.uniform(size=n))
    a = rng.normal(size=(rows, n)) * rng.exponential(1.0, (rows, 1)) / 28
    w, c = geometry.descent_caps(jnp.asarray(a, jnp.float32), jnp.asarray(-x, jnp.float32)[None],
                                 jnp.asarray(1 - x, jnp.float32)[None])
    return np.asarray(w), np.asarray(c)


@pytest.mark.parametrize("huge", [False, True], ids=["box", "huge_caps"])
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_max_capped_gain_matches_references(norm, huge):
    w, c, t = _instances(huge=huge)
    g = np.asarray(jax.jit(geometry.max_capped_gain, static_argnums=3)(w, c, t, norm))
    for i in range(len(w)):
        want = _ref_gain(w[i].astype(np.float64), c[i].astype(np.float64), float(t[i]), norm)
        assert g[i] == pytest.approx(want, rel=2e-5, abs=1e-5), (i, w[i], c[i], t[i])


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_max_capped_gain_exact_and_sound_on_mnist_sized_rows(norm):
    w, c = _mnist_like_rows()
    for t in (0.05, 0.5, 2.0, 8.0):
        g = np.asarray(geometry.max_capped_gain(jnp.asarray(w), jnp.asarray(c), t, norm))
        for i in range(len(w)):
            want = _ref_gain(w[i].astype(np.float64), c[i].astype(np.float64), t, norm)
            assert g[i] == pytest.approx(want, rel=1e-5, abs=1e-6), (t, i)
            assert g[i] >= want * (1 - 2e-6) - 1e-7  # the dual value: never below the maximum


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_no_box_is_the_closed_dual_norm(norm):
    """c=None (no box): max_{||m||_p <= t} w·m = t ||w||_q and min{||m||_p : w·m >= b} = b / ||w||_q;
    the same values as the capped solvers with unbounded caps."""
    w, _, t = _instances(huge=True)
    q = {"linf": np.sum(w, 1), "l2": np.sqrt(np.sum(w.astype(np.float64) ** 2, 1)), "l1": np.max(w, 1)}[norm]
    g = np.asarray(geometry.max_capped_gain(jnp.asarray(w), None, jnp.asarray(t), norm))
    np.testing.assert_allclose(g, t * q, rtol=1e-6, atol=1e-6)
    big = np.full_like(w, 1e15)
    np.testing.assert_allclose(g, np.asarray(geometry.max_capped_gain(w, big, t, norm)), rtol=1e-5, atol=1e-6)
    b = np.linspace(-0.5, 2.0, len(w)).astype(np.float32)
    d = np.asarray(geometry.min_norm_for_gain(jnp.asarray(w), None, jnp.asarray(b), norm))
    want = np.where(b <= 0, 0.0, np.where(q > 0, b / np.where(q > 0, q, 1), np.inf))
    np.testing.assert_allclose(d, want, rtol=1e-6)
    np.testing.assert_allclose(d, np.asarray(geometry.min_norm_for_gain(w, big, b, norm)), rtol=1e-5)
    # descent_caps / scaled_box pass "no box" through
    vlo, vhi = geometry.scaled_box(jnp.zeros(3), jnp.ones(3), None, None)
    assert vlo is None and vhi is None
    wc = geometry.descent_caps(jnp.array([1.0, -2.0, 0.0]), vlo, vhi)
    assert wc[1] is None and np.allclose(wc[0], [1, 2, 0])


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_hot_path_has_no_sort(norm):
    """l2/l1 concretisation used to sort every row (d log d per neuron and example, with ~10 sorted
    copies alive): neither the capped solver nor the box-free closed form may sort."""
    w, c = _mnist_like_rows(rows=4)
    for caps in (c, None):
        jaxpr = str(jax.make_jaxpr(lambda w, c: geometry.max_capped_gain(w, c, 0.5, norm))(w, caps))
        assert "sort" not in jaxpr


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_gradients_are_the_envelope_derivatives(norm):
    """d gain / d w = m*, d gain / d t = the budget's multiplier: compared with central differences
    in float64 (away from break points)."""
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(3)
        w = jnp.asarray(rng.uniform(0.1, 2.0, 12))
        c = jnp.asarray(rng.uniform(0.05, 0.6, 12))
        t = jnp.asarray(0.9)
        f = lambda w, c, t: geometry.max_capped_gain(w, c, t, norm)
        gw, gc, gt = jax.grad(f, argnums=(0, 1, 2))(w, c, t)
        h = 1e-6
        for j in range(12):
            e = jnp.zeros(12).at[j].set(h)
            assert float(gw[j]) == pytest.approx(float(f(w + e, c, t) - f(w - e, c, t)) / (2 * h), abs=1e-5)
            assert float(gc[j]) == pytest.approx(float(f(w, c + e, t) - f(w, c - e, t)) / (2 * h), abs=1e-5)
        assert float(gt) == pytest.approx(float(f(w, c, t + h) - f(w, c, t - h)) / (2 * h), abs=1e-5)
        assert np.all(np.isfinite(jax.grad(lambda t: f(w, c, t))(0.0)))  # t = 0 and saturated: finite
        assert np.all(np.isfinite(jax.grad(lambda t: f(w, c, t))(50.0)))
    finally:
        jax.config.update("jax_enable_x64", False)


def test_l2_gain_is_vmappable_and_batched_rows_agree():
    w, c = _mnist_like_rows(rows=6)
    t = jnp.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.0])
    whole = geometry.max_capped_gain(jnp.asarray(w), jnp.asarray(c), t, "l2")
    each = jax.vmap(lambda a, b, s: geometry.max_capped_gain(a, b, s, "l2"))(w, c, t)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(each), rtol=1e-6)


def test_unknown_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown norm"):
        geometry.max_capped_gain(jnp.ones(3), jnp.ones(3), 1.0, "l3")
    with pytest.raises(ValueError, match="unknown norm"):
        geometry.min_norm_for_gain(jnp.ones(3), None, 1.0, "l3")
