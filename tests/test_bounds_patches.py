"""Patch-form CROWN intermediate bounds (jaxrobust.bounds.patches): the same bounds as the dense
backward pass on every supported node (strided / padded / dilated / grouped convolutions, bias and
BatchNorm, residual sums of branches with different receptive fields, max pooling with overlapping
padded windows, sum and average pooling, relu / hard-tanh / sigmoid / tanh), soundness on sampled and
attacked points, gradients, window geometry, and the fall-back to dense rows."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.attacks import pgd
from jaxrobust.bounds import crown_bounds, margin_bounds, patches
from jaxrobust.bounds import backward as BW
from jaxrobust.bounds import linear as L
from jaxrobust.models import create_model, init_variables
from jaxrobust.threat import ThreatModel

K = 4
DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, k, stride=1, padding="SAME", dilation=1, groups=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, rhs_dilation=(dilation, dilation),
                                        dimension_numbers=DN, feature_group_count=groups)


def _local_zoo_params(key):
    ks = jax.random.split(key, 6)
    n = lambda k, s, sc: jax.random.normal(k, s) * sc
    return {"k1": n(ks[0], (3, 3, 2, 4), 0.5), "b1": n(ks[1], (4,), 0.1),
            "k2": n(ks[2], (3, 3, 4, 4), 0.3), "k3": n(ks[3], (3, 3, 2, 8), 0.4),
            "k4": n(ks[4], (1, 1, 8, 8), 0.5), "W": n(ks[5], (3 * 3 * 8, K), 0.3)}


def local_zoo(params, x):
    """(B, 16, 16, 2) -> (B, K): every node kind of the patch pass, with residual branches whose
    receptive fields differ."""
    h = jax.nn.relu((x - 0.3) / 0.5 + 0 * x)  # normalisation; relu of the input (IBP exact)
    h = _conv(h, params["k1"]) + params["b1"]  # 16x16x4
    h = jax.nn.relu(h)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")  # 8x8
    g = _conv(h, params["k2"], padding=((2, 2), (2, 2)), dilation=2)  # dilated, 8x8x4
    g = jnp.tanh(g * 0.7 + 0.1)
    h = h + g  # residual: identity branch (small window) + dilated branch (large window)
    h = _conv(h, params["k3"], stride=2, groups=2)  # grouped, strided, SAME: 4x4x8
    h = jnp.clip(h, -0.6, 0.5)  # hard tanh: max and min with constants
    h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 1, 1, 1), "VALID") / 4.0  # 3x3
    h = jax.nn.sigmoid(_conv(h, params["k4"]) * 2.0)
    return h.reshape(h.shape[0], -1) @ params["W"]


def _lenet():
    model = create_model("lenet", K, w=1)
    v = init_variables(model, jax.random.PRNGKey(0), (16, 16, 1))
    return lambda x: model.apply(v, x)


def _resnet():
    from jaxrobust.models.zoo import ResNet
    model = ResNet((1, 1), "basic", w=1, num_classes=K, mean=(0.4,) * 3, std=(0.3,) * 3)
    v = init_variables(model, jax.random.PRNGKey(0), (10, 10, 3))
    # non-trivial eval-mode BatchNorm statistics
    v = dict(v, batch_stats=jax.tree.map(lambda s: s + 0.1 * jax.random.uniform(jax.random.PRNGKey(5), s.shape),
                                         v["batch_stats"]))
    return lambda x: model.apply(v, x)


def _cnn_small():
    model = create_model("cnn_small", K, mean=(0.2,), std=(0.4,))
    v = init_variables(model, jax.random.PRNGKey(0), (16, 16, 1))
    return lambda x: model.apply(v, x)


NETS = {
    "local_zoo": (lambda: functools.partial(local_zoo, _local_zoo_params(jax.random.PRNGKey(3))), (16, 16, 2)),
    "cnn_small": (_cnn_small, (16, 16, 1)),
    "lenet": (_lenet, (16, 16, 1)),  # max pooling between convolutions
    "resnet": (_resnet, (10, 10, 3)),  # BatchNorm, identity and 1x1-conv shortcuts
}


@functools.lru_cache(maxsize=None)
def _net(name):
    make, shape = NETS[name]
    return make(), shape


def _threat(kind, shape):
    if kind == "linf_box":
        return ThreatModel("linf", 0.02)
    pf = jax.random.uniform(jax.random.PRNGKey(2), shape, minval=0.5, maxval=1.5)
    return ThreatModel("l2", 0.2, per_feature_eps=pf, box=None)


# The tangent sigmoid/tanh relaxations (a bisection loop) triples compile times; the patch pass
# treats every relaxation's lines alike, so the analytic ones suffice here.
KW = {"sigmoid": "analytic"}


@functools.lru_cache(maxsize=None)
def _bounds_fn(name, use_patches, margins=True):
    f, _ = _net(name)

    @jax.jit
    def both(x, y, tm):
        return (crown_bounds(f, x, tm, patches=use_patches, **KW),
                margin_bounds(f, x, y, tm, patches=use_patches, **KW) if margins else None)
    return both


def _count_patch_layers(name, tm, x):
    """Number of activation layers whose CROWN bounds ran in patch form (trace-time spy)."""
    f, _ = _net(name)
    calls = []
    original = patches.intermediate_bounds

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    patches.intermediate_bounds = spy
    try:
        jax.eval_shape(lambda xb: crown_bounds(f, xb, tm, **KW), x)
    finally:
        patches.intermediate_bounds = original
    return len(calls)


CASES = [("local_zoo", "linf_box"), ("local_zoo", "l2_per_feature"), ("cnn_small", "linf_box"),
         ("lenet", "linf_box"), pytest.param("resnet", "linf_box", marks=pytest.mark.slow),
         pytest.param("resnet", "l2_per_feature", marks=pytest.mark.slow),
         pytest.param("lenet", "l2_per_feature", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,kind", CASES)
def test_patch_bounds_equal_dense_bounds(name, kind):
    f, shape = _net(name)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2,) + shape)
    y = jnp.argmax(f(x), -1)
    tm = _threat(kind, shape)
    assert _count_patch_layers(name, tm, x) >= 1  # the patch pass is really exercised
    margins = name != "local_zoo"  # (compile time; its output layer is dense anyway)
    (plo, phi), pm = _bounds_fn(name, True, margins)(x, y, tm)
    (dlo, dhi), dm = _bounds_fn(name, False, margins)(x, y, tm)
    scale = 1e-5 * (1 + float(jnp.max(jnp.abs(dhi - dlo))))
    np.testing.assert_allclose(plo, dlo, atol=scale, rtol=1e-5)
    np.testing.assert_allclose(phi, dhi, atol=scale, rtol=1e-5)
    if margins:
        np.testing.assert_allclose(pm.lower, dm.lower, atol=scale, rtol=1e-5)
        np.testing.assert_allclose(pm.U, dm.U, atol=1e-5, rtol=1e-4)
    assert float(jnp.mean(dhi - dlo)) > 1e-3  # non-trivial bounds


@functools.partial(jax.jit, static_argnums=0)
def _extreme_points(f, x, key, tm):
    """PGD points pushing each output down and up: (B, 2K, *f) (one batched attack; label 0 of
    the pair [±z_j, 0] makes PGD minimise ±z_j)."""
    B = x.shape[0]
    xr = jnp.repeat(x, 2 * K, axis=0)
    j = jnp.tile(jnp.arange(2 * K) % K, B)
    sgn = jnp.tile(jnp.where(jnp.arange(2 * K) < K, 1.0, -1.0), B)
    rows = jnp.arange(B * 2 * K)
    pair = lambda z: jnp.stack([sgn * f(z)[rows, j], jnp.zeros(B * 2 * K)], axis=1)
    adv = pgd(pair, xr, jnp.zeros(B * 2 * K, jnp.int32), key, tm, steps=30, loss="cw", unroll=False)
    return adv.reshape((B, 2 * K) + x.shape[1:])


def test_patch_bounds_contain_sampled_and_attacked_outputs():
    f, shape = _net("local_zoo")
    x = jax.random.uniform(jax.random.PRNGKey(4), (2,) + shape)
    for kind in ("linf_box", "l2_per_feature"):
        tm = _threat(kind, shape)
        (lo, hi), _ = _bounds_fn("local_zoo", True, False)(x, jnp.zeros(2, jnp.int32), tm)
        rnd = tm.random_init(jax.random.PRNGKey(5), jnp.repeat(x, 200, axis=0)).reshape((2, 200) + shape)
        adv = _extreme_points(f, x, jax.random.PRNGKey(6), tm)
        pts = jnp.concatenate([rnd, adv], 1)
        assert bool(jnp.all(tm.contains(jnp.repeat(x, pts.shape[1], 0), pts.reshape((-1,) + shape))))
        z = np.asarray(f(pts.reshape((-1,) + shape))).reshape(2, -1, K)
        tol = 1e-5 * (1 + np.abs(z))
        assert np.all(z >= np.asarray(lo)[:, None] - tol), kind
        assert np.all(z <= np.asarray(hi)[:, None] + tol), kind
        # the attacks spread the outputs (the check is not vacuous)
        za = z[:, 200:]
        assert np.max(za.max(1) - za.min(1)) > 0.05 * float(jnp.max(hi - lo)), kind


def _grad_net(params, x):
    """A relu of the normalised input (IBP-exact, then relaxed in the patch pass with the
    element-wise normalisation behind it), max pooling, a strided convolution."""
    h = jax.nn.relu((x - 0.3) / 0.5)
    h = jax.nn.relu(_conv(h, params["k1"]) + params["b1"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jax.nn.relu(_conv(h, params["k2"], stride=2))
    return h.reshape(h.shape[0], -1) @ params["W"][:h[0].size]


def test_gradients_in_parameters_match_dense():
    """d(bound widths)/d(parameters) through the patch pass equals the dense pass's. (Under jit
    this program crashed jaxlib 0.10's XLA:CPU YNN fusions; ``jaxrobust`` turns them off.)"""
    params = _local_zoo_params(jax.random.PRNGKey(3))
    params = dict(params, k1=params["k1"][:, :, :1], W=jnp.tile(params["W"], (2, 1)))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 12, 12, 1))
    tm = ThreatModel("linf", 0.02)

    def loss(p, use_patches):
        lo, hi = crown_bounds(functools.partial(_grad_net, p), x, tm, patches=use_patches)
        return jnp.sum(hi - lo)

    gp = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
    gd = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
    for k in ("k1", "b1", "k2", "W"):
        np.testing.assert_allclose(gp[k], gd[k], rtol=2e-3, atol=1e-4 * float(jnp.max(jnp.abs(gd[k]))), err_msg=k)
        assert float(jnp.max(jnp.abs(gd[k]))) > 0, k


# ----------------------------------------------------------------------------- geometry
def _tape(f, shape):
    closed, _ = L._single_example_fn(f, shape, jnp.float32)
    tape = BW.Tape()
    x = jnp.zeros(shape)
    xr = tape.new(shape, jnp.float32)
    tape.iv[xr.id] = BW.Interval(x - 0.1, x + 0.1)
    tape.level[xr.id] = BW.LOOSE
    BW.trace_tape(closed.jaxpr, closed.consts, [xr], tape, lambda *a: None)
    acts = [[a for a in n.ins if isinstance(a, BW.Ref)][0] for n in tape.nodes if n.kind == "act"]
    return tape, xr, acts


def test_windows_of_a_conv_chain():
    """cnn_small on 28x28: conv 4x4/2 pad 1, twice. The second relu's input sees the input on
    stride-4 windows of 10 pixels starting 3 pixels before 4·position (receptive field arithmetic)."""
    model = create_model("cnn_small", K)
    v = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    tape, xr, acts = _tape(lambda x: model.apply(v, x), (28, 28, 1))
    plan = patches.local_plan(tape, acts[1].id, xr.id)
    assert plan.windows[xr.id] == patches.Window((4, 4), (-3, -3), (10, 10))
    assert plan.windows[acts[0].id] == patches.Window((2, 2), (-1, -1), (4, 4))
    assert plan.patch_cost < plan.dense_cost
    assert patches.local_plan(tape, acts[2].id, xr.id) is None  # dense layer: no spatial rows


def test_falls_back_to_dense_where_patches_do_not_apply():
    k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 1, 2))

    def transposed(x):  # a transpose between convolutions has no patch rule
        h = jax.nn.relu(_conv(x, k))
        h = jnp.transpose(h, (0, 2, 1, 3))
        return jax.nn.relu(_conv(h, jnp.ones((3, 3, 2, 2))))

    tape, xr, acts = _tape(transposed, (6, 6, 1))
    assert patches.local_plan(tape, acts[1].id, xr.id) is None

    def big_windows(x):  # windows as large as the 4x4 maps: dense rows are cheaper
        h = jax.nn.relu(_conv(x, jnp.ones((5, 5, 1, 2))))
        return jax.nn.relu(_conv(h, jnp.ones((5, 5, 2, 2))))

    tape, xr, acts = _tape(big_windows, (4, 4, 1))
    assert patches.local_plan(tape, acts[1].id, xr.id) is None
    zoo = functools.partial(local_zoo, _local_zoo_params(jax.random.PRNGKey(0)))
    tape, xr, acts = _tape(zoo, (16, 16, 2))
    assert patches.local_plan(tape, acts[1].id, xr.id) is not None
    # and the bounds through the transpose are still right (dense path)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 6, 6, 1))
    tm = ThreatModel("linf", 0.05)
    lo, hi = crown_bounds(transposed, x, tm)
    pts = tm.random_init(jax.random.PRNGKey(2), jnp.repeat(x, 100, axis=0))
    z = np.asarray(transposed(pts)).reshape((2, 100) + lo.shape[1:])
    assert np.all(z >= np.asarray(lo)[:, None] - 1e-5) and np.all(z <= np.asarray(hi)[:, None] + 1e-5)


def test_extract_matches_naive_windows():
    a = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 5, 3))
    w = patches.Window((2, 1), (-2, 1), (4, 3))
    grid = (4, 3)
    p = np.asarray(patches.extract(a, w, grid))
    assert p.shape == (4, 3, 1, 4, 3, 3)
    an = np.asarray(a)[0]
    for i in range(4):
        for j in range(3):
            for s in range(4):
                for t in range(3):
                    r, c = i * 2 - 2 + s, j + 1 + t
                    want = an[r, c] if (0 <= r < 7 and 0 <= c < 5) else 0.0
                    np.testing.assert_array_equal(p[i, j, 0, s, t], want)
    # infinite boxes stay out of the padding (no 0 * inf = nan)
    inf = patches.extract(jnp.full((7, 5, 3), -jnp.inf), w, grid)
    assert not bool(jnp.any(jnp.isnan(inf)))


def test_import_keeps_only_ynn_dot_fusions_on_jaxlib_010_and_respects_user_flags():
    import subprocess
    import sys
    from importlib.metadata import version
    code = "import os, jaxrobust; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    if version("jaxlib").startswith("0.10."):
        assert out == "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot"
    else:
        assert "ynn" not in out
    mine = "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=dot"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, XLA_FLAGS=mine),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == mine


def _nchw_net():
    """NCHW / OIHW convolutions (strided, padded), NCHW max pooling, a bias in (1, C, 1, 1)."""
    k1 = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 3, 3)) * 0.5  # OIHW
    k2 = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 3, 3)) * 0.4
    b1 = jax.random.normal(jax.random.PRNGKey(4), (1, 4, 1, 1)) * 0.1
    W = jax.random.normal(jax.random.PRNGKey(2), (3 * 4 * 4, K)) * 0.3
    dn = ("NCHW", "OIHW", "NCHW")

    def f(x):  # (B, 2, 16, 16)
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, k1, (1, 1), "SAME", dimension_numbers=dn) + b1)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), "SAME")  # 8x8
        h = jnp.tanh(jax.lax.conv_general_dilated(h, k2, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn))
        return h.reshape(x.shape[0], -1) @ W
    return f


@pytest.mark.parametrize("kind", ["linf_box", pytest.param("l2_per_feature", marks=pytest.mark.slow)])
def test_nchw_convolutions_run_in_patch_form_with_the_dense_bounds(kind):
    """The patch form follows each value's layout (set by the convolutions' dimension_numbers):
    an NCHW network's conv layers run on windows (it used to fall back to dense rows silently) and
    give the dense rows' bounds."""
    f = _nchw_net()
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 2, 16, 16))
    tm = _threat(kind, (2, 16, 16))
    calls = []
    original = patches.intermediate_bounds

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    patches.intermediate_bounds = spy
    try:
        lo, hi = jax.jit(lambda x, tm: crown_bounds(f, x, tm, **KW))(x, tm)
    finally:
        patches.intermediate_bounds = original
    assert len(calls) >= 1  # (at least) the tanh input after the NCHW max pooling and strided conv
    dlo, dhi = jax.jit(lambda x, tm: crown_bounds(f, x, tm, patches=False, **KW))(x, tm)
    np.testing.assert_allclose(lo, dlo, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hi, dhi, rtol=1e-4, atol=1e-5)


def test_a_conv_layout_without_patch_form_warns_once_with_the_memory(monkeypatch):
    """1-d convolutions have no patch form: the dense fall-back says why and how much memory."""
    import warnings as _w
    k1 = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 3)) * 0.5  # OIW
    k2 = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3)) * 0.5
    dn = ("NCH", "OIH", "NCH")

    def f(x):  # (B, 2, 12)
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, k1, (1,), "SAME", dimension_numbers=dn))
        h = jax.nn.relu(jax.lax.conv_general_dilated(h, k2, (1,), "SAME", dimension_numbers=dn) - 0.1)
        return h.reshape(x.shape[0], -1)[:, :K]

    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 2, 12))
    tm = ThreatModel("linf", 0.05)
    monkeypatch.setattr(patches, "_WARN_BYTES", 0)
    monkeypatch.setattr(patches, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"1 spatial dimensions.*MiB per example"):
        lo, hi = crown_bounds(f, x, tm)
    with _w.catch_warnings():
        _w.simplefilter("error")  # once per reason
        lo2, _ = crown_bounds(f, x, tm)
    np.testing.assert_allclose(lo, lo2)
