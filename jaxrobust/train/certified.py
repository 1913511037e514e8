"""Certified-training objectives (thesis §3.3.3–3.3.4, Tables 3.5–3.8) and today's best (SABR, MTL-IBP).

Every bound is computed through the public :mod:`jaxrobust.bounds` API on the model closure
``make_logits_fn(model, variables, 'eval', stop_gradient=False)``: the bound functions trace the
closure into a jaxpr whose constants are the (traced) parameters, so the bounds are differentiable in
the parameters and compile with the update step. Bounds always run in float32 (a bf16 model is cloned
with ``dtype=float32`` for them). BatchNorm models are bounded in eval mode with the running statistics
just updated by the clean train-mode pass (constants for the gradient).

Notation: ``lower_i`` is a lower bound of the margin z_y(x') - z_i(x') over S_ε(x) (eq. 3.12 with the
last layer elided, row y = 0); the *robust cross-entropy* is CE(-lower, y) = log(1 + Σ_{i≠y} e^{-lower_i}),
an upper bound of the worst-case CE over S_ε(x).

Registered objectives (``objective.name``):

==============  =================================================================================
``plain``       alias of ``standard`` (clean CE).
``at``          alias of ``pgd_at`` (Madry et al.).
``kw``          CE(-lower) with Fast-Lin / KW linear bounds (Wong & Kolter 2018; same algorithm as
                Fast-Lin for ReLU nets, thesis footnote 8).
``ibp``         κ·CE(z(x)) + (1-κ)·CE(-lower_IBP) (Gowal et al. 2019), κ = ``schedules.kappa``.
``crown_ibp``   κ·CE(z(x)) + (1-κ)·CE(-(β·lower_CROWN-IBP + (1-β)·lower_IBP)) (Zhang et al. 2020),
                β = ``schedules.crown_beta``, κ = ``schedules.kappa``.
``mmr``         CE + MMR(x) (Croce et al. 2019, maximum margin regulariser, ReLU nets only).
``mmr_at``      ½(CE(x) + CE(x')) + MMR(x') at the PGD point x'.
``lper``        CE(x) + PER(x) (eq. 3.20) with Fast-Lin-style linear bounds (L-PER).
``lper_at``     ½(CE(x) + CE(x')) + PER(x') (Algorithm 3.6, L-PER+at).
``iper``        as ``lper`` with the IBP-inspired linear bounds ('ibp_linear', §3.3.1) (I-PER).
``iper_at``     as ``lper_at`` with the IBP-inspired linear bounds (I-PER+at).
``sabr``        CE(-lower_IBP) over the small box B_{λε}(x̂) around a PGD point x̂ projected into
                B_{(1-λ)ε}(x) ∩ box (Müller et al. 2023).
``mtl_ibp``     α·CE(-lower_IBP) + (1-α)·CE(z(x')) (De Palma et al. 2024).
==============  =================================================================================

Settings live in ``objective.certified`` (configs/common.py); ε follows ``objective.eps_schedule``
(ramps / the exponential growth of Table 3.5). Constant weights (``per_beta``, ``mmr_lambda``,
``mtl_alpha``) are overridden by a named schedule of the same name when one is configured.

Shi et al. (2021, "Fast certified robust training with short warm-up"), for the IBP family (``ibp``,
``crown_ibp``, ``sabr``, ``mtl_ibp``): ``certified.ibp_init`` re-initialises every Dense/Conv kernel
but the output layer's as N(0, σ²), σ = sqrt(2π) / fan_in (:func:`ibp_init`), which keeps the mean
IBP interval width constant from layer to layer at initialisation, and ``certified.warmup_reg = λ > 0``
adds their warm-up regularisers (:func:`warmup_regularizer`, bound tightness + ReLU balance of the
interval pre-activations of every ReLU, :func:`ibp_preactivations`) with intensity λ (1 - ε(t)/ε).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

from jaxrobust.bounds import ibp as jibp
from jaxrobust.bounds import margin_bounds
from jaxrobust.bounds import tape as jtape
from jaxrobust.models import forward_train, make_logits_fn
from jaxrobust.train.objectives import (Objective, ObjectiveOutput, ce_and_accuracy, get_objective,
                                        masked_mean, pgd_points, register)

# ----------------------------------------------------------------------------- shared pieces
LINEAR_METHODS = {"lper": "fastlin", "lper_at": "fastlin", "iper": "ibp_linear",
                  "iper_at": "ibp_linear"}


def _float32_model(model):
    """The model computing in float32 (bounds are always float32, whatever the training dtype)."""
    dtype = getattr(model, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return model.clone(dtype=jnp.float32)
    return model


def bound_logits_fn(ctx, params, model_state):
    """``x -> logits`` for bound propagation: float32, eval-mode BatchNorm with ``model_state``
    (gradients flow to ``params`` only)."""
    variables = {"params": params, **jax.lax.stop_gradient(model_state)}
    return make_logits_fn(_float32_model(ctx.model), variables, "eval", stop_gradient=False)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def robust_ce(lower, y):
    """Per-example CE(-lower, y): the CE of the worst-case logits z_i = -lower_i, z_y = 0 (lower is
    (B, K) margin lower bounds with row y = 0). (B,)."""
    is_y = jax.nn.one_hot(y, lower.shape[-1], dtype=bool)
    return optax.softmax_cross_entropy_with_integer_labels(jnp.where(is_y, 0.0, -lower), y)


def certified_fraction(lower, y, mask):
    """Masked fraction of the batch whose margin lower bounds are all > 0 (training-time certificate)."""
    is_y = jax.nn.one_hot(y, lower.shape[-1], dtype=bool)
    return masked_mean(jnp.all(is_y | (lower > 0), axis=-1).astype(jnp.float32), mask)


def _value(ctx, name, default, step):
    s = ctx.schedules.get(name)
    return jnp.asarray(default, jnp.float32) if s is None else s(step)


def subsample(key, mask, n: int):
    """Algorithm 3.6 line 3: indices of ``n`` rows drawn uniformly without replacement among the
    valid (``mask``) rows of the batch, and their mask. ``n <= 0`` or ``n >= B``: the whole batch."""
    B = mask.shape[0]
    if n <= 0 or n >= B:
        return jnp.arange(B), mask
    r = jax.random.uniform(key, (B,)) + 2.0 * (~mask.astype(bool))
    idx = jnp.argsort(r)[:n]
    return idx, mask[idx]


def safe_dual_norm(U, norm: str):
    """||U_i||_q per row of (B, K, D) with q the dual of ``norm``; zero rows (row y) have norm 0 and
    a zero (not NaN) gradient."""
    if norm == "linf":
        return jnp.sum(jnp.abs(U), axis=-1)
    if norm == "l1":
        return jnp.max(jnp.abs(U), axis=-1)
    s = jnp.sum(U * U, axis=-1)
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def envelope_signed_distances(mb, x_ref, y, norm: str):
    """d̂_{i,y} of §3.3.3: signed l_p distances (U_i x_ref + p_i) / ||U_i||_q from ``x_ref`` to the
    hyperplanes of the polyhedral envelope (eq. 3.12), negative on the uncertified side; row y = +inf.
    Same values as :func:`jaxrobust.certify.signed_distances`, with finite gradients for l_2 too."""
    B, K = mb.lower.shape
    U = mb.U.reshape(B, K, -1)
    b = jnp.einsum("bkd,bd->bk", U, x_ref.reshape(B, -1)) + mb.p
    q = safe_dual_norm(U, norm)
    d = b / jnp.maximum(q, 1e-12)
    return jnp.where(jax.nn.one_hot(y, K, dtype=bool), jnp.inf, d)


def per_regularizer(d, alpha, beta, C: int):
    """Eq. (3.20): PER = β Σ_{i≤C} max(0, 1 - d̂_{j_i,y}/α) over the C smallest signed distances
    ``d`` (B, K) (row y = +inf is never among them when C <= K-1). (B,)."""
    C = min(int(C), d.shape[-1] - 1)
    smallest = -jax.lax.top_k(-d, C)[0]
    # d̂ >= α contributes exactly zero, gradient included (also at the kink d̂ = α)
    return beta * jnp.sum(jnp.where(smallest < alpha, 1.0 - smallest / alpha, 0.0), axis=-1)


def margin_lower(fn, x, y, threat, method: str):
    """Margin lower bounds (B, K) of ``method`` over S_ε(x); at ε = 0 (the start of an ε ramp) the
    exact margins z_y(x) - z_i(x) instead (``lax.cond``: no bound pass, and no gradient through
    relaxations of zero-width intervals, whose sigmoid tangent points have NaN derivatives)."""
    def exact():
        z = fn(x)
        zy = jnp.take_along_axis(z, y[:, None], axis=1)
        return jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), 0.0, zy - z)
    bound = lambda: margin_bounds(fn, x, y, threat, method=method).lower
    return jax.lax.cond(jnp.all(threat.eps_for(x) > 0), bound, exact)


def _clean(ctx, params, model_state, batch):
    logits, new_state = forward_train(ctx.model, params, model_state, batch["image"])
    ce, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
    return logits, new_state, ce, acc


def _threat(ctx, step):
    eps = ctx.eps_at(step)
    return ctx.threat.replace(eps=_f32(eps)), eps


def check_certified_config(c) -> None:
    """One-line ValueErrors for out-of-range ``objective.certified`` settings."""
    checks = [("per_alpha", c.per_alpha > 0, "> 0"), ("per_c", int(c.per_c) >= 1, "an int >= 1"),
              ("per_beta", c.per_beta >= 0, ">= 0"), ("mmr_gamma_b", c.mmr_gamma_b > 0, "> 0"),
              ("mmr_gamma_d", c.mmr_gamma_d > 0, "> 0"), ("mmr_k_b", int(c.mmr_k_b) >= 1, "an int >= 1"),
              ("mmr_lambda", c.mmr_lambda >= 0, ">= 0"),
              ("sabr_lambda", 0 < c.sabr_lambda <= 1, "in (0, 1]"),
              ("mtl_alpha", 0 <= c.mtl_alpha <= 1, "in [0, 1]"),
              ("warmup_reg", c.warmup_reg >= 0, ">= 0"), ("warmup_tol", c.warmup_tol > 0, "> 0")]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"objective.certified.{name} must be {expected}, got {c[name]!r}.")


def check_bounds_init(*methods):
    """An ``Objective.init`` that traces the model's bounds with ``methods`` once on a dummy input
    (shapes only, no compute) when the train state is created: a model with a primitive the bound
    rules do not support fails before training starts, with the bounds' error naming the primitive."""
    def init(ctx, params, n_train, input_shape):
        check_certified_config(ctx.cfg.certified)
        x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
        y = jnp.zeros((1,), jnp.int32)

        def trace():
            variables = ctx.model.init(jax.random.PRNGKey(0), x, train=False)
            state = {k: v for k, v in variables.items() if k != "params"}
            fn = bound_logits_fn(ctx, variables["params"], state)
            return [margin_bounds(fn, x, y, ctx.threat, method=m).lower for m in methods]

        jax.eval_shape(trace)
        return {}
    return init


# ----------------------------------------------------------------------------- Shi et al. 2021
def _kernel_call_order(model, params, input_shape):
    """Paths (tuples) of the Dense/Conv modules of ``model`` in the order its forward pass calls them
    (shapes only: nothing is computed)."""
    x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

    def intermediates(p):
        # eval-mode BatchNorm reads batch_stats: the initial ones (shapes only)
        others = {k: v for k, v in model.init(jax.random.PRNGKey(0), x, train=False).items()
                  if k != "params"}
        _, st = model.apply({"params": p, **others}, x, train=False, mutable=["intermediates"],
                            capture_intermediates=lambda m, n: isinstance(m, (nn.Dense, nn.Conv))
                            and n == "__call__")
        return st["intermediates"]

    flat = traverse_util.flatten_dict(jax.eval_shape(intermediates, params))
    return [k[:-1] for k in flat]  # drop the trailing '__call__'


def ibp_init(model, params, key, input_shape):
    """Shi et al. (2021) IBP initialisation: every Dense/Conv kernel except the output layer's (the
    last one called) drawn from N(0, σ²) with σ = sqrt(2π) / fan_in (fan_in = the product of the
    kernel's input axes: in for Dense, kh·kw·c_in for Conv); biases and the output layer unchanged.

    With inputs of half-width δ through W (n inputs), the output half-width is Σ|W_ji| δ_i, of mean
    n·E|w|·δ = n·σ·sqrt(2/π)·δ; a ReLU on intervals centred near 0 halves the mean width, so σ =
    sqrt(2π)/n keeps the mean pre-activation width constant across hidden layers (the standard
    initialisations grow it by ~0.4·sqrt(n) per layer). Returns the new ``params``."""
    order = _kernel_call_order(model, params, input_shape)
    if len(order) < 2:
        return params
    flat = dict(traverse_util.flatten_dict(params))
    for i, path in enumerate(order[:-1]):
        kpath = path + ("kernel",)
        if kpath not in flat:
            continue
        k = flat[kpath]
        fan_in = int(math.prod(k.shape[:-1]))
        sigma = math.sqrt(2.0 * math.pi) / fan_in
        flat[kpath] = (sigma * jax.random.normal(jax.random.fold_in(key, i), k.shape, jnp.float32)
                       ).astype(k.dtype)
    return traverse_util.unflatten_dict(flat)


def _ibp_init_params(ctx, params, key, input_shape):
    """Objective.init_params of the IBP family: :func:`ibp_init` when ``certified.ibp_init``."""
    if not bool(ctx.cfg.certified.ibp_init):
        return params
    return ibp_init(ctx.model, params, key, input_shape)


def ibp_preactivations(fn, x, threat):
    """Algorithm 3.2 (IBP) of ``fn`` over S_ε(x) ∩ box that also returns the interval of every
    activation input. Returns (output Interval (B, K), list of
    :class:`jaxrobust.bounds.tape.Interval` (each (B, ...), in call order) of z for every
    ``max(z, c)`` (ReLU when c = 0; the interval of z - c is recorded) and every sigmoid/tanh). Same
    propagation as :func:`jaxrobust.bounds.ibp_bounds`; differentiable in fn's parameters."""
    closed = jax.make_jaxpr(fn)(x)
    records = []
    is_dep = lambda a: isinstance(a, (jtape.Interval, jibp.Ball))

    def apply(eqn, ins, where):
        dep = [a for a in ins if is_dep(a)]
        if eqn.primitive in (lax.max_p, lax.logistic_p, lax.tanh_p) and len(dep) == 1:
            iv = jibp.as_interval(dep[0])
            const = [a for a in ins if not is_dep(a)]
            c = const[0] if const else 0.0
            records.append(jtape.Interval(iv.lo - c, iv.hi - c))
        out = jibp.ibp_rule(eqn.primitive, eqn.params, ins, where)
        return out if eqn.primitive.multiple_results else [out]

    out = jtape.interpret(closed.jaxpr, closed.consts, [jibp.input_value(x, threat)], is_dep, apply)[0]
    return jibp.as_interval(out), records


def _masked_moments(v, w):
    """Mean and (population) variance of ``v`` with per-element weights ``w`` (same shape)."""
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(v * w) / n
    return mean, jnp.sum(w * (v - mean) ** 2) / n


def warmup_regularizer(input_iv, preacts, mask, tol: float = 0.5):
    """Shi et al. (2021) warm-up regularisers from the interval pre-activations of every ReLU
    (``preacts``: Intervals (B, ...); ``input_iv``: the input set's interval, (B, *f); ``mask`` (B,)).
    Per layer, with half-widths r = (u - l)/2 and centres c = (u + l)/2 (means over the valid
    examples and all units):

    - tightness: ReLU(τ - mean(r_input)/mean(r)) / τ: zero while the layer's bounds are at most 1/τ
      times as wide as the input's;
    - ReLU balance: active (l > 0) and inactive (u < 0) units should have centres of comparable mean
      magnitude and spread: with m_a = mean(c·[l > 0]), m_i = mean(c·[u < 0]),
      v_a = Σ (c - mean c)²[l > 0], v_i the same over [u < 0], ρ_m = min(m_a/-m_i, -m_i/m_a) and ρ_v
      likewise, (ReLU(τ - ρ_m) + ReLU(τ - ρ_v)) / τ (a layer without active or inactive units adds 0,
      as the released code skips non-finite terms).

    Returns (L_tightness, L_relu), each the mean over layers (0 without ReLUs)."""
    if not preacts:
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    m = mask.astype(jnp.float32)

    def weights(a):
        return jnp.broadcast_to(m.reshape((-1,) + (1,) * (a.ndim - 1)), a.shape)

    w0 = weights(input_iv.lo)
    r0 = jnp.sum(w0 * (input_iv.hi - input_iv.lo) / 2) / jnp.maximum(jnp.sum(w0), 1.0)
    tight, relu = [], []
    for iv in preacts:
        w = weights(iv.lo)
        n = jnp.maximum(jnp.sum(w), 1.0)
        r = jnp.sum(w * (iv.hi - iv.lo) / 2) / n
        tight.append(jax.nn.relu(tol - r0 / jnp.maximum(r, 1e-12)) / tol)
        c = (iv.hi + iv.lo) / 2
        mean_c, _ = _masked_moments(c, w)
        act, inact = w * (iv.lo > 0), w * (iv.hi < 0)
        m_a, m_i = jnp.sum(c * act) / n, jnp.sum(c * inact) / n
        v_a, v_i = jnp.sum(act * (c - mean_c) ** 2), jnp.sum(inact * (c - mean_c) ** 2)
        ok = (jnp.sum(act) > 0) & (jnp.sum(inact) > 0) & (m_a > 0) & (m_i < 0) & (v_a > 0) & (v_i > 0)
        safe = lambda a, b: jnp.where(ok, a, 1.0) / jnp.where(ok, b, 1.0)
        rho_m = safe(m_a, -m_i)
        rho_v = safe(v_a, v_i)
        rho_m = jnp.minimum(rho_m, 1.0 / jnp.maximum(rho_m, 1e-12))
        rho_v = jnp.minimum(rho_v, 1.0 / jnp.maximum(rho_v, 1e-12))
        relu.append(jnp.where(ok, (jax.nn.relu(tol - rho_m) + jax.nn.relu(tol - rho_v)) / tol, 0.0))
    return jnp.mean(jnp.stack(tight)), jnp.mean(jnp.stack(relu))


def warmup_terms(ctx, params, model_state, x, threat, mask, step):
    """λ (1 - ε(t)/ε) (L_tightness + L_relu) of :func:`warmup_regularizer` over S(x) of ``threat``
    (``certified.warmup_reg`` = λ; 0 = off, nothing traced); skipped (``lax.cond``) once the ε ramp
    is over. Returns (term, metrics)."""
    c = ctx.cfg.certified
    lam = float(c.warmup_reg)
    zero = jnp.zeros((), jnp.float32)
    if lam <= 0:
        return zero, {}
    eps_max = float(ctx.threat.eps)
    eps = _f32(ctx.eps_at(step))
    intensity = lam * jnp.clip(1.0 - eps / max(eps_max, 1e-12), 0.0, 1.0)
    fn = bound_logits_fn(ctx, params, model_state)
    xf = _f32(x)

    def regs():
        _, pre = ibp_preactivations(fn, xf, threat)
        return warmup_regularizer(jibp.input_interval(xf, threat), pre, mask, float(c.warmup_tol))

    tight, relu = lax.cond(intensity > 0, regs, lambda: (zero, zero))
    return intensity * (tight + relu), {"reg_tightness": tight, "reg_relu": relu,
                                        "reg_intensity": intensity}


# ----------------------------------------------------------------------------- IBP / CROWN-IBP / KW
def ibp_loss(ctx, params, model_state, extra, batch, key, step):
    """Gowal et al. (2019): L = κ CE(z(x), y) + (1-κ) CE(-m_IBP(x, ε), y), with m_IBP the interval
    (Algorithm 3.2) lower bounds of the margins (last layer elided); κ = ``schedules.kappa`` (1 → ½
    in their recipe) and ε ramped by ``objective.eps_schedule``."""
    _, new_state, ce, acc = _clean(ctx, params, model_state, batch)
    threat, eps = _threat(ctx, step)
    x, y, mask = _f32(batch["image"]), batch["label"], batch["mask"]
    lower = margin_lower(bound_logits_fn(ctx, params, new_state), x, y, threat, "ibp")
    rob = masked_mean(robust_ce(lower, y), mask)
    kappa = ctx.schedules["kappa"](step)
    reg, reg_metrics = warmup_terms(ctx, params, new_state, x, threat, mask, step)
    loss = kappa * ce + (1.0 - kappa) * rob + reg
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "ce": ce, "robust_ce": rob,
                                                  "accuracy": acc, "eps": eps, "kappa": kappa,
                                                  "ibp_certified": certified_fraction(lower, y, mask),
                                                  **reg_metrics})


def crown_ibp_lower(fn, x, y, threat, beta):
    """Zhang et al. (2020): β·m_CROWN-IBP + (1-β)·m_IBP; the CROWN-IBP backward pass is skipped
    (``lax.cond``) once β = 0."""
    ibp = margin_lower(fn, x, y, threat, "ibp")
    crown = jax.lax.cond(beta > 0, lambda: margin_lower(fn, x, y, threat, "crown_ibp"), lambda: ibp)
    return beta * crown + (1.0 - beta) * ibp


def crown_ibp_loss(ctx, params, model_state, extra, batch, key, step):
    """CROWN-IBP (Zhang et al. 2020): L = κ CE(z(x)) + (1-κ) CE(-(β m_CROWN-IBP + (1-β) m_IBP)),
    β = ``schedules.crown_beta`` (1 → 0 during the ε ramp), κ = ``schedules.kappa``."""
    _, new_state, ce, acc = _clean(ctx, params, model_state, batch)
    threat, eps = _threat(ctx, step)
    x, y, mask = _f32(batch["image"]), batch["label"], batch["mask"]
    beta = ctx.schedules["crown_beta"](step)
    lower = crown_ibp_lower(bound_logits_fn(ctx, params, new_state), x, y, threat, beta)
    rob = masked_mean(robust_ce(lower, y), mask)
    kappa = ctx.schedules["kappa"](step)
    reg, reg_metrics = warmup_terms(ctx, params, new_state, x, threat, mask, step)
    loss = kappa * ce + (1.0 - kappa) * rob + reg
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "ce": ce, "robust_ce": rob,
                                                  "accuracy": acc, "eps": eps, "kappa": kappa,
                                                  "crown_beta": beta,
                                                  "certified": certified_fraction(lower, y, mask),
                                                  **reg_metrics})


def kw_loss(ctx, params, model_state, extra, batch, key, step):
    """Wong & Kolter (2018) robust CE: L = CE(-m_Lin(x, ε), y), m_Lin the Fast-Lin / KW linear lower
    bounds of the margins (Algorithm 3.1; identical to KW's dual network on ReLU nets)."""
    logits, new_state, ce, acc = _clean(ctx, params, model_state, batch)
    threat, eps = _threat(ctx, step)
    x, y, mask = _f32(batch["image"]), batch["label"], batch["mask"]
    lower = margin_lower(bound_logits_fn(ctx, params, new_state), x, y, threat, "fastlin")
    loss = masked_mean(robust_ce(lower, y), mask)
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "ce": ce, "accuracy": acc, "eps": eps,
                                                  "certified": certified_fraction(lower, y, mask)})


# ----------------------------------------------------------------------------- PER (thesis)
def per_terms(ctx, params, model_state, x, x_ref, y, mask, key, step, method: str):
    """PER (eq. 3.20) of the subsampled rows (Algorithm 3.6 lines 3-6): the envelope (U, p) of
    S_ε(x) from ``method`` ('fastlin' = L-PER, 'ibp_linear' = I-PER), signed distances from ``x_ref``
    (x for PER, the PGD point for PER+at). Returns (masked mean PER, certified fraction, d̂)."""
    c = ctx.cfg.certified
    idx, sub_mask = subsample(key, mask, int(c.subsample))
    threat, _ = _threat(ctx, step)
    xs, xr, ys = _f32(x)[idx], _f32(x_ref)[idx], y[idx]
    mb = margin_bounds(bound_logits_fn(ctx, params, model_state), xs, ys, threat, method=method)
    d = envelope_signed_distances(mb, xr, ys, ctx.threat.norm)
    beta = _value(ctx, "per_beta", c.per_beta, step)
    per = masked_mean(per_regularizer(d, float(c.per_alpha), beta, int(c.per_c)), sub_mask)
    return per, certified_fraction(mb.lower, ys, sub_mask), d


def _clean_or_mixed_ce(ctx, params, model_state, batch, key, step, adversarial: bool):
    """The CE term of PER/MMR and their +at variants: clean CE, or the mean of clean and PGD CE
    (thesis Alg 3.6). Returns (model state, ce, metrics, the point the regulariser is taken at)."""
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    _, new_state, ce, acc = _clean(ctx, params, model_state, batch)
    metrics = {"ce": ce, "accuracy": acc}
    if not adversarial:
        return new_state, ce, metrics, x
    x_adv, _ = pgd_points(ctx, params, new_state, batch, key, step)
    adv_logits, new_state = forward_train(ctx.model, params, new_state, x_adv)
    adv_ce, adv_acc = ce_and_accuracy(adv_logits, y, mask)
    metrics.update(adv_ce=adv_ce, adv_accuracy=adv_acc)
    return new_state, 0.5 * (ce + adv_ce), metrics, x_adv


def _per_objective(name: str):
    method = LINEAR_METHODS[name]
    adversarial = name.endswith("_at")

    def loss_fn(ctx, params, model_state, extra, batch, key, step):
        k_sub, k_adv = jax.random.split(key)
        x, y, mask = batch["image"], batch["label"], batch["mask"]
        new_state, ce, metrics, x_ref = _clean_or_mixed_ce(ctx, params, model_state, batch, k_adv, step,
                                                           adversarial)
        per, cert, _ = per_terms(ctx, params, new_state, x, x_ref, y, mask, k_sub, step, method)
        loss = ce + per
        metrics.update(loss=loss, per=per, certified=cert, eps=ctx.eps_at(step))
        return loss, ObjectiveOutput(new_state, {}, metrics)

    loss_fn.__doc__ = (f"{'I' if method == 'ibp_linear' else 'L'}-PER{'+at' if adversarial else ''} "
                       "(thesis §3.3.3, eq. 3.20, Algorithm 3.6): "
                       + ("½(CE(x) + CE(x')) + PER(x'), x' the PGD point" if adversarial else
                          "CE(x) + PER(x)")
                       + f"; envelope from '{method}' linear bounds over S_ε(x).")
    return loss_fn


# ----------------------------------------------------------------------------- MMR (Croce et al.)
def _hidden_and_logits(model, variables, x1):
    """One example (*f): (pre-activations of every hidden Dense/Conv layer, flat; logits (K,))."""
    logits, st = model.apply(variables, x1[None], train=False, mutable=["intermediates"],
                             capture_intermediates=lambda m, n: isinstance(m, (nn.Dense, nn.Conv))
                             and n == "__call__")
    outs = [v["__call__"][0] for v in st["intermediates"].values()]
    hidden = [o.reshape(-1) for o in outs[:-1]]  # the last layer's output is the logits
    h = jnp.concatenate(hidden) if hidden else jnp.zeros((0,), logits.dtype)
    return h, logits[0]


def mmr_regularizer(ctx, params, x, y):
    """Croce et al. (2019) MMR on a ReLU net (locally affine): with d_B the l_p distances from x to
    the k_B closest hyperplanes bounding its linear region (h_j(x) = 0 for each hidden pre-activation
    h_j, |h_j| / ||∇h_j||_q) and d_D the signed distances to the K-1 linearised decision hyperplanes
    ((z_y - z_i) / ||∇(z_y - z_i)||_q),
    MMR = (1/k_B) Σ max(0, 1 - d_B/γ_B) + (1/(K-1)) Σ max(0, 1 - d_D/γ_D). (B,)."""
    c = ctx.cfg.certified
    model = _float32_model(ctx.model)
    variables = {"params": params}
    norm = ctx.threat.norm

    def one(x1, y1):
        f = lambda z: jnp.concatenate(_hidden_and_logits(model, variables, z))
        vals = f(x1)
        jac = jax.jacfwd(f)(x1).reshape(vals.shape[0], -1)
        K = ctx.num_classes
        h, z = vals[:-K], vals[-K:]
        jh, jz = jac[:-K], jac[-K:]
        dh = jnp.abs(h) / jnp.maximum(safe_dual_norm(jh[None], norm)[0], 1e-12)
        kb = min(int(c.mmr_k_b), h.shape[0])
        db = -jax.lax.top_k(-dh, kb)[0]
        gm = jz[y1][None] - jz
        dd = (z[y1] - z) / jnp.maximum(safe_dual_norm(gm[None], norm)[0], 1e-12)
        dd = jnp.where(jnp.arange(K) == y1, jnp.inf, dd)
        rb = jnp.mean(jnp.maximum(0.0, 1.0 - db / float(c.mmr_gamma_b)))
        rd = jnp.sum(jnp.maximum(0.0, 1.0 - dd / float(c.mmr_gamma_d))) / (K - 1)
        return rb + rd

    return jax.vmap(one)(_f32(x), y)


def _check_mmr(ctx, model_state):
    if model_state:
        raise ValueError("mmr/mmr_at need a ReLU net without BatchNorm (its linear regions are "
                         f"computed from the Dense/Conv outputs); got collections {sorted(model_state)}.")
    act = getattr(ctx.model, "activation", "relu")
    if act != "relu":
        raise ValueError(f"mmr/mmr_at are defined for ReLU nets only (Croce et al. 2019), got "
                         f"activation {act!r}.")


def _mmr_objective(adversarial: bool):
    def loss_fn(ctx, params, model_state, extra, batch, key, step):
        _check_mmr(ctx, model_state)
        k_sub, k_adv = jax.random.split(key)
        x, y, mask = batch["image"], batch["label"], batch["mask"]
        new_state, ce, metrics, x_ref = _clean_or_mixed_ce(ctx, params, model_state, batch, k_adv, step,
                                                           adversarial)
        idx, sub_mask = subsample(k_sub, mask, int(ctx.cfg.certified.subsample))
        lam = _value(ctx, "mmr_lambda", ctx.cfg.certified.mmr_lambda, step)
        mmr = lam * masked_mean(mmr_regularizer(ctx, params, x_ref[idx], y[idx]), sub_mask)
        loss = ce + mmr
        metrics.update(loss=loss, mmr=mmr)
        return loss, ObjectiveOutput(new_state, {}, metrics)

    loss_fn.__doc__ = ("MMR+at (Croce et al. 2019): ½(CE(x) + CE(x')) + λ MMR(x'), x' the PGD point."
                       if adversarial else "MMR (Croce et al. 2019): CE(x) + λ MMR(x).")
    return loss_fn


# ----------------------------------------------------------------------------- SABR, MTL-IBP
def sabr_centers(ctx, x, x_adv, eps, lam):
    """SABR's box centres: the PGD point projected onto B_{(1-λ)ε}(x) ∩ box, so that the propagated
    region B_{λε}(centre) ∩ box lies inside S_ε(x)."""
    inner = ctx.threat.replace(eps=_f32((1.0 - lam) * eps))
    return inner.project(_f32(x), _f32(x_adv))


def sabr_loss(ctx, params, model_state, extra, batch, key, step):
    """SABR (Müller et al. 2023): L = CE(-m_IBP(x̂, λε), y), the IBP robust CE over the small region
    B_{λε}(x̂) ∩ box around x̂ = the PGD point (found in S_ε(x)) projected into B_{(1-λ)ε}(x);
    λ = ``certified.sabr_lambda``."""
    k_adv = key
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    _, new_state, ce, acc = _clean(ctx, params, model_state, batch)
    x_adv, eps = pgd_points(ctx, params, new_state, batch, k_adv, step)
    lam = float(ctx.cfg.certified.sabr_lambda)
    centres = jax.lax.stop_gradient(sabr_centers(ctx, x, x_adv, eps, lam))
    small = ctx.threat.replace(eps=_f32(lam * eps))
    lower = margin_lower(bound_logits_fn(ctx, params, new_state), centres, y, small, "ibp")
    reg, reg_metrics = warmup_terms(ctx, params, new_state, centres, small, mask, step)
    loss = masked_mean(robust_ce(lower, y), mask) + reg
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "ce": ce, "accuracy": acc, "eps": eps,
                                                  "small_box_certified": certified_fraction(lower, y, mask),
                                                  **reg_metrics})


def mtl_ibp_loss(ctx, params, model_state, extra, batch, key, step):
    """MTL-IBP (De Palma et al. 2024): L = α CE(-m_IBP(x, ε), y) + (1-α) CE(z(x'), y), x' the PGD
    point; α = ``certified.mtl_alpha`` (or ``schedules.mtl_alpha``)."""
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    _, new_state, ce, acc = _clean(ctx, params, model_state, batch)
    x_adv, eps = pgd_points(ctx, params, new_state, batch, key, step)
    adv_logits, new_state = forward_train(ctx.model, params, new_state, x_adv)
    adv_ce, adv_acc = ce_and_accuracy(adv_logits, y, mask)
    threat = ctx.threat.replace(eps=_f32(eps))
    lower = margin_lower(bound_logits_fn(ctx, params, new_state), _f32(x), y, threat, "ibp")
    rob = masked_mean(robust_ce(lower, y), mask)
    alpha = _value(ctx, "mtl_alpha", ctx.cfg.certified.mtl_alpha, step)
    reg, reg_metrics = warmup_terms(ctx, params, new_state, x, threat, mask, step)
    loss = alpha * rob + (1.0 - alpha) * adv_ce + reg
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "ce": ce, "accuracy": acc,
                                                  "adv_accuracy": adv_acc, "robust_ce": rob, "eps": eps,
                                                  "ibp_certified": certified_fraction(lower, y, mask),
                                                  **reg_metrics})


# ----------------------------------------------------------------------------- registration
METHOD_NAMES = ("plain", "at", "kw", "ibp", "crown_ibp", "mmr", "mmr_at", "lper", "lper_at", "iper",
                "iper_at", "sabr", "mtl_ibp")

register("plain", get_objective("standard"))
register("at", get_objective("pgd_at"))
register("kw", Objective(init=check_bounds_init("fastlin"), loss=kw_loss))
register("ibp", Objective(init=check_bounds_init("ibp"), loss=ibp_loss, schedules=("kappa",),
                          init_params=_ibp_init_params))
register("crown_ibp", Objective(init=check_bounds_init("ibp", "crown_ibp"), loss=crown_ibp_loss,
                                schedules=("kappa", "crown_beta"), init_params=_ibp_init_params))
register("mmr", Objective(init=check_bounds_init(), loss=_mmr_objective(False)))
register("mmr_at", Objective(init=check_bounds_init(), loss=_mmr_objective(True)))
for _name, _method in LINEAR_METHODS.items():
    register(_name, Objective(init=check_bounds_init(_method), loss=_per_objective(_name)))
register("sabr", Objective(init=check_bounds_init("ibp"), loss=sabr_loss, init_params=_ibp_init_params))
register("mtl_ibp", Objective(init=check_bounds_init("ibp"), loss=mtl_ibp_loss,
                              init_params=_ibp_init_params))

__all__ = ["METHOD_NAMES", "LINEAR_METHODS", "bound_logits_fn", "robust_ce", "certified_fraction",
           "subsample", "safe_dual_norm", "envelope_signed_distances", "per_regularizer", "per_terms", "check_bounds_init", "check_certified_config",
           "crown_ibp_lower", "margin_lower", "mmr_regularizer", "sabr_centers", "ibp_loss", "crown_ibp_loss",
           "kw_loss", "sabr_loss", "mtl_ibp_loss", "ibp_init", "ibp_preactivations", "warmup_regularizer",
           "warmup_terms"]
