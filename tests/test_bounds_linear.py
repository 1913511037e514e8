"""Linear-relaxation bounds (CROWN / Fast-Lin / CROWN-IBP / IBP-inspired / IBP) and the exact l_p
geometry behind their concretisation: soundness on sampled and attacked points, exactness where it
is a theorem, scalar soundness of every relaxation, the geometry solvers against LP / bisection
references, transformations (jit, vmap, grad) and clear errors.

Cost notes (budget: ~80 s for the default run on two cores). XLA compiles one program per
(network, norm, box / per-feature structure, method), 1-12 s each, whereas the bound code run op by
op reuses the compiled primitives across methods, norms and threat structures (each call after the
first costs 0.1-0.5 s on the fc nets). So on the small fc nets the bound calls run op by op, while the
sampling + attack (loops) are one jitted program per network and threat structure, and the conv nets
are jitted. The tangent sigmoid relaxations compiles its bisection loop on every op-by-op call
(~1-2 s), so the default run uses it on one sigmoid row only; its lines are checked at scalar level on
every kind of interval. The zoo's conv nets (cnn_small, ResNet stage, LeNet) and the rest of the
(net, norm, threat) matrix are marked slow; the default run has a small conv + max-pooling net and a
fan-out / residual net instead.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.attacks import pgd
from jaxrobust.bounds import (UnsupportedPrimitiveError, crown_bounds, geometry, linear_spec_bounds,
                              margin_bounds)
from jaxrobust.bounds.relaxations import SIGMOID_RELAXATIONS
from jaxrobust.bounds.relaxations import relu_lines as _relu_lines
from jaxrobust.bounds.relaxations import sigmoid_lines as _sigmoid_lines
from jaxrobust.models import create_model, init_variables
from jaxrobust.threat import ThreatModel

METHODS = ("crown", "fastlin", "crown_ibp", "ibp_linear", "ibp")
LINEAR_METHODS = ("crown", "fastlin", "crown_ibp", "ibp_linear")
TIGHT = ("crown", "crown_ibp")  # methods that use the 'midpoint_tangent' sigmoid relaxation (a bisection loop) by default
K = 5  # classes

# ----------------------------------------------------------------------------- networks
NETS = {
    "fc_relu": ((12,), lambda: create_model("fc", K, widths=(16, 16), activation="relu")),
    "fc_sigmoid": ((12,), lambda: create_model("fc", K, widths=(16, 16), activation="sigmoid")),
    "fc_tanh": ((12,), lambda: create_model("fc", K, widths=(16, 16), activation="tanh")),
    "cnn_small": ((12, 12, 1), lambda: create_model("cnn_small", K, mean=(0.2,), std=(0.4,))),
    "resblock": ((8, 8, 3), lambda: _resnet()),  # one residual stage, eval-mode BatchNorm
    "lenet": ((8, 8, 1), lambda: create_model("lenet", K, w=1)),  # max pooling
}


def _resnet():
    from jaxrobust.models.zoo import ResNet
    return ResNet((1, 1), "basic", w=1, num_classes=K)


@functools.lru_cache(maxsize=None)
def _net(name):
    """(jitted logits fn, feature shape); one per name for the whole module (compiled once)."""
    if name == "clip_res":
        # Hard-tanh layer (max and min with constants: both branches of the relaxation), whose output
        # feeds two branches (fan-out) that are summed again (a residual connection).
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
        W1, W2 = jax.random.normal(k1, (12, 16)) / 2, jax.random.normal(k2, (16, 16)) / 3
        W3 = jax.random.normal(k3, (16, K)) / 3

        def f(x):
            h = jnp.clip(x @ W1 - 0.2, -0.3, 0.4)
            return (h + jax.nn.relu(h @ W2 + 0.05)) @ W3 + 0.1

        return jax.jit(f), (12,)
    if name == "conv_pool":
        # conv -> relu -> overlapping 3x3 / stride 2 max pooling with SAME padding -> dense: small
        # enough that the max-pooling relaxation dominates the looseness (a wrong rule shows).
        k1, k2 = jax.random.split(jax.random.PRNGKey(8))
        kern = jax.random.normal(k1, (3, 3, 1, 2)) / 2
        W = jax.random.normal(k2, (3 * 3 * 2, K)) / 2

        def f(x):
            h = jax.lax.conv_general_dilated(x, kern, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + 0.1)
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
            return h.reshape(h.shape[0], -1) @ W

        return jax.jit(f), (6, 6, 1)
    shape, make = NETS[name]
    model = make()
    v = init_variables(model, jax.random.PRNGKey(0), shape)
    return jax.jit(lambda x: model.apply(v, x)), shape


def _attack(f, x, y, key, tm):
    """PGD points (B, 3K, *f): for every example, each logit pushed down and up, and each margin
    z_y - z_i pushed down (one batched PGD run; label 0 of the pair [v, 0] makes PGD minimise v)."""
    B = x.shape[0]
    R = 3 * K
    xr = jnp.repeat(x, R, axis=0)
    j = jnp.tile(jnp.arange(R) % K, B)
    kind = jnp.tile(jnp.arange(R) // K, B)
    yr = jnp.repeat(y, R)
    rows = jnp.arange(B * R)

    def pair(z):
        lz = f(z)
        zj, zy = lz[rows, j], lz[rows, yr]
        v = jnp.where(kind == 0, zj, jnp.where(kind == 1, -zj, zy - zj))
        return jnp.stack([v, jnp.zeros_like(v)], axis=1)

    adv = pgd(pair, xr, jnp.zeros((B * R,), jnp.int32), key, tm, steps=20, loss="cw",
              random_start=False, unroll=False)
    return adv.reshape((B, R) + x.shape[1:])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _points_and_membership(f, x, y, tm, n_random):
    """x itself, n_random points sampled in S(x) and 3K PGD points per example, (B, P, *f), and
    whether each lies in S(x), and the logits there. One program per (network, threat structure)."""
    B = x.shape[0]
    rnd = tm.random_init(jax.random.PRNGKey(11), jnp.repeat(x, n_random, axis=0))
    rnd = rnd.reshape((B, n_random) + x.shape[1:])
    adv = _attack(f, x, y, jax.random.PRNGKey(12), tm)
    pts = jnp.concatenate([x[:, None], rnd, adv], axis=1)
    flat = pts.reshape((-1,) + x.shape[1:])
    inside = tm.contains(jnp.repeat(x, pts.shape[1], axis=0), flat)
    return pts, inside, f(flat).reshape(pts.shape[:2] + (K,))


def _points(f, x, y, tm, n_random=100):
    """(points (B, P, *f), logits there (B, P, K))."""
    pts, inside, z = _points_and_membership(f, x, y, tm, n_random)
    assert bool(jnp.all(inside)), "test harness: a sampled/attacked point is outside S(x)"
    return pts, z


def _check_sound(pts, z, y, lo, hi, mb, what):
    """Interval bounds contain the logits z (B, P, K) at every point; the margin planes lie below the
    true margins there and above ``lower``. Tolerances scale with the magnitudes of the float32
    terms involved."""
    B, P = pts.shape[:2]
    z = np.asarray(z, np.float64)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)), what
    assert np.all(lo <= hi + 1e-6), what
    tol = 1e-4 + 1e-5 * np.abs(z)
    bad = (z < lo[:, None] - tol) | (z > hi[:, None] + tol)
    assert not bad.any(), f"{what}: f outside crown_bounds, worst gap " \
        f"{max((lo[:, None] - z).max(), (z - hi[:, None]).max()):.3g}"
    U = np.asarray(mb.U, np.float64).reshape(B, K, -1)
    p = np.asarray(mb.p, np.float64)
    lower = np.asarray(mb.lower, np.float64)
    flat = np.asarray(pts, np.float64).reshape(B, P, -1)
    lin = np.einsum("bkf,bpf->bpk", U, flat) + p[:, None]
    scale = np.einsum("bkf,bpf->bpk", np.abs(U), np.abs(flat)) + np.abs(p)[:, None]
    margins = np.take_along_axis(z, np.asarray(y)[:, None, None], axis=2) - z
    tol = 1e-4 + 1e-5 * (scale + np.abs(margins))
    assert np.all(np.isfinite(lower)), what
    gap = lin - margins
    assert np.all(gap <= tol), f"{what}: <U_i,x'>+p_i above the true margin by {gap.max():.3g}"
    gap = lower[:, None] - lin
    assert np.all(gap <= tol), f"{what}: lower above <U_i,x'>+p_i by {gap.max():.3g}"
    is_y = np.arange(K)[None] == np.asarray(y)[:, None]
    assert np.all(lower[is_y] == 0) and np.all(p[is_y] == 0) and np.all(U[is_y] == 0), what


EPS = {"linf": 0.03, "l2": 0.15, "l1": 0.4}
CONV_EPS = {"linf": 0.01, "l2": 0.1, "l1": 0.3}


def _threats(name, norm, shape):
    """Scalar ε with the [0, 1] box, and per-feature ε⃗ (one feature frozen at 0) without a box."""
    eps = (EPS if name.startswith("fc") or name in ("clip_res", "conv_pool") else CONV_EPS)[norm]
    pf = jax.random.uniform(jax.random.PRNGKey(2), shape, minval=0.5, maxval=1.5)
    pf = pf.reshape(-1).at[3].set(0.0).reshape(shape)
    return [ThreatModel(norm, eps), ThreatModel(norm, eps, per_feature_eps=pf, box=None)]


@functools.lru_cache(maxsize=None)
def _bound_fn(name, method, jit):
    """Bounds of one network by one method: op by op (fc nets: compiled primitives are shared by all
    methods, norms and threat structures) or jitted (conv nets: one program beats hundreds of
    primitive compilations when only a few methods run)."""
    f, _ = _net(name)

    def both(x, y, tm):
        return crown_bounds(f, x, tm, method=method), margin_bounds(f, x, y, tm, method=method)

    return jax.jit(both) if jit else both


def _run_soundness(name, norm, methods_for, threats=(0, 1)):
    f, shape = _net(name)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3,) + shape)
    y = jnp.argmax(f(x), -1)
    jit = not (name.startswith("fc") or name in ("clip_res", "conv_pool"))
    for ti, tm in enumerate(_threats(name, norm, shape)):
        if ti not in threats:
            continue
        pts, z = _points(f, x, y, tm)
        for method in methods_for(ti):
            (lo, hi), mb = _bound_fn(name, method, jit)(x, y, tm)
            what = f"{name} {norm} threat#{ti} {method}"
            _check_sound(pts, z, y, lo, hi, mb, what)
            if method == "ibp":
                assert not bool(jnp.any(mb.U)), what  # IBP: constant bound
                np.testing.assert_array_equal(mb.lower, mb.p)


ALL = lambda ti: METHODS  # noqa: E731
SLOW = pytest.mark.slow
SCALAR_BOX, PER_FEATURE_NO_BOX = 0, 1

ANALYTIC = ("fastlin", "ibp_linear", "ibp")  # the methods without the tangent relaxations' bisection loop

# (network, norm, threat, methods). Each row costs one compiled sampling + PGD program (~2-4 s), and
# every op-by-op call of a tangent-relaxation sigmoid method ~2 s, so the default run covers each norm with one
# threat kind per row (alternating), and the tangent relaxation on one sigmoid row (it is checked on
# every kind of interval at scalar level); every other combination is slow.
_DEFAULT_FC = {
    ("fc_relu", "linf", SCALAR_BOX, "all"), ("fc_relu", "l2", PER_FEATURE_NO_BOX, "all"),
    ("fc_relu", "l1", SCALAR_BOX, "all"), ("clip_res", "linf", PER_FEATURE_NO_BOX, "all"),
    ("fc_sigmoid", "linf", SCALAR_BOX, "all"), ("fc_tanh", "l2", PER_FEATURE_NO_BOX, "analytic"),
}
FC_PARAMS = [pytest.param(n, p, t, m, marks=() if (n, p, t, m) in _DEFAULT_FC else SLOW)
             for n in ("fc_relu", "fc_sigmoid", "fc_tanh", "clip_res") for p in ("linf", "l2", "l1")
             for t in (SCALAR_BOX, PER_FEATURE_NO_BOX) for m in ("all", "analytic")
             if m == "all" or (n, p, t, m) in _DEFAULT_FC]


@pytest.mark.parametrize("name,norm,threat,methods", FC_PARAMS)
def test_sound_on_sampled_and_attacked_points_fc(name, norm, threat, methods):
    _run_soundness(name, norm, lambda ti: METHODS if methods == "all" else ANALYTIC, threats=(threat,))


CONV = ("cnn_small", "resblock", "lenet")


def test_sound_on_sampled_and_attacked_points_conv_pool_linf():
    """Convolution, relu and overlapping max pooling with padding, jitted, CROWN-IBP (under l_inf
    CROWN's intermediate bounds equal IBP's here: every activation input is one affine map of the
    box). On this small net the max-pooling relaxation dominates the looseness, so a wrong pooling
    rule shows (on LeNet the looser intermediate bounds hide e.g. a missing non-dominant case)."""
    _run_soundness("conv_pool", "linf", lambda ti: ("crown_ibp",), threats=(SCALAR_BOX,))


@SLOW
@pytest.mark.parametrize("name", CONV)
def test_sound_on_sampled_and_attacked_points_conv_linf(name):
    # The zoo's conv nets with CROWN-IBP and the box (each method compiles for 1-12 s here).
    _run_soundness(name, "linf", lambda ti: ("crown_ibp",), threats=(SCALAR_BOX,))


@SLOW
@pytest.mark.parametrize("name,norm", [(n, p) for n in CONV for p in ("linf", "l2", "l1")])
def test_sound_on_sampled_and_attacked_points_conv_all(name, norm):
    _run_soundness(name, norm, ALL)


# ----------------------------------------------------------------------------- exactness theorems
@pytest.mark.parametrize("name", ["fc_relu", "fc_sigmoid"])
def test_every_method_is_exact_at_zero_eps(name):
    f, shape = _net(name)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3,) + shape)
    y = jnp.argmax(f(x), -1)
    z = f(x)
    threats = [ThreatModel("linf", 0.0), ThreatModel("l2", 0.0, box=None)]
    for tm in threats[:2 if name == "fc_relu" else 1]:  # (op-by-op tangent-relaxation calls cost ~1-2 s each)
        for method in METHODS:
            lo, hi = crown_bounds(f, x, tm, method=method)
            np.testing.assert_allclose(lo, z, atol=1e-4, err_msg=f"{method} {tm.norm}")
            np.testing.assert_allclose(hi, z, atol=1e-4, err_msg=f"{method} {tm.norm}")
            if name != "fc_relu" and method in TIGHT:
                continue  # (the interval bounds above suffice for the tangent relaxation)
            mb = margin_bounds(f, x, y, tm, method=method)
            margins = jnp.take_along_axis(z, y[:, None], 1) - z
            np.testing.assert_allclose(mb.lower, margins, atol=1e-4, err_msg=f"{method} {tm.norm}")


def _linear_model():
    W = jax.random.normal(jax.random.PRNGKey(20), (12, K))
    b = jax.random.normal(jax.random.PRNGKey(21), (K,))
    return W, b, (lambda x: x @ W + b)


def test_linear_model_bounds_are_exact():
    W, b, f = _linear_model()
    x = jax.random.uniform(jax.random.PRNGKey(22), (4, 12))
    y = jnp.array([0, 3, 4, 1])
    pf = jax.random.uniform(jax.random.PRNGKey(23), (12,), minval=0.2, maxval=2.0)
    Wn, bn, xn, yn, pfn = (np.asarray(a, np.float64) for a in (W, b, x, y, pf))
    U = np.stack([Wn[:, int(yn[i])][None] - Wn.T for i in range(4)])  # (B, K, 12): W[:,y] - W[:,i]
    p = bn[yn.astype(int)][:, None] - bn[None]
    centre = np.einsum("bkf,bf->bk", U, xn) + p

    def exact(tm):
        s = np.ones(12) if tm.per_feature_eps is None else pfn
        r = tm.eps * s
        if tm.norm == "linf":  # per coordinate, inside the box
            lo, hi = np.maximum(xn - r, 0.0), np.minimum(xn + r, 1.0)
            return np.minimum(U * lo[:, None], U * hi[:, None]).sum(-1) + p
        assert tm.box is None
        dual = {"l2": lambda a: np.sqrt((a ** 2).sum(-1)), "l1": lambda a: np.abs(a).max(-1)}[tm.norm]
        return centre - tm.eps * dual(U * s)

    threats = [ThreatModel("linf", 0.1), ThreatModel("linf", 0.1, per_feature_eps=pf),
               ThreatModel("l1", 0.5, box=None), ThreatModel("l2", 0.5, per_feature_eps=pf, box=None)]
    for ti, tm in enumerate(threats):
        want = exact(tm)
        # Without activations every linear method runs the same code (no relaxation, no intermediate
        # bounds): all methods on the first threat, CROWN and IBP on the others.
        methods = METHODS if ti == 0 else ("crown", "ibp")
        all_bounds = jax.jit(lambda x, y, tm: (
            [margin_bounds(f, x, y, tm, method=m) for m in methods], crown_bounds(f, x, tm, method="crown"),
            linear_spec_bounds(f, x, tm, -jnp.eye(K), method="crown")))
        mbs, (lo, hi), lb = all_bounds(x, y, tm)
        for method, mb in zip(methods, mbs):
            np.testing.assert_allclose(mb.lower, want, rtol=1e-5, atol=2e-5, err_msg=f"{method} {tm}")
            if method == "ibp":
                np.testing.assert_array_equal(mb.U, 0.0)
                continue
            np.testing.assert_allclose(mb.U, U, rtol=1e-6, atol=1e-6, err_msg=method)
            np.testing.assert_allclose(mb.p, p, rtol=1e-6, atol=1e-5, err_msg=method)
        # interval bounds of the logits are exact too (crown_bounds is spec = +-I)
        np.testing.assert_allclose(hi, -lb.lower, rtol=1e-6, atol=1e-5)
        if tm.norm == "linf":
            l0, h0 = np.maximum(xn - tm.eps * (1 if tm.per_feature_eps is None else pfn), 0), \
                np.minimum(xn + tm.eps * (1 if tm.per_feature_eps is None else pfn), 1)
            want_lo = np.minimum(l0[:, :, None] * Wn, h0[:, :, None] * Wn).sum(1) + bn
            np.testing.assert_allclose(lo, want_lo, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["fc_relu", "fc_sigmoid", pytest.param("cnn_small", marks=SLOW)])
def test_ibp_bounds_are_monotone_in_eps(name):
    """IBP is inclusion-monotone: S(ε1) ⊂ S(ε2) gives nested intervals and lower margins. (This is
    *not* a theorem for CROWN's adaptive relaxation, whose lower slope switches with the interval:
    see ``test_crown_lower_bounds_are_not_monotone_in_eps``.)"""
    f, shape = _net(name)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3,) + shape)
    y = jnp.argmax(f(x), -1)
    bounds = jax.jit(lambda x, y, tm: (crown_bounds(f, x, tm, method="ibp"),
                                       margin_bounds(f, x, y, tm, method="ibp").lower))
    for norm, box in (("linf", (0.0, 1.0)), ("l2", None)):
        prev = None
        for eps in (0.0, 0.005, 0.02, 0.05, 0.2):
            (lo, hi), lower = bounds(x, y, ThreatModel(norm, eps, box=box))
            if prev is not None:
                assert bool(jnp.all(lo <= prev[0] + 1e-5)) and bool(jnp.all(hi >= prev[1] - 1e-5))
                assert bool(jnp.all(lower <= prev[2] + 1e-5))
            prev = (lo, hi, lower)
        assert bool(jnp.all(prev[1] - prev[0] > 0))


def test_crown_lower_bounds_are_not_monotone_in_eps():
    """Documents why monotonicity in ε is only asserted for IBP: relu(3x - 2.5) at x = 0.9 in the
    [0, 1] box. At ε = 0.1 the pre-activation lies in [-0.1, 0.5] (u > -l: lower line z, bound -0.1);
    at ε = 0.3 in [-0.7, 0.5] (u < -l: lower line 0, bound 0). Both are sound (true minimum 0)."""
    f = lambda x: jnp.concatenate([jax.nn.relu(3.0 * x - 2.5), jnp.zeros_like(x)], -1)
    x, y = jnp.array([[0.9]]), jnp.array([0])
    bound = jax.jit(lambda tm: margin_bounds(f, x, y, tm, method="crown").lower[0, 1])
    low = {e: float(bound(ThreatModel("linf", e))) for e in (0.1, 0.3)}
    assert low[0.1] == pytest.approx(-0.1, abs=1e-5) and low[0.3] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- relaxations
def _intervals():
    fixed = [(-1e-7, 1e-7), (0.3, 0.3 + 1e-7), (-2.0, -2.0 + 1e-6), (1.0, 1.0 + 9e-6), (0.0, 1e-5),
             (-5.0, -5.0 + 1.1e-5), (-3.0, -3.0 + 1e-4), (4.0, 4.0 + 1e-3), (-50.0, 50.0),
             (-100.0, 30.0), (-30.0, 100.0), (-5.0, -1.0), (-40.0, -20.0), (1.0, 5.0), (20.0, 40.0),
             (-1.0, 2.0), (-3.0, 0.5), (-0.5, 3.0), (0.0, 3.0), (-3.0, 0.0), (0.0, 0.0), (2.0, 2.0),
             (-1e-3, 1e-3), (-12.0, 0.1), (-0.1, 12.0), (-8.0, 8.0), (-200.0, -199.0), (199.0, 200.0)]
    rng = np.random.default_rng(0)
    centre = rng.normal(0.0, 4.0, 400)
    width = 10.0 ** rng.uniform(-7, 2, 400)
    off = rng.uniform(0, 1, 400) * width
    lo, hi = centre - off, centre - off + width
    lo = np.concatenate([[a for a, _ in fixed], lo]).astype(np.float32)
    hi = np.concatenate([[b for _, b in fixed], hi]).astype(np.float32)
    return lo, np.maximum(hi, lo)


def _check_lines(phi, lines, lo, hi, what, tol):
    """al z + bl <= phi(z) <= au z + bu on a dense grid of every [lo, hi] (the float32 coefficients
    taken as exact reals; phi in float64)."""
    al, bl, au, bu = (np.asarray(a, np.float64) for a in lines)
    assert all(np.all(np.isfinite(a)) for a in (al, bl, au, bu)), what
    t = np.linspace(0.0, 1.0, 801)
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    z = lo64[:, None] + (hi64 - lo64)[:, None] * t[None]
    v = phi(z)
    excess = np.maximum(al[:, None] * z + bl[:, None] - v, v - (au[:, None] * z + bu[:, None])).max(1)
    i = int(np.argmax(excess - tol))
    assert np.all(excess <= tol), f"{what}: the lines cross phi on [{lo[i]!r}, {hi[i]!r}] by {excess[i]:.3g}"


SIGMOIDS = {"logistic": lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)), "tanh": np.tanh}


def _sigmoid_line_fns():
    return {(name, mode): jax.jit(functools.partial(_sigmoid_lines, name, mode=mode))
            for name in SIGMOIDS for mode in SIGMOID_RELAXATIONS}


def test_sigmoid_and_relu_lines_are_sound():
    """Narrow, wide, all-negative, all-positive, crossing, saturated and degenerate intervals."""
    lo, hi = _intervals()
    for (name, mode), fn in _sigmoid_line_fns().items():
        lines = fn(jnp.asarray(lo), jnp.asarray(hi))
        _check_lines(SIGMOIDS[name], lines, lo, hi, f"{name}/{mode}", tol=1e-6)
    # relu: no slack in the library; allow the float32 rounding of the coefficients (~1 ulp of |z|)
    tol = 1e-6 + 2e-7 * (np.abs(lo) + np.abs(hi))
    for mode in ("adaptive", "same_slope"):
        lines = _relu_lines(jnp.asarray(lo), jnp.asarray(hi), mode)
        _check_lines(lambda z: np.maximum(z, 0.0), lines, lo, hi, f"relu/{mode}", tol=tol)


@pytest.mark.parametrize("name", ["logistic", "tanh"])
def test_sigmoid_lines_are_sound_for_intermediate_widths(name):
    """Widths 1e-5 .. 0.5 away from 0, where φ(u) - φ(l) cancels in float32 (the chord's slope and
    intercept were once off by up to 0.04 there)."""
    rng = np.random.default_rng(3)
    centre = rng.uniform(-8.0, 8.0, 300)
    width = 10.0 ** rng.uniform(-5, np.log10(0.5), 300)
    lo = (centre - width / 2).astype(np.float32)
    hi = (centre + width / 2).astype(np.float32)
    for mode in SIGMOID_RELAXATIONS:
        lines = _sigmoid_line_fns()[(name, mode)](jnp.asarray(lo), jnp.asarray(hi))
        _check_lines(SIGMOIDS[name], lines, lo, hi, f"{name}/{mode}", tol=1e-6)


def test_default_sigmoid_lines_are_the_closest_sound_ones():
    """Per interval and side, the default 'midpoint_tangent' line is at least as close to φ as the
    other modes' (value at the midpoint m, which fixes the area between line and φ on [l, u]):
    lower line highest, upper line lowest. It is strictly closer on many crossing intervals."""
    lo, hi = _intervals()
    m = 0.5 * (lo.astype(np.float64) + hi)
    at_m = lambda a, b: np.asarray(a, np.float64) * m + np.asarray(b, np.float64)
    fns = _sigmoid_line_fns()
    for name in SIGMOIDS:
        best = fns[(name, "midpoint_tangent")](jnp.asarray(lo), jnp.asarray(hi))
        for other in ("endpoint_tangent", "analytic"):
            ref = fns[(name, other)](jnp.asarray(lo), jnp.asarray(hi))
            tol = 1e-6 * (1 + np.abs(m))
            assert np.all(at_m(best[0], best[1]) >= at_m(ref[0], ref[1]) - tol), (name, other, "lower")
            assert np.all(at_m(best[2], best[3]) <= at_m(ref[2], ref[3]) + tol), (name, other, "upper")
            gain = (at_m(ref[2], ref[3]) - at_m(best[2], best[3])) + (at_m(best[0], best[1]) - at_m(ref[0], ref[1]))
            assert np.sum(gain > 1e-3) >= 10, (name, other)


def test_relaxations_are_jittable_and_differentiable_in_the_bounds():
    """Certified training reuses the lines: jit(grad) w.r.t. (l, u) is finite for every mode, and
    the closed-form modes match finite differences."""
    lo = jnp.array([-2.0, -1.0, 0.5, -3.0, 0.2], jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    hi = jnp.array([-0.5, 1.5, 2.0, 0.4, 0.3], lo.dtype)

    def total(l, u, fn):
        return sum(jnp.sum(a * w) for a, w in zip(fn(l, u), (1.0, 2.0, -0.5, 3.0)))

    fns = {f"{n}/{m}": functools.partial(_sigmoid_lines, n, mode=m) for n in SIGMOIDS for m in SIGMOID_RELAXATIONS}
    fns.update({f"relu/{m}": functools.partial(_relu_lines, mode=m) for m in ("adaptive", "same_slope")})
    zero = jnp.array([0.0, 0.3, -2.0], lo.dtype)  # zero-width intervals (ε = 0), one at the inflection
    for what, fn in fns.items():
        gl, gu = jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=2)(lo, hi, fn)
        assert bool(jnp.all(jnp.isfinite(gl)) & jnp.all(jnp.isfinite(gu))), what
        zl, zu = jax.grad(total, argnums=(0, 1))(zero, zero, fn)
        assert bool(jnp.all(jnp.isfinite(zl)) & jnp.all(jnp.isfinite(zu))), (what, "zero width")
        if what.endswith("analytic") or what.startswith("relu"):
            h = 1e-3
            fd = (total(lo, hi + h, fn) - total(lo, hi - h, fn)) / (2 * h)
            assert float(jnp.sum(gu)) == pytest.approx(float(fd), rel=2e-2, abs=2e-2), what


def test_old_sigmoid_mode_name_gives_a_clear_error():
    x = jnp.full((2, 4), 0.5)
    with pytest.raises(ValueError, match="renamed 'endpoint_tangent'"):
        crown_bounds(lambda z: jax.nn.sigmoid(z), x, ThreatModel("linf", 0.1), sigmoid="tight")


@functools.lru_cache(maxsize=None)
def _wide_sigmoid_net(act):
    """fc net with weights x3: pre-activations cross 0 with wide intervals (where modes differ)."""
    m = create_model("fc", K, widths=(16, 16), activation=act)
    v = init_variables(m, jax.random.PRNGKey(0), (12,))
    v = jax.tree.map(lambda a: 3.0 * a, v)
    return lambda x: m.apply(v, x)


@pytest.mark.parametrize("act,method,gain", [("tanh", "crown_ibp", 0.01),
                                             pytest.param("sigmoid", "crown_ibp", 0.0, marks=pytest.mark.slow),
                                             pytest.param("tanh", "crown", 0.0, marks=pytest.mark.slow),
                                             pytest.param("sigmoid", "crown", 0.0, marks=pytest.mark.slow)])
def test_default_sigmoid_relaxation_is_never_wider_on_networks(act, method, gain):
    """Mean output width of the default relaxation <= the other modes' (up to 0.2%: a closer line
    need not give a tighter network bound element by element), and clearly tighter than CROWN's
    end-point tangents (the former 'tight' default was looser than 'analytic')."""
    f = _wide_sigmoid_net(act)
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 12))
    tm = ThreatModel("linf", 0.05)
    run = jax.jit(lambda x, mode: crown_bounds(f, x, tm, method=method, sigmoid=mode), static_argnums=1)
    width = {}
    for mode in SIGMOID_RELAXATIONS:
        lo, hi = run(x, mode)
        width[mode] = float(jnp.mean(hi - lo))
    default = width["midpoint_tangent"]
    assert default <= min(width.values()) * 1.002, width
    assert default <= (1 - gain) * width["endpoint_tangent"], width
    lo, hi = run(x, "midpoint_tangent")
    pts = x[None] + jax.random.uniform(jax.random.PRNGKey(2), (256,) + x.shape, minval=-0.05, maxval=0.05)
    v = jax.vmap(f)(jnp.clip(pts, 0, 1))
    assert bool(jnp.all(v >= lo - 1e-5)) and bool(jnp.all(v <= hi + 1e-5))


def test_sigmoid_network_bound_is_sound_for_a_small_eps():
    """Network level, narrow intervals away from 0 (float32 cancellation in the chord once made the
    lines unsound there): sigmoid(x + 5.5) at x = 0.0118, l_inf ε = 1e-5 without box; the lower bound
    must not exceed sigmoid(x - ε)."""
    f = lambda x: jax.nn.sigmoid(x + 5.5)
    x = jnp.array([[0.0118]], jnp.float32)
    eps = 1e-5
    z = np.linspace(float(x[0, 0]) - eps, float(x[0, 0]) + eps, 101)
    true_min = float(np.min(SIGMOIDS["logistic"](z + 5.5)))
    tm = ThreatModel("linf", eps, box=None)
    lo, _ = jax.jit(lambda x, tm: crown_bounds(f, x, tm, method="crown"))(x, tm)
    assert float(lo[0, 0]) <= true_min + 1e-6, (float(lo[0, 0]), true_min)
    assert float(lo[0, 0]) <= float(f(x - eps)[0, 0])  # also against the float32 network itself


# ----------------------------------------------------------------------------- geometry
def _ref_max_gain(w, c, t, norm):
    """Independent references: LPs (scipy) for linf / l1, bisection on the KKT multiplier for l2."""
    from scipy.optimize import linprog
    n = len(w)
    ub = [None if cj >= 1e14 else cj for cj in c]
    if norm == "linf":
        return float(np.sum(w * np.minimum(c, t)))
    if norm == "l1":
        if t == 0:
            return 0.0
        r = linprog(-w, A_ub=np.ones((1, n)), b_ub=[t], bounds=list(zip([0] * n, ub)), method="highs")
        assert r.status == 0
        return -r.fun
    pos = w > 0
    if np.sqrt(np.sum(c[pos] ** 2)) <= t:
        return float(np.sum(w * c))
    a, b = 0.0, float(t / np.min(w[pos]))  # at λ = t / min w the free norm already exceeds t
    for _ in range(200):
        lam = 0.5 * (a + b)
        if np.sqrt(np.sum(np.minimum(lam * w[pos], c[pos]) ** 2)) > t:
            b = lam
        else:
            a = lam
    return float(np.sum(w[pos] * np.minimum(a * w[pos], c[pos])))


def _ref_min_norm(w, c, b, norm):
    from scipy.optimize import linprog
    n = len(w)
    if b <= 0:
        return 0.0
    if np.sum(w * c) < b:
        return np.inf
    ub = [None if cj >= 1e14 else cj for cj in c]
    if norm == "linf":  # min s  s.t. m_j <= s, w·m >= b, 0 <= m <= c
        A = np.zeros((n + 1, n + 1))
        A[:n, :n], A[:n, n] = np.eye(n), -1.0
        A[n, :n] = -w
        r = linprog(np.r_[np.zeros(n), 1.0], A_ub=A, b_ub=np.r_[np.zeros(n), -b],
                    bounds=list(zip([0] * n, ub)) + [(0, None)], method="highs")
        assert r.status == 0
        return r.fun
    if norm == "l1":
        r = linprog(np.ones(n), A_ub=-w[None], b_ub=[-b], bounds=list(zip([0] * n, ub)), method="highs")
        assert r.status == 0
        return r.fun
    pos = w > 0  # KKT: m = min(λ w, c); bisect the gain on λ
    lo_, hi_ = 0.0, 1.0
    while np.sum(w[pos] * np.minimum(hi_ * w[pos], c[pos])) < b:
        hi_ *= 2.0
    for _ in range(200):
        lam = 0.5 * (lo_ + hi_)
        if np.sum(w[pos] * np.minimum(lam * w[pos], c[pos])) >= b:
            hi_ = lam
        else:
            lo_ = lam
    return float(np.sqrt(np.sum(np.minimum(hi_ * w[pos], c[pos]) ** 2)))


def _geometry_instances(n_inst=80, n=7, huge=False):
    rng = np.random.default_rng(5)
    w = rng.exponential(1.0, (n_inst, n)) * (rng.uniform(size=(n_inst, n)) > 0.2)
    c = rng.uniform(0.0, 2.0, (n_inst, n)) * (rng.uniform(size=(n_inst, n)) > 0.2)
    if huge:  # box-free sets: caps are 1e15 (unbounded) or 0 (frozen features)
        c = np.where(c > 0, 1e15, 0.0)
    w[0], c[0] = 0.0, 1.0  # all-zero weights
    c[1] = 0.0  # all-zero caps
    w[2, :3] = 0.0  # zero weights with positive caps
    t = rng.uniform(0.0, 3.0, n_inst)
    t[3] = 0.0
    total = np.sum(w * c, axis=1)
    b = rng.uniform(-0.5, 1.3, n_inst) * np.minimum(total, 10.0) + rng.uniform(-0.2, 0.5, n_inst)
    b[4], b[5] = 0.0, -1.0
    # keep b away from the feasibility threshold, where float32 may decide either way
    near = np.abs(b - total) < 1e-3 * np.maximum(total, 1.0)
    b = np.where(near, total + 0.1, b)
    return w.astype(np.float32), c.astype(np.float32), t.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("huge", [False, True], ids=["box", "huge_caps"])
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_geometry_solvers_match_references(norm, huge):
    w, c, t, b = _geometry_instances(huge=huge)
    gain = np.asarray(geometry.max_capped_gain(jnp.asarray(w), jnp.asarray(c), jnp.asarray(t), norm))
    dist = np.asarray(geometry.min_norm_for_gain(jnp.asarray(w), jnp.asarray(c), jnp.asarray(b), norm))
    w64, c64, t64, b64 = (a.astype(np.float64) for a in (w, c, t, b))
    for i in range(len(w)):
        want = _ref_max_gain(w64[i], c64[i], t64[i], norm)
        assert gain[i] == pytest.approx(want, rel=2e-5, abs=1e-5), (i, w[i], c[i], t[i])
        want = _ref_min_norm(w64[i], c64[i], b64[i], norm)
        if np.isinf(want):
            assert np.isposinf(dist[i]), (i, w[i], c[i], b[i], dist[i])
        else:
            assert dist[i] == pytest.approx(want, rel=2e-5, abs=1e-5), (i, w[i], c[i], b[i], dist[i])
    assert np.all(dist[b <= 0] == 0)
    # the two problems are inverse to each other: the least norm reaching the best gain at t is t
    # (wherever the gain is not saturated by the caps)
    tot = np.sum(w64 * c64, axis=1)
    g = geometry.max_capped_gain(jnp.asarray(w), jnp.asarray(c), jnp.asarray(t), norm)
    back = np.asarray(geometry.min_norm_for_gain(jnp.asarray(w), jnp.asarray(c), g, norm))
    ok = (np.asarray(g) < 0.99 * tot) & (np.asarray(g) > 1e-3)
    assert ok.sum() > 10
    np.testing.assert_allclose(back[ok], t[ok], rtol=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_geometry_with_finite_and_huge_caps_mixed(norm):
    """A finite cap summed before / after an unbounded one (1e15): cumsum(c) - c once lost the finite
    part to float32 cancellation (min_norm_for_gain over-estimated distances: unsound for PEC)."""
    w = np.array([2.0, 1.0], np.float32)
    c = np.array([0.5, 1e15], np.float32)
    # l_inf: G(s) = 2 min(s, .5) + s = 2 -> s = 1; l_2: m = min(λw, c) -> m = (.5, 1), ||m|| = 1.118;
    # l_1: m = (.5, 1) -> 1.5.  max gain at t = 2: l_2 m = (.5, 1.936); l_1 m = (.5, 1.5).
    want_d = {"linf": 1.0, "l2": float(np.sqrt(1.25)), "l1": 1.5}[norm]
    want_g = {"linf": 3.0, "l2": 1.0 + float(np.sqrt(3.75)), "l1": 2.5}[norm]
    d = float(geometry.min_norm_for_gain(jnp.asarray(w), jnp.asarray(c), 2.0, norm))
    g = float(geometry.max_capped_gain(jnp.asarray(w), jnp.asarray(c), 2.0, norm))
    assert d == pytest.approx(want_d, rel=1e-5) and g == pytest.approx(want_g, rel=1e-5)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_exact_concretisation_beats_the_dual_norm(norm):
    """A linear model near a corner of the [0, 1] box with a ball that sticks out of it: the margin
    lower bound is the exact minimum over ball ∩ box (l_2: projected gradient descent with the exact
    projection; l_1: an LP), strictly above the dual-norm bound of Algorithm 3.1 where the box cuts."""
    W, b, f = _linear_model()
    x = jnp.clip(0.95 + 0.04 * jax.random.normal(jax.random.PRNGKey(30), (3, 12)), 0.0, 1.0)
    x = x.at[:, :4].set(0.03)  # some coordinates at the other face
    y = jnp.array([0, 2, 4])
    eps = {"l2": 0.6, "l1": 1.0}[norm]
    tm = ThreatModel(norm, eps)
    U = np.asarray(W[:, y].T[:, None, :] - W.T[None], np.float64)  # (B, K, 12)
    p = np.asarray(b[y][:, None] - b[None], np.float64)
    dual = np.sqrt((U ** 2).sum(-1)) if norm == "l2" else np.abs(U).max(-1)
    dual_bound = np.einsum("bkf,bf->bk", U, np.asarray(x, np.float64)) + p - eps * dual
    for method in LINEAR_METHODS + ("ibp",):
        mb = margin_bounds(f, x, y, tm, method=method)
        assert np.all(np.asarray(mb.lower) >= dual_bound - 1e-5), method
        is_y = np.arange(K)[None] == np.asarray(y)[:, None]
        assert np.all((np.asarray(mb.lower) - dual_bound)[~is_y] > 1e-2), method  # the box matters

    mb = margin_bounds(f, x, y, tm, method="crown")
    if norm == "l1":  # exact minimum by LP: x' = x + d+ - d-, Σ(d+ + d-) <= ε, 0 <= x' <= 1
        from scipy.optimize import linprog
        xn = np.asarray(x, np.float64)
        for bi in range(3):
            for k in range(K):
                u = U[bi, k]
                A = np.r_[np.ones(12), np.ones(12)][None]
                bounds = [(0, 1 - xn[bi, j]) for j in range(12)] + [(0, xn[bi, j]) for j in range(12)]
                r = linprog(np.r_[u, -u], A_ub=A, b_ub=[eps], bounds=bounds, method="highs")
                assert r.status == 0
                want = u @ xn[bi] + p[bi, k] + r.fun
                assert float(mb.lower[bi, k]) == pytest.approx(want, abs=1e-4), (bi, k)
        return
    # l_2: exact minimum of each <U_i, x'> + p_i over S(x) by projected gradient descent with the
    # exact projection onto ball ∩ box (an independent solver).
    Uj = jnp.asarray(U, jnp.float32)

    @jax.jit
    def pgd_min(x):
        x0 = jnp.repeat(x, K, axis=0)
        g = Uj.reshape(-1, 12)

        def body(i, z):
            return tm.project(x0, z - 0.05 / (1 + i / 50.0) * g)

        z = jax.lax.fori_loop(0, 600, body, x0)
        return z, jnp.sum(g * z, -1).reshape(-1, K) + jnp.asarray(p, jnp.float32)

    z, best = pgd_min(x)
    assert bool(jnp.all(tm.contains(jnp.repeat(x, K, axis=0), z)))
    np.testing.assert_allclose(mb.lower, best, atol=1e-4)


# ----------------------------------------------------------------------------- transformations
def test_jit_and_vmap_agree_with_eager():
    f, shape = _net("fc_relu")
    x = jax.random.uniform(jax.random.PRNGKey(3), (4,) + shape)
    y = jnp.argmax(f(x), -1)
    eps_values = (0.0, 0.01, 0.03, 0.05)
    method = "crown_ibp"
    eager = {e: margin_bounds(f, x, y, ThreatModel("linf", e), method=method) for e in eps_values}

    @jax.jit
    def transformed(x, y, eps):
        # one ε per example (B,) in a batch, and vmapped over examples (each a batch of one)
        batched = margin_bounds(f, x, y, ThreatModel("linf", eps), method=method)
        mapped = jax.vmap(lambda xi, yi, ei: margin_bounds(
            f, xi[None], yi[None], ThreatModel("linf", ei), method=method))(x, y, eps)
        return batched, mapped

    for eps in (jnp.full((4,), 0.03), jnp.asarray(eps_values)):  # the same compiled program
        batched, mapped = transformed(x, y, eps)
        for i, e in enumerate(np.asarray(eps)):
            ref = eager[min(eps_values, key=lambda v: abs(v - e))]
            for a, b, c in zip(ref, batched, mapped):
                np.testing.assert_allclose(b[i], a[i], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(c[i, 0], a[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,method", [("sigmoid", "ibp_linear"), ("relu", "crown_ibp")])
def test_gradient_in_parameters_matches_finite_differences(act, method):
    model = create_model("fc", 3, widths=(8, 8), activation=act)
    v = init_variables(model, jax.random.PRNGKey(0), (6,))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6))
    y = jnp.array([0, 1, 2, 0])
    tm = ThreatModel("linf", 0.05)

    def objective(v):
        return jnp.sum(margin_bounds(lambda z: model.apply(v, z), x, y, tm, method=method).lower)

    val_and_grad = jax.jit(jax.value_and_grad(objective))
    _, g = val_and_grad(v)
    leaves, treedef = jax.tree.flatten(v)
    gleaves = jax.tree.leaves(g)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in gleaves)
    assert sum(float(jnp.abs(a).sum()) for a in gleaves) > 0
    obj = lambda v: val_and_grad(v)[0]  # noqa: E731  (the same compiled program)
    h = 1e-3
    rng = np.random.default_rng(0)
    checked = 0
    for li, leaf in enumerate(leaves):
        flat_g = np.asarray(gleaves[li]).reshape(-1)
        # the largest-gradient coordinate of each leaf and a random one
        for k in {int(np.argmax(np.abs(flat_g))), int(rng.integers(flat_g.size))}:
            def bumped(s):
                new = list(leaves)
                new[li] = leaf.reshape(-1).at[k].add(s).reshape(leaf.shape)
                return jax.tree.unflatten(treedef, new)
            fd = (float(obj(bumped(h))) - float(obj(bumped(-h)))) / (2 * h)
            assert flat_g[k] == pytest.approx(fd, rel=1e-2, abs=5e-3), (li, k)
            checked += 1
    assert checked >= 6


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    x = jnp.full((2, 4), 0.5)
    tm = ThreatModel("linf", 0.1)
    with pytest.raises(UnsupportedPrimitiveError, match="'sin'"):
        crown_bounds(lambda z: jnp.sin(z), x, tm)
    with pytest.raises(UnsupportedPrimitiveError, match="'mul'"):
        margin_bounds(lambda z: z * z, x, jnp.array([0, 1]), tm, method="crown_ibp")
    with pytest.raises(UnsupportedPrimitiveError, match="'max'"):
        crown_bounds(lambda z: jnp.maximum(z, z[:, ::-1]), x, tm)
    with pytest.raises(ValueError, match="NaN"):
        crown_bounds(lambda z: z, x.at[0, 0].set(jnp.nan), tm)
    with pytest.raises(ValueError, match="spec"):
        linear_spec_bounds(lambda z: z @ jnp.ones((4, 3)), x, tm, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="spec"):
        linear_spec_bounds(lambda z: z @ jnp.ones((4, 3)), x, tm, jnp.ones((5, 2, 3)))  # 5 != B
    with pytest.raises(ValueError, match="method"):
        crown_bounds(lambda z: z, x, tm, method="deepz")
    with pytest.raises(ValueError, match="method"):
        margin_bounds(lambda z: z, x, jnp.array([0, 1]), tm, method="CROWN")
    with pytest.raises(ValueError, match="eps"):
        ThreatModel("l2", -0.1)
    with pytest.raises(ValueError, match="relu relaxation"):
        crown_bounds(lambda z: jax.nn.relu(z @ jnp.ones((4, 3)) - 1.5), x, tm, relu="bogus")
    with pytest.raises(ValueError, match="sigmoid"):
        crown_bounds(lambda z: jax.nn.sigmoid(z), x, tm, sigmoid="bogus")
    with pytest.raises(ValueError, match="logits"):
        margin_bounds(lambda z: z[:, :, None], x, jnp.array([0, 1]), tm)
    for bad in (jnp.array([0, 4]), jnp.array([-1, 0])):  # 4 classes: labels 0..3
        with pytest.raises(ValueError, match="label"):
            margin_bounds(lambda z: z, x, bad, tm)
    with pytest.raises(ValueError, match="labels of shape"):
        margin_bounds(lambda z: z, x, jnp.array([[0], [1]]), tm)
    with pytest.raises(ValueError, match="batch axis"):
        crown_bounds(lambda z: z, x[0], tm)
    with pytest.raises(ValueError, match="batch axis"):
        linear_spec_bounds(lambda z: z, x[0], tm, jnp.ones((1, 4)))


@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
def test_no_box_concretisation_is_the_closed_form(norm):
    """Without a box, CROWN concretises every row in closed form (ε·||Λ||_q: no iterative ball∩box
    solver in the traced computation), with the bounds of a box too wide to matter."""
    import jax
    from jaxrobust.bounds import crown_bounds
    from jaxrobust.threat import ThreatModel
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    w1, w2, w3 = (jax.random.normal(k[0], (12, 16)), jax.random.normal(k[1], (16, 16)),
                  jax.random.normal(k[2], (16, 3)))
    fn = lambda z: jax.nn.relu(jax.nn.relu(z @ w1) @ w2) @ w3
    x = jax.random.uniform(k[3], (5, 12))
    eps = {"l2": 0.3, "l1": 0.6, "linf": 0.05}[norm]
    free = ThreatModel(norm, eps, box=None)
    wide = ThreatModel(norm, eps, box=(-1e3, 1e3))
    lo_f, up_f = crown_bounds(fn, x, free, method="crown")
    lo_w, up_w = crown_bounds(fn, x, wide, method="crown")
    np.testing.assert_allclose(lo_f, lo_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(up_f, up_w, rtol=1e-4, atol=1e-4)
    if norm != "linf":
        jaxpr = str(jax.make_jaxpr(lambda z: crown_bounds(fn, z, free, method="crown"))(x))
        assert "while" not in jaxpr
        assert "while" in str(jax.make_jaxpr(lambda z: crown_bounds(fn, z, wide, method="crown"))(x))
