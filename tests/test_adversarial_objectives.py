"""TRADES, MART, AWP and EMA objectives (jaxrobust/train/adversarial.py) and the ε schedulers of thesis
eq. 4.29: losses against direct numpy evaluations on a fixed batch and perturbation, AWP's weight
perturbation living only inside the loss, EMA against a numpy EMA of the parameter trajectory, and
every objective training end to end through ``train`` and resuming bit-exactly."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import base_config, schedule_config, with_defaults
from jaxrobust import models as jmodels
from jaxrobust.threat import ThreatModel
from jaxrobust.train import (Objective, ObjectiveContext, ObjectiveOutput, create_train_state,
                             get_objective, load_trained, make_scalar_schedule, make_update_fn, train)
from jaxrobust.train import adversarial as adv
from jaxrobust.train.objectives import standard_loss
from test_train import stop_at, tiny_config

D_IN, K, B = 12, 5, 8


# ----------------------------------------------------------------------------- fixtures
def _ctx(norm="linf", eps=0.1, **cfg):
    c = with_defaults(base_config()).objective
    c.attack.steps = 3
    for k, v in cfg.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    model = jmodels.create_model("fc", K, widths=(16,))
    return ObjectiveContext(model=model, threat=ThreatModel(norm=norm, eps=eps, box=(0.0, 1.0)),
                            schedules={"eps": lambda s: jnp.asarray(eps, jnp.float32)}, cfg=c,
                            num_classes=K)


def _params(ctx, seed=0):
    return jmodels.init_variables(ctx.model, jax.random.PRNGKey(seed), (D_IN,))["params"]


def _batch(seed=1):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.uniform(kx, (B, D_IN))
    y = jax.random.randint(ky, (B,), 0, K)
    mask = jnp.arange(B) < B - 1  # one padded row: excluded from every mean
    return {"image": x, "label": y, "mask": mask, "index": jnp.arange(B)}


def _x_adv(batch, seed=2, eps=0.1):
    d = jax.random.uniform(jax.random.PRNGKey(seed), batch["image"].shape, minval=-eps, maxval=eps)
    return jnp.clip(batch["image"] + d, 0.0, 1.0)


# ----------------------------------------------------------------------------- numpy references
def _np(t):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), t)


def np_logits(p, x):
    h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_mean(v, m):
    return (v * m).sum() / m.sum()


def np_trades(p, x, xa, y, m, beta):
    z, za = np_logits(p, x), np_logits(p, xa)
    lp, lq = np_log_softmax(z), np_log_softmax(za)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    return np_mean(np_ce(z, y), m) + beta * np_mean(kl, m)


def np_mart(p, x, xa, y, m, beta):
    """Line by line the reference MART code (argsort for the most probable wrong class)."""
    z, za = np_logits(p, x), np_logits(p, xa)
    adv_probs = np.exp(np_log_softmax(za))
    tmp1 = np.argsort(adv_probs, axis=1)[:, -2:]
    new_y = np.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = np_ce(za, y) - np.log(1.0001 - adv_probs[np.arange(len(y)), new_y] + 1e-12)
    nat_probs = np.exp(np_log_softmax(z))
    true_probs = nat_probs[np.arange(len(y)), y]
    kl = (nat_probs * (np.log(nat_probs) - np.log(adv_probs + 1e-12))).sum(1)
    return np_mean(loss_adv, m) + beta * np_mean(kl * (1.0000001 - true_probs), m)


def np_at(p, x, xa, y, m, beta):
    return np_mean(np_ce(np_logits(p, xa), y), m)


def np_grad(f, p, h=1e-6):
    """Central finite differences of a float64 numpy function of the parameter dict."""
    g = jax.tree.map(np.zeros_like, p)
    for layer in p:
        for name in p[layer]:
            a = p[layer][name]
            for i in np.ndindex(a.shape):
                old = a[i]
                a[i] = old + h
                up = f(p)
                a[i] = old - h
                down = f(p)
                a[i] = old
                g[layer][name][i] = (up - down) / (2 * h)
    return g


# ----------------------------------------------------------------------------- losses vs numpy
def test_trades_with_beta_zero_equals_clean_training_loss_and_gradient():
    ctx = _ctx(beta=0.0)
    params, batch, key = _params(ctx), _batch(), jax.random.PRNGKey(3)
    trades = get_objective("trades")

    def f(obj_loss):
        return jax.jit(jax.value_and_grad(lambda p: obj_loss(ctx, p, {}, {}, batch, key, 0)[0]))(params)

    (l_t, g_t), (l_s, g_s) = f(trades.loss), f(standard_loss)
    assert float(l_t) == float(l_s)
    jax.tree.map(np.testing.assert_array_equal, g_t, g_s)
    # with β > 0 the KL term is there and positive (the inner maximisation moved away from x)
    ctx6 = _ctx(beta=6.0)
    l6, out = jax.jit(lambda p: trades.loss(ctx6, p, {}, {}, batch, key, 0))(params)
    assert float(out.metrics["kl"]) > 0 and float(l6) == pytest.approx(
        float(l_s) + 6.0 * float(out.metrics["kl"]), rel=1e-6)


@pytest.mark.parametrize("name,loss_on,ref", [("trades", adv.trades_loss_on_points, np_trades),
                                              ("mart", adv.mart_loss_on_points, np_mart)])
def test_losses_on_fixed_points_match_numpy(name, loss_on, ref):
    ctx = _ctx(beta=6.0)
    params, batch = _params(ctx), _batch()
    xa = _x_adv(batch)
    f = jax.jit(lambda p, b: loss_on(ctx, p, {}, b, xa, 0)[0])
    got = f(params, batch)
    want = ref(_np(params), *_np((batch["image"], xa)), np.asarray(batch["label"]),
               np.asarray(batch["mask"], np.float64), 6.0)
    np.testing.assert_allclose(float(got), want, rtol=2e-6)
    # the padded row does not count: changing its label changes nothing
    y2 = batch["label"].at[B - 1].set((batch["label"][B - 1] + 1) % K)
    got2 = f(params, {**batch, "label": y2})
    assert float(got2) == float(got)
    # β from a named schedule wins over objective.beta
    ctx_s = dataclasses.replace(ctx, schedules={**ctx.schedules, "beta": lambda s: jnp.float32(0.0)})
    got0 = loss_on(ctx_s, params, {}, batch, xa, 0)[0]
    want0 = ref(_np(params), *_np((batch["image"], xa)), np.asarray(batch["label"]),
                np.asarray(batch["mask"], np.float64), 0.0)
    np.testing.assert_allclose(float(got0), want0, rtol=2e-6)


@pytest.mark.parametrize("base,ref", [("pgd_at", np_at), ("trades", np_trades), ("mart", np_mart)])
def test_awp_loss_matches_numpy_on_fixed_points(base, ref, monkeypatch):
    """AWP loss = base loss at w + v, v_l = γ‖w_l‖ ∇_l/‖∇_l‖ on the kernels (numpy finite-difference
    gradient in float64), on a fixed batch and fixed adversarial points."""
    gamma = 0.05
    ctx = _ctx(beta=6.0, **{"awp.gamma": gamma, "awp.base": base})
    params, batch = _params(ctx), _batch()
    xa = _x_adv(batch)
    points, loss_on = adv.METHODS[base]
    monkeypatch.setitem(adv.METHODS, base, (lambda *a: (xa, jnp.float32(0.1)), loss_on))
    got, out = jax.jit(lambda q: get_objective("awp").loss(ctx, q, {}, {}, batch, jax.random.PRNGKey(0),
                                                           0))(params)

    x, y, m = np.asarray(batch["image"], np.float64), np.asarray(batch["label"]), \
        np.asarray(batch["mask"], np.float64)
    xa64 = np.asarray(xa, np.float64)
    f = lambda p: ref(p, x, xa64, y, m, 6.0)
    p = _np(params)
    g = np_grad(f, p)
    pert = {layer: {"kernel": p[layer]["kernel"] + gamma * np.linalg.norm(p[layer]["kernel"])
                    / np.linalg.norm(g[layer]["kernel"]) * g[layer]["kernel"],
                    "bias": p[layer]["bias"]} for layer in p}
    want = f(pert)
    assert abs(want - f(p)) > 1e-3  # the perturbation matters at this γ
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # γ = 0: exactly the base objective (same points, same loss and gradient)
    ctx0 = _ctx(beta=6.0, **{"awp.gamma": 0.0, "awp.base": base})
    lg = lambda loss: jax.jit(jax.value_and_grad(
        lambda q: loss(ctx0, q, {}, {}, batch, jax.random.PRNGKey(0), 0)[0]))(params)
    (la, ga), (lb, gb) = lg(get_objective("awp").loss), lg(adv.method_loss(base))
    assert float(la) == float(lb)
    jax.tree.map(np.testing.assert_array_equal, ga, gb)


def test_awp_perturbation_relative_size_per_layer_kernels_only():
    params = {"Conv_0": {"kernel": jnp.linspace(-1, 1, 3 * 3 * 2 * 4).reshape(3, 3, 2, 4),
                         "bias": jnp.ones(4)},
              "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
              "Dense_0": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.ones(3)}}

    def loss(p):
        return jnp.sum(jnp.sin(p["Conv_0"]["kernel"])) * jnp.sum(p["Dense_0"]["kernel"] ** 3) + \
            jnp.sum(p["BatchNorm_0"]["scale"] ** 2) + jnp.sum(p["Dense_0"]["bias"])

    v = adv.awp_perturbation(loss, params, 0.01)
    g = jax.grad(loss)(params)
    for layer in ("Conv_0", "Dense_0"):
        w, vl, gl = params[layer]["kernel"], v[layer]["kernel"], g[layer]["kernel"]
        np.testing.assert_allclose(np.linalg.norm(vl), 0.01 * np.linalg.norm(w), rtol=1e-5)
        cos = np.sum(vl * gl) / (np.linalg.norm(vl) * np.linalg.norm(gl))
        assert cos == pytest.approx(1.0, abs=1e-5)  # along the ascent direction
    for path, leaf in jax.tree_util.tree_leaves_with_path(v):
        if leaf.ndim <= 1:  # biases, BatchNorm: never perturbed
            np.testing.assert_array_equal(leaf, 0.0, err_msg=jax.tree_util.keystr(path))
    # zero gradient: no perturbation, no NaN
    v0 = adv.awp_perturbation(lambda p: 0.0 * loss(p), params, 0.01)
    assert all(np.all(np.asarray(l) == 0) for l in jax.tree.leaves(v0))


@pytest.mark.parametrize("name,base", [("awp_at", "pgd_at"), ("awp_trades", "trades")])
def test_awp_step_leaves_stored_weights_unperturbed(name, base, monkeypatch):
    """SGD without momentum: params after each step = params − lr·∇L(w + v), never w + v − lr·∇."""
    lr, gamma = 0.5, 0.05
    ctx = _ctx(beta=6.0, **{"awp.gamma": gamma})
    batch = _batch()
    xa = _x_adv(batch)
    _, loss_on = adv.METHODS[base]
    monkeypatch.setitem(adv.METHODS, base, (lambda *a: (xa, jnp.float32(0.1)), loss_on))
    obj = get_objective(name)
    tx = optax.sgd(lr)
    state = create_train_state(ctx.model, (D_IN,), tx, obj, ctx, seed=0, n_train=B)
    update = jax.jit(make_update_fn(ctx, obj, lambda s: lr, "none"))
    base_loss = lambda p: loss_on(ctx, p, {}, batch, xa, 0)[0]

    @jax.jit
    def expected(p):
        v = adv.awp_perturbation(base_loss, p, gamma)
        return v, jax.grad(base_loss)(jax.tree.map(jnp.add, p, v))

    for _ in range(3):
        w = jax.tree.map(np.asarray, state.params)
        v, g = expected(state.params)
        state, metrics = update(state, batch)
        want = jax.tree.map(lambda a, b: a - lr * b, w, g)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     state.params, want)
        kernel_gap = np.abs(np.asarray(state.params["Dense_0"]["kernel"]) -
                            (want["Dense_0"]["kernel"] + np.asarray(v["Dense_0"]["kernel"])))
        assert kernel_gap.max() > 1e-4  # w + v would have been told apart
        assert float(metrics["awp_norm"]) > 0


# ----------------------------------------------------------------------------- inner maximisation
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_inner_maximisation_stays_in_the_threat_set_and_ascends(norm, eps, loss):
    ctx = _ctx(norm=norm, eps=eps, **{"attack.steps": 5})
    params, batch = _params(ctx), _batch()
    x = batch["image"]
    xa, e = jax.jit(lambda p: adv.inner_maximisation(ctx, p, {}, batch, jax.random.PRNGKey(4), 0,
                                                     loss))(params)
    d = np.asarray(xa - x).reshape(B, -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps * (1 + 1e-5)) and np.all(size > 0.5 * eps)
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    logits = lambda z: ctx.model.apply({"params": params}, z)
    if loss == "kl":
        start, end = 0.0, adv.kl_rows(logits(x), logits(xa))
    else:
        start = optax.softmax_cross_entropy_with_integer_labels(logits(x), batch["label"])
        end = optax.softmax_cross_entropy_with_integer_labels(logits(xa), batch["label"])
    assert float(jnp.sum(end)) > float(jnp.sum(start))
    with pytest.raises(ValueError, match="'kl' or 'ce'"):
        adv.inner_maximisation(ctx, params, {}, batch, jax.random.PRNGKey(4), 0, "cw")


# ----------------------------------------------------------------------------- ε schedulers (eq 4.29)
def eq_4_29(kind, d, D, eps_min, eps_max):
    if kind == "cosine":
        return 0.5 * (1 - math.cos(d / D * math.pi)) * (eps_max - eps_min) + eps_min
    return (eps_max - eps_min) * d / D + eps_min


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_eps_schedulers_reproduce_eq_4_29(kind):
    spe, D, total = 10, 6, 200  # steps per epoch, warm-up epochs D, run length
    # unclipped eq 4.29 for d <= D: base value ε_max, start_fraction ε_min/ε_max, ramp_epochs D
    eps_min, eps_max = 0.1, 0.4
    f = make_scalar_schedule(schedule_config(kind, start_fraction=eps_min / eps_max, ramp_epochs=D),
                             eps_max, total, spe)
    for step in range(0, D * spe + 1, 3):
        assert float(f(step)) == pytest.approx(eq_4_29(kind, step / spe, D, eps_min, eps_max), abs=1e-7)
    assert float(f(D * spe + 25)) == pytest.approx(eps_max, abs=1e-7)
    # the thesis's settings (MNIST ε_target 0.4, ε_min 0, ε_max 0.6 cosine / 0.8 linear) and a
    # negative ε_min: base value ε_target, fractions ε_min/ε_target and ε_max/ε_target, and the
    # objectives clip to [0, ε_target] (adversarial.eps_at)
    target = 0.4
    for eps_min, eps_max in [(0.0, 0.6 if kind == "cosine" else 0.8), (-0.1, 0.5)]:
        sc = schedule_config(kind, start_fraction=eps_min / target, final_fraction=eps_max / target,
                             ramp_epochs=D)
        ctx = ObjectiveContext(model=None, threat=ThreatModel(eps=target),
                               schedules={"eps": make_scalar_schedule(sc, target, total, spe)},
                               cfg=None, num_classes=10)
        got = jax.jit(lambda s: adv.eps_at(ctx, s))
        for step in list(range(0, D * spe + 1, 2)) + [D * spe + 40]:
            want = min(max(eq_4_29(kind, min(step / spe, D), D, eps_min, eps_max), 0.0), target)
            assert float(got(step)) == pytest.approx(want, abs=1e-7), (step, eps_min, eps_max)
        assert float(got(0)) == 0.0 and float(got(D * spe)) == pytest.approx(target)


# ----------------------------------------------------------------------------- EMA wrapper
def _inner_init(ctx, params, n_train, input_shape):
    return {"instance": {"seen": jnp.zeros((n_train,), jnp.int32)}, "count": jnp.zeros((), jnp.int32)}


def _inner_loss(ctx, params, model_state, extra, batch, key, step):
    assert set(extra) == {"instance", "count"}  # the wrapped objective sees its own layout
    loss, st = standard_loss(ctx, params, model_state, extra, batch, key, step)[0], model_state
    return loss, ObjectiveOutput(st, {"seen": extra["instance"]["seen"][batch["index"]] + 1}, {})


def _inner_after(ctx, params, extra, step):
    return {**extra, "count": extra["count"] + 1}


def test_with_ema_keeps_the_wrapped_objective_state_and_averages_weights():
    ctx = _ctx()
    inner = Objective(init=_inner_init, loss=_inner_loss, after_update=_inner_after)
    obj = adv.with_ema(inner, 0.75)
    p0 = _params(ctx)
    extra = obj.init_extra(ctx, p0, B, (D_IN,))
    assert set(extra) == {"instance", "base", "ema"} and set(extra["base"]) == {"count"}
    obj.loss(ctx, p0, {}, extra, _batch(), jax.random.PRNGKey(0), 0)
    traj = [_params(ctx, seed) for seed in (5, 6, 7)]
    ema = _np(p0)
    for i, p in enumerate(traj):
        extra = obj.after_update(ctx, p, extra, i)
        ema = jax.tree.map(lambda e, q: 0.75 * e + 0.25 * q, ema, _np(p))
    assert int(extra["base"]["count"]) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), extra["ema"], ema)
    # decay from the config: 0 leaves the objective and its extra unchanged
    plain = adv.with_ema(inner)
    assert set(plain.init_extra(ctx, p0, B, (D_IN,))) == {"instance", "count"}
    for bad in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            adv.with_ema(inner, bad)
    with pytest.raises(TypeError, match="Objective"):
        adv.with_ema(_inner_loss, 0.5)


def test_bad_values_raise_clear_errors():
    ctx = _ctx(beta=-1.0)
    with pytest.raises(ValueError, match="objective.beta must be a number >= 0"):
        adv.beta_at(ctx, 0)
    with pytest.raises(ValueError, match="objective.awp.base must be one of"):
        adv.awp_loss("sgd")
    ctx = _ctx(**{"awp.base": "fgsm"})
    with pytest.raises(ValueError, match="objective.awp.base must be one of"):
        get_objective("awp").loss(ctx, _params(ctx), {}, {}, _batch(), jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match="ema_decay"):
        adv.with_ema(get_objective("trades")).init_extra(_ctx(ema_decay=2.0), _params(ctx), B, (D_IN,))
    # the registered objectives validate their settings before a run writes anything
    for bad, match in (({"beta": -1.0}, "beta"), ({"awp.base": "fgsm"}, "awp.base"),
                       ({"awp.gamma": -0.1}, "awp.gamma")):
        with pytest.raises(ValueError, match=match):
            get_objective("awp").validate(_ctx(**bad).cfg)


# ----------------------------------------------------------------------------- end to end
def _run_config(name, **over):
    c = tiny_config(**{"objective.name": name, "train.num_steps": 6, "train.checkpoint_every_steps": 3,
                       "objective.attack.steps": 2, "eval.num_examples": 32, **over})
    return c


def _tree_np(t):
    return jax.tree.map(np.asarray, t)


@pytest.mark.parametrize("name,over", [
    ("awp_trades", {"objective.ema_decay": 0.8}),
    # ε_max = 2·ε_target reached after ~2 of the 6 steps: the objective clips ε to ε_target
    ("mart", {"threat.norm": "l2", "threat.eps": 0.5, "objective.eps_schedule": schedule_config(
        "linear", start_fraction=0.0, final_fraction=2.0, ramp_epochs=0.05)}),
    pytest.param("trades", {"objective.eps_schedule": schedule_config("cosine", ramp_epochs=0.1)},
                 marks=pytest.mark.slow),
    pytest.param("awp_at", {"threat.norm": "l2", "threat.eps": 0.5, "objective.ema_decay": 0.5},
                 marks=pytest.mark.slow),
])
def test_trains_end_to_end_and_resumes_bit_exactly(name, over, tmp_path):
    trajectory = []
    record = lambda step, state: trajectory.append(_tree_np(state.params)) and False
    full = train(_run_config(name, **over), str(tmp_path / "full"), callbacks=[record])
    assert full["steps"] == 6 and full["compiles"] == {"update": 1}
    assert all(np.isfinite(v) for v in full["final_train_metrics"].values())
    eps_target = _run_config(name, **over).threat.eps
    assert 0 < full["final_train_metrics"]["eps"] <= eps_target + 1e-7
    if "objective.eps_schedule" in over and over["objective.eps_schedule"].final_fraction > 1:
        assert full["final_train_metrics"]["eps"] == pytest.approx(eps_target)
    assert train(_run_config(name, **over), str(tmp_path / "res"), callbacks=[stop_at(3)])["stopped_at"] == 3
    resumed = train(_run_config(name, **over), str(tmp_path / "res"))
    assert resumed["eval"] == full["eval"]
    a, b = load_trained(str(tmp_path / "full")), load_trained(str(tmp_path / "res"))
    jax.tree.map(np.testing.assert_array_equal, _tree_np(a.variables), _tree_np(b.variables))
    jax.tree.map(np.testing.assert_array_equal, _tree_np(a.extra), _tree_np(b.extra))
    decay = over.get("objective.ema_decay", 0.0)
    if decay:
        # EMA = numpy EMA of the parameter trajectory (from the initial parameters)
        from jaxrobust.train import build_run
        setup = build_run(with_defaults(_run_config(name, **over)))
        p0 = create_train_state(setup.model, setup.dataset.info.image_shape, setup.tx, setup.objective,
                                setup.ctx, seed=0, n_train=setup.train_size).params
        ema = _np(p0)
        for p in trajectory:
            ema = jax.tree.map(lambda e, q: decay * e + (1 - decay) * q, ema, _np(p))
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                     _tree_np(a.extra["ema"]), ema)
        e = load_trained(str(tmp_path / "full"), weights="ema")
        jax.tree.map(np.testing.assert_array_equal, _tree_np(e.variables["params"]),
                     _tree_np(a.extra["ema"]))
        assert not np.allclose(a.extra["ema"]["Dense_0"]["kernel"],
                               a.variables["params"]["Dense_0"]["kernel"])
    else:
        assert "ema" not in (a.extra or {})


def test_demo_config_variants():
    from configs import mnist5k_fc1_adv
    for method in mnist5k_fc1_adv.METHODS:
        c = mnist5k_fc1_adv.get_config(f"{method},ema,smoke")
        assert c.objective.name == method and c.objective.ema_decay > 0 and c.train.num_steps == 4
        assert with_defaults(c).objective.awp.base == "pgd_at"
    assert mnist5k_fc1_adv.get_config("mart").objective.ema_decay == 0.0
    for bad in ("sgd", "trades,fast"):
        with pytest.raises(ValueError, match="Unknown config variant"):
            mnist5k_fc1_adv.get_config(bad)


@pytest.mark.slow
def test_demo_config_smoke_through_the_command_line(tmp_path):
    import json
    import subprocess
    import sys
    from test_train import REPO
    out = subprocess.run([sys.executable, "-m", "experiments.train",
                          "--config=configs/mnist5k_fc1_adv.py:awp_trades,ema,smoke",
                          f"--workdir={tmp_path}", "--config.objective.beta=3.0"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        s = json.load(f)
    assert s["steps"] == 4 and s["final_train_metrics"]["beta"] == 3.0
    assert s["final_train_metrics"]["awp_norm"] > 0
    assert load_trained(str(tmp_path), weights="ema").step == 4


def test_awp_warmup_epochs_turn_the_perturbation_on_after_warmup(monkeypatch):
    """awp.warmup_epochs = 1 with 40 examples in batches of 8: steps 0-4 are the base loss, step 5 on
    perturbs."""
    ctx = dataclasses.replace(_ctx(**{"awp.gamma": 0.05, "awp.warmup_epochs": 1.0}), n_train=40)
    params, batch = _params(ctx), _batch()
    xa = _x_adv(batch)
    _, loss_on = adv.METHODS["pgd_at"]
    monkeypatch.setitem(adv.METHODS, "pgd_at", (lambda *a: (xa, jnp.float32(0.1)), loss_on))
    f = jax.jit(lambda s: get_objective("awp_at").loss(ctx, params, {}, {}, batch,
                                                       jax.random.PRNGKey(0), s)[1].metrics)
    base = float(loss_on(ctx, params, {}, batch, xa, 0)[0])
    for step in (0, 4):
        m = f(step)
        assert float(m["awp_norm"]) == 0.0 and float(m["loss"]) == pytest.approx(base, rel=1e-6)
    m = f(5)
    assert float(m["awp_norm"]) > 0 and float(m["loss"]) > base
    with pytest.raises(ValueError, match="warmup_epochs must be a number >= 0"):
        adv.awp_gamma_at(_ctx(**{"awp.warmup_epochs": -1.0}), 0, B)


class _TinyBN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dense: BatchNorm statistics and 1-D BN parameters."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(3, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(K)(nn.relu(x).reshape((x.shape[0], -1)))


@pytest.mark.parametrize("name,base", [("awp_trades", "trades"), ("awp", "mart")])
def test_batchnorm_state_and_parameters_under_awp(name, base, monkeypatch):
    """The returned BatchNorm statistics are those of the train-mode forwards at w + v (clean, then
    adversarial batch); BN scale/bias are never perturbed."""
    model = _TinyBN()
    x = jax.random.uniform(jax.random.PRNGKey(0), (B, 4, 4, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    ctx = dataclasses.replace(_ctx(**{"awp.gamma": 0.05, "awp.base": base}), model=model)
    batch = {**_batch(), "image": x}
    xa = _x_adv(batch)
    _, loss_on = adv.METHODS[base]
    monkeypatch.setitem(adv.METHODS, base, (lambda *a: (xa, jnp.float32(0.1)), loss_on))
    obj = get_objective(name)
    _, out = jax.jit(lambda p, s: obj.loss(ctx, p, s, {}, batch, jax.random.PRNGKey(2), 0))(params, state)
    v = adv.awp_perturbation(lambda p: loss_on(ctx, p, state, batch, xa, 0)[0], params, 0.05)
    for leaf in ("scale", "bias"):
        assert np.all(np.asarray(v["BatchNorm_0"][leaf]) == 0)
    assert np.abs(np.asarray(v["Conv_0"]["kernel"])).max() > 0
    pv = jax.tree.map(jnp.add, params, v)
    _, s1 = jmodels.forward_train(model, pv, state, x)
    _, s2 = jmodels.forward_train(model, pv, s1, xa)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out.model_state, s2)
    mean = lambda s: s["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(mean(s2), mean(s1))


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_inner_maximisation_uses_the_attack_bn_mode(loss):
    """bn_mode='eval' (running statistics): each example's point is independent of the others';
    bn_mode='train' (batch statistics): changing one example moves the others' points."""
    model = _TinyBN()
    x = jax.random.uniform(jax.random.PRNGKey(0), (B, 4, 4, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    batch = {**_batch(), "image": x}
    batch2 = {**batch, "image": x.at[0].set(1.0 - x[0])}
    for mode, independent in (("eval", True), ("train", False)):
        ctx = dataclasses.replace(_ctx(**{"attack.bn_mode": mode, "attack.steps": 2}), model=model)
        f = jax.jit(lambda b: adv.inner_maximisation(ctx, params, state, b, jax.random.PRNGKey(3), 0,
                                                     loss)[0])
        a, b = np.asarray(f(batch))[1:], np.asarray(f(batch2))[1:]
        assert np.array_equal(a, b) == independent, mode


# ----------------------------------------------------------------------------- ε from the schedule
def _losses_with_eps(name, pairs):
    """The objective's loss for each (threat.eps, ε schedule value) pair, traced once (both traced)."""
    obj = get_objective(name)
    base = dataclasses.replace(_ctx(eps=0.3), n_train=B, steps_per_epoch=1)
    params = _params(base)
    batch = {**_batch(), "crop_offset": jnp.full((B, 2), 4, jnp.int32), "flip": jnp.zeros((B,), bool),
             "replay": jnp.int32(0)}

    def ctx_of(threat_eps, sched_eps):
        scheds = {n: (lambda s: jnp.float32(0.5)) for n in obj.schedules}
        return dataclasses.replace(base, threat=base.threat.replace(eps=threat_eps),
                                   schedules={**scheds, "eps": lambda s: sched_eps})

    extra = obj.init_extra(base, params, B, (D_IN,))

    @jax.jit
    def loss(p, threat_eps, sched_eps):
        return obj.loss(ctx_of(threat_eps, sched_eps), p, {}, extra, batch, jax.random.PRNGKey(5), 0)[0]

    return [float(loss(params, jnp.float32(t), jnp.float32(e))) for t, e in pairs]


ADVERSARIAL = ("pgd_at", "trades", "mart", "awp_at", "awp_trades")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ADVERSARIAL else pytest.mark.slow)
                                  for n in sorted(set(__import__("jaxrobust.train", fromlist=["x"])
                                                      .list_objectives()) - {"standard", "plain"})])
def test_every_objective_reads_eps_from_the_eps_schedule(name):
    """Thesis §4.2.4: ε(step) comes from objective.eps_schedule (eq 4.29's schedulers), clipped to
    threat.eps. With the schedule at 0.1, the loss is the same whether the run's target ε is 0.3 or
    0.5 (an objective reading threat.eps directly would differ), and differs from the schedule at 0."""
    a, b, zero = _losses_with_eps(name, [(0.3, 0.1), (0.5, 0.1), (0.3, 0.0)])
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7), name
    if name != "mmr":  # MMR's regulariser has no ε (its thresholds are objective.certified.mmr_gamma_*)
        assert zero != pytest.approx(a, rel=1e-4), name
