"""ThreatModel: exact projections onto l_p ball ∩ box, membership, random init, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

from jaxrobust.threat import ThreatModel, canonical_norm, dual_norm_name, lp_norm

NORMS = ["linf", "l2", "l1"]


def _scipy_projection(x0, x, norm, eps, pf, box):
    """Reference: minimise ||d - v||^2 s.t. ||d / pf||_p <= eps, box, with SLSQP (small d)."""
    v = (x - x0).ravel().astype(np.float64)
    r = pf.ravel().astype(np.float64) * eps
    if box is None:
        bounds = None
    else:
        bounds = list(zip(box[0] - x0.ravel(), box[1] - x0.ravel()))
    if norm == "l2":
        cons = [{"type": "ineq", "fun": lambda d: 1.0 - np.sum((d / r) ** 2),
                 "jac": lambda d: -2 * d / r ** 2}]
        res = scipy.optimize.minimize(lambda d: np.sum((d - v) ** 2), np.zeros_like(v),
                                      jac=lambda d: 2 * (d - v), constraints=cons, bounds=bounds,
                                      method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
        return res.x
    # l1: split d = a - b with a, b >= 0 gives a QP with linear constraints.
    n = v.size
    lo = -np.inf * np.ones(n) if box is None else box[0] - x0.ravel()
    hi = np.inf * np.ones(n) if box is None else box[1] - x0.ravel()

    def obj(ab):
        d = ab[:n] - ab[n:]
        return np.sum((d - v) ** 2)

    def jac(ab):
        g = 2 * (ab[:n] - ab[n:] - v)
        return np.concatenate([g, -g])

    cons = [{"type": "ineq", "fun": lambda ab: 1.0 - np.sum((ab[:n] + ab[n:]) / r),
             "jac": lambda ab: -np.concatenate([1 / r, 1 / r])},
            {"type": "ineq", "fun": lambda ab: (ab[:n] - ab[n:]) - lo,
             "jac": lambda ab: np.concatenate([np.eye(n), -np.eye(n)], 1)},
            {"type": "ineq", "fun": lambda ab: hi - (ab[:n] - ab[n:]),
             "jac": lambda ab: np.concatenate([-np.eye(n), np.eye(n)], 1)}]
    cons = cons if box is not None else cons[:1]
    res = scipy.optimize.minimize(obj, np.zeros(2 * n), jac=jac, constraints=cons,
                                  bounds=[(0, None)] * (2 * n), method="SLSQP",
                                  options={"ftol": 1e-14, "maxiter": 1000})
    return res.x[:n] - res.x[n:]


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("use_box", [True, False])
@pytest.mark.parametrize("per_feature", [False, True])
def test_projection_matches_constrained_qp(norm, use_box, per_feature):
    rng = np.random.default_rng(0)
    x0 = rng.uniform(0, 1, size=(1, 6)).astype(np.float32)
    x = (x0 + rng.normal(size=(1, 6)) * 0.8).astype(np.float32)
    pf = rng.uniform(0.3, 1.5, size=(6,)).astype(np.float32) if per_feature else np.ones(6, np.float32)
    box = (0.0, 1.0) if use_box else None
    tm = ThreatModel(norm=norm, eps=0.4, per_feature_eps=pf if per_feature else None, box=box)
    ours = np.asarray(tm.project(jnp.asarray(x0), jnp.asarray(x)))[0] - x0[0]
    ref = _scipy_projection(x0[0], x[0], norm, 0.4, pf, None if box is None else np.array(box))
    # Both are feasible; compare objective values and the points themselves.
    v = (x - x0)[0]
    assert np.sum((ours - v) ** 2) <= np.sum((ref - v) ** 2) + 1e-4
    np.testing.assert_allclose(ours, ref, atol=2e-3)


@settings(max_examples=15, deadline=None)
@given(norm=st.sampled_from(NORMS), seed=st.integers(0, 10_000),
       eps=st.floats(0.0, 3.0), scale=st.floats(0.01, 10.0), use_box=st.booleans(),
       per_feature=st.booleans())
def test_projection_feasible_and_idempotent(norm, seed, eps, scale, use_box, per_feature):
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    x0 = jax.random.uniform(k1, (3, 4, 4, 2))
    x = x0 + scale * jax.random.normal(k2, x0.shape)
    pf = jax.random.uniform(k3, (4, 4, 2), minval=0.1, maxval=2.0) if per_feature else None
    tm = ThreatModel(norm=norm, eps=eps, per_feature_eps=pf, box=(0.0, 1.0) if use_box else None)
    p = tm.project(x0, x)
    assert bool(jnp.all(tm.contains(x0, p)))
    p2 = tm.project(x0, p)
    np.testing.assert_allclose(np.asarray(p2), np.asarray(p), atol=1e-5)
    # A point already inside is left where it is.
    r = tm.random_init(key, x0)
    assert bool(jnp.all(tm.contains(x0, r)))
    np.testing.assert_allclose(np.asarray(tm.project(x0, r)), np.asarray(r), atol=1e-5)


def test_linf_projection_is_clip_and_per_example_eps():
    x0 = jnp.full((2, 3), 0.5)
    x = jnp.array([[2.0, -2.0, 0.55], [2.0, -2.0, 0.55]])
    tm = ThreatModel(norm="linf", eps=jnp.array([0.1, 0.3]))
    np.testing.assert_allclose(np.asarray(tm.project(x0, x)),
                               [[0.6, 0.4, 0.55], [0.8, 0.2, 0.55]], atol=1e-7)


def test_random_init_covers_ball_for_l2():
    # Uniform in the ball: the radius CDF is r^d, so the mean radius is d/(d+1) of eps.
    x0 = jnp.zeros((4000, 3))
    tm = ThreatModel(norm="l2", eps=1.0, box=None)
    r = lp_norm(tm.random_init(jax.random.PRNGKey(0), x0), "l2")
    assert abs(float(r.mean()) - 0.75) < 0.02
    assert float(r.max()) <= 1.0 + 1e-6


def test_norm_names_and_duals():
    assert canonical_norm(np.inf) == "linf" and canonical_norm(2) == "l2" and canonical_norm("L1") == "l1"
    assert dual_norm_name("linf") == "l1" and dual_norm_name("l2") == "l2"
    with pytest.raises(ValueError, match="Unknown norm"):
        canonical_norm("l3")


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_eps_rejected(bad):
    with pytest.raises(ValueError, match="eps"):
        ThreatModel(norm="linf", eps=bad)


def test_validate_inputs_errors():
    tm = ThreatModel(norm="linf", eps=0.1)
    with pytest.raises(ValueError, match="NaN"):
        tm.validate_inputs(np.full((2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="outside the input box"):
        tm.validate_inputs(np.full((2, 3), 2.0, np.float32))
    with pytest.raises(TypeError, match="floating"):
        tm.validate_inputs(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="labels"):
        tm.validate_inputs(np.zeros((2, 3), np.float32), np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="per_feature_eps"):
        ThreatModel(norm="l2", eps=0.1, per_feature_eps=np.ones(5)).validate_inputs(
            np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="box"):
        ThreatModel(norm="l2", eps=0.1, box=(1.0, 0.0))


def test_validate_inputs_labels_in_range():
    tm = ThreatModel(norm="linf", eps=0.1)
    x = np.zeros((3, 4), np.float32)
    tm.validate_inputs(x, np.array([0, 9, 5]), num_classes=10)  # fine
    with pytest.raises(ValueError, match=r"label 10 out of range for 10 classes"):
        tm.validate_inputs(x, np.array([0, 10, 5]), num_classes=10)
    with pytest.raises(ValueError, match="negative labels"):
        tm.validate_inputs(x, np.array([0, -1, 5]), num_classes=10)
    with pytest.raises(ValueError, match="negative labels"):  # even without num_classes
        tm.validate_inputs(x, np.array([0, -1, 5]))
    with pytest.raises(TypeError, match="integer labels"):
        tm.validate_inputs(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="num_classes"):
        tm.validate_inputs(x, np.array([0, 1, 2]), num_classes=0)


@pytest.mark.parametrize("y", [3, np.int32(3), np.array(3), jnp.array(3)])
def test_validate_inputs_unbatched_says_batch_axis(y):
    tm = ThreatModel(norm="linf", eps=0.1)
    one_image = np.zeros((28, 28, 1), np.float32)
    with pytest.raises(ValueError, match=r"a batch axis is expected: pass x\[None\]"):
        tm.validate_inputs(one_image, y, num_classes=10)
    with pytest.raises(ValueError, match=r"a batch axis is expected"):
        tm.validate_inputs(np.zeros((5,), np.float32))
    tm.validate_inputs(one_image[None], np.asarray(y).reshape(1), num_classes=10)  # the fix works


def test_threat_is_a_jittable_pytree():
    tm = ThreatModel(norm="l2", eps=jnp.array([0.5, 1.0]), box=None)
    f = jax.jit(lambda t, a, b: t.project(a, b))
    out = f(tm, jnp.zeros((2, 3)), jnp.ones((2, 3)) * 5)
    np.testing.assert_allclose(np.asarray(lp_norm(out, "l2")), [0.5, 1.0], rtol=1e-5)
