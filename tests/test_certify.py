"""PEC (Alg 3.4), optimal-ε search (Alg 3.5), non-uniform regions (Alg 3.3): exactness on linear
models, soundness against attacks, search-cost guarantee, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from jaxrobust.attacks import apgd, pgd
from jaxrobust.attacks.fab import fab
from jaxrobust.bounds import margin_bounds
from jaxrobust.certify import (certified_radius_curve, certify, cosine_similarity_stats, hyperplane_distances,
                               nonuniform_bounds, optimal_eps_search, pec_radius, signed_distances)
from jaxrobust.models import create_model, init_variables
from jaxrobust.threat import ThreatModel

D, K = 6, 3


def _linear():
    W = jax.random.normal(jax.random.PRNGKey(0), (D, K))
    b = jnp.array([0.3, -0.1, 0.0])
    return (lambda x: x @ W + b), np.asarray(W), np.asarray(b)


def _exact_distance(a, b0, lo, hi, norm):
    """min ||Δ||_p s.t. a·Δ + b0 <= 0, lo <= Δ <= hi, by an independent LP / NLP; inf if infeasible."""
    n = a.size
    if b0 <= 0:
        return 0.0
    if np.sum(np.minimum(a * lo, a * hi)) + b0 > 1e-9:
        return np.inf
    if norm == "linf":  # min t: |Δ| <= t
        A = np.r_[np.r_[a, 0][None], np.c_[np.eye(n), -np.ones(n)], np.c_[-np.eye(n), -np.ones(n)]]
        r = linprog(np.r_[np.zeros(n), 1], A_ub=A, b_ub=np.r_[-b0, np.zeros(2 * n)],
                    bounds=list(zip(lo, hi)) + [(0, None)])
        return r.fun
    if norm == "l1":  # Δ = P - N
        A = np.r_[a, -a][None]
        r = linprog(np.ones(2 * n), A_ub=A, b_ub=[-b0],
                    bounds=[(0, max(h, 0)) for h in hi] + [(0, max(-l, 0)) for l in lo])
        return r.fun
    best = np.inf
    for s in range(4):
        r = minimize(lambda d: d @ d, np.clip(-a * b0 / (a @ a) * (1 + 0.1 * s), lo, hi), method="SLSQP",
                     bounds=list(zip(lo, hi)), constraints=[{"type": "ineq", "fun": lambda d: -(a @ d + b0)}],
                     options={"ftol": 1e-12, "maxiter": 500})
        if r.success:
            best = min(best, np.sqrt(r.fun))
    return best


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_pec_is_exact_distance_to_decision_boundary_of_linear_model(norm):
    f, W, b = _linear()
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, D))
    y = jnp.argmax(f(x), -1)
    threat = ThreatModel(norm, 10.0)  # budget larger than any distance in the box
    mb = margin_bounds(f, x, y, threat, method="crown")
    d = np.asarray(hyperplane_distances(mb, x, y, threat))
    for n in range(8):
        for i in range(K):
            if i == int(y[n]):
                assert np.isinf(d[n, i])
                continue
            a = W[:, int(y[n])] - W[:, i]
            b0 = float(np.asarray(x[n]) @ a + b[int(y[n])] - b[i])
            ref = _exact_distance(a, b0, -np.asarray(x[n]), 1 - np.asarray(x[n]), norm)
            if np.isinf(ref):
                assert np.isinf(d[n, i])
            else:
                np.testing.assert_allclose(d[n, i], ref, rtol=1e-4, atol=1e-5)
    # Lemma 3.1 with a budget beyond the boundary: the radius is the exact minimal adversarial distance.
    r = np.asarray(pec_radius(mb, x, y, threat))
    np.testing.assert_allclose(r, np.minimum(10.0, d.min(1)), rtol=1e-6)


def test_signed_distance_matches_hoelder_without_box():
    f, W, b = _linear()
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, D))
    y = jnp.argmax(f(x), -1)
    t = ThreatModel("l2", 1.0, box=None)
    mb = margin_bounds(f, x, y, t)
    sd = np.asarray(signed_distances(mb, x, y, "l2"))
    d = np.asarray(hyperplane_distances(mb, x, y, t))
    finite = np.isfinite(d) & (sd > 0)
    np.testing.assert_allclose(sd[finite], d[finite], rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _relu_net():
    m = create_model("fc", 4, widths=(32, 32))
    v = init_variables(m, jax.random.PRNGKey(3), (10,))
    f = jax.jit(lambda x: m.apply(v, x))
    x = jax.random.uniform(jax.random.PRNGKey(4), (24, 10))
    y = jnp.argmax(f(x), -1)
    return f, x, y


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.15), ("l1", 0.4)])
def test_certified_points_never_broken_and_pec_below_adversarial_distance(norm, eps):
    f, x, y = _relu_net()
    threat = ThreatModel(norm, eps)
    c = jax.jit(lambda x, y: certify(f, x, y, threat, method="crown"))(x, y)
    cert = np.asarray(c.certified)
    assert 0 < cert.sum() < len(cert)  # the test exercises both outcomes
    xa = pgd(f, x, y, jax.random.PRNGKey(0), threat, steps=50, restarts=3, loss="cw", unroll=False)
    broken = np.asarray(jnp.argmax(f(xa), -1) != y)
    xb = apgd(f, x, y, jax.random.PRNGKey(2), threat, n_iter=50, loss="dlr" if norm == "linf" else "ce")
    broken_apgd = np.asarray(jnp.argmax(f(xb), -1) != y)
    assert broken.any() or broken_apgd.any()  # the attacks do break the uncertified points somewhere
    assert not np.any(cert & broken) and not np.any(cert & broken_apgd)
    # PEC radius <= the smallest adversarial distance an attack finds (radius is a lower bound).
    big = ThreatModel(norm, 10.0)
    _, norms = fab(f, x, y, jax.random.PRNGKey(1), big, n_iter=100, targeted=False, return_norms=True)
    norms = np.asarray(norms)
    r = np.asarray(c.radius)
    found = np.isfinite(norms)
    assert found.sum() > 5
    assert np.all(r[found] <= norms[found] + 1e-5)
    # PEC is never worse than the plain certificate and reaches beyond it on uncertified points.
    assert np.all(r >= np.where(cert, eps, 0.0) - 1e-7)
    assert np.any((r > 0) & ~cert)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_alg35_uses_no_more_bound_computations_than_binary_search(norm):
    f, x, y = _relu_net()
    threat = ThreatModel(norm, 0.1)
    run = jax.jit(lambda x, y, use: optimal_eps_search(f, x, y, threat, eps_high=1.0, tol=1e-3,
                                                       use_pec=use), static_argnums=2)
    pec, lin = run(x, y, True), run(x, y, False)
    assert np.all(np.asarray(pec.bound_computations) <= np.asarray(lin.bound_computations))
    assert np.mean(np.asarray(pec.bound_computations)) < np.mean(np.asarray(lin.bound_computations))
    assert int(lin.bound_computations[0]) == int(np.ceil(np.log2(1.0 / 1e-3)))
    # both radii are certified: re-certify at the found radius
    for res in (pec, lin):
        rad = jnp.maximum(res.radius, 1e-6)
        c = certify(f, x, y, threat.replace(eps=rad))
        assert np.all(np.asarray(c.radius) >= np.asarray(rad) * (1 - 1e-4) - 1e-7)
        assert np.all(np.asarray(res.upper - res.radius) <= 1e-3 + 1e-6)
    # the two searches agree within the tolerance (and PEC's lower end is never below binary's - tol)
    np.testing.assert_allclose(np.asarray(pec.radius), np.asarray(lin.radius), atol=2e-3)


def test_nonuniform_region_is_certified_and_larger_than_uniform():
    f, x, y = _relu_net()
    x, y = x[:6], y[:6]
    run = jax.jit(lambda x, y: nonuniform_bounds(f, x, y, uniform=True, iterations=150))
    uni = run(x, y)
    non = jax.jit(lambda x, y, u: nonuniform_bounds(f, x, y, init=0.9 * u, fallback=u, iterations=150))(x, y, uni.eps)
    assert bool(jnp.all(uni.certified)) and bool(jnp.all(non.certified))
    # every returned region is certified by an independent bound computation
    for res in (uni, non):
        t = ThreatModel("linf", 1.0, per_feature_eps=jnp.maximum(res.eps, 1e-12))
        assert bool(jnp.all(certify(f, x, y, t).certified))
        # and PGD inside the non-uniform box does not break it
        xa = pgd(f, x, y, jax.random.PRNGKey(0), t, steps=30, loss="cw", unroll=False)
        assert bool(jnp.all(jnp.argmax(f(xa), -1) == y))
    # uniform: all features equal; volume (geometric mean) of the non-uniform region >= uniform
    u = np.asarray(uni.eps)
    np.testing.assert_allclose(u, np.broadcast_to(u[:, :1], u.shape), rtol=1e-6)
    assert np.all(np.asarray(non.eps_avg) >= np.asarray(uni.eps_avg) * (1 - 1e-6))
    ratio = np.asarray(non.eps_avg) / np.asarray(uni.eps_avg)
    assert np.mean(ratio) > 1.02 and np.max(ratio) > 1.05  # the optimisation really enlarges regions
    # Alg 3.3's uniform result is close to the optimal uniform radius from bisection (δ aside)
    s = optimal_eps_search(f, x, y, ThreatModel("linf", 0.1), eps_high=1.0, tol=1e-4)
    assert np.all(np.asarray(uni.eps_avg) <= np.asarray(s.upper) + 1e-6)
    assert np.mean(np.asarray(uni.eps_avg) / np.asarray(s.radius)) > 0.8
    mean_cos, min_cos = cosine_similarity_stats(non.eps)
    assert -1 <= min_cos <= mean_cos <= 1


def test_errors():
    f, x, y = _relu_net()
    with pytest.raises(ValueError):
        optimal_eps_search(f, x, y, ThreatModel("linf", 0.1), eps_high=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        certify(f, x.at[0, 0].set(jnp.nan), y, ThreatModel("linf", 0.1))
    with pytest.raises(ValueError):
        ThreatModel("linf", -0.1)
    with pytest.raises(ValueError, match="labels"):
        certify(f, x, y[:3], ThreatModel("linf", 0.1))


# ----------------------------------------------------------------------------- memory-bounded chunks
@pytest.mark.parametrize("norm", ["l2", pytest.param("linf", marks=pytest.mark.slow),
                                  pytest.param("l1", marks=pytest.mark.slow)])
def test_chunked_certify_equals_unchunked(norm):
    """A tiny memory budget forces the 24 examples into chunks of 5 (the last one padded): the same
    certificates as one chunk, with per-example ε and with per-example ε⃗."""
    f, x, y = _relu_net()
    from jaxrobust.certify.pec import bytes_per_example
    per = bytes_per_example(f, x)
    eps = jnp.linspace(0.01, 0.2 if norm == "linf" else 0.6, x.shape[0])
    pf = jax.random.uniform(jax.random.PRNGKey(7), x.shape, minval=0.5, maxval=1.5)
    for threat in (ThreatModel(norm, eps), ThreatModel(norm, 0.1, per_feature_eps=pf)):
        whole = certify(f, x, y, threat)
        part = certify(f, x, y, threat, memory_budget_bytes=5 * per)
        for a, b in zip(whole, part):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert 0 < int(np.sum(np.asarray(whole.certified))) < x.shape[0]


def test_chunked_search_equals_unchunked():
    f, x, y = _relu_net()
    from jaxrobust.certify.pec import bytes_per_example
    small = 7 * bytes_per_example(f, x)  # chunks of 7: 24 = 3 x 7 + 3 (padded)
    threat = ThreatModel("l2", 0.1)
    a = optimal_eps_search(f, x, y, threat, eps_high=1.0, tol=1e-3)
    b = optimal_eps_search(f, x, y, threat, eps_high=1.0, tol=1e-3, memory_budget_bytes=small)
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_chunked_curve_equals_unchunked():
    f, x, y = _relu_net()
    from jaxrobust.certify.pec import bytes_per_example
    small = bytes_per_example(f, x) // 2  # one example per chunk
    threat = ThreatModel("l2", 0.1)
    grid = [0.05, 0.2]
    for u, v in zip(certified_radius_curve(f, x, y, threat, grid),
                    certified_radius_curve(f, x, y, threat, grid, memory_budget_bytes=small)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_chunk_size_follows_the_budget():
    f, x, y = _relu_net()
    from jaxrobust.certify.pec import bytes_per_example, chunk_size
    per = bytes_per_example(f, x)
    # fc 10-32-32-4: rows 2*32+4 of max(10, 32) columns, float32, a few live copies
    assert per == pytest.approx(4 * 68 * 32 * 4, rel=0.5)
    assert chunk_size(f, x, 3 * per + 1) == 3
    assert chunk_size(f, x, 1) == 1 and chunk_size(f, x, 10 ** 12) == x.shape[0]
    for bad in (0, -5, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="memory_budget_bytes"):
            certify(f, x, y, ThreatModel("linf", 0.1), memory_budget_bytes=bad)


def test_no_box_pec_is_the_closed_form_distance():
    """box=None: the distance to each margin hyperplane is (U_i x + p_i) / ||U_i||_q exactly."""
    f, W, b = _linear()
    x = jax.random.uniform(jax.random.PRNGKey(2), (5, D))
    y = jnp.argmax(f(x), -1)
    for norm, q in (("l2", 2), ("l1", np.inf), ("linf", 1)):
        t = ThreatModel(norm, 1.0, box=None)
        mb = margin_bounds(f, x, y, t)
        d = np.asarray(hyperplane_distances(mb, x, y, t))
        for n in range(5):
            for i in range(K):
                if i == int(y[n]):
                    continue
                a = W[:, int(y[n])] - W[:, i]
                want = (np.asarray(x[n]) @ a + b[int(y[n])] - b[i]) / np.linalg.norm(a, q)
                assert d[n, i] == pytest.approx(max(want, 0.0), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("bad", [4, -1])
def test_out_of_range_labels_are_rejected(bad):
    f, x, y = _relu_net()
    yb = y.at[0].set(bad)
    t = ThreatModel("linf", 0.1)
    with pytest.raises(ValueError, match="labels"):
        certify(f, x, yb, t)
    with pytest.raises(ValueError, match="labels"):
        optimal_eps_search(f, x, yb, t, eps_high=1.0)
    with pytest.raises(ValueError, match="labels"):
        certified_radius_curve(f, x, yb, t, [0.1])


def test_entry_points_assert_shapes_under_jit():
    """Under jit the eager checks cannot see values, but shapes are static: chex catches a label
    vector of the wrong length there too."""
    f, x, y = _relu_net()
    t = ThreatModel("linf", 0.1)
    with pytest.raises(AssertionError):
        jax.jit(lambda x, y: certify(f, x, y, t))(x, y[:5])
    with pytest.raises(TypeError, match="ThreatModel"):
        certify(f, x, y, "linf")


def test_nonuniform_entry_checks():
    f, x, y = _relu_net()
    with pytest.raises(ValueError, match="labels"):
        nonuniform_bounds(f, x, y.at[0].set(9), iterations=1)
    with pytest.raises(ValueError, match="init"):
        nonuniform_bounds(f, x, y, init=jnp.ones((3, 10)), iterations=1)
    with pytest.raises(AssertionError):
        jax.jit(lambda x, y: nonuniform_bounds(f, x, y, iterations=1))(x, y[:4])


@pytest.mark.slow
def test_certify_peak_memory_does_not_grow_with_the_batch():
    """Peak RSS of certify (l2 + box, fc1 on MNIST-5k, 8 MiB budget) for 16 and 96 images: the same
    within noise (unchunked it grew by ~45 MB per image). Runs bench/certify_memory.py in fresh
    processes."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    peak = {}
    for n in (16, 96):
        out = subprocess.run([sys.executable, "-m", "bench.certify_memory", "--n", str(n), "--norm", "l2",
                              "--budget-mib", "8"], cwd=root, capture_output=True, text=True, check=True)
        peak[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    assert peak[96] - peak[16] < 150, peak


def test_signed_distances_have_finite_gradients_under_l2():
    """PER differentiates signed_distances; row y has U = 0, whose l2 norm must not give NaN gradients."""
    import jax
    import jax.numpy as jnp
    from jaxrobust.bounds import margin_bounds
    from jaxrobust.certify import signed_distances
    from jaxrobust.threat import ThreatModel
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w1, w2 = jax.random.normal(k[0], (6, 8)), jax.random.normal(k[1], (8, 3))
    x = jax.random.uniform(k[2], (4, 6))
    y = jnp.array([0, 1, 2, 0])

    def total(w):
        fn = lambda z: jax.nn.relu(z @ w) @ w2
        mb = margin_bounds(fn, x, y, ThreatModel("l2", 0.1, box=None), method="fastlin")
        d = signed_distances(mb, x, y, "l2")
        return jnp.sum(jnp.where(jnp.isfinite(d), d, 0.0))

    g = jax.grad(total)(w1)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
