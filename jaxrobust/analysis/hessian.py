"""Hessian spectra of the clean and adversarial losses (thesis §4.2.3 "Hessian Analysis", Fig 4.5).

Everything is built on the Hessian-vector product of the subset loss ``L(θ) = (1/N) Σ_i ℓ_i(θ)``
(:mod:`jaxrobust.analysis.subset`): ``H v = d/dr ∇L(θ + r v)|_{r=0}``, forward-over-reverse
(``jax.jvp`` of ``jax.grad``), summed exactly over masked batches (:func:`make_hvp`). On top of it:

- :func:`lanczos_top_k`: the top-k eigenpairs by Lanczos with full re-orthogonalisation (Ritz values
  of the tridiagonal T_m; residuals ``|β_m y_{m,i}|`` say how converged each one is);
- :func:`power_top_k`: power iteration with deflation, the algorithm of PyHessian (Yao et al. 2020)
  the thesis used: each eigenvector is iterated in the orthogonal complement of the ones found before,
  so it returns the k eigenvalues of largest *magnitude* (Lanczos: the algebraically largest; they
  coincide at trained minima, where the top of the spectrum is positive and dominant);
- :func:`slq_density`: the spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019):
  each unit probe v gives Gauss quadrature nodes θ_j (Ritz values) and weights τ_j = (e_1ᵀ y_j)², so
  ``Σ_j τ_j f(θ_j) = vᵀ f(H) v`` exactly for polynomials of degree < 2m, and the average over probes
  estimates ``tr f(H) / n``; :func:`density_on_grid` smooths it with a Gaussian kernel (a density
  integrating to 1 whose first two moments are tr(H)/n and tr(H²)/n).

Shapes: parameters are flattened to one vector of ``n`` entries (``jax.flatten_util.ravel_pytree``);
eigenvectors come back as ``(k, n)`` rows. The loops run in Python around jitted steps (one HVP over
the whole subset per step, hundreds of milliseconds on a real net), which lets them report progress
with rate and ETA; the Lanczos basis is a ``(m + 1, n)`` float32 array (``4 (m + 1) n`` bytes).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxrobust.analysis.subset import (ApplyFn, AttackSpec, Batches, attack_inputs, batch_key,
                                       batch_sums, subset_size)
from jaxrobust.analysis.registry import register_analysis
from jaxrobust.train.metrics import Progress


@dataclasses.dataclass
class HVP:
    """A Hessian-vector product operator over a fixed subset: ``matvec(v (n,)) -> H v (n,)`` and
    ``matmat(V (b, n)) -> (H V_iᵀ)_i (b, n)`` (all probes share one forward/backward pass of the
    primal). ``unravel`` maps a flat vector back to the parameter pytree. ``calls`` counts HVPs."""
    matvec: Callable
    matmat: Callable
    dim: int
    params_flat: jax.Array
    unravel: Callable
    calls: int = 0

    def __call__(self, v):
        self.calls += 1
        return self.matvec(v)

    def block(self, vs):
        self.calls += int(vs.shape[0])
        return self.matmat(vs)


def make_hvp(apply_fn: ApplyFn, params, batches: Batches, *, key=None,
             attack: Optional[AttackSpec] = None) -> HVP:
    """The Hessian-vector product of the subset loss at ``params`` (Fig 4.5's operator).

    ``attack`` None: the clean loss L_0. With an ``attack``, the PGD points of every batch are
    regenerated inside each product (at ``params``, with the batch's fixed key, so the operator is
    the same symmetric matrix at every call; memory O(batch) instead of O(N)); for points generated
    once and held fixed, pass ``adversarial_batches(...)`` and no attack: both give the same H.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    flat, unravel = ravel_pytree(params)
    flat = jnp.asarray(flat, jnp.float32)

    def loss_flat(p, x, y, mask):
        return batch_sums(apply_fn, unravel(p), x, y, mask)[0]

    grad_flat = jax.grad(loss_flat)

    def hv_batches(p, vs, batches, key):
        """(b, n) tangents -> (b, n) products, summed over batches / N."""
        n = jnp.maximum(subset_size(batches), 1).astype(jnp.float32)

        def body(acc, inp):
            batch, i = inp
            x = attack_inputs(apply_fn, unravel(p), batch["image"], batch["label"],
                              batch_key(key, i), attack)
            g = lambda q: grad_flat(q, x, batch["label"], batch["mask"])
            hv = jax.vmap(lambda v: jax.jvp(g, (p,), (v,))[1])(vs)
            return acc + hv, None

        nb = batches["label"].shape[0]
        acc, _ = jax.lax.scan(body, jnp.zeros_like(vs), (batches, jnp.arange(nb)))
        return acc / n

    hv_jit = jax.jit(hv_batches)
    return HVP(matvec=lambda v: hv_jit(flat, v[None], batches, key)[0],
               matmat=lambda vs: hv_jit(flat, vs, batches, key),
               dim=int(flat.shape[0]), params_flat=flat, unravel=unravel)


def dense_hessian(apply_fn: ApplyFn, params, batches: Batches, *, key=None,
                  attack: Optional[AttackSpec] = None) -> np.ndarray:
    """The full ``(n, n)`` Hessian of the subset loss by ``jax.hessian`` (tiny nets, tests)."""
    from jaxrobust.analysis.subset import subset_loss
    flat, unravel = ravel_pytree(params)
    if attack is not None and attack.active:
        from jaxrobust.analysis.subset import adversarial_batches
        batches = adversarial_batches(apply_fn, params, batches, key, attack)
    f = lambda p: subset_loss(apply_fn, unravel(p), batches)[0]
    return np.asarray(jax.jit(jax.hessian(f))(flat), np.float64)


# ----------------------------------------------------------------------------- Lanczos
def _orthogonalise(basis, w):
    """w minus its projection on the rows of ``basis`` (zero rows contribute nothing), twice
    (classical Gram-Schmidt with re-orthogonalisation: orthogonal to working precision)."""
    for _ in range(2):
        w = w - jnp.einsum("...mn,...m->...n", basis, jnp.einsum("...mn,...n->...m", basis, w))
    return w


@functools.partial(jax.jit, donate_argnums=(0,))
def _lanczos_update(V, w, j, beta_prev, key):
    """One Lanczos step for a block of b independent runs: V (b, m + 1, n) holds the basis so far,
    w (b, n) = H v_j. Returns (V with v_{j+1}, α_j (b,), β_j (b,)). A breakdown (β ≈ 0: an invariant
    subspace was found) restarts from a random vector orthogonal to the basis, with β_j = 0 recorded,
    so the Ritz values stay exact eigenvalues and the iteration can continue."""
    vj = V[:, j]
    alpha = jnp.sum(w * vj, -1)
    w = w - alpha[:, None] * vj - beta_prev[:, None] * V[:, jnp.maximum(j - 1, 0)] * (j > 0)
    w = _orthogonalise(V, w)
    beta = jnp.linalg.norm(w, axis=-1)
    scale = jnp.abs(alpha) + beta_prev + beta
    broke = beta <= 1e-6 * jnp.maximum(scale, 1e-30)
    r = _orthogonalise(V, jax.random.normal(key, w.shape, w.dtype))
    r = r / jnp.maximum(jnp.linalg.norm(r, axis=-1, keepdims=True), 1e-30)
    nxt = jnp.where(broke[:, None], r, w / jnp.maximum(beta, 1e-30)[:, None])
    V = jax.lax.dynamic_update_index_in_dim(V, nxt, j + 1, axis=1)
    return V, alpha, jnp.where(broke, 0.0, beta)


def lanczos(matmat: Callable, v0, num_steps: int, *, key=None, progress: Optional[Progress] = None):
    """``num_steps`` Lanczos steps with full re-orthogonalisation from the rows of ``v0`` (b, n) (each
    normalised; b independent runs sharing every block product ``matmat``).

    Returns ``(alphas (b, m), betas (b, m), V (b, m + 1, n))``: T_m = tridiag(β, α, β) (β_{m-1} is the
    residual norm, outside T_m) and the orthonormal basis (row m is the next Lanczos vector)."""
    v0 = jnp.asarray(v0, jnp.float32)
    if v0.ndim != 2:
        raise ValueError(f"v0 must be (b, n), got {v0.shape}.")
    b, n = v0.shape
    m = int(num_steps)
    if not 1 <= m <= n:
        raise ValueError(f"num_steps must be in [1, n={n}], got {num_steps}.")
    key = jax.random.PRNGKey(0) if key is None else key
    V = jnp.zeros((b, m + 1, n), jnp.float32)
    V = V.at[:, 0].set(v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True))
    alphas, betas = [], []
    beta = jnp.zeros((b,), jnp.float32)
    for j in range(m):
        w = matmat(V[:, j])
        V, alpha, beta = _lanczos_update(V, w, j, beta, jax.random.fold_in(key, j))
        alphas.append(alpha)
        betas.append(beta)
        if progress is not None:
            progress.maybe_print(progress.start + (j + 1) * b)
    return np.asarray(jnp.stack(alphas, 1), np.float64), np.asarray(jnp.stack(betas, 1), np.float64), V


def tridiagonal_eigh(alphas, betas):
    """Eigen-decomposition of T = tridiag(β[:-1], α, β[:-1]) in float64: (θ ascending, Y (m, m))."""
    alphas = np.asarray(alphas, np.float64)
    off = np.asarray(betas, np.float64)[:len(alphas) - 1]
    T = np.diag(alphas) + np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(T)


@dataclasses.dataclass
class Eigen:
    """Top eigenpairs: ``values`` (k,) in decreasing order, ``vectors`` (k, n) unit rows,
    ``residuals`` (k,) = ‖H u − λ u‖ (Lanczos: estimated from T_m; power: measured), ``hvps``."""
    values: np.ndarray
    vectors: jax.Array
    residuals: np.ndarray
    hvps: int


def lanczos_top_k(hvp: HVP, k: int, *, num_steps: Optional[int] = None, key=None,
                  progress: Optional[Progress] = None) -> Eigen:
    """Top-k (algebraically largest) eigenpairs of H by Lanczos with full re-orthogonalisation.

    ``num_steps`` (default ``min(n, max(4k, 40))``) trades HVPs for accuracy: the top Ritz values
    converge first; ``residuals`` bound each one's error (|λ − θ| ≤ residual for some eigenvalue λ)."""
    n = hvp.dim
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}.")
    m = min(n, max(4 * k, 40)) if num_steps is None else int(num_steps)
    if m < k:
        raise ValueError(f"num_steps={m} must be >= k={k}.")
    key = jax.random.PRNGKey(0) if key is None else key
    k0, k1 = jax.random.split(key)
    v0 = jax.random.normal(k0, (1, n), jnp.float32)
    start = hvp.calls
    alphas, betas, V = lanczos(hvp.block, v0, m, key=k1, progress=progress)
    theta, Y = tridiagonal_eigh(alphas[0], betas[0])
    order = np.argsort(theta)[::-1][:k]
    vectors = jnp.asarray(Y[:, order].T, jnp.float32) @ V[0, :m]
    residuals = np.abs(betas[0, -1] * Y[-1, order])
    return Eigen(theta[order], vectors, residuals, hvp.calls - start)


@jax.jit
def _deflate_normalise(v, found):
    v = _orthogonalise(found, v)
    return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)


def power_top_k(hvp: HVP, k: int, *, max_iters: int = 100, tol: float = 1e-3, key=None,
                progress: Optional[Progress] = None) -> Eigen:
    """Top-k eigenpairs by power iteration with deflation (PyHessian's ``eigenvalues``; the thesis's
    Fig 4.5): for i = 1..k, from a random unit vector, iterate ``v <- H v / ‖H v‖`` in the orthogonal
    complement of the eigenvectors found so far until the Rayleigh quotient changes by less than
    ``tol`` (relative) or ``max_iters`` products were spent. Returns the eigenvalues of largest
    magnitude in the order found (sorted decreasingly)."""
    n = hvp.dim
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}.")
    if max_iters < 1 or not tol > 0:
        raise ValueError(f"need max_iters >= 1 and tol > 0, got {max_iters}, {tol}.")
    key = jax.random.PRNGKey(0) if key is None else key
    found = jnp.zeros((k, n), jnp.float32)
    values, residuals, start = [], [], hvp.calls
    for i in range(k):
        v = _deflate_normalise(jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32), found)
        lam_prev = None
        for _ in range(max_iters):
            hv = hvp(v)
            lam = float(jnp.vdot(v, hv))
            res = float(jnp.linalg.norm(hv - lam * v))
            v = _deflate_normalise(hv, found)
            if progress is not None:
                progress.maybe_print(progress.start + hvp.calls - start)
            if lam_prev is not None and abs(lam - lam_prev) < tol * (abs(lam_prev) + 1e-6):
                break
            lam_prev = lam
        values.append(lam)
        residuals.append(res)
        found = found.at[i].set(v)
    values = np.asarray(values)
    order = np.argsort(values)[::-1]
    return Eigen(values[order], found[order], np.asarray(residuals)[order], hvp.calls - start)


# ----------------------------------------------------------------------------- SLQ
def rademacher_probes(key, num: int, n: int):
    """``num`` Rademacher vectors (±1 entries) scaled to unit norm, (num, n)."""
    return jax.random.rademacher(key, (num, n), jnp.float32) / np.sqrt(n)


@dataclasses.dataclass
class Quadrature:
    """SLQ nodes (p, m) and weights (p, m) of p probes; each probe's weights sum to 1."""
    nodes: np.ndarray
    weights: np.ndarray
    hvps: int

    def moment(self, power: int) -> float:
        """The quadrature's ``E[λ^power]`` = (1/p) Σ_probes Σ_j τ_j θ_j^power ≈ tr(H^power) / n."""
        return float(np.mean(np.sum(self.weights * self.nodes ** power, -1)))


def slq_density(hvp: HVP, *, num_probes: int = 10, num_steps: int = 80, probes=None, key=None,
                block: int = 10, progress: Optional[Progress] = None) -> Quadrature:
    """Stochastic Lanczos quadrature of the spectral density of H (Ghorbani et al. 2019; PyHessian's
    ``density``): ``num_probes`` Rademacher probes (or the rows of ``probes`` (p, n), normalised),
    ``num_steps`` Lanczos steps each, ``block`` probes per block product."""
    n = hvp.dim
    m = min(int(num_steps), n)
    if m < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    key = jax.random.PRNGKey(0) if key is None else key
    kp, kl = jax.random.split(key)
    if probes is None:
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
        probes = rademacher_probes(kp, num_probes, n)
    probes = jnp.asarray(probes, jnp.float32)
    if probes.ndim != 2 or probes.shape[1] != n:
        raise ValueError(f"probes must be (p, n={n}), got {probes.shape}.")
    start = hvp.calls
    nodes, weights = [], []
    for s in range(0, probes.shape[0], max(int(block), 1)):
        chunk = probes[s:s + max(int(block), 1)]
        alphas, betas, _ = lanczos(hvp.block, chunk, m, key=jax.random.fold_in(kl, s),
                                   progress=progress)
        for a, b in zip(alphas, betas):
            theta, Y = tridiagonal_eigh(a, b)
            nodes.append(theta)
            weights.append(Y[0] ** 2)
    return Quadrature(np.stack(nodes), np.stack(weights), hvp.calls - start)


def density_on_grid(quad: Quadrature, grid, sigma: float) -> np.ndarray:
    """The Gaussian-smoothed SLQ density ``ρ(λ) = (1/p) Σ_probes Σ_j τ_j N(λ; θ_j, σ²)`` on ``grid``."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")
    g = np.asarray(grid, np.float64)[:, None, None]
    k = np.exp(-0.5 * ((g - quad.nodes[None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    return np.mean(np.sum(k * quad.weights[None], -1), -1)


def density_grid(quad: Quadrature, num_points: int = 1000, sigma_fraction: float = 0.01):
    """A grid covering the nodes with margins of 5σ and σ = ``sigma_fraction`` of the node range:
    ``(grid, density, sigma)``."""
    lo, hi = float(quad.nodes.min()), float(quad.nodes.max())
    sigma = sigma_fraction * max(hi - lo, 1e-12)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(num_points))
    return grid, density_on_grid(quad, grid, sigma), sigma


def loss_scale(apply_fn: ApplyFn, init_params: Callable, batches: Batches, num_samples: int, key,
               attack: Optional[AttackSpec] = None) -> float:
    """The average subset loss at ``num_samples`` random parameters ``init_params(key)`` (the scale of
    L_ε the thesis divides Fig 4.5's eigenvalues by, "estimated by randomly sampling θ")."""
    from jaxrobust.analysis.subset import subset_loss
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    f = jax.jit(lambda p, k: subset_loss(apply_fn, p, batches, k, attack)[0])
    vals = [float(f(init_params(jax.random.fold_in(key, i)), jax.random.fold_in(key, 10_000 + i)))
            for i in range(num_samples)]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------- registered analyses
METHODS = ("lanczos", "power")


def _methods(cfg):
    names = [m.strip() for m in str(cfg.hessian.methods).split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise ValueError(f"hessian.methods={cfg.hessian.methods!r}: expected a comma-separated subset "
                         f"of {list(METHODS)}.")
    return names


def _validate_hessian(cfg):
    _methods(cfg)
    h = cfg.hessian
    if h.top_k < 1 or h.power_iters < 1 or not h.power_tol > 0 or h.normalize_samples < 0:
        raise ValueError(f"hessian: need top_k >= 1, power_iters >= 1, power_tol > 0 and "
                         f"normalize_samples >= 0, got {h.top_k}, {h.power_iters}, {h.power_tol}, "
                         f"{h.normalize_samples}.")
    if 0 < h.lanczos_steps < h.top_k:
        raise ValueError(f"hessian.lanczos_steps={h.lanczos_steps} must be >= top_k={h.top_k} "
                         f"(or <= 0 for the default).")


def _validate_density(cfg):
    d = cfg.density
    if d.probes < 1 or d.steps < 2 or d.block < 1 or d.grid_points < 10 or not d.sigma_fraction > 0:
        raise ValueError(f"density: need probes >= 1, steps >= 2, block >= 1, grid_points >= 10 and "
                         f"sigma_fraction > 0, got {d.probes}, {d.steps}, {d.block}, {d.grid_points}, "
                         f"{d.sigma_fraction}.")


def hessian_operator(ctx, attack=None, batches=None):
    """The HVP operator of ``ctx``'s loss on its subset (``cfg.loss.points``: PGD points held fixed
    or regenerated in every product) and the batches it uses (adversarial ones when fixed)."""
    from jaxrobust.analysis.subset import adversarial_batches
    batches = ctx.subset() if batches is None else batches
    if attack is not None and ctx.cfg.loss.points == "fixed":
        batches = adversarial_batches(ctx.apply_fn, ctx.params, batches, ctx.key, attack)
        attack = None
    return make_hvp(ctx.apply_fn, ctx.params, batches, key=ctx.key, attack=attack), batches


def _loss_info(ctx, attack):
    from jaxrobust.analysis.subset import subset_loss
    batches = ctx.subset()
    loss, acc = jax.jit(lambda p: subset_loss(ctx.apply_fn, p, batches, ctx.key, attack))(ctx.params)
    return batches, {"kind": "adversarial" if attack is not None else "clean",
                     "eps": float(attack.threat.eps) if attack is not None else 0.0,
                     "norm": attack.threat.norm if attack is not None else ctx.run.threat.norm,
                     "points": ctx.cfg.loss.points if attack is not None else "",
                     "value": float(loss), "accuracy": float(acc),
                     "num_examples": int(batches["mask"].sum())}


def random_init_params(ctx):
    """``key -> params``: fresh initialisations of the run's model (the random θ of Fig 4.5's scale)."""
    shape = ctx.run.dataset.info.image_shape
    x = jnp.zeros((1,) + tuple(shape), jnp.float32)
    init = jax.jit(lambda k: ctx.run.model.init(k, x, train=False)["params"])
    return init


def run_hessian(ctx) -> dict:
    """Fig 4.5: the top-k Hessian eigenvalues of the run's (clean or adversarial) loss on the subset,
    by each method, raw, divided by the mean loss at random parameters ("normalized", the thesis's
    normalisation) and divided by the top eigenvalue ("relative")."""
    h = ctx.cfg.hessian
    attack = ctx.attack()
    batches, loss = _loss_info(ctx, attack)
    hvp, _ = hessian_operator(ctx, attack, batches)
    k = min(int(h.top_k), hvp.dim)
    out = {"num_params": hvp.dim, "top_k": k, "loss": loss, "seconds_by_method": {}, "hvps": {},
           "residuals": {}}
    for method in _methods(ctx.cfg):
        t0 = time.time()
        if method == "lanczos":
            m = int(h.lanczos_steps) if h.lanczos_steps > 0 else min(hvp.dim, max(4 * k, 40))
            eig = lanczos_top_k(hvp, k, num_steps=m, key=jax.random.fold_in(ctx.key, 1),
                                progress=ctx.progress(m, "HVPs", every=10))
        else:
            eig = power_top_k(hvp, k, max_iters=int(h.power_iters), tol=float(h.power_tol),
                              key=jax.random.fold_in(ctx.key, 2),
                              progress=ctx.progress(k * int(h.power_iters), "HVPs", every=25))
        out[method] = eig.values
        out["residuals"][method] = eig.residuals
        out["hvps"][method] = eig.hvps
        out["seconds_by_method"][method] = time.time() - t0
    if h.normalize_samples > 0:
        scale = loss_scale(ctx.apply_fn, random_init_params(ctx), batches, int(h.normalize_samples),
                           jax.random.fold_in(ctx.key, 3), attack)
        out["loss_scale"] = scale
        out["normalized"] = {m: np.asarray(out[m]) / scale for m in _methods(ctx.cfg)}
    out["relative"] = {m: np.asarray(out[m]) / out[m][0] for m in _methods(ctx.cfg)}
    return out


def plot_hessian(result, path, cfg):
    from jaxrobust.analysis.plots import plot_spectra
    methods = [m for m in METHODS if m in result]
    spectra = {m: result[m] for m in methods}
    normalized = {m: result["normalized"][m] for m in methods} if "normalized" in result else None
    loss = result["loss"]
    title = f"top-{result['top_k']} Hessian eigenvalues ({loss['kind']} loss, ε={loss['eps']:g})"
    return plot_spectra(spectra, path, normalized=normalized, title=title)


def run_density(ctx) -> dict:
    """The spectral density of the Hessian by stochastic Lanczos quadrature, its quadrature nodes and
    weights, the moments tr(H)/n and tr(H²)/n it implies, and the density on a grid."""
    d = ctx.cfg.density
    attack = ctx.attack()
    batches, loss = _loss_info(ctx, attack)
    hvp, _ = hessian_operator(ctx, attack, batches)
    steps = min(int(d.steps), hvp.dim)
    quad = slq_density(hvp, num_probes=int(d.probes), num_steps=steps, key=jax.random.fold_in(ctx.key, 4),
                       block=int(d.block), progress=ctx.progress(int(d.probes) * steps, "HVPs", every=20))
    grid, density, sigma = density_grid(quad, int(d.grid_points), float(d.sigma_fraction))
    return {"num_params": hvp.dim, "loss": loss, "probes": int(d.probes), "steps": steps,
            "hvps": quad.hvps, "nodes": quad.nodes, "weights": quad.weights, "sigma": sigma,
            "trace_per_param": quad.moment(1), "trace_estimate": quad.moment(1) * hvp.dim,
            "second_moment": quad.moment(2), "max_node": float(quad.nodes.max()),
            "min_node": float(quad.nodes.min()), "grid": grid, "density": density,
            "integral": float(np.trapezoid(density, grid))}


def plot_density_result(result, path, cfg):
    from jaxrobust.analysis.plots import plot_density
    loss = result["loss"]
    return plot_density(result["grid"], result["density"], path,
                        title=f"Hessian density (SLQ, {loss['kind']} loss, ε={loss['eps']:g})")


def _summary_hessian(result):
    return {k: result[k][:3] for k in METHODS if k in result} | {"loss": result["loss"]["value"]}


def _summary_density(result):
    return {k: result[k] for k in ("trace_estimate", "max_node", "min_node", "integral")}


register_analysis("hessian", run_hessian, plot=plot_hessian, validate=_validate_hessian,
                  summary=_summary_hessian)
register_analysis("density", run_density, plot=plot_density_result, validate=_validate_density,
                  summary=_summary_density)
