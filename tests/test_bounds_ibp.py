"""IBP over traced jaxprs: soundness on sampled and attacked points, exactness, gradients, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.attacks import pgd
from jaxrobust.bounds import (UnsupportedPrimitiveError, ibp_bounds, ibp_margin_lower_bounds, input_interval,
                              interval_bounds)
from jaxrobust.models import create_model, init_variables
from jaxrobust.threat import ThreatModel

NETS = [
    ("fc", (12,), dict(widths=(16, 16), activation="relu")),
    ("fc", (12,), dict(widths=(16,), activation="sigmoid")),
    ("fc", (12,), dict(widths=(16,), activation="tanh")),
    ("cnn_small", (12, 12, 1), dict(mean=(0.2,), std=(0.4,))),
    ("resblock", (8, 8, 3), {}),  # one residual stage, eval-mode BatchNorm
    ("lenet", (8, 8, 1), dict(w=1)),  # max pooling
]


def _net(name, shape, kw):
    if name == "resblock":
        from jaxrobust.models.zoo import ResNet
        m = ResNet((1, 1), "basic", w=1, num_classes=5)
    else:
        m = create_model(name, 5, **kw)
    v = init_variables(m, jax.random.PRNGKey(0), shape)
    return jax.jit(lambda x: m.apply(v, x))


CASES = [pytest.param(n, s, k, norm, marks=() if (norm == "linf" or n == "fc") else pytest.mark.slow)
         for (n, s, k) in NETS for norm in ("linf", "l2", "l1")]


@pytest.mark.parametrize("name,shape,kw,norm", CASES)
def test_sampled_and_attacked_points_inside_bounds(name, shape, kw, norm):
    f = _net(name, shape, kw)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3,) + shape)
    eps = {"linf": 0.03, "l2": 0.1, "l1": 0.3}[norm]
    pf = jax.random.uniform(jax.random.PRNGKey(2), shape, minval=0.5, maxval=1.5)
    for tm in (ThreatModel(norm, eps), ThreatModel(norm, eps, per_feature_eps=pf, box=None)):
        lo, hi = jax.jit(lambda x, t: ibp_bounds(f, x, t))(x, tm)
        assert bool(jnp.all(lo <= hi))
        pts = [tm.random_init(jax.random.PRNGKey(s), x) for s in range(6)]
        for j in range(2):  # PGD points that push logit j down (label 0) and up (label 1)
            pair = lambda z, j=j: jnp.stack([f(z)[:, j], jnp.zeros_like(f(z)[:, j])], 1)
            for label in (0, 1):
                pts.append(pgd(pair, x, jnp.full((3,), label, jnp.int32), jax.random.PRNGKey(j),
                               tm, steps=10, loss="cw", unroll=False))
        for p in pts:
            assert bool(jnp.all(tm.contains(x, p)))
            z = f(p)
            assert bool(jnp.all(z >= lo - 1e-4)) and bool(jnp.all(z <= hi + 1e-4))


def test_exact_for_one_linear_layer_and_tight_at_zero_eps():
    W = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    f = lambda x: x @ W + 1.0
    x = jnp.full((2, 6), 0.5)
    lo, hi = ibp_bounds(f, x, ThreatModel("linf", 0.1))
    np.testing.assert_allclose(lo, f(x) - 0.1 * jnp.abs(W).sum(0), rtol=1e-5)
    np.testing.assert_allclose(hi, f(x) + 0.1 * jnp.abs(W).sum(0), rtol=1e-5)
    g = _net("resblock", (8, 8, 3), {})
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 8, 8, 3))
    lo, hi = ibp_bounds(g, x, ThreatModel("linf", 0.0))
    np.testing.assert_allclose(lo, g(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hi, g(x), rtol=1e-4, atol=1e-4)


def test_bounds_grow_with_eps_and_margins_certify_sound():
    f = _net("fc", (12,), dict(widths=(16,)))
    x = jax.random.uniform(jax.random.PRNGKey(4), (16, 12))
    y = jnp.argmax(f(x), -1)
    widths = [float(jnp.mean(jnp.subtract(*ibp_bounds(f, x, ThreatModel("linf", e))[::-1])))
              for e in (0.0, 0.01, 0.05)]
    assert widths[0] < widths[1] < widths[2]
    tm = ThreatModel("linf", 0.01)
    m = ibp_margin_lower_bounds(f, x, y, tm)
    certified = jnp.all(jnp.where(jax.nn.one_hot(y, 5, dtype=bool), True, m > 0), axis=1)
    x_adv = pgd(f, x, y, jax.random.PRNGKey(0), tm, steps=50, restarts=2, loss="cw")
    broken = jnp.argmax(f(x_adv), -1) != y
    assert not bool(jnp.any(certified & broken))  # certified points are never broken


def test_differentiable_in_parameters_and_vmappable():
    m = create_model("fc", 3, widths=(8,))
    v = init_variables(m, jax.random.PRNGKey(0), (5,))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 5))
    tm = ThreatModel("linf", 0.05)

    def width(v):
        lo, hi = ibp_bounds(lambda z: m.apply(v, z), x, tm)
        return jnp.sum(hi - lo)

    g = jax.grad(width)(v)
    leaf = g["params"]["Dense_0"]["kernel"]
    assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.abs(leaf).sum()) > 0
    # finite difference on one weight
    e = 1e-3
    bump = lambda s: jax.tree.map(lambda a: a, v) | {"params": {**v["params"], "Dense_0": {
        **v["params"]["Dense_0"], "kernel": v["params"]["Dense_0"]["kernel"].at[0, 0].add(s)}}}
    fd = (width(bump(e)) - width(bump(-e))) / (2 * e)
    assert float(leaf[0, 0]) == pytest.approx(float(fd), rel=0.05, abs=1e-2)
    per_example = jax.vmap(lambda xi: ibp_bounds(lambda z: m.apply(v, z), xi[None], tm))(x)
    lo, hi = ibp_bounds(lambda z: m.apply(v, z), x, tm)
    np.testing.assert_allclose(per_example[0][:, 0], lo, rtol=1e-5)


def test_clear_errors():
    x = jnp.full((2, 4), 0.5)
    with pytest.raises(UnsupportedPrimitiveError, match=r"'sin' \(at .*test_bounds_ibp.py"):
        ibp_bounds(lambda z: jnp.sin(z), x, ThreatModel("linf", 0.1))  # names where it occurs
    with pytest.raises(UnsupportedPrimitiveError, match=r"'sort' \(at .*test_bounds_ibp.py.*equation 1 "):
        ibp_bounds(lambda z: jnp.sort(z * 2.0), x, ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="eps"):
        ibp_bounds(lambda z: z, x, ThreatModel("linf", -1.0))
    with pytest.raises(ValueError, match="NaN"):
        ibp_bounds(lambda z: z, x.at[0, 0].set(jnp.nan), ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="per_feature_eps"):
        ibp_bounds(lambda z: z, x, ThreatModel("l2", 0.1, per_feature_eps=jnp.ones(3)))


# ----------------------------------------------------------------------------- l_2 / l_1 balls
def _ball_points(key, x, eps, norm, n, scale=None):
    """n points of the l_p ball (on its surface and inside), clipped to [0, 1] (stays in the ball)."""
    k1, k2 = jax.random.split(key)
    d = jax.random.normal(k1, (n,) + x.shape)
    if norm == "l1":
        d = jnp.sign(d) * jax.random.exponential(k2, d.shape) ** 3  # sparse-ish directions
    axes = tuple(range(2, d.ndim))
    p = 2 if norm == "l2" else 1
    d = d / jnp.sum(jnp.abs(d) ** p, axis=axes, keepdims=True) ** (1 / p)
    r = jnp.where(jnp.arange(n) < n // 2, 1.0, jax.random.uniform(k2, (n,)))
    d = d * eps * r.reshape((n,) + (1,) * (d.ndim - 1))
    return jnp.clip(x[None] + (d if scale is None else d * scale), 0.0, 1.0)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_first_dense_layer_is_exact_over_the_ball(norm):
    """w·x' over {||(x' - x) ⊘ ε⃗||_p <= ε} is w·x ± ε ||w ⊙ ε⃗||_q, through normalisation and a reshape
    (the interval hull of the ball gave ε Σ|w_j| ε⃗_j: 2.4x / 6x wider here)."""
    W = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    f = lambda x: ((x - 0.3) / 0.5).reshape(x.shape[0], 6) @ W + 1.0
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 2, 3))
    pf = jnp.linspace(0.5, 1.5, 6).reshape(2, 3)
    tm = ThreatModel(norm, 0.1, per_feature_eps=pf, box=None)
    lo, hi = ibp_bounds(f, x, tm)
    rows = W * (pf.reshape(6, 1) / 0.5)
    dual = jnp.sqrt(jnp.sum(rows ** 2, 0)) if norm == "l2" else jnp.max(jnp.abs(rows), 0)
    np.testing.assert_allclose(lo, f(x) - 0.1 * dual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi, f(x) + 0.1 * dual, rtol=1e-5, atol=1e-6)


NETS_BALL = {
    "fc": (lambda k: _net("fc", (12,), dict(widths=(16, 16), activation="relu")), (12,)),
    "cnn_nhwc": (lambda k: _net("cnn_small", (12, 12, 1), dict(mean=(0.2,), std=(0.4,))), (12, 12, 1)),
    "conv_nchw": (lambda k: _nchw_net(k), (2, 8, 8)),
}


def _nchw_net(key):
    k1, k2, k3 = jax.random.split(key, 3)
    K1 = jax.random.normal(k1, (4, 2, 3, 3)) * 0.4  # OIHW
    K2 = jax.random.normal(k2, (4, 4, 3, 3)) * 0.3
    W = jax.random.normal(k3, (4 * 4 * 4, 5)) * 0.2

    def f(x):  # (B, C, H, W); a strided, dilated first conv
        dn = ("NCHW", "OIHW", "NCHW")
        h = jax.lax.conv_general_dilated((x - 0.5) / 0.25, K1, (1, 1), "SAME", rhs_dilation=(2, 2),
                                         dimension_numbers=dn)
        h = jax.lax.conv_general_dilated(jax.nn.relu(h), K2, (2, 2), "SAME", dimension_numbers=dn)
        return jax.nn.relu(h).reshape(x.shape[0], -1) @ W
    return jax.jit(f)


BALL_CASES = [pytest.param(n, norm, marks=() if (n, norm) in (("fc", "l2"), ("conv_nchw", "l1")) else pytest.mark.slow)
              for n in sorted(NETS_BALL) for norm in ("l2", "l1")]


@pytest.mark.parametrize("name,norm", BALL_CASES)
def test_ball_ibp_is_sound_and_tighter_than_the_hull(name, norm):
    make, shape = NETS_BALL[name]
    f = make(jax.random.PRNGKey(3))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3,) + shape)
    eps = {"l2": 0.5, "l1": 1.0}[norm]
    tm = ThreatModel(norm, eps)
    lo, hi = ibp_bounds(f, x, tm)
    hull = input_interval(x, tm)
    hlo, hhi = interval_bounds(f, hull.lo, hull.hi)
    assert bool(jnp.all(lo >= hlo - 1e-5)) and bool(jnp.all(hi <= hhi + 1e-5))
    assert float(jnp.mean(hi - lo)) < 0.9 * float(jnp.mean(hhi - hlo))
    pts = _ball_points(jax.random.PRNGKey(2), x, eps, norm, 256)
    v = jax.vmap(f)(pts)
    y = jnp.argmax(f(x), -1)
    adv = [f(pgd(f, x, y, jax.random.PRNGKey(0), tm, steps=20, loss="cw"))]
    v = jnp.concatenate([v] + [a[None] for a in adv])
    tol = 1e-4 * (1 + jnp.abs(v))
    assert bool(jnp.all(v >= lo - tol)) and bool(jnp.all(v <= hi + tol))


def test_margin_bounds_reject_out_of_range_labels():
    f = _net("fc", (12,), dict(widths=(16,)))
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 12))
    tm = ThreatModel("linf", 0.01)
    for bad in (jnp.array([0, 5]), jnp.array([-1, 0])):
        with pytest.raises(ValueError, match="label"):
            ibp_margin_lower_bounds(f, x, bad, tm)
    with pytest.raises(ValueError, match="batch axis"):
        ibp_bounds(f, x[0], tm)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_ball_ibp_gradients_are_finite_at_zero_eps(norm):
    """Certified training starts its ε schedule at 0: the dual-norm rows must not give NaN gradients."""
    m = create_model("fc", 3, widths=(8,))
    v = init_variables(m, jax.random.PRNGKey(0), (5,))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 5))

    def width(v, eps):
        lo, hi = ibp_bounds(lambda z: m.apply(v, z), x, ThreatModel(norm, eps))
        return jnp.sum(hi - lo)

    for eps in (0.0, 0.3):
        g = jax.grad(width)(v, eps)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g)), eps
    assert float(jnp.abs(jax.grad(width)(v, 0.3)["params"]["Dense_0"]["kernel"]).sum()) > 0
