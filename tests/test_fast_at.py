"""Fast adversarial training (thesis §5.2, Alg. 5.3, Table 5.11): the ATTA/ATAS perturbation cache
(alignment with crop/flip, ε-ball and box, bit-exact resume), ATAS's step sizes (eq. 5.15-5.16 and the
released clamp), Free-AT's m updates per batch, N-FGSM's unprojected perturbation, GradAlign's
regulariser, YOPO's first-layer adjoint, the catastrophic-overfitting monitor and the Table 5.11
configs."""
import dataclasses
import functools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import table5_11
from configs.common import schedule_config, with_defaults
from jaxrobust.data.augment import apply_crop_flip
from jaxrobust.models import forward_train
from jaxrobust.train import (Objective, ObjectiveOutput, build_run, create_train_state,
                             get_objective, load_trained, make_update_fn, register, train)
from jaxrobust.train import fast_at
from jaxrobust.train.monitors import (CatastrophicOverfittingMonitor,
                                      CatastrophicOverfittingWarning, monitors_from_config)
from test_train import stop_at, tiny_config

EPS = 0.1


# ----------------------------------------------------------------------------- helpers
def _recording_loss(ctx, params, model_state, extra, batch, key, step):
    """ATAS, also storing the perturbation the step trained on and the batch's crop/flip."""
    xa, upd, m = fast_at.cache_attack(ctx, params, model_state, extra, batch, key, step,
                                      adaptive=True)
    logits, new_state = forward_train(ctx.model, params, model_state, xa)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    upd = dict(upd, used=xa - batch["image"], offset=batch["crop_offset"], flip=batch["flip"])
    return loss, ObjectiveOutput(new_state, upd, {"loss": loss, **m})


def _recording_init(ctx, params, n_train, input_shape):
    extra = fast_at.init_cache(ctx, n_train, input_shape, with_v=True, name="atas")
    extra["instance"].update(used=jnp.zeros((n_train,) + tuple(input_shape)),
                             offset=jnp.zeros((n_train, 2), jnp.int32),
                             flip=jnp.zeros((n_train,), bool))
    return extra


register("test_atas_recorded", Objective(init=_recording_init, loss=_recording_loss))


def cache_config(**overrides):
    """digits (8x8x1), fc-32, crop+flip, batch 64: one epoch = 22 steps."""
    return tiny_config(**{"objective.name": "test_atas_recorded", "data.augment": "crop_flip",
                          "data.batch_size": 64, "train.num_steps": 22,
                          "train.checkpoint_every_steps": 11, "threat.eps": EPS,
                          "optimizer.lr": 0.2, **overrides})


def _setup(config):
    """(setup, state) of a config without training (for direct objective calls)."""
    setup = build_run(with_defaults(config))
    state = create_train_state(setup.model, setup.dataset.info.image_shape, setup.tx,
                               setup.objective, setup.ctx, seed=0, n_train=setup.train_size)
    return setup, state


@functools.lru_cache(maxsize=None)
def _shared():
    """One (setup, state) shared by the tests that call objectives directly: digits fc-32 with the
    ATAS cache (δ, seen, v); other methods' settings come from :func:`_ctx`."""
    return _setup(cache_config(**{"objective.name": "atas", "data.augment": "none"}))


def _ctx(setup, **fast):
    """``setup.ctx`` with ``objective.fast`` settings replaced."""
    cfg = ml_collections.ConfigDict(setup.ctx.cfg.to_dict())
    for k, v in fast.items():
        cfg.fast[k] = v
    return dataclasses.replace(setup.ctx, cfg=cfg)


def _with_instance(state, b, **values):
    """``state.extra`` with the batch's rows of extra['instance'] set (δ, seen, v)."""
    inst = dict(state.extra["instance"])
    for k, v in values.items():
        inst[k] = inst[k].at[b["index"]].set(v)
    return {**state.extra, "instance": inst}


def _batch(setup, n=16, augment=False):
    b = setup.dataset.split("train").get(np.arange(n))
    b = {k: jnp.asarray(v) for k, v in b.items()}
    b["mask"] = jnp.ones((n,), bool)
    b["crop_offset"] = jnp.full((n, 2), 4, jnp.int32)
    b["flip"] = jnp.zeros((n,), bool)
    return b


def _train_images(dataset):
    """The training images by dataset index (digits: no validation split, indices 0..n-1)."""
    sp = dataset.split("train")
    b = sp.get(np.arange(len(sp)))
    out = np.zeros((len(sp),) + b["image"].shape[1:], np.float32)
    out[b["index"]] = b["image"]
    return out


# ----------------------------------------------------------------------------- the cache
def test_cache_aligned_with_crop_flip_in_ball_and_box_and_resumes_bit_exactly(tmp_path):
    c = cache_config()
    c.train.monitor.enabled = True  # the monitor rides along (integration: metrics + best_pgd)
    c.train.monitor.every_epochs = 0.5
    c.train.monitor.num_examples = 64
    c.train.monitor.pgd_steps = 3
    full = str(tmp_path / "full")
    train(c, full)  # train.monitor.enabled: the loop builds the monitor from the config
    run = load_trained(full)
    extra, images = run.extra, _train_images(run.dataset)
    inst = {k: np.asarray(v)[:len(images)] for k, v in extra["instance"].items()}
    seen = inst["seen"]
    assert seen.sum() == 22 * 64  # one epoch: every example of the 22 batches visited once
    delta, used = inst["delta"][seen], inst["used"][seen]
    off, flip = inst["offset"][seen], inst["flip"][seen]
    assert len(np.unique(off, axis=0)) > 10 and 0.2 < flip.mean() < 0.8
    # re-augmenting the cached δ_i with the batch's crop/flip gives the δ that step trained on, on
    # every pixel that came from the image (padding pixels are not stored)
    realigned = np.asarray(apply_crop_flip(jnp.asarray(delta), jnp.asarray(off), jnp.asarray(flip)))
    from_image = np.asarray(apply_crop_flip(jnp.ones_like(jnp.asarray(delta)), jnp.asarray(off),
                                            jnp.asarray(flip))) > 0
    assert from_image.mean() > 0.5 and np.abs(used).max() > 0.5 * EPS
    np.testing.assert_array_equal(realigned[from_image], used[from_image])
    # ε-ball and box, for every stored value (the un-augmented frame)
    x = images[seen]
    assert np.abs(delta).max() <= EPS + 1e-6
    assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6
    assert np.all(inst["v"][seen] > 0) and np.all(inst["v"][~seen] == 0)
    # the monitor checked twice, logged to metrics.jsonl and kept its best-PGD state
    lines = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
    mon = [l for l in lines if l["split"] == "monitor"]
    assert [l["step"] for l in mon] == [11, 22] and all("fgsm_accuracy" in l for l in mon)
    assert os.path.isdir(os.path.join(full, "best_pgd", "checkpoints"))
    # killed mid-epoch and resumed == uninterrupted, extra state included (bit-exact)
    res = str(tmp_path / "res")
    assert train(cache_config(), res, callbacks=[stop_at(9)])["stopped_at"] == 9
    train(cache_config(), res)
    b = load_trained(res)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, extra),
                 jax.tree.map(np.asarray, b.extra))


def test_cache_downsampled_and_bf16_storage_and_memory():
    shape = fast_at.cache_shape((224, 224, 3), 32)
    assert shape == (32, 32, 3)
    total, per_dev = fast_at.cache_bytes(1_281_167, (224, 224, 3), 32, "bfloat16", 8, with_v=True)
    rows = -(-1_281_167 // 1024) * 1024
    assert total == rows * (32 * 32 * 3 * 2 + 1 + 4) and per_dev == total // 8
    full, _ = fast_at.cache_bytes(50_000, (32, 32, 3), 0, "float32", 1)
    assert full == 50_176 * (32 * 32 * 3 * 4 + 1)
    with pytest.raises(ValueError, match="cache_resolution needs"):
        fast_at.cache_shape((784,), 16)
    # write → read round trip through a 4x4 bf16 store of a smooth δ is close, and in the ball
    n = 4
    yy, xx = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij")
    smooth = jnp.asarray(np.broadcast_to((0.05 * (yy + xx) / 2)[None, :, :, None], (n, 8, 8, 1)),
                         jnp.float32)
    batch = {"image": jnp.full((n, 8, 8, 1), 0.5), "crop_offset": jnp.full((n, 2), 4, jnp.int32),
             "flip": jnp.zeros((n,), bool)}
    stored = fast_at.write_cache(smooth, jnp.zeros((n, 4, 4, 1), jnp.bfloat16), batch, jnp.bfloat16)
    assert stored.shape == (n, 4, 4, 1) and stored.dtype == jnp.bfloat16
    back = fast_at.read_cache(stored, batch)
    err = jnp.abs(back - smooth)  # bilinear: exact up to the half-pixel border effect
    assert back.shape == (n, 8, 8, 1) and float(err.max()) < 0.015
    assert float(err[:, 1:-1, 1:-1].max()) < 0.007
    assert float(jnp.abs(back).max()) <= 0.05 + 1e-3


def test_atas_with_a_downsampled_bf16_cache(capsys):
    """§5.2.4's ImageNet-scale cache on a crop/flip batch: the memory printed at creation is
    :func:`cache_bytes`'s; the stored δ is (B, 4, 4, 1) bfloat16 inside the ε-ball; the next visit
    starts in ball ∩ box from the up-sampled, re-augmented δ, which keeps the used δ's coarse
    structure (correlated with it, unlike an unrelated δ)."""
    setup, state = _shared()
    ctx = _ctx(setup, cache_resolution=4, cache_dtype="bfloat16")
    n = setup.train_size
    extra = fast_at.init_cache(ctx, n, (8, 8, 1), with_v=True, name="atas")
    total, per_dev = fast_at.cache_bytes(n, (8, 8, 1), 4, "bfloat16", jax.device_count(), True)
    printed = capsys.readouterr().out
    assert f"{n} x 4x4x1 bfloat16 + v = {total / 2 ** 20:.1f} MiB, {per_dev / 2 ** 20:.1f} MiB per device" in printed
    assert extra["instance"]["delta"].shape == (n, 4, 4, 1)
    rng = np.random.default_rng(0)
    b = _batch(setup, 16)
    off = jnp.asarray(rng.integers(0, 9, (16, 2)), jnp.int32)
    flip = jnp.asarray(rng.uniform(size=16) < 0.5)
    b.update(image=apply_crop_flip(b["image"], off, flip), crop_offset=off, flip=flip)
    x = b["image"]

    @jax.jit
    def visit(extra):
        xa, upd, _ = fast_at.cache_attack(ctx, state.params, state.model_state, extra, b,
                                          jax.random.PRNGKey(1), 0, adaptive=True)
        inst = {k: v.at[b["index"]].set(upd[k].astype(v.dtype)) if k in upd else v
                for k, v in extra["instance"].items()}
        start = fast_at.cached_start(ctx, {"instance": inst}, b, ctx.threat, jax.random.PRNGKey(2))
        return xa, upd["delta"], {"instance": inst}, start

    xa1, stored, extra1, start = visit(extra)
    assert stored.dtype == jnp.bfloat16 and stored.shape == (16, 4, 4, 1)
    assert float(jnp.abs(stored.astype(jnp.float32)).max()) <= EPS * (1 + 2 ** -7)
    for xa in (xa1, start):  # the used point and the next visit's start: ball ∩ box
        assert float(jnp.abs(xa - x).max()) <= EPS + 1e-6
        assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    used, back = np.asarray(xa1 - x).ravel(), np.asarray(start - x).ravel()
    unrelated = rng.uniform(-EPS, EPS, used.shape)
    corr = lambda a, c: float(np.corrcoef(a, c)[0, 1])  # noqa: E731
    assert corr(used, back) > 0.25 and abs(corr(unrelated, back)) < 0.1, (corr(used, back),
                                                                          corr(unrelated, back))
    xa2, _, _, _ = visit(extra1)  # the second visit starts from the stored δ: in ball ∩ box
    assert float(jnp.abs(xa2 - x).max()) <= EPS + 1e-6


def test_cache_config_errors():
    setup, _ = _shared()
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        fast_at.init_cache(_ctx(setup, cache_dtype="float16"), 10, (8, 8, 1), with_v=False, name="atta")
    with pytest.raises(ValueError, match="cache_resolution must be an integer >= 0"):
        fast_at.init_cache(_ctx(setup, cache_resolution=-1), 10, (8, 8, 1), with_v=False, name="atta")
    with pytest.raises(ValueError, match="atas_rule must be one of"):
        fast_at.atas_step_size(jnp.zeros(2), 0.1, rule="adam", c=0.01)


# ----------------------------------------------------------------------------- ATAS step sizes
def test_atas_step_sizes_follow_eq_5_16_and_released_clamp():
    eps = 8 / 255
    v_prev = jnp.array([0.0, 0.5, 0.0, 1e-4])
    # gradients with squared l2 norms 4, 0, 0, 1e-4 (hand-computed)
    g = jnp.zeros((4, 2, 2, 1)).at[0, 0, 0, 0].set(2.0).at[3, 1, 1, 0].set(0.01)
    v = fast_at.atas_preconditioner(v_prev, g, 0.5)
    np.testing.assert_allclose(v, [2.0, 0.25, 0.0, 1e-4], rtol=1e-6)  # eq. 5.15, β = 0.5
    # thesis eq. 5.16: α/√(v + C) with α = 2ε√C, C = 0.01
    th = fast_at.atas_step_size(v, eps, rule="thesis", c=0.01, alpha=2.0)
    np.testing.assert_allclose(th, [2 * eps * 0.1 / np.sqrt(2.01), 2 * eps * 0.1 / np.sqrt(0.26),
                                    2 * eps, 2 * eps * 0.1 / np.sqrt(0.0101)], rtol=1e-6)
    # released: clamp(2·(8/255)·c/(c + √v), 4/255, 14/255), c = 0.01
    rel = fast_at.atas_step_size(v, eps, rule="released", c=0.01)
    np.testing.assert_allclose(rel, [4 / 255, 4 / 255, 14 / 255, 8 / 255], rtol=1e-6)
    # the released ImageNet setting (ε = 2/255): clamp(16/255·c/(c + √v), 4/255, 8/255)
    im = fast_at.atas_step_size(v, 2 / 255, rule="released", c=0.01, alpha=8.0, lo=2.0, hi=4.0)
    np.testing.assert_allclose(im, [4 / 255, 4 / 255, 8 / 255, 8 / 255], rtol=1e-6)
    im = fast_at.atas_step_size(jnp.array([0.0002 ** 2]), 2 / 255, rule="released", c=0.0001,
                                alpha=8.0, lo=2.0, hi=4.0)
    np.testing.assert_allclose(im, [16 / 255 / 3], rtol=1e-5)  # 16/255·c/(c + 2c), inside the clamp


def test_atas_objective_uses_hand_computed_v_and_step():
    """On a fixed batch with a cached δ = 0: v_new = β v + (1−β)‖∇_x mean-CE‖², and the step taken is
    α_i·sign(∇) with eq. 5.16's α_i (rule 'thesis') or the released clamp (rule 'released')."""
    setup, state = _shared()
    b = _batch(setup, 16)
    b["image"] = jnp.clip(b["image"], 0.3, 0.7)  # far enough from the box for one step
    v_prev = jnp.where(jnp.arange(16) < 3, 1.0, jnp.linspace(0.0, 2e-4, 16))  # 3 large-v examples
    extra = _with_instance(state, b, seen=True, v=v_prev)  # start from the cached δ = 0
    logits_fn = lambda x: setup.model.apply({"params": state.params, **state.model_state}, x)
    g = jax.grad(lambda x: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(x), b["label"])))(b["image"])
    sq = np.sum(np.square(np.asarray(g, np.float64).reshape(16, -1)), 1)
    v = 0.5 * np.asarray(v_prev) + 0.5 * sq  # eq. 5.15, β = 0.5
    c_rel = float(np.median(np.sqrt(v))) / 2  # a c at which the released rule's middle shows
    thesis = _ctx(setup, atas_rule="thesis", atas_c=1e-6)
    released = _ctx(setup, atas_rule="released", atas_c=c_rel)
    both = jax.jit(lambda: [fast_at.cache_attack(ctx, state.params, state.model_state, extra, b,
                                                 jax.random.PRNGKey(1), 0, adaptive=True)
                            for ctx in (thesis, released)])
    (xa, upd, m), (xr, updr, mr) = both()
    np.testing.assert_allclose(upd["v"], v, rtol=1e-5)
    alpha = 2 * EPS * np.sqrt(1e-6) / np.sqrt(v + 1e-6)
    assert alpha.min() < 0.9 * EPS  # some steps are not cut by the ε-ball
    expect = np.clip(alpha[:, None, None, None] * np.sign(np.asarray(g)), -EPS, EPS)
    np.testing.assert_allclose(np.asarray(xa - b["image"]), expect, atol=1e-6)
    np.testing.assert_allclose(upd["delta"], expect, atol=1e-6)
    # released: clip(2ε·c/(c + √v), ε/2, 1.75ε)
    rel = np.clip(2 * EPS * c_rel / (c_rel + np.sqrt(v)), 0.5 * EPS, 1.75 * EPS)
    assert ((rel > 0.5 * EPS + 1e-6) & (rel < EPS - 1e-6)).sum() >= 4  # unclamped, inside the ball
    assert (rel == np.float64(0.5 * EPS)).sum() == 3  # and the lower clamp (the large-v ones)
    np.testing.assert_allclose(updr["v"], v, rtol=1e-5)
    np.testing.assert_allclose(float(mr["step_size"]), rel.mean(), rtol=1e-5)
    expect = np.clip(rel[:, None, None, None] * np.sign(np.asarray(g)), -EPS, EPS)
    np.testing.assert_allclose(np.asarray(xr - b["image"]), expect, atol=1e-6)


def test_atta_takes_k_steps_from_the_cached_start():
    setup, state = _shared()
    ctx = _ctx(setup, cache_steps=2, atta_step=0.3)
    b = _batch(setup, 16)
    start = 0.05 * jnp.sign(jax.random.normal(jax.random.PRNGKey(2), (16, 8, 8, 1)))
    extra = _with_instance(state, b, delta=start, seen=True)
    xa, upd, _ = jax.jit(lambda: fast_at.cache_attack(ctx, state.params, state.model_state, extra, b,
                                                      jax.random.PRNGKey(1), 0, adaptive=False))()
    logits_fn = lambda x: setup.model.apply({"params": state.params, **state.model_state}, x)
    grad = jax.grad(lambda x: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(x), b["label"])))
    x = b["image"]
    e = jnp.clip(x + start, 0.0, 1.0)
    for _ in range(2):  # two signed steps of 0.3ε from the cached start, projected
        e = jnp.clip(jnp.clip(e + 0.3 * EPS * jnp.sign(grad(e)), x - EPS, x + EPS), 0.0, 1.0)
    np.testing.assert_allclose(xa, e, atol=1e-6)
    np.testing.assert_allclose(upd["delta"], e - x, atol=1e-6)
    assert bool(jnp.all(upd["seen"]))


def test_atas_released_warmup_and_cache_reset_epochs():
    """The released code's schedule: a constant step ε with v untouched during the warm-up epochs;
    the cache re-drawn (uniform start) in the listed 1-based epochs."""
    setup, state = _shared()
    ctx = _ctx(setup, atas_warmup_epochs=1, atas_warmup_step=1.0, cache_reset_at=(3,))
    b = _batch(setup, 16)
    spe = setup.train_size // 16
    extra = _with_instance(state, b, seen=True, v=0.5)  # cached δ = 0: the start is x itself
    run = jax.jit(lambda step: fast_at.cache_attack(ctx, state.params, state.model_state, extra, b,
                                                    jax.random.PRNGKey(1), step, adaptive=True))
    xa, upd, m = run(spe - 1)  # epoch 1 (1-based): warm-up
    np.testing.assert_array_equal(upd["v"], np.full(16, 0.5, np.float32))
    assert float(m["step_size"]) == pytest.approx(EPS)
    np.testing.assert_allclose(np.abs(np.asarray(xa - b["image"])).max(axis=(1, 2, 3)), EPS, atol=1e-6)
    xa2, upd2, m2 = run(spe)  # epoch 2: adaptive, from the cache (δ = 0 start: one step of α_i)
    assert np.all(np.asarray(upd2["v"]) < 0.5) and float(m2["step_size"]) != pytest.approx(EPS)
    step2 = np.abs(np.asarray(xa2 - b["image"])).reshape(16, -1).max(1)
    assert np.all(step2 <= EPS + 1e-6) and np.all(step2 > 0)
    xa3, _, _ = run(2 * spe)  # epoch 3: the cache is re-drawn: a uniform start, not x
    d3 = np.asarray(xa3 - b["image"]).reshape(16, -1)
    assert np.unique(np.round(np.abs(d3[np.abs(d3) < EPS - 1e-4]), 6)).size > 100
    xa4, upd4, _ = run(3 * spe)  # epoch 4: from the cache (x) again: one step of α_i(v)
    alpha4 = np.asarray(fast_at.atas_step_size(upd4["v"], EPS, rule="released", c=0.01))
    np.testing.assert_allclose(np.abs(np.asarray(xa4 - b["image"])).reshape(16, -1).max(1),
                               np.minimum(alpha4, EPS), rtol=1e-5)


# ----------------------------------------------------------------------------- Free / N-FGSM / GA
def _free_config(m):
    c = cache_config(**{"objective.name": "free", "data.augment": "none"})
    c.objective.fast.free_replays = m
    c.schedule = schedule_config("constant")
    return c


def test_free_makes_m_optimizer_updates_per_batch():
    """Free with m replays = m real optimizer updates on the batch (here SGD with momentum 0.9:
    exact for any optimizer), δ carried over between replays and cached for the next visit."""
    m, lr, mu = 3, 0.2, 0.9
    assert build_run(with_defaults(_free_config(m))).objective.replays == m  # replays = free_replays
    setup, state = _shared()
    objective = dataclasses.replace(get_objective("free"), replays=m)
    b = _batch(setup, 32)
    key = jax.random.PRNGKey(3)
    tx = optax.sgd(lr, momentum=mu)
    state = state.replace(opt_state=tx.init(state.params), tx=tx, key=key)
    update = jax.jit(make_update_fn(setup.ctx, objective, lambda s: lr, "none"))
    new_state, metrics = update(state, b)
    assert int(new_state.step) == 1  # one loop step ...
    # ... = m sequential momentum-SGD updates written out by hand, δ carried over between replays
    k_obj = jax.random.split(jax.random.fold_in(key, 0))[1]
    threat = setup.ctx.threat
    x, y, ms = b["image"], b["label"], state.model_state

    def ce(p, xin):
        logits, _ = forward_train(setup.model, p, ms, xin)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @jax.jit
    def by_hand(theta):
        xa = fast_at.cached_start(setup.ctx, state.extra, b, threat, jax.random.fold_in(k_obj, 0))
        one = jax.tree.map(lambda t, g: t - lr * g, theta, jax.grad(ce)(theta, xa))  # 1 update
        vel = jax.tree.map(jnp.zeros_like, theta)
        for _ in range(m):
            gp, gx = jax.grad(ce, argnums=(0, 1))(theta, xa)
            vel = jax.tree.map(lambda v, g: g + mu * v, vel, gp)
            theta = jax.tree.map(lambda t, v: t - lr * v, theta, vel)
            xa = jnp.clip(jnp.clip(xa + EPS * jnp.sign(gx), x - EPS, x + EPS), 0.0, 1.0)
        return theta, xa, one

    theta, xa, one = by_hand(state.params)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6),
                 new_state.params, theta)
    # ... which is not what a single update does
    assert not np.allclose(new_state.params["Dense_0"]["kernel"], one["Dense_0"]["kernel"], atol=1e-5)
    # the carried δ is cached for the example's next visit
    d = np.asarray(new_state.extra["instance"]["delta"])[np.asarray(b["index"])]
    np.testing.assert_allclose(d, np.asarray(xa - x), atol=1e-6)


def test_free_replays_must_be_positive():
    c = _free_config(0)
    with pytest.raises(ValueError, match="free_replays"):
        build_run(with_defaults(c))


def test_nfgsm_perturbation_exceeds_eps_but_at_most_3eps():
    setup, state = _shared()
    b = _batch(setup, 64)
    (xa, eps), (xr, _) = jax.jit(lambda: [fn(setup.ctx, state.params, state.model_state, b,
                                             jax.random.PRNGKey(0), 0)
                                          for fn in (fast_at.nfgsm_points, fast_at.fgsm_rs_points)])()
    dist = np.abs(np.asarray(xa - b["image"])).reshape(64, -1).max(1)
    assert float(eps) == pytest.approx(EPS)
    assert (dist > EPS * 1.01).mean() > 0.5  # no projection back onto the ε-ball
    assert dist.max() <= 3 * EPS + 1e-6  # noise 2ε + step ε
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    # FGSM-RS, for contrast, projects: ‖δ‖ ≤ ε
    assert float(jnp.abs(xr - b["image"]).max()) <= EPS + 1e-6


def test_grad_align_regulariser_zero_for_parallel_gradients():
    rng = np.random.default_rng(0)
    g, h = (jnp.asarray(rng.normal(size=(5, 4, 4, 3)), jnp.float32) for _ in range(2))
    mixed = g.at[0].set(-g[0])
    reg = jax.jit(lambda: [fast_at.grad_align_regulariser(g, 3.0 * g),
                           fast_at.grad_align_regulariser(g, -g),
                           fast_at.grad_align_regulariser(g, h),
                           fast_at.grad_align_regulariser(g, mixed, jnp.arange(5) > 0),
                           fast_at.grad_align_regulariser(g, mixed)])()
    parallel, opposite, random, masked, unmasked = (float(r) for r in reg)
    assert parallel == pytest.approx(0.0, abs=1e-6) and opposite == pytest.approx(2.0, abs=1e-6)
    assert 0.5 < random < 1.5  # ~orthogonal in high dimension
    # masked rows do not count (row 0 is anti-parallel: 2 / 5 unmasked)
    assert masked == pytest.approx(0.0, abs=1e-6) and unmasked == pytest.approx(0.4, abs=1e-6)


def test_fgsm_ga_loss_adds_lambda_times_regulariser():
    setup, state = _shared()
    ctx = _ctx(setup, ga_lambda=0.5)
    b = _batch(setup, 16)
    loss, out = jax.jit(lambda: fast_at.fgsm_ga_loss(ctx, state.params, state.model_state, state.extra,
                                                     b, jax.random.PRNGKey(0), 0))()
    mt = out.metrics
    assert float(mt["grad_align"]) > 0
    np.testing.assert_allclose(loss, mt["ce"] + 0.5 * mt["grad_align"], rtol=1e-6)


def test_yopo_gradients_equal_a_hand_computation():
    """YOPO-2-2 on fc-32 (digits): the gradient the objective hands to the loop equals Zhang et al.'s
    Alg. 1 written out in numpy: every layer but the first from the full passes at η^{j,0}; the first
    layer from the Hamiltonian ⟨p_j, f₀(x + η^{j,n})⟩ at the end of the inner steps (x'ᵀp_j, Σp_j);
    the inner steps η ← Π(η + σ·sign(p_j W₀ᵀ)); both averaged over j (digits: identity
    normalisation, so f₀(x) = x W₀ + b₀)."""
    m, n, sigma = 2, 2, 0.3
    setup, state = _shared()
    ctx = _ctx(setup, yopo_m=m, yopo_n=n, yopo_step=sigma)
    b = _batch(setup, 16)
    key = jax.random.PRNGKey(0)
    v = {"params": state.params, **state.model_state}
    path = []

    @jax.jit
    def run(prm):
        path.append(fast_at.first_layer_path(setup.model, v, b["image"]))
        (loss, out), grads = jax.value_and_grad(lambda q: fast_at.yopo_loss(
            ctx, q, state.model_state, state.extra, b, key, 0), has_aux=True)(prm)
        eta0 = setup.ctx.threat.random_init(key, b["image"])
        return fast_at.first_layer_output(setup.model, v, b["image"]), loss, out, grads, eta0

    z, loss, out, grads, eta0 = run(state.params)
    assert path == [("Dense_0",)]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
    W0, b0, W1, b1 = p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["Dense_1"]["kernel"], p["Dense_1"]["bias"]
    x = np.asarray(b["image"], np.float64).reshape(16, -1)
    np.testing.assert_allclose(z, x @ W0 + b0, atol=1e-5)
    onehot = np.eye(10)[np.asarray(b["label"])]

    def full_pass(xin):  # mean CE of relu(xin W0 + b0) W1 + b1: gradients by hand
        zz = xin @ W0 + b0
        h = np.maximum(zz, 0)
        logits = h @ W1 + b1
        e = np.exp(logits - logits.max(1, keepdims=True))
        dlogits = (e / e.sum(1, keepdims=True) - onehot) / 16
        adj = (dlogits @ W1.T) * (zz > 0)
        return h.T @ dlogits, dlogits.sum(0), adj

    eta = np.asarray(eta0, np.float64).reshape(16, -1) - x
    want = {k: np.zeros_like(w) for k, w in (("W0", W0), ("b0", b0), ("W1", W1), ("b1", b1))}
    first_at_start = np.zeros_like(W0)
    for _ in range(m):
        gW1, gb1, adj = full_pass(x + eta)
        first_at_start += (x + eta).T @ adj / m  # what the full pass alone would give θ₀
        for _ in range(n):
            eta = np.clip(np.clip(eta + sigma * EPS * np.sign(adj @ W0.T), -EPS, EPS) + x, 0, 1) - x
        want["W0"] += (x + eta).T @ adj / m
        want["b0"] += adj.sum(0) / m
        want["W1"] += gW1 / m
        want["b1"] += gb1 / m
    got = {"W0": grads["Dense_0"]["kernel"], "b0": grads["Dense_0"]["bias"],
           "W1": grads["Dense_1"]["kernel"], "b1": grads["Dense_1"]["bias"]}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-7, err_msg=k)
    # the first-layer term is not the full pass's gradient (the inner steps moved η)
    assert np.abs(first_at_start - want["W0"]).max() > 0.05 * np.abs(want["W0"]).max()
    assert float(out.metrics["delta_linf"]) == pytest.approx(EPS, rel=1e-5)  # 2x2 steps of 0.3ε
    assert np.isfinite(float(loss)) and float(out.metrics["eps"]) == pytest.approx(EPS)


def test_yopo_adjoint_probe_and_first_layer_of_a_conv_stem():
    """The adjoint probe ∂L/∂ξ equals ∂L/∂z₁ computed from z₁; on a conv net (cnn_small) the first
    layer is the first Conv, the Hamiltonian gradient vanishes on every other layer and equals the
    vjp of the conv w.r.t. its kernel."""
    from jaxrobust.models import create_model
    model = create_model("cnn_small", 10, mean=(0.3,), std=(0.2,))  # 8x8 -> 4x4x16 -> 2x2x32
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(4, 8, 8, 1)), jnp.float32)
    y, mask = jnp.array([0, 3, 5, 9]), jnp.ones(4, bool)
    # parameters drawn in numpy (compiling flax's initialisers costs more than the test)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), x)["params"]
    k1 = jax.tree.map(lambda sd: jnp.asarray(rng.normal(size=sd.shape) / np.sqrt(
        np.prod(sd.shape[:-1]) if len(sd.shape) > 1 else 10.0), jnp.float32), shapes)
    v, model_state = {"params": k1}, {}
    xn = (x - 0.3) / 0.2
    conv = lambda h, kern, s: jax.lax.conv_general_dilated(  # noqa: E731
        h, kern, (s, s), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def tail(zz):  # the network after its first conv, written out
        h = jax.nn.relu(zz)
        h = jax.nn.relu(conv(h, k1["Conv_1"]["kernel"], 2) + k1["Conv_1"]["bias"])
        h = jax.nn.relu(h.reshape(4, -1) @ k1["Dense_0"]["kernel"] + k1["Dense_0"]["bias"])
        return h @ k1["Dense_1"]["kernel"] + k1["Dense_1"]["bias"]

    path = []

    @jax.jit
    def everything():
        path.append(fast_at.first_layer_path(model, v, x))
        z = fast_at.first_layer_output(model, v, x)
        adj = jax.grad(lambda xi: fast_at.probed_loss(model, k1, model_state, x, y, mask, xi)[0])(
            jnp.zeros_like(z))
        by_hand = jax.grad(lambda zz: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            tail(zz), y)))(z)
        g = fast_at.yopo_hamiltonian_grad(model, k1, model_state, x, adj)
        # ∇_K ⟨p, conv(x_n, K)⟩ through lax's own convolution (not the model)
        g_conv = jax.grad(lambda kern: jnp.sum(adj * conv(xn, kern, 2)))(k1["Conv_0"]["kernel"])
        return dict(z=z, z_lax=conv(xn, k1["Conv_0"]["kernel"], 2) + k1["Conv_0"]["bias"],
                    tail=tail(z), logits=model.apply(v, x), adj=adj, by_hand=by_hand, g=g,
                    g_conv=g_conv)

    r = everything()
    assert path == [("Conv_0",)]
    np.testing.assert_allclose(r["z"], r["z_lax"], atol=1e-5)
    np.testing.assert_allclose(r["tail"], r["logits"], atol=1e-5)
    np.testing.assert_allclose(r["adj"], r["by_hand"], atol=1e-6)
    g = r["g"]
    assert all(float(jnp.abs(l).max()) == 0 for k, sub in g.items() if k != "Conv_0"
               for l in jax.tree.leaves(sub))
    np.testing.assert_allclose(g["Conv_0"]["kernel"], r["g_conv"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g["Conv_0"]["bias"], jnp.sum(r["adj"], (0, 1, 2)), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- the monitor
class _FakeState:
    def __init__(self, tag):
        self.params = {"w": jnp.full((2,), float(tag))}

    def variables(self):
        return {"params": self.params}

    def checkpoint_tree(self):
        return {"params": self.params}


def test_monitor_detects_constructed_collapse(tmp_path):
    """Scripted accuracies: PGD climbs to 0.45 at step 3, then falls to 0.10 while FGSM jumps to
    0.90 (catastrophic overfitting): a warning, a logged collapse, and best_pgd = the step-3 state."""
    model = _Linear()
    x = np.random.default_rng(0).uniform(size=(8, 2)).astype(np.float32)
    mon = CatastrophicOverfittingMonitor(model, _threat(), x,
                                         np.zeros(8, np.int32), every_steps=1,
                                         workdir=str(tmp_path), drop=0.2, pgd_steps=2)
    script = {1: (0.8, 0.40, 0.30), 2: (0.8, 0.45, 0.40), 3: (0.8, 0.50, 0.45),
              4: (0.8, 0.55, 0.35), 5: (0.9, 0.90, 0.10)}
    mon._acc = lambda variables, xx, yy, key: script[int(variables["params"]["w"][0])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stops = [mon(s, _FakeState(s)) for s in range(1, 5)]
        assert not any(issubclass(w.category, CatastrophicOverfittingWarning) for w in caught)
        assert not mon.collapsed  # step 4: PGD −10 points is not a collapse
        stops.append(mon(5, _FakeState(5)))
    assert [issubclass(w.category, CatastrophicOverfittingWarning) for w in caught].count(True) == 1
    assert mon.collapsed and mon.collapses[0]["step"] == 5 and not any(stops)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["collapse"] for l in lines] == [0, 0, 0, 0, 1]
    assert lines[-1]["collapse_drop"] == 1 and lines[-1]["fgsm_pgd_gap"] == pytest.approx(0.8)
    rec = json.load(open(tmp_path / "co_monitor.json"))
    assert rec["best"]["step"] == 3 and rec["collapses"][0]["pgd_accuracy"] == 0.10
    assert rec["num_collapses"] == 1 and rec["first_collapse_step"] == 5 and rec["seconds"] > 0
    # a resumed run's monitor continues from the record (best, collapses, time spent)
    again = CatastrophicOverfittingMonitor(model, _threat(), x, np.zeros(8, np.int32), every_steps=1,
                                           workdir=str(tmp_path))
    assert again.best["step"] == 3 and len(again.collapses) == 1 and again.seconds == rec["seconds"]
    again.close()
    from jaxrobust.train.checkpoint import Checkpointer
    mon.close()
    ck = Checkpointer(str(tmp_path / "best_pgd"))
    assert ck.latest_step() == 3
    np.testing.assert_array_equal(ck.restore({"params": {"w": jnp.zeros(2)}})["params"]["w"], [3, 3])
    ck.close()
    # FGSM falling with PGD is a plain accuracy drop, not catastrophic overfitting; stop_on_collapse
    mon2 = CatastrophicOverfittingMonitor(model, _threat(), x, np.zeros(8, np.int32), every_steps=1,
                                          stop_on_collapse=True)
    mon2._acc = lambda variables, xx, yy, key: {1: (0.8, 0.6, 0.5), 2: (0.5, 0.3, 0.1),
                                                3: (0.8, 0.7, 0.05)}[int(variables["params"]["w"][0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [mon2(s, _FakeState(s)) for s in (1, 2, 3)] == [False, False, True]
    # a run that overfits before its PGD accuracy ever rose: only the FGSM-PGD gap criterion sees it
    for gap, expect in ((0.5, 1), (0.0, 0)):
        mon3 = CatastrophicOverfittingMonitor(model, _threat(), x, np.zeros(8, np.int32),
                                              every_steps=1, gap=gap)
        mon3._acc = lambda variables, xx, yy, key: (0.95, 0.83, 0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = mon3.check(1, None)
        assert rec["collapse"] == rec["collapse_gap"] == expect and rec["collapse_drop"] == 0


class _Linear:
    """A linear model with the zoo's ``apply(variables, x, train=...)`` signature."""

    def apply(self, variables, x, train=False):
        p = variables["params"]
        return x @ p["kernel"] + p["bias"]


def _threat():
    from jaxrobust.threat import ThreatModel
    return ThreatModel(norm="linf", eps=0.1, box=(0.0, 1.0))


def test_monitor_measures_real_accuracies():
    """With a real model, FGSM/PGD accuracies are ≤ clean and PGD ≤ FGSM on a linear model (PGD-10
    with restarts finds at least FGSM's linear-model optimum up to the box)."""
    model = _Linear()
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int32)
    variables = {"params": {"kernel": jnp.asarray([[-10.0, 10.0], [0, 0], [0, 0], [0, 0]]),
                            "bias": jnp.asarray([5.0, -5.0])}}
    mon = CatastrophicOverfittingMonitor(model, _threat(), x, y, every_steps=1, pgd_steps=10)
    rec = mon.check(1, variables)
    assert rec["clean_accuracy"] == 1.0
    # the margin is 20|x0 − 0.5|; an l_inf step of 0.1 flips exactly the examples within 0.1 of 0.5
    expect = float(np.mean(np.abs(x[:, 0] - 0.5) > 0.1))
    assert rec["fgsm_accuracy"] == pytest.approx(expect) and rec["pgd_accuracy"] == pytest.approx(expect)


def test_monitor_config_errors():
    with pytest.raises(ValueError, match="drop must be in"):
        CatastrophicOverfittingMonitor(None, _threat(), np.zeros((2, 2)), np.zeros(2), every_steps=1,
                                       drop=20)
    with pytest.raises(ValueError, match="every_steps"):
        CatastrophicOverfittingMonitor(None, _threat(), np.zeros((2, 2)), np.zeros(2), every_steps=0)
    c = with_defaults(cache_config())
    assert monitors_from_config(c, None, None) == []  # disabled by default
    c.train.monitor.enabled = True
    c.train.monitor.split = "nope"
    setup = build_run(c)
    with pytest.raises(ValueError, match="not a split"):
        monitors_from_config(c, None, setup)


# ----------------------------------------------------------------------------- Table 5.11 configs
def test_table5_11_configs():
    c = table5_11.get_config("cifar10_rn18_atas")
    assert c.objective.name == "atas" and c.threat.eps == pytest.approx(8 / 255)
    assert c.train.num_epochs == 30 and c.schedule.name == "cyclic" and c.data.augment == "crop_flip"
    assert c.objective.fast.atas_rule == "released" and c.objective.fast.atas_c == 0.01
    assert c.objective.fast.atas_warmup_epochs == 5 and tuple(c.objective.fast.cache_reset_at) == (10, 20)
    im = table5_11.get_config("imagenet_rn50_atas")
    assert im.threat.eps == pytest.approx(2 / 255) and im.objective.fast.atas_c == 0.1
    assert im.objective.fast.cache_resolution == 32 and im.train.num_epochs == 90
    assert im.eval.splits == ("validation",) and im.train.monitor.split == "validation"
    assert (im.objective.fast.atas_alpha * im.threat.eps, im.objective.fast.atas_max_step
            * im.threat.eps) == pytest.approx((16 / 255, 8 / 255))
    assert c.model.name == "preact_resnet18"
    # Free: the epochs divided by m (same number of passes); m optimizer updates per batch
    for ds, m in (("cifar10", 8), ("imagenet", 4)):
        f = table5_11.get_config(f"{ds}_rn18_free")
        assert f.objective.fast.free_replays == m
        assert f.train.num_epochs * m == table5_11.FREE_PASSES[ds]
    assert table5_11.get_config("cifar10_wrn28_yopo").train.num_epochs == 12
    assert table5_11.get_config("cifar10_rn18_pgd10").objective.attack.steps == 10
    assert table5_11.get_config("cifar100_rn18_fgsm_ga").objective.fast.ga_lambda == 0.5
    for name in table5_11.METHODS:
        cfg = table5_11.get_config(f"mnist5k_cnn_{name},smoke")
        assert cfg.objective.name in fast_at.FAST_AT_OBJECTIVES and cfg.train.num_steps > 0
    # options: a shortened protocol keeps Free's and YOPO's ratio of passes; ε moves PGD-10's step
    short = {m: table5_11.get_config(f"fashion_mnist_cnn_{m},epochs=4") for m in ("atas", "free", "yopo")}
    assert short["atas"].train.num_epochs == 4
    assert short["free"].train.num_epochs == pytest.approx(40 / 8 * 4 / 20)
    assert short["yopo"].train.num_epochs == pytest.approx(8 * 4 / 20)
    p = table5_11.get_config("mnist5k_cnn_pgd10,eps=0.2")
    assert p.threat.eps == 0.2 and p.objective.attack.step_size == pytest.approx(0.05)
    for bad, msg in (("mnist5k_cnn_atas,eps=-1", "must be > 0"), ("mnist5k_cnn_atas,eps=x", "needs a number"),
                     ("mnist5k_cnn_atas,fast", "Unknown config variant")):
        with pytest.raises(ValueError, match=msg):
            table5_11.get_config(bad)
    with pytest.raises(ValueError, match="expected <dataset>_<net>_<method>"):
        table5_11.get_config("cifar10_rn18")
    with pytest.raises(ValueError, match="Unknown method"):
        table5_11.get_config("cifar10_rn18_sgd")


def test_table5_11_row_sets_and_claims():
    from experiments.reproduce import validate
    for name in table5_11.ROW_SETS:
        for arg in (name, name + ",smoke"):
            r = table5_11.get_config(arg).reproduce
            validate(r)  # every row's config file exists, steps and columns are well formed
            for row in r.rows.values():  # and every row's training config builds
                path, _, run_arg = row.train.partition(":")
                assert path == "configs/table5_11.py"
                table5_11.get_config(run_arg)
    main = table5_11.get_config("mnist5k_cnn").reproduce
    assert sorted(main.rows) == sorted(table5_11.METHODS)
    assert main.rows.atas.thesis[:4] == (81.22, 50.03, 48.18, 45.38)
    assert dict(main.steps.aa.items())["overrides"] == ("output=eval_aa.json", "num_examples=500")
    co = table5_11.get_config("mnist5k_cnn_co").reproduce
    assert "fgsm_rs_eps0p4" in co.rows and co.rows.fgsm_rs_eps0p4.train.endswith(",eps=0.4")
    # claims on constructed means: ATAS best and not collapsed where FGSM-RS collapsed
    row = lambda aa, t, co: {"AA": aa, "PGD50": aa, "Time (min)": t, "CO checks": co}  # noqa: E731
    means = {"atas": row(30, 10, 0), "fgsm_rs": row(1, 9, 4), "atta": row(25, 10, 0),
             "free": row(20, 9, 0), "yopo": row(18, 8, 0), "fgsm_ga": row(28, 20, 0),
             "pgd10": row(31, 40, 0)}
    got = {c["claim"]: c["holds"] for c in table5_11.claims(means)}
    assert len(got) == 6 and all(got.values()), got
    means["atas"] = row(20, 20, 2)
    got = {c["claim"]: c["holds"] for c in table5_11.claims(means) if "ATAS" in c["claim"]}
    assert len(got) == 5 and not any(got.values()), got
    means["fgsm_rs"]["CO checks"] = 0  # nothing collapsed: the CO claim is not tested (n/a)
    assert [c["holds"] for c in table5_11.claims(means) if "overfitting" in c["claim"]] == [None]
    sweep = {"fgsm_rs_eps0p1": {"CO checks": 0, "PGD10": 80}, "atas_eps0p1": {"CO checks": 0, "PGD10": 81},
             "fgsm_rs_eps0p3": {"CO checks": 3, "PGD10": 2}, "atas_eps0p3": {"CO checks": 0, "PGD10": 30}}
    assert [c["holds"] for c in table5_11.claims_co(sweep)] == [True, True, True]
    sweep["atas_eps0p3"] = {"CO checks": 1, "PGD10": 1}
    assert [c["holds"] for c in table5_11.claims_co(sweep)] == [True, False, False]


@pytest.mark.slow
def test_table5_11_smoke_run(tmp_path):
    s = train(table5_11.get_config("mnist5k_cnn_atas,smoke"), str(tmp_path))
    assert s["steps"] == table5_11.get_config("mnist5k_cnn_atas,smoke").train.num_steps
    assert 0.0 <= s["eval"]["test"]["pgd_accuracy"] <= s["eval"]["test"]["clean_accuracy"]


@pytest.mark.slow
def test_table5_11_cifar10_and_imagenet_smoke_on_mock_data(tmp_path, capsys):
    import tensorflow_datasets as tfds
    # the cache on crop/flip; the adjoint probe on a conv stem; ImageNet's 32x32 bf16 cache of 224x224
    for arg in ("cifar10_rn18_atas", "cifar10_rn18_yopo", "imagenet_rn50_atas"):
        with tfds.testing.mock_data(num_examples=32):
            s = train(table5_11.get_config(f"{arg},smoke"), str(tmp_path / arg))
        held_out = "test" if "cifar" in arg else "validation"
        assert s["steps"] == 4 and 0.0 <= s["eval"][held_out]["pgd_accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert "[atas] perturbation cache: 32 x 32x32x3 bfloat16 + v" in printed
    inst = load_trained(str(tmp_path / "imagenet_rn50_atas")).extra["instance"]
    assert inst["delta"].shape[1:] == (32, 32, 3) and inst["delta"].dtype == jnp.bfloat16
    assert float(jnp.abs(inst["delta"].astype(jnp.float32)).max()) <= 2 / 255 * (1 + 2 ** -7)


@pytest.mark.slow
def test_fgsm_rs_overfits_catastrophically_on_mnist5k_at_eps_0_3_and_atas_does_not(tmp_path):
    """mnist5k, small CNN, ε = 0.3, Adam 1e-3 cyclic, 8 epochs (~40 s each on 2 CPU cores): FGSM-RS
    (α = 1.25ε) reaches high FGSM but near-zero PGD accuracy on held-out data and the monitor reports
    it (gap criterion; measured at 10 epochs: FGSM 0.83 / PGD 0.05); ATAS keeps them close
    (measured: FGSM 0.45 / PGD 0.17) and is not flagged."""
    out = {}
    for method in ("fgsm_rs", "atas"):
        c = with_defaults(table5_11.get_config(f"mnist5k_cnn_{method}"))
        c.train.num_epochs, c.train.eval_every_epochs, c.train.tensorboard = 8.0, 0.0, False
        c.train.monitor.every_epochs, c.train.monitor.pgd_steps = 2.0, 10
        c.eval.num_examples = 200
        wd = str(tmp_path / method)
        mons = monitors_from_config(c, wd, build_run(c))
        c.train.monitor.enabled = False  # the monitor is passed explicitly (to inspect it after)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(c, wd, callbacks=mons)
        out[method] = (mons[0], [w for w in caught
                                 if issubclass(w.category, CatastrophicOverfittingWarning)])
        mons[0].close()
    co, warned = out["fgsm_rs"]
    assert co.collapsed and warned and co.history[-1]["fgsm_pgd_gap"] > 0.5
    assert co.history[-1]["pgd_accuracy"] < 0.15
    atas, warned = out["atas"]
    assert not atas.collapsed and not warned
    assert atas.history[-1]["pgd_accuracy"] > co.history[-1]["pgd_accuracy"]


@pytest.mark.slow
def test_cache_sharded_on_4_devices_equals_1_device(tmp_path):
    import subprocess
    import sys
    import textwrap
    from test_train import REPO
    code = textwrap.dedent(f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_fast_at import cache_config
        from jaxrobust.train import train, load_trained
        specs = {{}}
        def grab(step, state):
            specs['delta'] = state.extra['instance']['delta'].sharding.spec
        train(cache_config(**{{'train.num_steps': 6}}), sys.argv[1], callbacks=[grab])
        inst = load_trained(sys.argv[1]).extra['instance']
        np.savez(sys.argv[1] + '/inst.npz', **{{k: np.asarray(v) for k, v in inst.items()}})
        print('devices', jax.device_count(), 'spec', specs['delta'])
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "four")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 4 spec P('data',)" in out.stdout, out.stdout
    train(cache_config(**{"train.num_steps": 6}), str(tmp_path / "one"))
    one = {k: np.asarray(v) for k, v in load_trained(str(tmp_path / "one")).extra["instance"].items()}
    four = np.load(str(tmp_path / "four" / "inst.npz"))
    np.testing.assert_array_equal(one["seen"], four["seen"])
    np.testing.assert_allclose(one["v"], four["v"], rtol=1e-4, atol=1e-12)
    close = np.isclose(one["delta"], four["delta"], atol=1e-6)
    assert close.mean() > 0.999  # signed steps: equal up to a sign flip where a gradient is ~0
