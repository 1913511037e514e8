"""Model zoo: registry, shapes, exact parameter counts, BatchNorm modes, internal normalisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.models import (count_params, create_model, init_variables, list_models,
                              make_logits_fn)


def _abstract_params(name, shape, **kw):
    m = create_model(name, 10, **kw)
    v = jax.eval_shape(lambda k: m.init(k, jnp.zeros((1,) + shape)), jax.random.PRNGKey(0))
    return m, v


def test_exact_parameter_counts():
    # fc1: 784-1024-10 with biases.
    assert count_params(_abstract_params("fc1", (28, 28, 1))[1]["params"]) == 784 * 1024 + 1024 + 1024 * 10 + 10
    # Wong-Kolter small CNN on MNIST: conv 1->16 4x4, conv 16->32 4x4, fc 32*7*7->100, fc 100->10.
    expected = (16 * 16 + 16) + (16 * 32 * 16 + 32) + (32 * 7 * 7 * 100 + 100) + (100 * 10 + 10)
    assert count_params(_abstract_params("cnn_small", (28, 28, 1))[1]["params"]) == expected
    # §5.1: the CIFAR ResNet34 pruning backbone has 21,265,088 weights (no biases, non-affine BN).
    _, v = _abstract_params("cifar_resnet34", (32, 32, 3))
    assert count_params(v["params"]) == 21_265_088
    assert count_params(v["params"], kernels_only=True) == 21_265_088
    # Table 4.1: ResNet18 of width 16 is the standard 11.17M-parameter ResNet18.
    assert count_params(_abstract_params("resnet18", (32, 32, 3), w=16)[1]["params"]) == 11_173_962
    # LeNet(w): FC(196w, 64w) — check the first FC layer's fan-in is 196w.
    _, v = _abstract_params("lenet", (28, 28, 1), w=4)
    kernels = [l.shape for l in jax.tree.leaves(v["params"]) if l.ndim == 2]
    assert (196 * 4, 64 * 4) in kernels


@pytest.mark.parametrize("name,shape,kw", [
    ("fc", (8, 8, 1), dict(widths=(7, 5), activation="tanh")),
    ("fc", (2,), dict(widths=(4,), activation="sigmoid")),
    ("cnn_small", (32, 32, 3), {}),
    ("lenet", (28, 28, 1), dict(w=1)),
    ("vgg", (32, 32, 3), dict(w=1)),
    ("resnet18", (32, 32, 3), dict(w=1)),
    ("cifar_resnet18", (32, 32, 3), dict(w=1, last_bn=True)),
])
def test_forward_shapes_and_modes(name, shape, kw):
    m = create_model(name, 10, **kw)
    v = init_variables(m, jax.random.PRNGKey(0), shape)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4,) + shape)
    out = m.apply(v, x, train=False)
    assert out.shape == (4, 10) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    if "batch_stats" in v:
        logits_train, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
        assert not np.allclose(logits_train, out)  # batch statistics differ from running ones
        # bn_mode='train' closure must not touch the stored statistics.
        fn = make_logits_fn(m, v, bn_mode="train")
        before = jax.tree.map(np.asarray, v["batch_stats"])
        np.testing.assert_allclose(fn(x), logits_train, rtol=1e-5, atol=1e-5)
        jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, v["batch_stats"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["preact_resnet18", "wrn28_10", "wrn34_10", "cifar_resnet50", "vgg"])
def test_big_models_forward(name):
    m = create_model(name, 10)
    v = init_variables(m, jax.random.PRNGKey(0), (32, 32, 3))
    assert m.apply(v, jnp.zeros((2, 32, 32, 3)), train=False).shape == (2, 10)


def test_big_model_counts_abstract():
    _, v = _abstract_params("wrn34_10", (32, 32, 3))
    assert 46_000_000 < count_params(v["params"]) < 46_300_000  # WRN-34-10 has ~46.2M parameters
    _, v = _abstract_params("preact_resnet18", (32, 32, 3))
    assert 11_100_000 < count_params(v["params"]) < 11_200_000


def test_normalisation_inside_model():
    mean, std = (0.5,), (0.25,)
    m_norm = create_model("fc", 3, widths=(5,), mean=mean, std=std)
    m_raw = create_model("fc", 3, widths=(5,))
    v = init_variables(m_raw, jax.random.PRNGKey(0), (4, 4, 1))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 4, 1))
    np.testing.assert_allclose(m_norm.apply(v, x), m_raw.apply(v, (x - 0.5) / 0.25), rtol=1e-5)


def test_eval_mode_is_deterministic():
    m = create_model("resnet18", 10, w=1)
    v = init_variables(m, jax.random.PRNGKey(0), (32, 32, 3))
    fn = make_logits_fn(m, v)
    x = jnp.ones((2, 32, 32, 3)) * 0.3
    np.testing.assert_array_equal(fn(x), fn(x))
    np.testing.assert_allclose(fn(x[:1]), fn(x)[:1], rtol=1e-5, atol=1e-6)  # no batch coupling


def test_clear_errors():
    with pytest.raises(ValueError, match="Available models"):
        create_model("resnet1000")
    with pytest.raises(ValueError, match="Bad arguments"):
        create_model("fc1", 10, nonsense=3)
    with pytest.raises(ValueError, match="activation"):
        m = create_model("fc", 10, activation="gelu2")
        init_variables(m, jax.random.PRNGKey(0), (4,))
    with pytest.raises(ValueError, match="bn_mode"):
        make_logits_fn(None, None, bn_mode="xyz")
    assert "cifar_resnet34" in list_models()
