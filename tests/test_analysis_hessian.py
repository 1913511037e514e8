"""Hessian analyses (thesis Fig 4.5): HVPs, Lanczos, power iteration and SLQ against the dense
``jax.hessian`` of a tiny trained net."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrobust.analysis import hessian as H
from jaxrobust.analysis import subset as S
from jaxrobust.threat import ThreatModel


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.tanh(nn.Dense(6)(x))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def tiny():
    """A 4-6-3 tanh net (51 parameters) trained near a minimum on 37 points in [0, 1]^4."""
    model = TinyMLP()
    x = jax.random.uniform(jax.random.PRNGKey(0), (37, 4))
    y = jax.random.randint(jax.random.PRNGKey(1), (37,), 0, 3)
    params = model.init(jax.random.PRNGKey(2), x)["params"]
    apply_fn = lambda p, z: model.apply({"params": p}, z)
    batches = S.stack_batches(x, y, 10)  # 4 batches, the last one padded with 3 masked rows
    opt = optax.adam(0.05)
    grad = jax.jit(jax.grad(lambda p: S.subset_loss(apply_fn, p, batches)[0]))

    @jax.jit
    def fit(p):
        def body(_, carry):
            p, s = carry
            u, s = opt.update(grad(p), s)
            return optax.apply_updates(p, u), s
        return jax.lax.fori_loop(0, 300, body, (p, opt.init(p)))[0]

    params = fit(params)
    dense = H.dense_hessian(apply_fn, params, batches)
    return dict(apply_fn=apply_fn, params=params, x=x, y=y, batches=batches, dense=dense,
                eig=np.linalg.eigvalsh(dense)[::-1], hvp=H.make_hvp(apply_fn, params, batches))


def test_masked_batch_hvp_equals_full_batch_and_dense(tiny):
    v = jax.random.normal(jax.random.PRNGKey(3), (tiny["hvp"].dim,))
    full = H.make_hvp(tiny["apply_fn"], tiny["params"], S.stack_batches(tiny["x"], tiny["y"], 37))
    assert tiny["batches"]["mask"].shape == (4, 10) and int(tiny["batches"]["mask"].sum()) == 37
    masked, one = np.asarray(tiny["hvp"](v)), np.asarray(full(v))
    np.testing.assert_allclose(masked, one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked, tiny["dense"] @ np.asarray(v, np.float64), rtol=1e-4, atol=1e-5)
    # The block product (several tangents sharing one primal pass) is the same operator.
    vs = jax.random.normal(jax.random.PRNGKey(4), (3, tiny["hvp"].dim))
    np.testing.assert_allclose(np.asarray(tiny["hvp"].block(vs)), np.asarray(vs, np.float64) @ tiny["dense"],
                               rtol=1e-4, atol=1e-5)


def test_lanczos_and_power_top_eigenvalues_equal_the_dense_ones(tiny):
    ev = tiny["eig"]
    assert ev[0] > 5 * abs(ev[-1])  # a minimum: the top of the spectrum dominates
    lz = H.lanczos_top_k(tiny["hvp"], 5, num_steps=40)
    np.testing.assert_allclose(lz.values, ev[:5], rtol=1e-4)
    pw = H.power_top_k(tiny["hvp"], 5, max_iters=2000, tol=1e-9)
    np.testing.assert_allclose(pw.values, ev[:5], rtol=1e-4)
    # Eigenvectors: unit, orthogonal, and H u = λ u.
    for eig in (lz, pw):
        U = np.asarray(eig.vectors, np.float64)
        np.testing.assert_allclose(U @ U.T, np.eye(5), atol=1e-4)
        np.testing.assert_allclose(U @ tiny["dense"], eig.values[:, None] * U, atol=2e-3 * ev[0])


def test_lanczos_restarts_after_an_invariant_subspace():
    """A matrix with 3 distinct eigenvalues: the Krylov space closes after 3 steps; the restart keeps
    every Ritz value an exact eigenvalue, so m = n steps recover the whole spectrum."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 12)))
    lam = np.array([5.0] * 4 + [2.0] * 4 + [-1.0] * 4)
    A = jnp.asarray((q * lam) @ q.T, jnp.float32)
    op = H.HVP(matvec=lambda v: A @ v, matmat=lambda vs: vs @ A, dim=12, params_flat=None,
               unravel=None)
    alphas, betas, V = H.lanczos(op.block, jnp.ones((1, 12)), 12)
    theta, _ = H.tridiagonal_eigh(alphas[0], betas[0])
    np.testing.assert_allclose(np.sort(theta), np.sort(lam), atol=1e-4)
    B = np.asarray(V[0, :12])
    np.testing.assert_allclose(B @ B.T, np.eye(12), atol=1e-5)


def test_slq_density_integrates_to_one_and_has_the_dense_moments(tiny):
    hvp, dense = tiny["hvp"], tiny["dense"]
    n = hvp.dim
    tr1, tr2 = np.trace(dense) / n, np.trace(dense @ dense) / n
    # The standard basis as probes: the quadrature's moments are exactly tr(H)/n and tr(H²)/n.
    exact = H.slq_density(hvp, probes=np.eye(n), num_steps=n)
    np.testing.assert_allclose([exact.moment(1), exact.moment(2)], [tr1, tr2], rtol=1e-4)
    np.testing.assert_allclose(exact.weights.sum(-1), 1.0, atol=1e-6)
    grid, rho, _ = H.density_grid(exact, 4000)
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-3)
    # Rademacher probes (Hutchinson): within 4 standard errors of the exact moments.
    p = 60
    rad = H.slq_density(hvp, num_probes=p, num_steps=20, key=jax.random.PRNGKey(5), block=30)
    se1 = np.sqrt(2 * (np.sum(dense ** 2) - np.sum(np.diag(dense) ** 2)) / n ** 2 / p)
    assert abs(rad.moment(1) - tr1) < 4 * se1
    d2 = dense @ dense
    se2 = np.sqrt(2 * (np.sum(d2 ** 2) - np.sum(np.diag(d2) ** 2)) / n ** 2 / p)
    assert abs(rad.moment(2) - tr2) < 4 * se2


def test_adversarial_hvp_regenerated_points_equal_fixed_points(tiny):
    attack = S.AttackSpec(ThreatModel("linf", 0.1, box=(0.0, 1.0)), steps=3)
    key = jax.random.PRNGKey(6)
    regen = H.make_hvp(tiny["apply_fn"], tiny["params"], tiny["batches"], key=key, attack=attack)
    adv = S.adversarial_batches(tiny["apply_fn"], tiny["params"], tiny["batches"], key, attack)
    fixed = H.make_hvp(tiny["apply_fn"], tiny["params"], adv)
    v = jax.random.normal(jax.random.PRNGKey(7), (regen.dim,))
    np.testing.assert_allclose(np.asarray(regen(v)), np.asarray(fixed(v)), rtol=1e-5, atol=1e-6)
    # The points are inside the budget and raise the loss above the clean one.
    x0, xa = tiny["batches"]["image"], adv["image"]
    assert float(jnp.max(jnp.abs(xa - x0))) <= 0.1 + 1e-6
    clean = S.subset_loss(tiny["apply_fn"], tiny["params"], tiny["batches"])[0]
    robust = S.subset_loss(tiny["apply_fn"], tiny["params"], tiny["batches"], key, attack)[0]
    assert float(robust) > float(clean)
    assert float(robust) == pytest.approx(float(S.subset_loss(tiny["apply_fn"], tiny["params"], adv)[0]),
                                          rel=1e-6)


def test_bad_arguments_raise_one_clear_error(tiny):
    with pytest.raises(ValueError, match="k must be in"):
        H.lanczos_top_k(tiny["hvp"], 0)
    with pytest.raises(ValueError, match="num_steps=3 must be >= k=5"):
        H.lanczos_top_k(tiny["hvp"], 5, num_steps=3)
    with pytest.raises(ValueError, match="max_iters"):
        H.power_top_k(tiny["hvp"], 2, max_iters=0)
    with pytest.raises(ValueError, match="NaN"):
        S.stack_batches(np.full((3, 2), np.nan), np.zeros(3, int), 2)
    with pytest.raises(ValueError, match="labels must have shape"):
        S.stack_batches(np.zeros((3, 2)), np.zeros(4, int), 2)
