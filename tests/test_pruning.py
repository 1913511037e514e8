"""Robust binary sub-networks (thesis §5.1): eq. 5.11 keep counts (the released code's cResNet34
anchor), exact top-k masks with the straight-through score gradient, the initialisations and the
last BatchNorm, training that only moves scores and statistics, and the compact export whose logits
equal the masked model's."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from configs.common import base_config, subnet_model, with_defaults
from jaxrobust.models import create_model
from jaxrobust.pruning import (adaptive_shares, allocate_keep_counts, effective_params, export_subnet,
                               hard_mask, layer_table, load_artifact, masked_kernel, masks_of,
                               table5_1_flops, topk_mask)
from jaxrobust.pruning.subnet import get_path, init_weights, prunable_layers


def cresnet34_sizes():
    """Prunable layer sizes of the released cResNet34 (3x3 stem, 1x1 shortcuts, 1x1-conv fc) in the
    order PyTorch's named_modules lists them."""
    sizes, inp = [27 * 64], 64
    for i, (n, c) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for j in range(n):
            sizes += [9 * inp * c, 9 * c * c]
            if (i > 0 and j == 0) or inp != c:
                sizes.append(inp * c)
            inp = c
    return sizes + [512 * 10]


# ----------------------------------------------------------------------------- allocation (eq 5.11)
def test_released_allocation_anchor_cresnet34():
    sizes = cresnet34_sizes()
    assert sum(sizes) == 21265088  # §5.1.4: "21265088 trainable parameters"
    counts = allocate_keep_counts(sizes, 0.01, 0.1, rounding="released")
    assert sum(counts) == 212649
    assert counts[0] == sizes[0]  # conv1 kept whole
    assert abs(counts[-1] / sizes[-1] - 0.775) < 1e-3  # the final fc 77.5% kept
    exact = allocate_keep_counts(sizes, 0.01, 0.1)
    assert sum(exact) == int(0.01 * sum(sizes)) and exact[0] == sizes[0]
    assert max(abs(a - b) for a, b in zip(exact, counts)) <= 2  # the same rule, rounded differently


def test_flax_cresnet34_has_the_released_layers():
    model = create_model("subnet", 10, base="cifar_resnet34", keep_rate=0.01, gamma=0.1)
    table = layer_table(model, (32, 32, 3))
    assert sorted(r["size"] for r in table) == sorted(cresnet34_sizes())
    assert sum(r["kept"] for r in table) == 212650
    stem = next(r for r in table if r["layer"] == "Conv_0/kernel")
    assert stem["kept"] == stem["size"] == 1728


@pytest.mark.parametrize("base,kwargs", [
    ("cifar_resnet18", {"w": 2}), ("vgg", {"w": 2}), ("cnn_small", {}),
    pytest.param("cifar_resnet50", {"w": 2}, marks=pytest.mark.slow),
    pytest.param("wrn34_10", {}, marks=pytest.mark.slow)])
def test_every_backbone_is_masked_kernel_by_kernel(base, kwargs):
    """SubNet wraps each §5.1 backbone unchanged: one score tensor per conv/dense kernel, the keep
    counts over all of them (shapes only: nothing is compiled)."""
    model = create_model("subnet", 10, base=base, base_kwargs=kwargs, keep_rate=0.05, gamma=0.1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    dense = jax.eval_shape(lambda: create_model(base, 10, **kwargs).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert jax.tree.map(lambda a: a.shape, shapes["params"]["weights"]) == \
        jax.tree.map(lambda a: a.shape, dense["params"])
    kernels = prunable_layers(dense["params"])
    assert [p for p, _ in prunable_layers(shapes["params"]["scores"])] == [p for p, _ in kernels]
    table = layer_table(model, (32, 32, 3))
    n = sum(int(np.prod(s)) for _, s in kernels)
    assert sum(r["size"] for r in table) == n and sum(r["kept"] for r in table) == int(0.05 * n)
    if "batch_stats" in dense:
        assert jax.tree.map(lambda a: a.shape, shapes["batch_stats"]["base_stats"]) == \
            jax.tree.map(lambda a: a.shape, dense["batch_stats"])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 200_000), min_size=2, max_size=12),
       keep=st.floats(0.001, 1.0), gamma=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0]))
def test_keep_counts_sum_to_the_budget_for_every_gamma(sizes, keep, gamma):
    budget = math.floor(keep * sum(sizes) + 1e-9)
    if budget < len(sizes):
        with pytest.raises(ValueError, match="min_keep"):
            allocate_keep_counts(sizes, keep, gamma)
        return
    m = allocate_keep_counts(sizes, keep, gamma)
    assert sum(m) == budget
    assert all(1 <= a <= n for a, n in zip(m, sizes))
    shares = adaptive_shares(sizes, keep, gamma)
    assert np.isclose(shares.sum(), keep * sum(sizes)) and np.all(shares <= np.array(sizes) + 1e-6)
    # integer counts stay within 1 of the real solution (+ what min_keep moved)
    moved = sum(max(0.0, 1 - s) for s in shares)
    assert np.abs(np.array(m) - shares * budget / shares.sum()).sum() <= len(sizes) + 2 * moved + 1e-6


def test_gamma_one_is_the_fixed_rate_and_gamma_zero_a_fixed_number():
    sizes = [27, 1728, 36864, 73728, 147456, 589824, 5120]
    fixed = allocate_keep_counts(sizes, 0.05, 1.0)
    assert all(abs(m - 0.05 * n) <= 1 for m, n in zip(fixed, sizes))
    same = allocate_keep_counts(sizes, 0.05, 0.0)
    unsaturated = [m for m, n in zip(same, sizes) if m < n]
    assert len(unsaturated) >= 3 and max(unsaturated) - min(unsaturated) <= 1
    assert all(m == n for m, n in zip(same, sizes) if n < min(unsaturated))  # small layers kept whole
    mid = allocate_keep_counts(sizes, 0.05, 0.5)  # in between: small layers keep larger fractions
    fr = [m / n for m, n in zip(mid, sizes)]
    assert fr[-2] < 0.05 < fr[1] and fr[-2] > same[-2] / sizes[-2]


def test_allocation_rejects_bad_settings():
    for kw, match in (({"keep_rate": 0.0}, "keep_rate"), ({"keep_rate": 1.5}, "keep_rate"),
                      ({"keep_rate": float("nan")}, "keep_rate"), ({"gamma": -0.1}, "gamma"),
                      ({"gamma": 2.0}, "gamma"), ({"rounding": "round"}, "exact")):
        args = {"keep_rate": 0.1, "gamma": 0.5, **kw}
        with pytest.raises(ValueError, match=match):
            allocate_keep_counts([100, 200], args.pop("keep_rate"), args.pop("gamma"), **args)
    with pytest.raises(ValueError, match="positive"):
        allocate_keep_counts([100, 0], 0.1, 0.5)


# ----------------------------------------------------------------------------- masks (eqs 5.1-5.2)
def test_mask_keeps_exactly_k_entries_even_with_ties():
    s = jnp.array([[0.5, -0.5, 0.5], [0.1, 0.5, -0.5]])  # five entries tie at |s| = 0.5
    masks = jax.jit(lambda s: [hard_mask(s, k) for k in range(7)])(s)
    for k, m in enumerate(masks):
        assert int(m.sum()) == k
        if 0 < k < 6:  # kept entries are never smaller than dropped ones
            assert float(jnp.min(jnp.where(m, jnp.abs(s), 9.0))) >= float(jnp.max(jnp.where(m, -1.0, jnp.abs(s))))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 3, 8))
    m = hard_mask(x, 37)
    assert int(m.sum()) == 37 and bool(jnp.all(jnp.abs(x)[m].min() >= jnp.abs(x)[~m].max()))


def test_straight_through_gradient_is_the_masked_weight_gradient_times_w():
    """∂L/∂s = ∂L/∂W_eff ⊙ W ⊙ sign(s) for every score, kept or not (the mask is the identity in the
    backward pass), on a real SubNet with the last BN in train mode."""
    model = create_model("subnet", 10, base="fc", base_kwargs={"widths": (16,)}, keep_rate=0.2,
                         gamma=0.5, score_scale=0.3)
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 6, 6, 1))
    y = jnp.arange(8) % 10
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    w, s = v["params"]["weights"], v["params"]["scores"]
    layers, counts = model.layer_plan((6, 6, 1))

    def loss_of_scores(scores):
        logits, _ = model.apply({**v, "params": {"weights": w, "scores": scores}}, x, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def loss_of_effective(eff):  # the same network, differentiated w.r.t. W ⊙ m directly
        z = model.base.apply({"params": eff}, x)
        mean, var = z.mean(0), z.var(0)
        return optax.softmax_cross_entropy_with_integer_labels((z - mean) * jax.lax.rsqrt(var + 1e-5),
                                                               y).mean()

    g_s = jax.jit(jax.grad(loss_of_scores))(s)
    eff = jax.jit(lambda w, s: effective_params(w, s, layers, counts))(w, s)
    g_eff = jax.jit(jax.grad(loss_of_effective))(eff)
    assert np.isclose(jax.jit(loss_of_scores)(s), jax.jit(loss_of_effective)(eff))
    for (path, _), k in zip(layers, counts):
        expected = get_path(g_eff, path) * get_path(w, path) * jnp.sign(get_path(s, path))
        np.testing.assert_allclose(get_path(g_s, path), expected, rtol=1e-5, atol=1e-7)
        dropped = ~hard_mask(get_path(s, path), k)
        assert bool(jnp.any(get_path(g_s, path)[dropped] != 0))  # pruned weights' scores move too


def test_masked_kernel_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="do not match"):
        masked_kernel(jnp.ones((3, 4)), jnp.ones((4, 3)), 2)
    assert float(topk_mask(jnp.array([3.0, 1.0, 2.0]), 2).sum()) == 2.0


# ----------------------------------------------------------------------------- initialisation, LBN
def test_binary_and_signed_kaiming_constant_initialisations():
    x = jnp.zeros((1, 8, 8, 1))
    for init, a in (("binary", 0.01), ("signed_kaiming_constant", 1.0)):
        model = create_model("subnet", 10, base="cnn_small", keep_rate=0.05, weight_init=init,
                             score_init="uniform" if init == "binary" else "fan_uniform", score_scale=a)
        p = jax.jit(model.init)(jax.random.PRNGKey(3), x)["params"]
        for path, shape in prunable_layers(p["weights"]):
            w, s = np.asarray(get_path(p["weights"], path)), np.asarray(get_path(p["scores"], path))
            fan = int(np.prod(shape[:-1]))
            mag = 1.0 if init == "binary" else math.sqrt(2.0 / (fan * 0.05))
            np.testing.assert_allclose(np.abs(w), mag, rtol=1e-6)
            assert 0.3 < (w > 0).mean() < 0.7  # random signs
            bound = a if init == "binary" else a / math.sqrt(fan)
            assert np.abs(s).max() <= bound and np.abs(s).max() > 0.5 * bound
            bias = np.asarray(get_path(p["weights"], path[:-1] + ("bias",)))
            assert not bias.any()  # §5.1.4: biases initialised to 0 and thus disabled
    w = {"Dense_0": {"kernel": jnp.array([[2.0, -4.0]]), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match="unknown init"):
        init_weights(w, "gaussian", 0.1)
    m = create_model("subnet", 10, base="fc", base_kwargs={"widths": (4,)}, score_init="magnitude",
                     score_scale=1.0, weight_init="base", keep_rate=0.5)
    p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3)))["params"]
    k, s = p["weights"]["Dense_0"]["kernel"], p["scores"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(s, math.sqrt(6 / 3) * k / jnp.abs(k).max(), rtol=1e-6)  # HYDRA


def test_subnet_settings_are_validated():
    for kw, match in (({"weight_init": "xavier"}, "weight_init"), ({"score_init": "normal"}, "score_init"),
                      ({"weight_init": "pretrained"}, "weights_from"), ({"score_scale": -1.0}, "score_scale"),
                      ({"keep_rate": 0.0}, "keep_rate"), ({"gamma": 3.0}, "gamma"), ({"bogus": 1}, "bogus"),
                      ({"base": "nope"}, "Unknown model")):
        with pytest.raises(ValueError, match=match):
            create_model("subnet", 10, **{"base": "cnn_small", **kw})
    with pytest.raises(FileNotFoundError, match="not a training run"):
        create_model("subnet", 10, base="cnn_small", weight_init="pretrained", weights_from="/nonexistent")


def test_last_bn_cancels_the_weight_scale_in_the_score_gradient():
    """§5.1.3, eq. 5.14: with LBN, multiplying the last layer's weights by α leaves the loss and the
    score gradients unchanged (train mode); without LBN the logits grow with α and the gradients
    change."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 5))
    y = jnp.arange(16) % 3
    out = {}
    for lbn in (True, False):
        model = create_model("subnet", 3, base="fc", base_kwargs={"widths": (12,)}, keep_rate=0.5,
                             last_bn=lbn, score_scale=0.1)
        v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])

        @jax.jit
        def loss(scores, alpha):
            w = v["params"]["weights"]
            w = {**w, "Dense_1": {**w["Dense_1"], "kernel": alpha * w["Dense_1"]["kernel"]}}
            logits, _ = model.apply({**v, "params": {"weights": w, "scores": scores}}, x, train=True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        s = v["params"]["scores"]
        grad = jax.jit(jax.grad(loss))
        out[lbn] = [(loss(s, a), grad(s, a)) for a in (1.0, 50.0)]
    (l1, g1), (l50, g50) = out[True]
    assert np.isclose(l1, l50, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g50)):  # up to BN's ε = 1e-5
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3 * np.abs(a).max())
    (l1, g1), (l50, g50) = out[False]
    assert not np.isclose(l1, l50, rtol=1e-2)
    last = lambda g: np.abs(np.asarray(g["Dense_1"]["kernel"])).max()
    assert not np.isclose(last(g1), last(g50), rtol=0.5)


# ----------------------------------------------------------------------------- FLOPs (Table 5.1)
def test_table5_1_flops_of_the_small_cnn():
    model = create_model("subnet", 10, base="cnn_small", keep_rate=0.1, gamma=1.0)
    f = table5_1_flops(model, (28, 28, 1))
    sizes = [256, 8192, 156800, 1000]
    positions = [14 * 14, 7 * 7, 1, 1]  # conv 4x4/2 outputs 14x14, then 7x7; dense: 1
    kept = [r["kept"] for r in f["layers"]]
    assert [r["size"] for r in f["layers"]] == sizes and [r["positions"] for r in f["layers"]] == positions
    mp = sum(k * p for k, p in zip(kept, positions))
    bn = 10  # only the last BN (10 logits): cnn_small has no BatchNorm
    assert f["sparse_fp"] == {"forward_train": 2 * mp + 11 * bn, "forward_eval": 2 * mp + 4 * bn,
                              "backward": 4 * mp + sum(sizes) + 4 * bn}
    assert f["sparse_binary"] == {"forward_train": mp + 11 * bn, "forward_eval": mp + 4 * bn,
                                  "backward": 3 * mp + 4 * bn}
    dense_mp = sum(n * p for n, p in zip(sizes, positions))
    assert f["dense_fp"]["forward_eval"] == 2 * dense_mp + 4 * bn
    saving = f["binary_saving"]
    assert saving["inference"] == pytest.approx(1 - (mp + 4 * bn) / (2 * mp + 4 * bn))
    assert saving["forward_train"] == pytest.approx(1 - (mp + 11 * bn) / (2 * mp + 11 * bn))
    assert saving["training"] == pytest.approx(
        1 - (4 * mp + 15 * bn) / (6 * mp + sum(sizes) + 15 * bn))


# ----------------------------------------------------------------------------- training and export
def tiny_subnet_config(**kw):
    c = base_config()
    c.data.name, c.data.batch_size, c.data.eval_batch_size = "mnist5k", 32, 100
    subnet_model(c, "cnn_small", **{"keep_rate": 0.01, "gamma": 0.1, **kw})
    c.threat.eps = 0.1
    c.objective.attack.steps = 2
    c.train.num_steps, c.train.log_every, c.train.eval_every_epochs = 3, 1, 0.0
    c.train.tensorboard = False
    c.eval.num_examples, c.eval.attack.steps = 64, 0  # clean accuracy only: one compile less
    return c


@pytest.fixture(scope="module")
def trained_subnet(tmp_path_factory):
    from jaxrobust.train import train
    wd = str(tmp_path_factory.mktemp("subnet"))
    c = tiny_subnet_config()
    first = {}

    def after_first_step(step, state):  # the state after one update (weights frozen since init:
        if step == 1:                   # they are still exactly ±1, see below)
            first.update(jax.device_get({"params": state.params, "stats": state.model_state}))
    summary = train(c, wd, callbacks=(after_first_step,))
    return c, wd, first, summary


def test_training_moves_only_scores_and_statistics(trained_subnet):
    from jaxrobust.train import load_trained
    c, wd, first, summary = trained_subnet
    run = load_trained(wd)
    p0, p1 = first["params"], jax.device_get(run.variables["params"])
    for a, b in zip(jax.tree.leaves(p0["weights"]), jax.tree.leaves(p1["weights"])):
        assert np.array_equal(a, b)  # frozen: bit-identical after steps 2 and 3
    for path, _ in prunable_layers(p1["weights"]):  # ... and at step 1: still the binary init, with
        assert set(np.unique(get_path(p1["weights"], path))) == {-1.0, 1.0}  # the zero biases
        assert not np.any(get_path(p1["weights"], path[:-1] + ("bias",)))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0["scores"]),
                                                         jax.tree.leaves(p1["scores"]))]
    assert all(changed)
    lbn0, lbn1 = first["stats"]["batch_stats"]["last_bn"], run.variables["batch_stats"]["last_bn"]
    assert not np.array_equal(lbn0["mean"], lbn1["mean"])  # the last BN's running statistics
    for row, (_, mask) in zip(layer_table(run.model, (28, 28, 1)),
                              masks_of(run.model, run.variables, (28, 28, 1))):
        assert int(mask.sum()) == row["kept"]  # exactly k_i per layer
    for png in ("subnet_layers.png", "subnet_mask.png"):  # kept fraction per layer, a conv's mask
        assert os.path.getsize(os.path.join(wd, "plots", png)) > 1000
    hook = summary["finish_hooks"]["jaxrobust.pruning.export:export_run"]
    assert hook["kept_weights"] == int(0.01 * hook["prunable_weights"])


def test_export_reproduces_the_logits_exactly_and_is_small(trained_subnet):
    from jaxrobust.pruning import load_export_run
    from jaxrobust.train import load_trained
    c, wd, _, _ = trained_subnet
    run = load_trained(wd)
    art = load_artifact(os.path.join(wd, "export"))
    x = run.dataset.split("test").get(np.arange(64))["image"]
    assert np.array_equal(np.asarray(run.logits_fn(x)), np.asarray(art.logits_fn(x)))
    b = art.manifest["bytes"]
    assert b["total"] == os.path.getsize(os.path.join(wd, "export", "subnet.npz")) + \
        os.path.getsize(os.path.join(wd, "export", "manifest.json"))
    assert b["dense_fp32"] == 4 * (256 + 16 + 8192 + 32 + 156800 + 100 + 1000 + 10 + 2 * 10)
    assert b["dense_fp32"] / b["total"] >= 20  # ≥ 20x smaller than the dense fp32 network at 1% kept
    assert all(layer["binary"] and layer["scale"] == 1.0 for layer in art.manifest["layers"])
    from configs.eval.pgd20 import get_config as pgd20
    from experiments.evaluate import evaluate
    bad = pgd20("smoke")
    bad.source = "weights"
    with pytest.raises(ValueError, match="'checkpoint'.*'export'"):
        evaluate(bad, wd)
    loaded = load_export_run(wd)  # what experiments.evaluate --config.source=export attacks
    assert np.array_equal(np.asarray(loaded.logits_fn(x)), np.asarray(run.logits_fn(x)))
    assert loaded.threat.eps == pytest.approx(0.1) and loaded.step == 3


def test_export_of_fp_weights_keeps_their_values(tmp_path):
    """HYDRA-style sub-networks have trained full-precision weights: stored as kept float32 values."""
    model = create_model("subnet", 10, base="fc", base_kwargs={"widths": (8,)}, keep_rate=0.3,
                         weight_init="base", last_bn=False)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 7)))
    m = export_subnet(model, v, (7,), str(tmp_path))
    assert not any(layer["binary"] for layer in m["layers"])
    art = load_artifact(str(tmp_path))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 7))
    assert np.array_equal(np.asarray(jax.jit(lambda x: model.apply(v, x))(x)), np.asarray(art.logits_fn(x)))
    with open(tmp_path / "manifest.json") as f:
        assert json.load(f)["base"] == {"name": "fc", "num_classes": 10, "kwargs": {"widths": [8]}}


def test_finish_hooks_are_checked_before_the_run_starts(tmp_path):
    from jaxrobust.train import train
    c = tiny_subnet_config()
    c.train.finish_hooks = ("jaxrobust.pruning.export:no_such_function",)
    with pytest.raises(ValueError, match="does not load"):
        train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "config.json")
