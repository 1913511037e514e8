"""AutoLip / SeqLip (Scaman & Virmaux 2018; thesis Table 4.5): the layer decomposition reproduces the
network, AutoLip of a linear map is its spectral norm (dense and convolutional, the latter through
jax.linear_transpose), and both bounds lie above the gradient-norm estimate of the Lipschitz constant."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.analysis import lipschitz as L
from jaxrobust.models import create_model, init_variables


class ConvOnly(nn.Module):
    """One strided convolution, flattened: a linear map (plus bias)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(3, (3, 3), strides=2, padding="SAME")(x)
        return x.reshape((x.shape[0], -1))


def _jacobian_norm(fn, shape):
    J = jax.jacfwd(lambda z: fn(z[None])[0])(jnp.zeros(shape))
    return float(np.linalg.norm(np.asarray(J).reshape(-1, int(np.prod(shape))), 2))


def test_autolip_of_a_linear_map_is_its_spectral_norm():
    m = create_model("fc", 5, widths=(), mean=(0.5,), std=(0.25,))
    v = init_variables(m, jax.random.PRNGKey(0), (4, 4, 1))
    W = np.asarray(v["params"]["Dense_0"]["kernel"], np.float64) / 0.25
    got = L.autolip(m, v, (4, 4, 1), jax.random.PRNGKey(1))
    assert got["bound"] == pytest.approx(np.linalg.norm(W, 2), rel=1e-4)
    assert L.seqlip(m, v, (4, 4, 1), jax.random.PRNGKey(1))["bound"] == pytest.approx(
        np.linalg.norm(W, 2), rel=1e-4)
    conv = ConvOnly()
    vc = conv.init(jax.random.PRNGKey(2), jnp.zeros((1, 6, 6, 2)))
    want = _jacobian_norm(lambda z: conv.apply(vc, z), (6, 6, 2))
    assert L.autolip(conv, vc, (6, 6, 2), jax.random.PRNGKey(3))["bound"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name,kwargs,shape", [
    pytest.param("cnn_small", {}, (8, 8, 1), marks=pytest.mark.slow),
    ("fc", {"widths": (7, 5), "activation": "tanh"}, (3, 3, 2))])
def test_segments_reproduce_the_network(name, kwargs, shape):
    m = create_model(name, 4, mean=(0.3,), std=(0.5,), **kwargs)
    v = init_variables(m, jax.random.PRNGKey(0), shape)
    segs = L.extract_segments(m, v, shape)
    assert [s.activation for s in segs][-1] == "" and len(segs) == (4 if name == "cnn_small" else 3)
    x = jax.random.uniform(jax.random.PRNGKey(5), (16,) + shape)
    z = x
    for s in segs:
        z = L.segment_fn(m, v, s, shape)(z.reshape((z.shape[0],) + s.in_shape))
        if s.activation:
            z = {"relu": jax.nn.relu, "tanh": jnp.tanh}[s.activation](z)
    np.testing.assert_allclose(z, m.apply(v, x), rtol=1e-5, atol=1e-5)
    # each segment's norm by power iteration (linearize + linear_transpose) = the dense Jacobian's
    for i, s in enumerate(segs):
        lin, lin_t = L.linear_maps(m, v, s, shape)
        got = L.spectral_norm(lin, lin_t, s.in_shape, jax.random.PRNGKey(i), 300)
        assert got == pytest.approx(_jacobian_norm(L.segment_fn(m, v, s, shape), s.in_shape), rel=1e-3)


class Residual(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        h = nn.Dense(x.shape[-1])(x)
        return nn.Dense(3)(x + nn.relu(h))


def test_networks_that_are_not_chains_are_refused():
    m = Residual()
    v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="element-wise"):
        L.extract_segments(m, v, (5,))


def _grad_norms(m, v, x):
    return L.gradient_norm_estimate(lambda z: m.apply(v, z), x)["max"]


@pytest.mark.parametrize("name,kwargs,shape", [
    ("fc", {"widths": (8, 6)}, (3, 3, 1)),
    pytest.param("cnn_small", {}, (8, 8, 1), marks=pytest.mark.slow)])
def test_bounds_lie_above_gradient_norms_and_seqlip_below_autolip(name, kwargs, shape):
    """Tiny ReLU net (hidden 8, 6: SeqLip's patterns enumerated exactly, a guaranteed bound) and a
    small CNN (SeqLip by alternating maximisation, slow): max ‖∇f‖ over 2000 points spread over and
    beyond the input box <= SeqLip <= AutoLip."""
    m = create_model(name, 4, **kwargs)
    v = init_variables(m, jax.random.PRNGKey(1), shape)
    x = jnp.concatenate([jax.random.uniform(jax.random.PRNGKey(0), (1000,) + shape),
                         3 * jax.random.normal(jax.random.PRNGKey(2), (1000,) + shape)])
    lower = _grad_norms(m, v, x)
    res = L.lipschitz_bounds(m, v, shape, jax.random.PRNGKey(3), runs=2, restarts=3)
    assert lower <= res["seqlip"]["min"] * (1 + 1e-5), (name, lower, res["seqlip"])
    assert res["seqlip"]["max"] <= res["autolip"]["min"] * (1 + 1e-4), (name, res)
    assert res["autolip"]["std"] <= 1e-3 * res["autolip"]["mean"]  # power iteration converged


def test_pattern_maximisation_against_enumeration():
    rng = np.random.default_rng(0)
    hits = 0
    for t in range(8):
        A, B = rng.normal(size=(5, 11)), rng.normal(size=(11, 4))
        exact = L.exact_pattern_norm(A, B)
        brute = max(np.linalg.norm(A @ np.diag(s) @ B, 2) for s in
                    ((np.arange(2 ** 11)[:, None] >> np.arange(11)) & 1))
        assert exact == pytest.approx(brute, rel=1e-9)
        alt = L.max_pattern_norm(A, B, jax.random.PRNGKey(t), restarts=4, exact_limit=0)
        assert np.linalg.norm(A @ B, 2) * (1 - 1e-5) <= alt <= exact * (1 + 1e-5)
        hits += alt >= exact * (1 - 1e-4)
    assert hits >= 6  # a local maximum, but mostly the global one on small problems
