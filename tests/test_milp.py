"""Complete MILP verification (Table 3.6 "CRE MIP"): exactness against brute force (a dense grid
in 2-D, LP enumeration of activation patterns in 4-D), soundness of the incomplete bounds below it,
real counterexamples, PGD never breaking verified points, time-outs, errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxrobust.attacks import pgd
from jaxrobust.bounds import margin_bounds
from jaxrobust.certify.milp import milp_certified_error, milp_verify, summary
from jaxrobust.threat import ThreatModel

K = 3
B = 4  # one batch size (and input size 4) throughout: JAX compiles the bounds once per shape


def _params(seed, sizes, scale=1.0):
    """He-initialised dense layers [(W (in, out), b (out,))] in float32."""
    rng = np.random.default_rng(seed)
    out = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        W = rng.normal(0.0, scale * np.sqrt(2.0 / n_in), (n_in, n_out)).astype(np.float32)
        b = rng.normal(0.0, 0.3, (n_out,)).astype(np.float32)
        out.append((W, b))
    return out


def _mlp(params, lo=None, hi=None):
    """x -> logits; hidden activation max(z, lo) (ReLU when lo is None), then min(., hi) if given
    (per-neuron constant vectors: a clipped ReLU exercises 'min' and non-zero constants)."""
    def fn(x):
        h = x.reshape(x.shape[0], -1)
        for k, (W, b) in enumerate(params[:-1]):
            h = jnp.maximum(h @ W + b, 0.0 if lo is None else lo[k])
            if hi is not None:
                h = jnp.minimum(h, hi[k])
        W, b = params[-1]
        return h @ W + b
    return fn


def _np_logits(params, x, lo=None, hi=None):
    """The same network in float64 numpy (independent of JAX and of the MILP encoding)."""
    h = x.astype(np.float64)
    for k, (W, b) in enumerate(params[:-1]):
        h = np.maximum(h @ W.astype(np.float64) + b, 0.0 if lo is None else lo[k])
        if hi is not None:
            h = np.minimum(h, hi[k])
    W, b = params[-1]
    return h @ W.astype(np.float64) + b


def _enumerate_min_margins(params, x_lo, x_hi, y, lo=None, hi=None):
    """Exact min over the box [x_lo, x_hi] of z_y - z_i for every i, by enumerating the linear
    pieces: each hidden neuron is 'at its lower constant', 'linear' or 'at its upper constant'
    (ReLU: two states); on a fixed pattern the network is affine, so one LP per piece and class.
    Patterns are enumerated layer by layer, dropping a layer's pattern as soon as its piece is empty."""
    d = x_lo.size
    box = list(zip(x_lo, x_hi))
    best = np.full(K, np.inf)

    def lp(c, A_ub, b_ub):
        return linprog(c, A_ub=np.array(A_ub), b_ub=np.array(b_ub), bounds=box, method="highs")

    def visit(k, G, g, A_ub, b_ub):
        # Values of the current layer: G^T x + g (G: (d, n)); the piece so far: A_ub x <= b_ub.
        if k == len(params) - 1:
            W, b = params[-1]
            Go, go = G @ W.astype(np.float64), g @ W + b
            for i in range(K):
                if i != y:
                    r = lp(Go[:, y] - Go[:, i], A_ub, b_ub)
                    assert r.status == 0
                    best[i] = min(best[i], r.fun + go[y] - go[i])
            return
        W, b = params[k]
        W = W.astype(np.float64)
        Gz, gz = G @ W, g @ W + b  # pre-activations
        n = W.shape[1]
        lo_k = np.zeros(n) if lo is None else np.broadcast_to(lo[k], (n,))
        hi_k = np.full(n, np.inf) if hi is None else np.broadcast_to(hi[k], (n,))
        for pattern in itertools.product(range(2 if hi is None else 3), repeat=n):
            A, c = list(A_ub), list(b_ub)
            Gn, gn = np.zeros_like(Gz), np.zeros_like(gz)
            for j, s in enumerate(pattern):
                if s == 0:  # z <= lo: output lo
                    A.append(Gz[:, j]), c.append(lo_k[j] - gz[j])
                    gn[j] = lo_k[j]
                elif s == 1:  # lo <= z (<= hi): output z
                    A.append(-Gz[:, j]), c.append(gz[j] - lo_k[j])
                    if np.isfinite(hi_k[j]):
                        A.append(Gz[:, j]), c.append(hi_k[j] - gz[j])
                    Gn[:, j], gn[j] = Gz[:, j], gz[j]
                else:  # z >= hi: output hi
                    A.append(-Gz[:, j]), c.append(gz[j] - hi_k[j])
                    gn[j] = hi_k[j]
            if lp(np.zeros(d), A, c).status == 2:
                continue  # empty piece
            visit(k + 1, Gn, gn, A, c)

    visit(0, np.eye(d), np.zeros(d), [], [])
    return best


def _input_box(x, eps):
    return np.clip(x - eps, 0.0, 1.0), np.clip(x + eps, 0.0, 1.0)


# ----------------------------------------------------------------------------- 1. exactness
@pytest.mark.slow  # ~30 s on 2 cores (compiling the bounds for a second input size, 16M grid points);
def test_exact_minimum_matches_dense_grid_2d():  # the LP enumeration below is the exact default check
    params = _params(3, [2, 6, 5, K])
    fn = _mlp(params)
    x = jnp.asarray(np.random.default_rng(1).uniform(0.05, 0.95, (4, 2)), jnp.float32)
    y = jnp.argmax(fn(x), 1).astype(jnp.int32)
    eps = 0.2
    res = milp_verify(fn, x, y, ThreatModel("linf", eps), exact_margin=True)
    assert set(res.status) == {"verified", "falsified"}
    for b in range(x.shape[0]):
        lo, hi = _input_box(np.asarray(x[b], np.float64), eps)
        yb = int(y[b])

        def grid_min(glo, ghi, n):
            t0, t1 = np.linspace(glo[0], ghi[0], n), np.linspace(glo[1], ghi[1], n)
            best, arg = np.inf, None
            for rows in np.array_split(np.arange(n), 10):  # chunks keep memory small
                pts = np.stack(np.meshgrid(t0[rows], t1, indexing="ij"), -1).reshape(-1, 2)
                z = _np_logits(params, pts)
                m = np.min(np.delete(z[:, [yb]] - z, yb, axis=1), axis=1)
                k = int(np.argmin(m))
                if m[k] < best:
                    best, arg = m[k], pts[k]
            return best, arg

        g, arg = grid_min(lo, hi, 2001)  # step 2e-4
        h = (hi - lo) / 2000
        g_ref, _ = grid_min(np.maximum(arg - 2 * h, lo), np.minimum(arg + 2 * h, hi), 201)
        m = res.min_margin[b]
        # The MILP minimum is a minimum over the whole box: never above any grid point, and the
        # refined grid comes within its resolution of it.
        assert m <= min(g, g_ref) + 1e-6, (b, m, g, g_ref)
        assert min(g, g_ref) - m <= 1e-3, (b, m, g, g_ref)
        assert (res.status[b] == "verified") == (m > 0)


@pytest.mark.parametrize("clipped", [False, True])
def test_exact_minimum_matches_pattern_enumeration_4d(clipped):
    if clipped:  # max(z, lo) then min(., hi) with per-neuron constants; three states per neuron
        params = _params(4, [4, 3, 3, K], scale=1.5)
        lo = [np.array([-0.2, 0.0, 0.1], np.float32), np.array([0.0, -0.1, 0.05], np.float32)]
        hi = [np.array([0.8, 1.0, 1.5], np.float32), np.array([0.6, 0.9, 1.2], np.float32)]
    else:
        params, lo, hi = _params(3, [4, 5, 4, K]), None, None
    fn = _mlp(params, lo, hi)
    x = jnp.asarray(np.random.default_rng(4).uniform(0.1, 0.9, (B, 4)), jnp.float32)
    y = jnp.argmax(fn(x), 1).astype(jnp.int32)
    eps = 0.15
    threat = ThreatModel("linf", eps)
    res = milp_verify(fn, x, y, threat, exact_margin=True)
    crown = np.asarray(margin_bounds(fn, x, y, threat).lower, np.float64)
    n_checked = 0
    for b in range(x.shape[0]):
        x_lo, x_hi = _input_box(np.asarray(x[b], np.float64), eps)
        exact = _enumerate_min_margins(params, x_lo, x_hi, int(y[b]), lo, hi)
        assert np.isclose(res.min_margin[b], np.min(exact), atol=1e-5, rtol=1e-5), \
            (b, res.min_margin[b], exact)
        for i in range(K):  # every class solved to optimality matches its own exact minimum
            if np.isfinite(res.margins[b, i]):
                n_checked += 1
                assert np.isclose(res.margins[b, i], exact[i], atol=1e-5, rtol=1e-5)
            if i != int(y[b]):  # and the incomplete bound is sound below the exact minimum
                assert crown[b, i] <= exact[i] + 1e-5
    assert n_checked >= B
    assert res.n_binary.max() > 0  # the test exercises the big-M encoding, not only stable neurons
    assert set(res.status) <= {"verified", "falsified"}
    np.testing.assert_array_equal(milp_verify(fn, x, y, threat).status, res.status)


def test_linear_model_matches_closed_form():
    """No activation at all: the 'MILP' is an LP (no binaries, no MIP dual bound) and the minimum of
    a linear margin over a box has a closed form."""
    rng = np.random.default_rng(11)
    W, b = rng.normal(size=(4, K)).astype(np.float32), rng.normal(size=K).astype(np.float32)
    fn = lambda xb: xb @ W + b
    x = jnp.asarray(rng.uniform(0.1, 0.9, (B, 4)), jnp.float32)
    y = jnp.argmax(fn(x), 1).astype(jnp.int32)
    eps = jnp.asarray([0.02, 0.1, 0.2, 0.3], jnp.float32)
    exact = np.full(B, np.inf)
    for n in range(B):
        lo, hi = _input_box(np.asarray(x[n], np.float64), float(eps[n]))
        for i in set(range(K)) - {int(y[n])}:
            a = W[:, int(y[n])].astype(np.float64) - W[:, i]
            exact[n] = min(exact[n], np.sum(np.minimum(a * lo, a * hi)) + b[int(y[n])] - b[i])
    assert np.any(exact > 0) and np.any(exact < 0)
    for exact_margin in (False, True):
        res = milp_verify(fn, x, y, ThreatModel("linf", eps), exact_margin=exact_margin)
        np.testing.assert_array_equal(res.status, np.where(exact > 0, "verified", "falsified"))
        assert np.all(res.n_binary == 0)
        known = np.isfinite(res.min_margin)
        assert known.all() if exact_margin else known[exact < 0].all()
        np.testing.assert_allclose(res.min_margin[known], exact[known], atol=1e-5)


# ----------------------------------------------------------------------------- 2-3. soundness
@pytest.fixture(scope="module")
def mixed_case():
    """A 4-16-16-3 net and budgets (per example, with a per-feature scale) at which some points are
    verifiable -- one of them only by the MILP, not by CROWN -- and some falsifiable."""
    params = _params(7, [4, 16, 16, K], scale=1.2)
    fn = _mlp(params)
    x = jnp.asarray(np.random.default_rng(6).uniform(0.0, 1.0, (B, 4)), jnp.float32)
    y = jnp.argmax(fn(x), 1).astype(jnp.int32)
    eps = jnp.asarray([0.05, 0.1, 0.15, 0.2], jnp.float32)
    threat = ThreatModel("linf", eps, per_feature_eps=jnp.asarray([1.0, 0.5, 1.0, 0.8], jnp.float32))
    res = milp_verify(fn, x, y, threat, exact_margin=True)
    return fn, x, y, threat, res


def _min_over_classes(lower, y):
    return np.min(np.where(np.eye(K, dtype=bool)[np.asarray(y)], np.inf, np.asarray(lower)), axis=1)


def test_bounds_never_exceed_the_exact_minimum(mixed_case):
    fn, x, y, threat, res = mixed_case
    assert {"verified", "falsified"} <= set(res.status)  # both outcomes are exercised
    assert set(res.status) <= {"verified", "falsified"}
    assert np.all(np.isfinite(res.min_margin))
    assert np.all((res.min_margin > 0) == (res.status == "verified"))
    for method in ("crown", "ibp"):
        lb = np.asarray(margin_bounds(fn, x, y, threat, method=method).lower, np.float64)
        # Per class where the MILP solved it, and the minimum over classes everywhere.
        solved = np.isfinite(res.margins)
        assert np.all(lb[solved] <= res.margins[solved] + 1e-5), method
        assert np.all(_min_over_classes(lb, y) <= res.min_margin + 1e-5), method
        # A complete verifier's verdict cannot depend on the intermediate bounds it starts from.
        other = milp_verify(fn, x, y, threat, method=method)
        np.testing.assert_array_equal(other.status, res.status)
        # The MILP's proven lower bound dominates the incomplete one.
        assert np.all(other.margin_lower >= _min_over_classes(lb, y) - 1e-6)
    # The MILP is strictly more complete here: a point CROWN cannot certify is verified.
    crown_min = _min_over_classes(margin_bounds(fn, x, y, threat).lower, y)
    assert np.any((res.status == "verified") & (crown_min < 0))


def test_counterexamples_are_real_and_verified_points_resist_pgd(mixed_case):
    fn, x, y, threat, res = mixed_case
    fast = milp_verify(fn, x, y, threat)  # default: pre-screen, cutoff row, stop at the verdict
    np.testing.assert_array_equal(fast.status, res.status)
    for r in (res, fast):
        fals = r.status == "falsified"
        assert fals.any() and not r.mismatch.any() and not any(r.notes)
        cex = jnp.asarray(r.counterexample)
        assert bool(jnp.all(threat.contains(x, cex, atol=1e-6)[fals]))
        pred = np.asarray(jnp.argmax(fn(cex), 1))
        assert np.all(pred[fals] != np.asarray(y)[fals]) and np.all(r.counterexample_ok[fals])
        # Points without a counterexample keep x itself.
        np.testing.assert_array_equal(np.asarray(cex)[~fals], np.asarray(x)[~fals])
        assert np.all(r.min_margin[fals & np.isfinite(r.min_margin)] <= 0)
    ver = res.status == "verified"
    adv = pgd(fn, x, y, jax.random.PRNGKey(0), threat, steps=50, restarts=5, loss="cw")
    assert bool(jnp.all(threat.contains(x, adv)))
    pred = np.asarray(jnp.argmax(fn(adv), 1))
    assert np.all(pred[ver] == np.asarray(y)[ver])
    s = summary(fast)
    assert s["verified"] + s["falsified"] == s["n"] == x.shape[0]
    assert milp_certified_error(fast) == pytest.approx(1 - ver.mean())


def test_small_cnn_exact_margins_bound_crown_and_resist_pgd():
    """A two-layer strided CNN (8x8x1 -> 4x4x4 -> 2x2x4 -> K): the MILP over the traced conv graph
    is exact -- CROWN's margin bounds lie below its margins, its counterexamples are real, PGD does
    not break what it verifies -- and it verifies a point CROWN cannot."""
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    k1 = jax.random.normal(ks[0], (3, 3, 1, 4)) * 0.6
    k2 = jax.random.normal(ks[1], (3, 3, 4, 4)) * 0.4
    W, b = jax.random.normal(ks[2], (16, K)) * 0.5, jax.random.normal(ks[3], (K,)) * 0.1
    dn = ("NHWC", "HWIO", "NHWC")

    def fn(x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, k1, (2, 2), "SAME", dimension_numbers=dn) + 0.1)
        h = jax.nn.relu(jax.lax.conv_general_dilated(h, k2, (2, 2), "SAME", dimension_numbers=dn) - 0.05)
        return h.reshape(h.shape[0], -1) @ W + b

    x = jnp.asarray(np.random.default_rng(6).uniform(0.0, 1.0, (B, 8, 8, 1)), jnp.float32)
    y = jnp.argmax(fn(x), 1).astype(jnp.int32)
    threat = ThreatModel("linf", jnp.asarray([0.01, 0.03, 0.06, 0.1], jnp.float32))
    res = milp_verify(fn, x, y, threat, exact_margin=True)
    assert {"verified", "falsified"} <= set(res.status) <= {"verified", "falsified"}
    lb = np.asarray(margin_bounds(fn, x, y, threat).lower, np.float64)
    solved = np.isfinite(res.margins)
    assert np.all(lb[solved] <= res.margins[solved] + 1e-5)
    crown_min = _min_over_classes(lb, y)
    assert np.any((res.status == "verified") & (crown_min < 0))
    fals = res.status == "falsified"
    cex = jnp.asarray(res.counterexample)
    assert bool(jnp.all(threat.contains(x, cex, atol=1e-6)[fals]))
    assert np.all(np.asarray(jnp.argmax(fn(cex), 1))[fals] != np.asarray(y)[fals])
    adv = pgd(fn, x, y, jax.random.PRNGKey(0), threat, steps=50, restarts=3, loss="cw")
    ver = res.status == "verified"
    assert np.all(np.asarray(jnp.argmax(fn(adv), 1))[ver] == np.asarray(y)[ver])


def test_misclassified_points_are_reported_without_solving():
    params = _params(3, [4, 5, 4, K])
    fn = _mlp(params)
    x = jnp.asarray(np.random.default_rng(4).uniform(0.1, 0.9, (B, 4)), jnp.float32)
    pred = jnp.argmax(fn(x), 1).astype(jnp.int32)
    y = pred.at[:2].set((pred[:2] + 1) % K)  # the first two labels are wrong
    res = milp_verify(fn, x, y, ThreatModel("linf", 0.05))
    assert list(res.status[:2]) == ["misclassified"] * 2 and "misclassified" not in res.status[2:]
    assert np.all(res.n_solves[:2] == 0) and np.all(res.counterexample_ok[:2])
    np.testing.assert_array_equal(res.counterexample[:2], np.asarray(x[:2]))
    assert summary(res)["misclassified"] == 2 and milp_certified_error(res) >= 0.5


# ----------------------------------------------------------------------------- 4. time-outs
def test_tiny_time_limit_is_a_timeout_not_a_certificate():
    params = _params(7, [4, 64, 64, K])
    fn = _mlp(params)
    x = jnp.asarray(np.random.default_rng(8).uniform(0.2, 0.8, (B, 4)), jnp.float32)
    y = jnp.argmax(fn(x), 1).astype(jnp.int32)
    threat = ThreatModel("linf", 0.3)
    assert np.all(_min_over_classes(margin_bounds(fn, x, y, threat).lower, y) < 0)
    res = milp_verify(fn, x, y, threat, time_limit=1e-3)
    assert res.n_binary.min() >= 30  # many unstable neurons: no proof within a millisecond
    assert "timeout" in set(res.status) and set(res.status) <= {"timeout", "falsified"}
    assert np.all(np.isnan(res.min_margin[res.status == "timeout"]))
    assert milp_certified_error(res) == 1.0 and summary(res)["verified"] == 0
    assert all(res.notes[b] for b in np.flatnonzero(res.status == "timeout"))


def test_time_limit_bounds_each_examples_wall_time_and_second_call_does_not_retrace():
    """A problem that times out: every example's wall time (intervals, MILP rows, solves, checks)
    stays within its time limit (HiGHS gets what is left, less a reserve, and runs in a child process
    stopped at the deadline: it overran its own limit by seconds on fc1 MILPs); the overshoot was
    4-70% when only solver time counted. A second call with the same fn and shapes reuses the
    compiled logits / pre-screen / intervals: no new trace."""
    from jaxrobust.certify.milp import _compiled_pieces
    params = _params(11, [8, 96, 96, 96, K])
    fn = _mlp(params)
    x = jnp.asarray(np.random.default_rng(8).uniform(0.2, 0.8, (2, 8)), jnp.float32)
    y = jnp.argmax(fn(x), 1).astype(jnp.int32)
    threat = ThreatModel("linf", 0.2)
    res = milp_verify(fn, x, y, threat, time_limit=1.0, exact_margin=True)
    # (HiGHS may or may not stumble on a counterexample within the limit, depending on the load)
    assert set(res.status) <= {"timeout", "falsified"} and res.n_binary.min() > 150
    assert "timeout" in set(res.status) or res.seconds.max() < 1.0
    assert np.all(res.seconds <= 1.0 + 0.2), res.seconds
    traces = _compiled_pieces(fn, "crown").traces
    assert traces == 3  # logits, pre-screen, one example's intervals
    res2 = milp_verify(fn, x, y, threat, time_limit=0.5, exact_margin=True)
    assert _compiled_pieces(fn, "crown").traces == traces
    assert np.all(res2.seconds <= 0.5 + 0.2), res2.seconds
    np.testing.assert_array_equal(res.n_binary, res2.n_binary)


@pytest.mark.parametrize("bad", [K, -1])
def test_out_of_range_labels_are_rejected(bad):
    params = _params(3, [4, 5, 4, K])
    x = jnp.full((B, 4), 0.5, jnp.float32)
    y = jnp.zeros(B, jnp.int32).at[1].set(bad)
    with pytest.raises(ValueError, match="labels"):
        milp_verify(_mlp(params), x, y, ThreatModel("linf", 0.1))


# ----------------------------------------------------------------------------- 5. errors
def test_errors():
    params = _params(3, [4, 5, 4, K])
    x = jnp.full((B, 4), 0.5, jnp.float32)
    y = jnp.zeros(B, jnp.int32)
    relu_net = _mlp(params)
    with pytest.raises(ValueError, match="l_inf"):
        milp_verify(relu_net, x, y, ThreatModel("l2", 0.1))
    with pytest.raises(ValueError, match="NaN"):
        milp_verify(relu_net, x.at[0, 1].set(jnp.nan), y, ThreatModel("linf", 0.1))

    def sigmoid_net(xb):
        h = jax.nn.sigmoid(xb @ params[0][0] + params[0][1])
        return jnp.maximum(h @ params[1][0] + params[1][1], 0.0) @ params[2][0] + params[2][1]

    with pytest.raises(ValueError, match="logistic"):
        milp_verify(sigmoid_net, x, y, ThreatModel("linf", 0.1))

    def pooled_net(xb):  # 2x2 max pooling over a 2x2 "image"
        img = xb.reshape(-1, 2, 2, 1)
        p = jax.lax.reduce_window(img, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")
        return p.reshape(-1, 1) * jnp.ones((1, K))

    with pytest.raises(ValueError, match="reduce_window_max"):
        milp_verify(pooled_net, x, y, ThreatModel("linf", 0.1))
