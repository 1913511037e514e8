"""Certified-training objectives (jaxrobust/train/certified.py) and their configs (Tables 3.6-3.8,
sota_certified): PER (eq 3.20) properties, envelope distances vs certify, IBP / CROWN-IBP losses vs
the clean CE and the bound API, a real certified-accuracy ordering (ibp vs at), smoke runs."""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sota_certified, table3_6, table3_7, table3_8
from configs.common import base_config, schedule_config, with_defaults
from jaxrobust import models as jmodels
from jaxrobust.bounds import crown_bounds, margin_bounds
from jaxrobust.certify import signed_distances
from jaxrobust.models import create_model, init_variables, make_logits_fn
from jaxrobust.threat import ThreatModel
from jaxrobust.train import certified as C
from jaxrobust.train import build_run, get_objective, load_trained, train
from jaxrobust.train.loop import create_run_state
from jaxrobust.train.objectives import ObjectiveContext, standard_loss
from test_train import REPO

SHAPE = (6, 6, 1)


@functools.lru_cache(maxsize=None)
def _net(activation="relu", widths=(12,)):
    model = create_model("fc", 10, widths=widths, activation=activation)
    variables = init_variables(model, jax.random.PRNGKey(0), SHAPE)
    return model, variables


def _batch(n=8, seed=1):
    x = jax.random.uniform(jax.random.PRNGKey(seed), (n,) + SHAPE)
    y = jnp.arange(n) % 10
    return {"image": x, "label": y, "index": jnp.arange(n), "mask": jnp.ones(n, bool)}


def _ctx(model, norm="linf", eps=0.1, kappa=0.0, beta=1.0, **cert):
    cfg = with_defaults(base_config()).objective
    cfg.attack.steps = 2
    for k, v in cert.items():
        cfg.certified[k] = v
    scheds = {"eps": lambda s: jnp.asarray(eps, jnp.float32),
              "kappa": lambda s: jnp.asarray(kappa, jnp.float32),
              "crown_beta": lambda s: jnp.asarray(beta, jnp.float32)}
    return ObjectiveContext(model=model, threat=ThreatModel(norm=norm, eps=eps), schedules=scheds,
                            cfg=cfg, num_classes=10, n_train=8)


# ----------------------------------------------------------------------------- PER (eq 3.20)
def test_per_is_zero_with_zero_gradient_when_every_distance_reaches_alpha():
    d = jnp.array([[jnp.inf, 0.2, 0.3, 0.25, 0.21, 0.5, 0.22, 0.4, 0.3, 0.2]])
    assert float(C.per_regularizer(d, 0.2, 1.0, 4)[0]) == 0.0
    g = jax.grad(lambda d: C.per_regularizer(d, 0.2, 1.0, 4).sum())(d)
    assert np.all(np.asarray(g)[np.isfinite(np.asarray(d))] == 0)
    # one distance below α: exactly the hinge of that one (β (1 - d/α)), and the C=4 smallest only
    d2 = d.at[0, 5].set(0.1)
    assert float(C.per_regularizer(d2, 0.2, 3.0, 4)[0]) == pytest.approx(3.0 * 0.5)
    d3 = jnp.array([[jnp.inf, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]])
    assert float(C.per_regularizer(d3, 0.5, 1.0, 4)[0]) == pytest.approx(3.0 + 3.0)  # 1+1+1+(1+2)


def test_per_on_a_model_is_zero_when_the_envelope_is_far_and_its_gradient_matches_finite_differences():
    model, variables = _net("sigmoid")
    batch = _batch()
    x, y = batch["image"], batch["label"]
    params = variables["params"]

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def per(p, alpha=0.3, eps=0.05, predicted=False):
        c2 = _ctx(model, eps=eps, per_alpha=alpha, per_beta=1.0)
        labels = jnp.argmax(make_logits_fn(model, {"params": p})(x), -1) if predicted else y
        return C.per_terms(c2, p, {}, x, x, labels, batch["mask"], jax.random.PRNGKey(0), 0, "fastlin")

    value, _, d = per(params)
    assert float(value) > 0
    # with the predicted labels and a small ε every envelope hyperplane is on the far side of x:
    # α at or below every distance gives PER exactly 0, just above the smallest one a positive PER
    _, _, d = per(params, 0.3, 1e-3, True)
    dmin = float(jnp.min(d))
    assert dmin > 0
    assert float(per(params, dmin, 1e-3, True)[0]) == 0.0
    assert float(per(params, 1.01 * dmin, 1e-3, True)[0]) > 0.0
    # directional derivative in the parameters vs central finite differences (smooth sigmoid net)
    f = lambda p: per(p)[0]
    g = jax.jit(jax.grad(f))(params)
    direction = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(3), a.shape), params)
    h = 3e-3  # float32: smaller steps are dominated by rounding
    plus = jax.tree.map(lambda a, v: a + h * v, params, direction)
    minus = jax.tree.map(lambda a, v: a - h * v, params, direction)
    fd = (float(f(plus)) - float(f(minus))) / (2 * h)
    an = sum(float(jnp.sum(a * v)) for a, v in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
    assert an == pytest.approx(fd, rel=1e-2)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("method", ["fastlin", "ibp_linear"])
def test_envelope_distances_equal_certify_signed_distances_with_finite_gradients(norm, method):
    model, variables = _net("relu", (12, 12))  # two hidden layers: L- and I- envelopes differ
    batch = _batch()
    x, y = batch["image"], batch["label"]
    threat = ThreatModel(norm=norm, eps=0.05)
    ctx = _ctx(model, norm=norm, eps=0.05)

    @jax.jit
    def run(params):
        mb = margin_bounds(make_logits_fn(model, {"params": params}), x, y, threat, method=method)
        ours = C.envelope_signed_distances(mb, x, y, norm)
        ref = signed_distances(mb, x, y, norm)
        per = lambda p: C.per_terms(ctx, p, {}, x, x, y, batch["mask"], jax.random.PRNGKey(0), 0, method)
        return ours, ref, per(params)[2], jax.grad(lambda p: per(p)[0])(params)

    ours, ref, d, g = run(variables["params"])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)
    # the objective's own path (I-PER uses 'ibp_linear', L-PER 'fastlin') gives the same distances
    np.testing.assert_allclose(np.asarray(d), np.asarray(ref), rtol=1e-4, atol=1e-5)
    # gradients in the parameters are finite (row y's zero U has no NaN norm gradient, l_2 included)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))


def test_subsample_draws_distinct_valid_rows():
    mask = jnp.array([True] * 6 + [False] * 4)
    for s in range(5):
        idx, m = C.subsample(jax.random.PRNGKey(s), mask, 4)
        idx = np.asarray(idx)
        assert len(set(idx.tolist())) == 4 and np.all(idx < 6) and bool(jnp.all(m))
    idx, m = C.subsample(jax.random.PRNGKey(0), mask, 0)
    assert np.array_equal(np.asarray(idx), np.arange(10)) and np.array_equal(m, mask)


# ----------------------------------------------------------------------------- IBP / CROWN-IBP / KW
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ibp_crown_ibp_and_kw_losses_upper_bound_the_clean_ce(norm):
    model, variables = _net("relu")
    batch = _batch()
    params = variables["params"]
    eps = 0.05 if norm == "linf" else 0.3

    @functools.partial(jax.jit, static_argnums=2)
    def losses(kappa, beta, e):
        ctx = _ctx(model, norm, e, kappa=kappa, beta=beta)
        args = (ctx, params, {}, {}, batch, jax.random.PRNGKey(0), 0)
        return (standard_loss(*args)[0], C.ibp_loss(*args)[0], C.crown_ibp_loss(*args)[0],
                C.kw_loss(*args)[0])

    for kappa in (0.0, 0.5):
        for beta in (0.0, 0.5, 1.0):
            clean, l_ibp, l_cibp, l_kw = map(float, losses(kappa, beta, eps))
            assert min(l_ibp, l_cibp, l_kw) >= clean - 1e-6
            if kappa == 0.0:
                assert l_ibp > clean + 1e-3  # a real gap at this ε
    # at ε = 0 the bounds are exact: every robust loss is the clean CE
    clean, *robust = map(float, losses(0.0, 1.0, 0.0))
    assert robust == pytest.approx([clean] * 3, rel=1e-5)


def test_bound_losses_at_the_start_of_an_eps_ramp_have_finite_gradients_on_sigmoid_nets():
    # ε = 0 and zero inputs with zero biases: zero-width intervals at z = 0, where the sigmoid tangent
    # points of the relaxations have a NaN derivative (the start of every ε ramp)
    model, variables = _net("sigmoid")
    batch = {**_batch(), "image": jnp.zeros((8,) + SHAPE)}
    ctx = _ctx(model, "linf", 0.0, kappa=0.5, beta=1.0)
    for loss in (C.kw_loss, C.ibp_loss, C.crown_ibp_loss):
        g = jax.jit(jax.grad(lambda p: loss(ctx, p, {}, {}, batch, None, 0)[0]))(variables["params"])
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g)), loss.__name__


def test_crown_ibp_at_beta_one_is_the_crown_ibp_bound():
    model, variables = _net("relu")
    x = _batch()["image"]
    y = jnp.full((x.shape[0],), 3)  # one label: the margins z_3 - z as a function crown_bounds takes
    threat = ThreatModel(norm="linf", eps=0.05)
    fn = make_logits_fn(model, variables)
    lower = C.crown_ibp_lower(fn, x, y, threat, jnp.float32(1.0))
    margins = lambda xb: (lambda z: z[:, 3:4] - z)(fn(xb))
    ref, _ = crown_bounds(margins, x, threat, method="crown_ibp", intersect_ibp=False)
    off = np.arange(10) != 3
    np.testing.assert_allclose(np.asarray(lower)[:, off], np.asarray(ref)[:, off], rtol=1e-5, atol=1e-5)
    # β = 0 is IBP (last layer elided), looser than CROWN-IBP here
    ibp = C.crown_ibp_lower(fn, x, y, threat, jnp.float32(0.0))
    ibp_ref = margin_bounds(fn, x, y, threat, method="ibp").lower
    np.testing.assert_allclose(np.asarray(ibp), np.asarray(ibp_ref), rtol=1e-6, atol=1e-6)
    # the loss uses exactly this bound: κ = 0, β = 1 -> mean robust CE of it
    ctx = _ctx(model, "linf", 0.05, kappa=0.0, beta=1.0)
    batch = {**_batch(), "label": y}
    loss, _ = C.crown_ibp_loss(ctx, variables["params"], {}, {}, batch, None, 0)
    assert float(loss) == pytest.approx(float(jnp.mean(C.robust_ce(lower, y))), rel=1e-5)


def test_sabr_centres_keep_the_small_region_inside_the_ball():
    model, _ = _net("relu")
    x = _batch()["image"]
    far = jnp.clip(x + 0.3 * jnp.sign(jax.random.normal(jax.random.PRNGKey(5), x.shape)), 0, 1)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        ctx = _ctx(model, norm, eps)
        c = C.sabr_centers(ctx, x, far, eps, 0.4)
        assert bool(jnp.all(ctx.threat.replace(eps=0.6 * eps).contains(x, c)))
        assert bool(jnp.all((c >= 0) & (c <= 1)))


def test_mmr_rejects_non_relu_nets_and_penalises_close_boundaries():
    model, variables = _net("sigmoid")
    with pytest.raises(ValueError, match="ReLU"):
        get_objective("mmr").loss(_ctx(model), variables["params"], {}, {}, _batch(), None, 0)
    model, variables = _net("relu")
    x, y = _batch()["image"], _batch()["label"]
    r_small = C.mmr_regularizer(_ctx(model, mmr_gamma_b=1e-7, mmr_gamma_d=1e-7), variables["params"], x, y)
    r_big = C.mmr_regularizer(_ctx(model, mmr_gamma_b=1e3, mmr_gamma_d=1e3), variables["params"], x, y)
    # γ -> inf: every hinge -> 1 (boundary mean + decision mean = 2); γ -> 0: only misclassified
    # points (a negative signed decision distance) are penalised
    np.testing.assert_allclose(np.asarray(r_big), 2.0, atol=1e-2)
    correct = np.asarray(jnp.argmax(make_logits_fn(model, variables)(x), -1) == y)
    assert np.all(np.asarray(r_small)[correct] == 0) and np.all(np.asarray(r_small)[~correct] > 0)


def test_mmr_sees_every_hidden_preactivation_of_a_cnn():
    model = create_model("cnn_small", 10)
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    x1 = jax.random.uniform(jax.random.PRNGKey(1), (8, 8, 1))
    h, z = C._hidden_and_logits(model, variables, x1)
    assert h.shape == (4 * 4 * 16 + 2 * 2 * 32 + 100,)
    np.testing.assert_allclose(np.asarray(z), np.asarray(model.apply(variables, x1[None])[0]), rtol=1e-6)
    r = C.mmr_regularizer(_ctx(model), variables["params"], x1[None], jnp.array([1]))
    assert r.shape == (1,) and bool(jnp.isfinite(r[0])) and float(r[0]) > 0


def test_bounds_run_in_float32_for_a_bfloat16_model():
    model = create_model("fc", 10, widths=(12,), dtype=jnp.bfloat16)
    variables = init_variables(model, jax.random.PRNGKey(0), SHAPE)
    ref_model = create_model("fc", 10, widths=(12,))
    ctx = _ctx(model)
    x, y = _batch()["image"], _batch()["label"]
    fn = C.bound_logits_fn(ctx, variables["params"], {})
    threat = ThreatModel(norm="linf", eps=0.05)
    jaxpr = jax.make_jaxpr(fn)(x)
    assert "bf16" not in str(jaxpr)  # no bf16 computation inside the bounded function
    ours = margin_bounds(fn, x, y, threat, method="crown_ibp").lower
    ref = margin_bounds(make_logits_fn(ref_model, variables), x, y, threat, method="crown_ibp").lower
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_cnn7_trains_with_ibp_bounds_and_bn():
    model = create_model("cnn7", 10, width=2, linear=8)
    variables = init_variables(model, jax.random.PRNGKey(0), (4, 4, 3))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 4, 4, 3))
    batch = {"image": x, "label": jnp.arange(4), "index": jnp.arange(4), "mask": jnp.ones(4, bool)}
    ctx = _ctx(model, "linf", 2 / 255, kappa=0.5, beta=1.0)
    state = {"batch_stats": variables["batch_stats"]}
    g = jax.jit(jax.grad(lambda p: C.ibp_loss(ctx, p, state, {}, batch, None, 0)[0]))(
        variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g)) > 0


# ----------------------------------------------------------------------------- configs
def test_config_arguments_and_table3_5_values():
    c = table3_6.get_config("mnist5k_fc1_iper_at")
    assert (c.threat.norm, c.threat.eps, c.objective.name) == ("linf", 0.1, "iper_at")
    assert (c.optimizer.name, c.optimizer.lr, c.data.batch_size, c.train.num_epochs) == \
        ("adam", 1e-3, 100, 100.0)
    assert (c.objective.certified.per_alpha, c.objective.certified.per_beta) == (0.15, 0.1)
    assert c.objective.eps_schedule.name == "exponential"
    c = table3_6.get_config("cifar10_cnn_lper_at")
    assert (c.objective.certified.per_beta, c.objective.certified.subsample) == (1e-3, 10)
    c = table3_7.get_config("mnist5k_cnn_lper")
    assert (c.threat.norm, c.threat.eps, c.objective.certified.per_alpha) == ("l2", 0.3, 0.45)
    c = table3_8.get_config("mnist5k_fc1tanh_iper,l2,smoke")
    assert (c.model.kwargs.activation, c.threat.norm, c.train.num_steps) == ("tanh", "l2", 3)
    for bad in ("mnist5k_fc3_ibp", "svhn_fc1_ibp", "mnist5k_fc1_per", "mnist5k_fc1_ibp,quick"):
        with pytest.raises(ValueError, match="method in"):
            table3_6.get_config(bad)
    with pytest.raises(ValueError, match="ReLU"):
        table3_8.get_config("mnist5k_fc1sigmoid_mmr")
    c = sota_certified.get_config("cifar10_cnn7_sabr_8")
    assert (c.model.name, c.objective.certified.sabr_lambda, c.train.num_epochs) == ("cnn7", 0.7, 260.0)
    with pytest.raises(ValueError, match="cifar10_cnn7_ibp_2"):
        sota_certified.get_config("cifar10_cnn7_kw_2")


# ----------------------------------------------------------------------------- smoke runs
def _smoke(method, norm, activation, tmp_path):
    net = "fc1" if activation == "relu" else "fc1sigmoid"
    mod = {"linf": table3_6, "l2": table3_7}[norm] if activation == "relu" else table3_8
    arg = f"mnist5k_{net}_{method},smoke" + (",l2" if activation != "relu" and norm == "l2" else "")
    c = mod.get_config(arg)
    c.data.name, c.data.batch_size = "digits", 32
    c.model.name, c.model.kwargs.widths = "fc", (16,)
    c.objective.certified.subsample = 8 if method in ("mmr", "mmr_at") else 0
    summary = train(c, str(tmp_path))
    assert summary["steps"] == 3 and summary["compiles"] == {"update": 1}
    assert all(np.isfinite(v) for v in summary["final_train_metrics"].values())
    return c


DEFAULT_SMOKE = [("crown_ibp", "l2", "sigmoid"), ("lper_at", "linf", "relu"), ("sabr", "l2", "relu"),
                 ("mmr_at", "linf", "relu")]
ALL_SMOKE = [(m, n, a) for m in table3_6.METHODS for n in ("linf", "l2") for a in ("relu", "sigmoid")
             if not (a == "sigmoid" and m.startswith("mmr")) and (m, n, a) not in DEFAULT_SMOKE]


@pytest.mark.parametrize("method,norm,activation", DEFAULT_SMOKE)
def test_smoke_config_trains(method, norm, activation, tmp_path):
    _smoke(method, norm, activation, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method,norm,activation", ALL_SMOKE)
def test_smoke_config_trains_full_cross_product(method, norm, activation, tmp_path):
    _smoke(method, norm, activation, tmp_path)


@pytest.mark.slow
def test_smoke_run_certifies_end_to_end(tmp_path):
    _smoke("iper_at", "linf", "relu", tmp_path)
    out = subprocess.run([sys.executable, "-m", "experiments.certify",
                          "--config=configs/certify/table3_6.py", f"--workdir={tmp_path}",
                          "--config.num_examples=16", "--config.search.num_examples=4",
                          "--config.pgd.steps=3", "--config.plots.enabled=False"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(tmp_path, "certify.json")) as f:
        cert = json.load(f)
    assert cert and "ibp" in json.dumps(cert).lower()


def _sota_smoke(method, tmp_path):
    """A sota_certified recipe (CNN7 + BatchNorm, crop/flip, clipping) on mock data: digits images and
    a narrow CNN7."""
    c = sota_certified.get_config(f"cifar10_cnn7_{method}_8,smoke")
    c.data.name, c.data.batch_size = "digits", 16
    c.model.kwargs.width, c.model.kwargs.linear = 2, 8
    summary = train(c, str(tmp_path))
    assert summary["steps"] == 3 and summary["compiles"] == {"update": 1}
    assert all(np.isfinite(v) for v in summary["final_train_metrics"].values())


def test_sota_recipe_trains_cnn7_with_sabr_on_mock_data(tmp_path):
    _sota_smoke("sabr", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtl_ibp", "crown_ibp", "ibp"])
def test_sota_recipes_train_on_mock_data(method, tmp_path):
    _sota_smoke(method, tmp_path)


# ----------------------------------------------------------------------------- a real ordering
def _ordering_run(method, tmp_path, steps, eps=0.1):
    """A few hundred steps of ``method`` on mnist5k (FC 784-100-10, l_inf ε = 0.1, ε ramped over the
    first half), then the fraction of 500 test points certified by IBP and by Fast-Lin at ε."""
    c = table3_6.get_config(f"mnist5k_fc1_{method}")
    c.model.name, c.model.kwargs.widths = "fc", (100,)
    c.objective.attack.steps = 5
    half = steps / (4000 // 100) / 2  # epochs
    if c.objective.eps_schedule.name != "constant":  # ε (and κ) ramps squeezed into the first half
        c.objective.eps_schedule = schedule_config("linear", start_fraction=0.0, final_fraction=1.0,
                                                   ramp_epochs=half)
    for name in c.objective.schedules:
        c.objective.schedules[name].ramp_epochs = half
    c.train.num_steps = steps
    c.train.log_every = steps
    c.train.eval_every_epochs = 0.0
    c.train.tensorboard = False
    c.eval.num_examples = 100
    c.eval.attack.steps = 5
    train(c, str(tmp_path / method))
    run = load_trained(str(tmp_path / method))
    test = run.dataset.split("test").get(np.arange(500))
    x, y = jnp.asarray(test["image"]), jnp.asarray(test["label"])
    fn = make_logits_fn(run.model, run.variables)
    threat = ThreatModel(norm="linf", eps=eps)
    cert = {}
    for m in ("ibp", "fastlin"):
        lower = margin_bounds(fn, x, y, threat, method=m).lower
        cert[m] = float(C.certified_fraction(lower, y, jnp.ones(len(y), bool)))
    return cert


@pytest.mark.slow
def test_ibp_training_certifies_far_more_than_at_and_lper_at_more_with_lin(tmp_path):
    at = _ordering_run("at", tmp_path, 400)
    ibp = _ordering_run("ibp", tmp_path, 400)
    lper = _ordering_run("lper_at", tmp_path, 400)
    print({"at": at, "ibp": ibp, "lper_at": lper})
    assert ibp["ibp"] >= at["ibp"] + 0.3
    assert lper["fastlin"] >= at["fastlin"] + 0.2


# ----------------------------------------------------------------------------- bad input
class _SinNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(jnp.sin(nn.Dense(8)(x)))


def test_a_bound_method_on_an_unsupported_primitive_fails_before_training_naming_it(tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setitem(jmodels._REGISTRY, "sin_net", lambda num_classes, **kw: _SinNet(num_classes))
    c = table3_6.get_config("mnist5k_fc1_lper,smoke")
    c.data.name, c.data.batch_size = "digits", 32
    c.model.name, c.model.normalize = "sin_net", False
    setup = build_run(c)
    with pytest.raises(ValueError, match="'sin'"):  # when the train state is created, not at step 1
        create_run_state(setup)


@pytest.mark.parametrize("field,value", [("per_alpha", 0.0), ("per_c", 0), ("sabr_lambda", 1.5),
                                         ("mtl_alpha", -0.1), ("mmr_gamma_b", -1.0)])
def test_bad_certified_settings_fail_with_one_line_errors(field, value):
    c = table3_6.get_config("mnist5k_fc1_lper,smoke")
    c.data.name, c.data.batch_size = "digits", 32
    c.model.name, c.model.kwargs.widths = "fc", (8,)
    c.objective.certified[field] = value
    with pytest.raises(ValueError, match=f"objective.certified.{field} must be"):
        create_run_state(build_run(c))


# ----------------------------------------------------------------------------- Shi et al. 2021
def _deep_net(widths=(200, 200, 200)):
    model = create_model("fc", 10, widths=widths)
    return model, init_variables(model, jax.random.PRNGKey(0), SHAPE)


def _mean_widths(model, params, x, threat):
    @jax.jit
    def widths(p):
        _, pre = C.ibp_preactivations(make_logits_fn(model, {"params": p}), x, threat)
        return [jnp.mean(iv.hi - iv.lo) for iv in pre]
    return [float(w) for w in widths(params)]


def test_ibp_init_keeps_the_interval_width_constant_from_layer_to_layer():
    """Shi et al.'s claim: with σ = sqrt(2π)/fan_in the mean IBP pre-activation width stays ~1x per
    hidden layer (and 2x the input's at the first); the default (LeCun) initialisation grows it by
    ~0.4 sqrt(n) per layer. The output layer is left as it was."""
    model, variables = _deep_net()
    x = jax.random.uniform(jax.random.PRNGKey(1), (16,) + SHAPE)
    threat = ThreatModel("linf", 0.01, box=(0.0, 1.0))
    p = C.ibp_init(model, variables["params"], jax.random.PRNGKey(2), SHAPE)
    w_ibp = _mean_widths(model, p, x, threat)
    w_def = _mean_widths(model, variables["params"], x, threat)
    ratios = [b / a for a, b in zip(w_ibp, w_ibp[1:])]
    assert all(0.8 < r < 1.25 for r in ratios), ratios
    assert all(b / a > 4.0 for a, b in zip(w_def, w_def[1:])), w_def
    first = float(jnp.mean(2 * jnp.minimum(0.01, 1 - x) + 0 * x))  # ~ input width 0.02 (box-clipped)
    assert 1.4 < w_ibp[0] / first < 2.6
    for i, name in enumerate(["Dense_0", "Dense_1", "Dense_2"]):
        k = p[name]["kernel"]
        assert float(jnp.std(k)) == pytest.approx(np.sqrt(2 * np.pi) / k.shape[0], rel=0.05)
    np.testing.assert_array_equal(p["Dense_3"]["kernel"], variables["params"]["Dense_3"]["kernel"])


def test_ibp_preactivations_contain_every_sampled_preactivation_and_end_in_the_ibp_bounds():
    from jaxrobust.bounds import ibp_bounds
    from jaxrobust.bounds.tape import Interval
    model, variables = _net("relu", widths=(12, 9))
    fn = make_logits_fn(model, variables)
    x = _batch(4)["image"]
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        threat = ThreatModel(norm, eps, box=(0.0, 1.0))
        def run(x):
            out, pre = C.ibp_preactivations(fn, x, threat)
            return (out.lo, out.hi), [(iv.lo, iv.hi) for iv in pre], ibp_bounds(fn, x, threat)
        out, pre, (lo, hi) = jax.jit(run)(x)
        np.testing.assert_allclose(out[0], lo, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[1], hi, rtol=1e-6, atol=1e-6)
        pre = [Interval(a, b) for a, b in pre]
        assert [iv.lo.shape for iv in pre] == [(4, 12), (4, 9)]
        xs = jax.vmap(lambda k: threat.random_init(k, x))(jax.random.split(jax.random.PRNGKey(3), 64))

        def hidden(xi):
            _, st = model.apply(variables, xi, mutable=["intermediates"],
                                capture_intermediates=lambda m, n: isinstance(m, nn.Dense))
            return [v["__call__"][0] for v in st["intermediates"].values()][:2]
        for iv, h in zip(pre, jax.vmap(hidden)(xs)):  # h: (64, 4, width)
            assert bool(jnp.all((h >= iv.lo - 1e-5) & (h <= iv.hi + 1e-5)))


def test_warmup_regularizer_zero_when_tight_and_balanced_and_penalises_otherwise():
    from jaxrobust.bounds.tape import Interval
    mask = jnp.ones(2, bool)
    inp = Interval(jnp.zeros((2, 4)), jnp.full((2, 4), 0.2))  # half-width 0.1
    c = jnp.array([[1.0, -1.0, 2.0, -2.0], [0.5, -0.5, 1.5, -1.5]])
    balanced = Interval(c - 0.1, c + 0.1)  # as wide as the input; symmetric active/inactive units
    tight, relu = C.warmup_regularizer(inp, [balanced], mask, 0.5)
    assert float(tight) == 0.0 and float(relu) == 0.0
    wide = Interval(c - 1.0, c + 1.0)  # 10x the input's width: τ - 0.1 = 0.4, /τ = 0.8
    assert float(C.warmup_regularizer(inp, [wide], mask, 0.5)[0]) == pytest.approx(0.8)
    skew = Interval(jnp.abs(c) * jnp.array([1.0, 0.1, 1.0, 0.1]) * jnp.sign(c) - 0.01,
                    jnp.abs(c) * jnp.array([1.0, 0.1, 1.0, 0.1]) * jnp.sign(c) + 0.01)
    assert float(C.warmup_regularizer(inp, [skew], mask, 0.5)[1]) > 0.5  # inactive centres 10x closer
    # a padded row (mask False) does not count
    pad = Interval(jnp.concatenate([balanced.lo[:1], wide.lo[1:]]), jnp.concatenate([balanced.hi[:1], wide.hi[1:]]))
    assert float(C.warmup_regularizer(inp, [pad], jnp.array([True, False]), 0.5)[0]) == 0.0


def test_warmup_regularisers_gradient_matches_finite_differences_and_vanishes_after_the_ramp():
    model, variables = _deep_net((24, 24))
    batch = _batch(8)
    x, mask = batch["image"], batch["mask"]
    p0 = variables["params"]  # default init: the bounds widen, the tightness term is active
    threat = ThreatModel("linf", 0.05, box=(0.0, 1.0))

    @jax.jit
    def tightness(p):
        _, pre = C.ibp_preactivations(make_logits_fn(model, {"params": p}), x, threat)
        return C.warmup_regularizer(C.jibp.input_interval(x, threat), pre, mask, 0.5)[0]

    assert float(tightness(p0)) > 0
    g = jax.grad(tightness)(p0)["Dense_1"]["kernel"]
    d = jax.random.normal(jax.random.PRNGKey(4), g.shape)
    d = d / jnp.linalg.norm(d)  # a small step: no interval end crosses a ReLU kink
    h = 1e-3
    shifted = lambda t: {**p0, "Dense_1": dict(p0["Dense_1"], kernel=p0["Dense_1"]["kernel"] + t * d)}
    fd = (float(tightness(shifted(h))) - float(tightness(shifted(-h)))) / (2 * h)
    assert float(jnp.sum(g * d)) == pytest.approx(fd, rel=2e-2, abs=1e-5)

    def term(eps_now):  # λ (1 - ε(t)/ε): on at ε(t) = ε/2, off (exactly 0) once ε(t) = ε = 0.1
        ctx = _ctx(model, eps=0.1, warmup_reg=0.5)
        ctx = dataclasses.replace(ctx, schedules=dict(ctx.schedules, eps=lambda s: jnp.float32(eps_now)))
        small = ctx.threat.replace(eps=jnp.float32(eps_now))
        return C.warmup_terms(ctx, p0, {}, x, small, mask, 0)

    on, metrics = term(0.05)
    assert float(on) > 0 and float(metrics["reg_intensity"]) == pytest.approx(0.25)
    assert float(term(0.1)[0]) == 0.0


def test_ibp_init_is_applied_when_the_train_state_is_created():
    c = table3_6.get_config("mnist5k_fc1_ibp,smoke")
    c.data.name, c.data.batch_size = "digits", 32
    c.model.name, c.model.kwargs.widths = "fc", (16, 16)
    c.objective.certified.ibp_init = True
    setup = build_run(c)
    state = create_run_state(setup)
    plain = setup.model.init(jax.random.split(jax.random.PRNGKey(c.seed))[0],
                             jnp.zeros((1, 8, 8, 1)), train=False)["params"]  # the loop's own init
    k = state.params["Dense_1"]["kernel"]
    assert float(jnp.std(k)) == pytest.approx(np.sqrt(2 * np.pi) / 16, rel=0.25)
    assert not np.allclose(plain["Dense_1"]["kernel"], k)
    np.testing.assert_array_equal(plain["Dense_2"]["kernel"], state.params["Dense_2"]["kernel"])


# ----------------------------------------------------------------------------- row sets
ROW_SETS = [(table3_6, "mnist5k_fc1"), (table3_6, "mnist5k_cnn"), (table3_6, "cifar10_cnn"),
            (table3_6, "fashion_mnist_local_fc1"), (table3_7, "mnist5k_fc1"), (table3_7, "cifar10_cnn"),
            (table3_8, "mnist5k_fc1sigmoid"), (table3_8, "mnist5k_fc1tanh,l2")]


@pytest.mark.parametrize("mod,arg", ROW_SETS)
def test_row_sets_name_every_method_with_the_thesis_numbers(mod, arg):
    from experiments import reproduce as rp
    c = mod.get_config(arg)
    r = c.reproduce
    rp.validate(r)  # the reproduce command's own checks (train configs exist, thesis widths)
    assert list(r.order)[:2] == ["plain", "at"] or arg.startswith("fashion")
    for name in r.order:
        row = r.rows[name]
        path, _, run_arg = row.train.partition(":")
        run = mod.get_config(run_arg)  # each row's training config builds
        assert run.objective.name == name
        if not arg.startswith("fashion") and name not in ("sabr", "mtl_ibp"):
            assert len(row.thesis) == len(r.columns), name
    if arg.startswith("fashion"):
        assert sorted(r.order) == sorted(("at", "kw", "ibp", "crown_ibp", "lper_at", "iper_at"))


def test_thesis_numbers_are_the_printed_ones_and_the_claims_hold_on_them():
    """The claims functions checked on the thesis's own numbers must all hold (they encode what the
    thesis says about its tables); a few spot values against the printed tables."""
    from configs import table3_9
    r = table3_6.get_config("mnist5k_fc1").reproduce
    assert r.rows.lper.thesis == (1.60, 7.45, 11.71, 92.89, 7.69, 8.83, 0.71, 9.35)
    assert table3_7.get_config("cifar10_cnn").reproduce.rows.iper_at.thesis[:4] == (24.85, 31.32, 47.28, 100.0)
    assert table3_8.get_config("mnist5k_fc1tanh,l2").reproduce.rows.lper.thesis[2] == 5.53
    for mod, arg in ROW_SETS + [(table3_7, "mnist5k_cnn"), (table3_8, "mnist5k_fc1tanh"),
                                (table3_8, "mnist5k_fc1sigmoid,l2")]:
        r = mod.get_config(arg).reproduce
        if arg.startswith("fashion"):
            continue
        labels = [lab for lab, _ in r.columns]
        means = {n: dict(zip(labels, r.rows[n].thesis)) for n in r.order if len(r.rows[n].thesis)}
        for cl in mod.claims(means):
            assert cl["holds"] is True, (arg, cl)
    for arg in ("mnist5k_fc1", "mnist5k_cnn,l2", "cifar10_cnn"):
        r = table3_9.get_config(arg).reproduce
        means = {n: {"T_Lin": r.rows[n].thesis[0], "T_PEC": r.rows[n].thesis[1]}
                 for n in r.order if len(r.rows[n].thesis)}
        assert len(means) == 7 and all(c["holds"] for c in table3_9.claims(means)), arg
    # a claim that does not hold is reported as such
    bad = {"kw": {"CTE (%)": 1.0}, "lper_at": {"CTE (%)": 2.0}, "iper_at": {"CTE (%)": 1.5}}
    assert table3_6.claim_per_at_cleaner_than_kw(bad)["holds"] is False


def test_epochs_option_scales_the_whole_protocol():
    full = table3_6.get_config("mnist5k_cnn_lper")
    short = table3_6.get_config("mnist5k_cnn_lper,epochs20")
    assert (full.train.num_epochs, short.train.num_epochs) == (100.0, 20.0)
    assert short.objective.schedules.per_beta.warmup_epochs == pytest.approx(2.0)
    assert short.schedule.milestones == (18.0,)
    fc = table3_6.get_config("mnist5k_fc1_lper,epochs50")
    assert fc.objective.eps_schedule.rate == pytest.approx(2.0 ** (1 / 10))  # x2 every 10 epochs
    assert table3_6.get_config("mnist5k_fc1_ibp,epochs50").objective.schedules.kappa.ramp_epochs == 25.0
    for bad in ("mnist5k_fc1_ibp,epochs0", "mnist5k_fc1_ibp,epochsx", "mnist5k_fc1,quick"):
        with pytest.raises(ValueError, match="epochs<N>"):
            table3_6.get_config(bad)
    with pytest.raises(ValueError, match="row set"):
        table3_9 = __import__("configs.table3_9", fromlist=["x"])
        table3_9.get_config("mnist5k_fc1_kw")
