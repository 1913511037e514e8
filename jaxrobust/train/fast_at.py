"""Fast adversarial training (thesis §5.2, Algorithm 5.3, Table 5.11): ATAS and the baselines it is
compared with, as objectives of the one training loop.

Registered objectives (``objective.name``; settings under ``objective.fast``):

- ``at``: PGD adversarial training (Madry et al. 2018), the reference (``objective.attack.steps=10``).
- ``fgsm_rs`` (Wong et al. 2020): uniform start in the ε-ball, one signed step α = ``fgsm_step``·ε
  (1.25ε), projection onto the ball ∩ box.
- ``fgsm_ga`` (GradAlign, Andriushchenko & Flammarion 2020): FGSM from x with step ``fgsm_ga_step``·ε
  plus ``ga_lambda``·(1 − cos(∇_x ℓ(x), ∇_x ℓ(x + η))), η ~ U(ball); the first gradient is a
  constant, the second is differentiated through (double back-propagation) as the reference code.
- ``nfgsm`` (de Jorge et al. 2022): noise η ~ U(−kε, kε) (k = ``nfgsm_noise`` = 2), one signed step
  of ``nfgsm_step``·ε (= ε) from x + η, NO projection back onto the ε-ball (only onto the box):
  ‖δ‖_∞ ≤ (k + 1)ε = 3ε. l_inf only.
- ``atta`` (Zheng et al. 2020): a per-instance perturbation cache ``extra['instance']['delta']``
  (dataset index → δ_i in the un-augmented frame; ``seen`` flags visited examples, whose first visit
  starts from U(ε-ball ∩ box)). Each step reads δ_i, applies the batch's crop/flip,
  projects it onto the current ε-ball ∩ box, runs ``cache_steps`` signed steps of ``atta_step``·ε
  (ATTA-1: 4/255 at ε = 8/255), trains on the result, and writes x_adv − x back after inverting the
  crop/flip (pixels the crop did not cover keep their cached value).
- ``atas`` (thesis Alg. 5.3): ATTA's cache plus a per-instance pre-conditioner
  ``extra['instance']['v']``: eq. 5.15 ``v_i ← β v_i + (1 − β)‖∇_x L‖²₂`` and, with
  ``atas_rule='thesis'``, eq. 5.16 ``α_i = α / √(v_i + C)`` (α = ``atas_alpha``·ε·√C, so that
  α_i = ``atas_alpha``·ε when v_i = 0: the thesis's "γ/C = 16/255" at ε = 8/255), or with
  ``atas_rule='released'`` the released code's ``α_i = clip(a·ε·c/(c + √v_i), lo·ε, hi·ε)``
  (a, lo, hi = ``atas_alpha``, ``atas_min_step``, ``atas_max_step`` = 2, 0.5, 1.75: i.e.
  clip(2·(8/255)·c/(c+√v_i), 4/255, 14/255) at ε = 8/255), c = ``atas_c``, β = ``atas_beta``. One
  signed step of α_i from the cached start (Alg. 5.3). As the released code, ∇_x L is the gradient of
  the batch-mean cross-entropy (so ‖∇_x L‖ scales with 1/B) in the attack BN mode. The released
  code's schedule is available too: ``atas_warmup_epochs`` (5) epochs of a constant step
  ``atas_warmup_step``·ε (ε) with v untouched, and the cache re-drawn uniformly in the 1-based
  epochs ``cache_reset_at`` (every 10th but the last; any cached method).
- ``free`` (Shafahi et al. 2019): each batch is replayed m = ``free_replays`` times; every replay's
  single backward pass gives both the parameter gradient (a parameter update) and the input gradient
  (δ ← Π(δ + ε·sign(∇_x)), carried over to the next replay): the objective has ``replays = m`` and
  the loop makes m optimizer updates per batch. δ is carried over between replays and batches
  through the per-instance cache (each example restarts from its own last δ).
- ``yopo`` (Zhang et al. 2019, YOPO-m-n): m = ``yopo_m`` full forward/backward passes per batch, each
  giving the gradient of every layer but the first and the adjoint p = ∂L/∂z₁ of the first layer's
  output z₁; after each, n = ``yopo_n`` cheap steps η ← Π(η + σ·sign(∇_η ⟨p, f₀(x + η)⟩)) through
  the first layer only (σ = ``yopo_step``·ε), and the first layer's weight gradient is the
  Hamiltonian's ∇_θ₀ ⟨p, f₀(x + η; θ₀)⟩ at the last η (both averaged over the m).

ImageNet-scale caches (§5.2.4): ``cache_resolution`` > 0 stores δ down-sampled to that height/width
(bilinear; up-sampled when read), ``cache_dtype='bfloat16'`` halves it again; the cache memory per
device is printed when the state is created (:func:`cache_bytes`).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from jaxrobust.attacks.common import default_unroll, steepest_ascent_step
from jaxrobust.data.augment import apply_crop_flip, invert_crop_flip
from jaxrobust.models import forward_train, make_logits_fn
from jaxrobust.train.objectives import (Objective, ObjectiveOutput, ce_and_accuracy, get_objective,
                                        masked_mean, per_example_ce, register)

AUGMENT_PAD = 4  # the loop's crop_flip padding (jaxrobust.train.loop.AUGMENT_PAD)
CACHE_DTYPES = ("float32", "bfloat16")
ATAS_RULES = ("thesis", "released")
COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's guard (GradAlign reference)


# ----------------------------------------------------------------------------- config access
def _fast(ctx):
    f = ctx.cfg.get("fast", None)
    if f is None:
        raise ValueError("objective.fast is missing: build configs from configs.common.base_config "
                         "(with_defaults fills it).")
    return f


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"objective.fast.{what} must be an integer >= 1, got {value!r}.")
    return int(value)


def _nonneg(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"objective.fast.{what} must be a number >= 0, got {value!r}.")
    return float(value)


def _rows(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _attack_logits_fn(ctx, params, model_state):
    return make_logits_fn(ctx.model, {"params": params, **model_state}, ctx.cfg.attack.bn_mode,
                          stop_gradient=True)


def _mean_ce_grad(logits_fn, x, y, mask):
    """∇_x of the batch-mean (masked) cross-entropy, as the reference codes' ``F.cross_entropy``."""
    def f(xa):
        return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(xa), y), mask)
    return jax.grad(f)(x)


def _signed_step(threat, x, xa, grad, alpha):
    """One steepest-ascent step of size ``alpha`` (B,) or scalar from ``xa``, projected onto the ball
    around ``x`` ∩ box."""
    alpha = jnp.broadcast_to(jnp.asarray(alpha, x.dtype), (x.shape[0],))
    return threat.project(x, steepest_ascent_step(grad, xa, x, threat, alpha))


def _train_on(ctx, params, model_state, batch, x_adv, metrics, instance_updates=None):
    logits, new_state = forward_train(ctx.model, params, model_state, x_adv)
    loss, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
    return loss, ObjectiveOutput(new_state, instance_updates or {},
                                 {"loss": loss, "adv_accuracy": acc, **metrics},
                                 per_example_ce(logits, batch["label"]))


def _tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def linear_surrogate(params, grads, value):
    """A loss whose value is ``value`` and whose gradient w.r.t. ``params`` is ``grads`` (constants):
    lets an objective that computed its parameter gradient itself (Free, YOPO) hand it to the loop's
    ``value_and_grad`` without another forward/backward pass."""
    g = jax.lax.stop_gradient(grads)
    lin = _tree_vdot(g, params)
    return jax.lax.stop_gradient(value - lin) + lin


# ----------------------------------------------------------------------------- the perturbation cache
def cache_shape(input_shape, resolution: int = 0) -> Tuple[int, ...]:
    """Per-example shape of the stored δ: the input shape, or (resolution, resolution, C) for images
    when ``resolution`` > 0 (§5.2.4: ImageNet perturbations kept at 32×32)."""
    input_shape = tuple(int(s) for s in input_shape)
    if resolution and resolution > 0:
        if len(input_shape) != 3:
            raise ValueError(f"objective.fast.cache_resolution needs (H, W, C) images, got input shape "
                             f"{input_shape}.")
        return (int(resolution), int(resolution), input_shape[-1])
    return input_shape


def cache_bytes(n_train: int, input_shape, resolution: int = 0, dtype: str = "float32",
                num_devices: int = 1, with_v: bool = False) -> Tuple[int, int]:
    """(total bytes, bytes per device) of the δ cache (its flags, and ATAS's v) of ``n_train`` examples, sharded
    over ``num_devices`` (rows padded as the loop pads them)."""
    from jaxrobust.train.loop import instance_rows
    rows = instance_rows(n_train, num_devices)
    per = int(np.prod(cache_shape(input_shape, resolution))) * jnp.dtype(dtype).itemsize
    total = rows * (per + 1 + (4 if with_v else 0))  # δ, the 'seen' flag, ATAS's v
    return total, total // max(num_devices, 1)


def _check_cache_cfg(f):
    if f.cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"objective.fast.cache_dtype must be one of {CACHE_DTYPES}, got "
                         f"{f.cache_dtype!r}.")
    if isinstance(f.cache_resolution, bool) or not isinstance(f.cache_resolution, int) or \
            f.cache_resolution < 0:
        raise ValueError(f"objective.fast.cache_resolution must be an integer >= 0 (0 = full "
                         f"resolution), got {f.cache_resolution!r}.")


def init_cache(ctx, n_train: int, input_shape, *, with_v: bool, name: str):
    """``extra['instance']``: δ_i = 0 in ``cache_dtype`` at ``cache_resolution``, ``seen`` = False
    (an example's first visit starts from U(ε-ball ∩ box) instead: Alg. 5.3's uniform initialisation,
    drawn when the example's image is at hand so the stored δ always stays in the ball and the box),
    and v_i = 0 for ATAS."""
    f = _fast(ctx)
    _check_cache_cfg(f)
    shape = cache_shape(input_shape, f.cache_resolution)
    inst = {"delta": jnp.zeros((n_train,) + shape, f.cache_dtype),
            "seen": jnp.zeros((n_train,), bool)}
    if with_v:
        inst["v"] = jnp.zeros((n_train,), jnp.float32)
    total, per_dev = cache_bytes(n_train, input_shape, f.cache_resolution, f.cache_dtype,
                                 jax.device_count(), with_v)
    print(f"[{name}] perturbation cache: {n_train} x {'x'.join(map(str, shape))} {f.cache_dtype}"
          f"{' + v' if with_v else ''} = {total / 2**20:.1f} MiB, {per_dev / 2**20:.1f} MiB per device "
          f"({jax.device_count()} devices)", flush=True)
    return {"instance": inst}


def _is_image(x):
    return x.ndim == 4


def read_cache(stored, batch):
    """The cached δ of the batch's examples, in the batch's (augmented) frame: up-sampled to the
    image size if stored down-sampled, then the batch's crop offsets/flips applied."""
    x = batch["image"]
    d = stored.astype(jnp.float32)
    if d.shape[1:] != x.shape[1:]:
        d = jax.image.resize(d, x.shape, "linear")
    if _is_image(x):
        d = apply_crop_flip(d, batch["crop_offset"], batch["flip"], AUGMENT_PAD)
    return d


def write_cache(delta_aug, stored, batch, dtype):
    """δ (augmented frame) → the un-augmented frame (inverse crop/flip), keeping the cached value on
    pixels the crop did not cover; down-sampled to the stored resolution and cast to its dtype."""
    x = batch["image"]
    if _is_image(x):
        off, flip = batch["crop_offset"], batch["flip"]
        back = invert_crop_flip(delta_aug, off, flip, AUGMENT_PAD)
        covered = invert_crop_flip(jnp.ones_like(delta_aug), off, flip, AUGMENT_PAD) > 0
        old = stored.astype(jnp.float32)
        if old.shape[1:] != x.shape[1:]:
            old = jax.image.resize(old, x.shape, "linear")
        back = jnp.where(covered, back, old)
    else:
        back = delta_aug
    if back.shape[1:] != stored.shape[1:]:
        back = jax.image.resize(back, (back.shape[0],) + stored.shape[1:], "linear")
    return back.astype(dtype)


def epoch_of(ctx, batch, step):
    """0-based epoch of ``step`` (the loop's ``n_train // batch_size`` steps per epoch)."""
    spe = max(int(ctx.n_train) // int(batch["image"].shape[0]), 1)
    return step // spe


def _reset_now(ctx, batch, step):
    """True in the (1-based) epochs listed in ``objective.fast.cache_reset_at``: the released ATAS
    code re-draws the whole cache uniformly at the start of every 10th epoch but the last."""
    at = tuple(int(e) for e in _fast(ctx).cache_reset_at)
    if not at:
        return jnp.asarray(False)
    return jnp.isin(epoch_of(ctx, batch, step) + 1, jnp.asarray(at))


def cached_start(ctx, extra, batch, threat, key, step=None):
    """The attack's start from the cache: x + δ_i (augmented frame) projected onto ball ∩ box; a
    uniform random point of ball ∩ box on the example's first visit and in the epochs
    ``cache_reset_at`` (given ``step``)."""
    x = batch["image"]
    inst = extra["instance"]
    d = read_cache(inst["delta"][batch["index"]], batch)
    seen = inst["seen"][batch["index"]]
    if step is not None:
        seen = seen & ~_reset_now(ctx, batch, step)
    return jnp.where(_rows(seen, x), threat.project(x, x + d), threat.random_init(key, x))


# ----------------------------------------------------------------------------- ATAS step sizes
def atas_preconditioner(v, grad, beta):
    """Eq. 5.15: ``v_i ← β v_i + (1 − β)‖∇_x L_i‖²₂`` (grad of shape (B, ...))."""
    sq = jnp.sum(jnp.square(grad.reshape(grad.shape[0], -1)), axis=1)
    return beta * v + (1.0 - beta) * sq


def atas_step_size(v, eps, *, rule: str, c: float, alpha: float = 2.0, lo: float = 0.5,
                   hi: float = 1.75):
    """ATAS's per-instance step α_i from the pre-conditioner v (B,).

    ``rule='thesis'``: eq. 5.16 ``α_i = α/√(v_i + C)`` with C = ``c`` and α = ``alpha``·ε·√C
    (α_i = ``alpha``·ε at v_i = 0). ``rule='released'``: ``clip(alpha·ε·c/(c + √v_i), lo·ε, hi·ε)``;
    the released code's ``clip(2·(8/255)·c/(c + √v_i), 4/255, 14/255)`` at ε = 8/255 is
    (alpha, lo, hi) = (2, 0.5, 1.75) (its ImageNet setting, ε = 2/255 with bounds 4/255 and 8/255,
    is (8, 2, 4)).
    """
    if rule == "thesis":
        return alpha * eps * jnp.sqrt(c) / jnp.sqrt(v + c)
    if rule == "released":
        return jnp.clip(alpha * eps * c / (c + jnp.sqrt(v)), lo * eps, hi * eps)
    raise ValueError(f"objective.fast.atas_rule must be one of {ATAS_RULES}, got {rule!r}.")


# ----------------------------------------------------------------------------- ATTA / ATAS
def cache_attack(ctx, params, model_state, extra, batch, key, step, *, adaptive: bool):
    """The ATTA / ATAS inner step from the cache. Returns ``(x_adv, instance_updates, metrics)``."""
    f = _fast(ctx)
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    eps = ctx.eps_at(step)
    threat = ctx.threat.replace(eps=eps)
    logits_fn = _attack_logits_fn(ctx, params, model_state)
    xa = cached_start(ctx, extra, batch, threat, key, step)
    metrics = {"eps": eps}
    updates = {"seen": jnp.ones_like(batch["mask"])}
    if adaptive:
        beta = _nonneg(f.atas_beta, "atas_beta")
        g = _mean_ce_grad(logits_fn, xa, y, mask)
        v_old = extra["instance"]["v"][batch["index"]]
        v = atas_preconditioner(v_old, g, beta)
        alpha = atas_step_size(v, eps, rule=f.atas_rule, c=_nonneg(f.atas_c, "atas_c"),
                               alpha=_nonneg(f.atas_alpha, "atas_alpha"),
                               lo=_nonneg(f.atas_min_step, "atas_min_step"),
                               hi=_nonneg(f.atas_max_step, "atas_max_step"))
        # the released code's warm-up: a constant step and v left alone for the first epochs
        warm = epoch_of(ctx, batch, step) < _nonneg(f.atas_warmup_epochs, "atas_warmup_epochs")
        alpha = jnp.where(warm, _nonneg(f.atas_warmup_step, "atas_warmup_step") * eps, alpha)
        v = jnp.where(warm, v_old, v)
        xa = _signed_step(threat, x, xa, g, alpha)
        updates["v"] = v
        metrics.update(step_size=masked_mean(alpha, mask), preconditioner=masked_mean(v, mask))
    else:
        k = _positive_int(f.cache_steps, "cache_steps")
        alpha = _nonneg(f.atta_step, "atta_step") * eps

        def attack_step(_, xa):
            return _signed_step(threat, x, xa, _mean_ce_grad(logits_fn, xa, y, mask), alpha)
        # unrolled on CPU, a rolled loop on GPU/TPU (attacks.common.default_unroll)
        xa = jax.lax.fori_loop(0, k, attack_step, xa, unroll=default_unroll(k))
    xa = jax.lax.stop_gradient(xa)
    updates["delta"] = write_cache(xa - x, extra["instance"]["delta"][batch["index"]], batch,
                                   f.cache_dtype)
    return xa, updates, metrics


def atta_loss(ctx, params, model_state, extra, batch, key, step):
    """ATTA (Zheng et al. 2020): ``cache_steps`` steps from the accumulated per-instance δ."""
    xa, upd, m = cache_attack(ctx, params, model_state, extra, batch, key, step, adaptive=False)
    return _train_on(ctx, params, model_state, batch, xa, m, upd)


def atas_loss(ctx, params, model_state, extra, batch, key, step):
    """ATAS (thesis Alg. 5.3): one step of the instance-adaptive size α_i (eq. 5.15-5.16) from the
    accumulated δ_i, then the parameter update on the result."""
    xa, upd, m = cache_attack(ctx, params, model_state, extra, batch, key, step, adaptive=True)
    return _train_on(ctx, params, model_state, batch, xa, m, upd)


def _atta_init(ctx, params, n_train, input_shape):
    return init_cache(ctx, n_train, input_shape, with_v=False, name="atta")


def _atas_init(ctx, params, n_train, input_shape):
    return init_cache(ctx, n_train, input_shape, with_v=True, name="atas")


# ----------------------------------------------------------------------------- FGSM-RS / N-FGSM / GA
def fgsm_rs_points(ctx, params, model_state, batch, key, step):
    """FGSM-RS (Wong et al. 2020): x₀ ~ U(ball ∩ box), x' = Π(x₀ + α·sign(∇_x L(x₀))), α = 1.25ε."""
    f = _fast(ctx)
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    eps = ctx.eps_at(step)
    threat = ctx.threat.replace(eps=eps)
    logits_fn = _attack_logits_fn(ctx, params, model_state)
    x0 = threat.random_init(key, x)
    g = _mean_ce_grad(logits_fn, x0, y, mask)
    return jax.lax.stop_gradient(_signed_step(threat, x, x0, g, _nonneg(f.fgsm_step, "fgsm_step") * eps)), eps


def fgsm_rs_loss(ctx, params, model_state, extra, batch, key, step):
    xa, eps = fgsm_rs_points(ctx, params, model_state, batch, key, step)
    return _train_on(ctx, params, model_state, batch, xa, {"eps": eps})


def nfgsm_points(ctx, params, model_state, batch, key, step):
    """N-FGSM (de Jorge et al. 2022): η ~ U(−kε, kε), δ = η + α·sign(∇_x L(x + η)), α = ``nfgsm_step``·ε;
    x' = clip(x + δ, box) with no projection onto the ε-ball (‖δ‖_∞ ≤ (k + 1)ε)."""
    f = _fast(ctx)
    if ctx.threat.norm != "linf":
        raise ValueError(f"nfgsm supports threat.norm='linf' only, got {ctx.threat.norm!r}.")
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    eps = ctx.eps_at(step)
    k = _nonneg(f.nfgsm_noise, "nfgsm_noise")
    noise = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * (k * eps)
    logits_fn = _attack_logits_fn(ctx, params, model_state)
    box = ctx.threat.box
    clip = (lambda z: z) if box is None else (lambda z: jnp.clip(z, box[0], box[1]))
    x0 = clip(x + noise)
    g = _mean_ce_grad(logits_fn, x0, y, mask)
    xa = clip(x0 + _nonneg(f.nfgsm_step, "nfgsm_step") * eps * jnp.sign(g))
    return jax.lax.stop_gradient(xa), eps


def nfgsm_loss(ctx, params, model_state, extra, batch, key, step):
    xa, eps = nfgsm_points(ctx, params, model_state, batch, key, step)
    dist = jnp.max(jnp.abs(xa - batch["image"]).reshape(xa.shape[0], -1), axis=1)
    return _train_on(ctx, params, model_state, batch, xa,
                     {"eps": eps, "delta_linf": masked_mean(dist, batch["mask"])})


def grad_align_regulariser(g1, g2, mask=None):
    """GradAlign: ``mean_b (1 − cos(g1_b, g2_b))`` with cos = ⟨g1, g2⟩ / max(‖g1‖‖g2‖, 1e-8)."""
    a = g1.reshape(g1.shape[0], -1)
    b = g2.reshape(g2.shape[0], -1)
    cos = jnp.sum(a * b, 1) / jnp.maximum(jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1),
                                          COS_EPS)
    one = 1.0 - cos
    return jnp.mean(one) if mask is None else masked_mean(one, mask)


def fgsm_ga_loss(ctx, params, model_state, extra, batch, key, step):
    """FGSM + GradAlign (Andriushchenko & Flammarion 2020): CE on the FGSM point (zero start, step
    ``fgsm_ga_step``·ε) + λ·(1 − cos(∇_x L(x), ∇_x L(x + η))), η ~ U(ball); ∇_x L(x) is a constant and
    ∇_x L(x + η) is differentiated w.r.t. the parameters (double back-propagation)."""
    f = _fast(ctx)
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    eps = ctx.eps_at(step)
    threat = ctx.threat.replace(eps=eps)
    lam = ctx.schedules["ga_lambda"](step) if "ga_lambda" in ctx.schedules else \
        _nonneg(f.ga_lambda, "ga_lambda")
    k_noise = key
    stopped = _attack_logits_fn(ctx, params, model_state)
    g1 = _mean_ce_grad(stopped, x, y, mask)
    xa = jax.lax.stop_gradient(_signed_step(threat, x, x, g1, _nonneg(f.fgsm_ga_step, "fgsm_ga_step") * eps))
    live = make_logits_fn(ctx.model, {"params": params, **model_state}, ctx.cfg.attack.bn_mode)
    x_noise = threat.random_init(k_noise, x)
    g2 = _mean_ce_grad(live, x_noise, y, mask)
    reg = grad_align_regulariser(jax.lax.stop_gradient(g1), g2, mask)
    logits, new_state = forward_train(ctx.model, params, model_state, xa)
    ce, acc = ce_and_accuracy(logits, y, mask)
    loss = ce + lam * reg
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "ce": ce, "grad_align": reg,
                                                 "ga_lambda": lam, "adv_accuracy": acc, "eps": eps})


# ----------------------------------------------------------------------------- Free AT
def free_loss(ctx, params, model_state, extra, batch, key, step):
    """Free adversarial training (Shafahi et al. 2019, Alg. 1), one of its m = ``free_replays``
    replays of a batch: the objective has ``replays = m``, so the loop makes m real optimizer updates
    on the same batch (momentum, weight decay and schedules included). Replay r runs one
    forward/backward at (θ_r, x + δ_r) giving ∇_θ L (the update) and ∇_x L, and
    δ_{r+1} = Π(δ_r + ε·sign(∇_x L)) is carried over to the next replay and, through the cache, to
    the example's next visit. Configure ``train.num_epochs`` divided by m (same number of passes)."""
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    eps = ctx.eps_at(step)
    threat = ctx.threat.replace(eps=eps)
    xa = jax.lax.stop_gradient(cached_start(ctx, extra, batch, threat, key))

    def loss_fn(p, xin):
        logits, new_state = forward_train(ctx.model, p, model_state, xin)
        loss, acc = ce_and_accuracy(logits, y, mask)
        return loss, (new_state, acc)

    (loss, (new_state, acc)), (g_theta, g_x) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, xa)
    x_next = jax.lax.stop_gradient(_signed_step(threat, x, xa, g_x, eps))
    upd = {"delta": write_cache(x_next - x, extra["instance"]["delta"][batch["index"]], batch,
                                _fast(ctx).cache_dtype),
           "seen": jnp.ones_like(batch["mask"])}
    # ∇_θ was computed with ∇_x in the same pass: hand it to the loop without another pass
    sur = linear_surrogate(params, g_theta, loss)
    return sur, ObjectiveOutput(new_state, upd, {"loss": loss, "adv_accuracy": acc, "eps": eps})


def _free_init(ctx, params, n_train, input_shape):
    return init_cache(ctx, n_train, input_shape, with_v=False, name="free")


# ----------------------------------------------------------------------------- YOPO
def _first_layer_interceptor(add=None, capture=None, path=None):
    """A flax method interceptor acting on the first Dense/Conv call of a forward pass (the first
    one to return): adds ``add`` to its output (the adjoint probe ξ: ∂L/∂ξ = ∂L/∂z₁), appends the
    output to ``capture`` and the layer's parameter path (e.g. ``('Conv_0',)``) to ``path``."""
    done = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if not done and context.method_name == "__call__" and \
                isinstance(context.module, (nn.Dense, nn.Conv)):
            done.append(True)
            if capture is not None:
                capture.append(out)
            if path is not None:
                path.append(tuple(context.module.path))
            if add is not None:
                out = out + add
        return out
    return interceptor


def _first_layer(model, variables, x):
    cap, path = [], []
    with nn.intercept_methods(_first_layer_interceptor(capture=cap, path=path)):
        model.apply(variables, x, train=False)
    if not cap:
        raise ValueError("yopo needs a model whose first layer is a flax Dense or Conv.")
    return cap[0], path[0]


def first_layer_output(model, variables, x):
    """z₁ = f₀(x; θ₀): the output of the model's first Dense/Conv layer (after the model's own input
    normalisation; the rest of the network is dead code under jit)."""
    return _first_layer(model, variables, x)[0]


def first_layer_path(model, variables, x) -> Tuple[str, ...]:
    """The parameter path of the model's first Dense/Conv layer (θ₀ of YOPO), e.g. ``('Conv_0',)``."""
    return _first_layer(model, variables, x)[1]


def probed_loss(model, params, model_state, x, y, mask, xi):
    """Train-mode masked mean CE with ``xi`` added to the first layer's output z₁: its gradient
    w.r.t. ``xi`` (at 0) is YOPO's adjoint p = ∂L/∂z₁. Returns ``(loss, (new model state, accuracy))``."""
    with nn.intercept_methods(_first_layer_interceptor(add=xi)):
        logits, new_state = forward_train(model, params, model_state, x)
    loss, acc = ce_and_accuracy(logits, y, mask)
    return loss, (new_state, acc)


def _in_subtree(path, prefix) -> bool:
    keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
    return keys[:len(prefix)] == tuple(prefix)


def yopo_hamiltonian_grad(model, params, model_state, x_adv, adjoint):
    """∇_θ ⟨p, f₀(x'; θ₀)⟩: YOPO's first-layer weight gradient from the adjoint p (B, ...) of z₁ and
    the perturbed input x' (the Hamiltonian's parameter gradient, Zhang et al. 2019, Alg. 1). Non-zero
    only on the first layer's parameters (kernel and bias)."""
    def ham(p):
        z = first_layer_output(model, {"params": p, **model_state}, x_adv)
        return jnp.sum(adjoint * z)
    return jax.grad(ham)(params)


def yopo_loss(ctx, params, model_state, extra, batch, key, step):
    """YOPO-m-n (Zhang et al. 2019, "You Only Propagate Once", Alg. 1 and the released code), m =
    ``yopo_m``, n = ``yopo_n``, σ = ``yopo_step``·ε. η^{1,0} ~ U(ball ∩ box); for j = 1..m:

    - one full train-mode forward/backward at x + η^{j,0} gives ∇_θ̃ L_j for every layer but the
      first (θ̃) and the first layer's adjoint p_j = ∂L_j/∂z₁ (z₁ = f₀(x + η; θ₀));
    - n cheap steps η^{j,s+1} = Π(η^{j,s} + σ·sign(∇_η ⟨p_j, f₀(x + η^{j,s}; θ₀)⟩)) propagate
      through the first layer only; η^{j+1,0} = η^{j,n};
    - the first layer's weight gradient is the Hamiltonian's, at the end of the inner steps:
      ∇_θ₀ ⟨p_j, f₀(x + η^{j,n}; θ₀)⟩ (the released code discards the full pass's first-layer weight
      gradient and accumulates this one instead).

    The loop's update (one optimizer step per batch) uses the mean over j of both gradients; the
    released code sums them (the same direction with an m× larger learning rate on the gradient
    term). Shapes: x (B, ...), η like x, p_j like z₁."""
    f = _fast(ctx)
    m = _positive_int(f.yopo_m, "yopo_m")
    n = _positive_int(f.yopo_n, "yopo_n")
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    eps = ctx.eps_at(step)
    threat = ctx.threat.replace(eps=eps)
    sigma = _nonneg(f.yopo_step, "yopo_step") * eps
    xa = threat.random_init(key, x)
    theta = jax.lax.stop_gradient(params)
    frozen_state = jax.lax.stop_gradient(model_state)
    frozen = {"params": theta, **frozen_state}
    z_shape = jax.eval_shape(lambda: first_layer_output(ctx.model, frozen, x))
    first = first_layer_path(ctx.model, frozen, x)

    def full(p, ms, xin, xi):
        return probed_loss(ctx.model, p, ms, xin, y, mask, xi)

    grad_full = jax.value_and_grad(full, argnums=(0, 3), has_aux=True)
    xi0 = jnp.zeros(z_shape.shape, z_shape.dtype)
    total = jax.tree.map(jnp.zeros_like, theta)
    ms, losses, accs = model_state, [], []
    for _ in range(m):  # m, n small and static: unrolled
        (loss, (ms, acc)), (g_theta, adj) = grad_full(theta, ms, xa, xi0)
        losses.append(loss)
        accs.append(acc)
        adj = jax.lax.stop_gradient(adj)
        ham = jax.grad(lambda xin: jnp.sum(adj * first_layer_output(ctx.model, frozen, xin)))
        for _ in range(n):
            xa = jax.lax.stop_gradient(_signed_step(threat, x, xa, ham(xa), sigma))
        g_first = yopo_hamiltonian_grad(ctx.model, theta, frozen_state, xa, adj)
        g = jax.tree_util.tree_map_with_path(
            lambda path, a, b: b if _in_subtree(path, first) else a, g_theta, g_first)
        total = jax.tree.map(jnp.add, total, g)
    grads = jax.tree.map(lambda g: g / m, total)
    loss = jnp.mean(jnp.stack(losses))
    return linear_surrogate(params, grads, loss), ObjectiveOutput(
        ms, {}, {"loss": loss, "adv_accuracy": jnp.mean(jnp.stack(accs)), "eps": eps,
                 "delta_linf": masked_mean(jnp.max(jnp.abs(xa - x).reshape(x.shape[0], -1), 1), mask)})


# ----------------------------------------------------------------------------- registration
register("at", get_objective("pgd_at"))
register("fgsm_rs", Objective(init=None, loss=fgsm_rs_loss))
register("fgsm_ga", Objective(init=None, loss=fgsm_ga_loss))
register("nfgsm", Objective(init=None, loss=nfgsm_loss))
register("atta", Objective(init=_atta_init, loss=atta_loss))
register("atas", Objective(init=_atas_init, loss=atas_loss))
register("free", Objective(init=_free_init, loss=free_loss,
                           replays=lambda cfg: _positive_int(cfg.fast.free_replays, "free_replays")))
register("yopo", Objective(init=None, loss=yopo_loss))

FAST_AT_OBJECTIVES = ("at", "fgsm_rs", "fgsm_ga", "nfgsm", "atta", "atas", "free", "yopo")

__all__ = ["FAST_AT_OBJECTIVES", "atas_preconditioner", "atas_step_size", "grad_align_regulariser",
           "cache_shape", "cache_bytes", "epoch_of", "read_cache", "write_cache", "cache_attack", "init_cache",
           "linear_surrogate", "first_layer_output", "first_layer_path", "probed_loss",
           "yopo_hamiltonian_grad", "fgsm_rs_points", "nfgsm_points"]
