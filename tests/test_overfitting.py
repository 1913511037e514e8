"""Robust overfitting toolkit (thesis §4.3, issue #15): instance difficulty (eq. 4.30) tracked by the
loop, D-distance (eq. 4.31), easy/random/hard subsets, extra data, reweighting and adaptive targets
(Alg. 4.1), IAT's ε rule, and the reference run trained first by a subset run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import base_config, with_defaults
from jaxrobust.analysis import difficulty as D
from jaxrobust.data import subsets as S
from jaxrobust.data.sources import in_memory_split
from jaxrobust.models import create_model, init_variables
from jaxrobust.train import ObjectiveContext, get_objective, register, train
from jaxrobust.train import reweight as R
from jaxrobust.train.loop import build_run, build_schedules
from jaxrobust.train.objectives import Objective, ObjectiveOutput, per_example_ce


# ----------------------------------------------------------------------------- eq. 4.30 / 4.31
def _brute_difficulty(g):
    g = np.asarray(g, float)
    return np.array([(np.sum(g > v) + 0.5 * np.sum(g == v)) / len(g) for v in g])


def test_difficulty_is_eq_4_30_with_ties_and_unknown_instances():
    rng = np.random.default_rng(0)
    g = np.round(rng.exponential(size=300), 1)  # many ties
    np.testing.assert_allclose(D.difficulty_from_losses(g), _brute_difficulty(g), atol=1e-12)
    g2 = g.copy()
    g2[[3, 7]] = np.nan
    d2 = D.difficulty_from_losses(g2)
    assert np.isnan(d2[[3, 7]]).all()
    ok = np.isfinite(g2)
    np.testing.assert_allclose(d2[ok], _brute_difficulty(g2[ok]), atol=1e-12)
    # without ties: the easiest (lowest loss) instance gets 1 - 1/2n, the hardest 1/2n; mean 1/2
    d3 = D.difficulty_from_losses(rng.normal(size=200))
    assert d3.max() == 1 - 1 / 400 and d3.min() == 1 / 400 and d3.mean() == pytest.approx(0.5)
    assert np.nanmean(d2) == pytest.approx(0.5)


def test_d_distance_is_a_bounded_symmetric_distance():
    rng = np.random.default_rng(1)
    a = D.difficulty_from_losses(rng.normal(size=20000))
    b = D.difficulty_from_losses(rng.normal(size=20000))
    assert D.d_distance(a, a) == 0.0
    assert D.d_distance(a, b) == D.d_distance(b, a)
    assert D.d_distance(a, 1 - a) == pytest.approx(0.5, abs=1e-3)  # reversed ranks
    # independent difficulty functions are 1/3 apart on average (E|U - V| for independent uniforms)
    assert D.d_distance(a, b) == pytest.approx(1 / 3, abs=0.01)
    for _ in range(20):
        x, y = rng.uniform(size=50), rng.uniform(size=50)
        assert 0.0 <= D.d_distance(x, y) <= 1.0
    # only instances known to both count; a run with fewer dataset indices compares on the prefix
    c = a.copy()
    c[:100] = np.nan
    assert D.d_distance(c, a) == 0.0 and D.d_distance(a[:500], a) == 0.0
    with pytest.raises(ValueError, match="outside"):
        D.d_distance(a, a * 2)
    with pytest.raises(ValueError, match="share no instance"):
        D.d_distance(np.full(4, np.nan), np.ones(4) / 2)
    m = D.d_distance_matrix({"x": [a, a], "y": [b]})
    assert m["x"]["x"] == 0.0 and np.isnan(m["y"]["y"]) and m["x"]["y"] == m["y"]["x"]


def test_groups_are_deciles_of_difficulty():
    d = np.array([0.0, 0.05, 0.1, 0.55, 0.999, 1.0, np.nan])
    np.testing.assert_array_equal(D.difficulty_groups(d), [0, 0, 1, 5, 9, 9, -1])
    vals = np.array([[1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0]])
    gm = D.group_means(vals, D.difficulty_groups(d))
    assert gm[0, 0] == 2.0 and gm[0, 9] == 10.0 and np.isnan(gm[0, 2])


# ----------------------------------------------------------------------------- difficulty in the loop
def _tiny_config(objective="standard", epochs=2.0):
    c = base_config()
    c.data.name = "digits"
    c.data.batch_size = 100
    c.data.eval_batch_size = 200
    c.model.name = "fc"
    c.model.kwargs.widths = (16,)
    c.threat.eps = 0.1
    c.objective.name = objective
    c.objective.attack.steps = 1
    c.optimizer.name, c.optimizer.lr = "adam", 1e-2
    c.train.num_epochs = epochs
    c.train.log_every = 7
    c.train.eval_every_epochs = 0.0
    c.train.tensorboard = False
    c.eval.attack.steps = 1
    c.eval.num_examples = 50
    c.train.difficulty.enabled = True
    return c


# Logs every step's per-example values next to the difficulty sums (an independent record).
def _logging_loss(ctx, params, model_state, extra, batch, key, step):
    value, out = get_objective("standard").loss(ctx, params, model_state, extra, batch, key, step)
    pe = out.per_example
    upd = {"logged_loss": pe["loss"], "logged_step": jnp.full_like(batch["index"], step)}
    return value, out._replace(instance_updates=upd)


register("_logging_standard", Objective(
    init=lambda ctx, p, n, s: {"instance": {"logged_loss": jnp.zeros((n,), jnp.float32),
                                            "logged_step": jnp.full((n,), -1, jnp.int32)}},
    loss=_logging_loss))


def test_difficulty_equals_the_average_of_logged_per_example_losses(tmp_path):
    """A 2-epoch run on digits (14 steps of 100, 37 examples dropped each epoch): difficulty.npy and
    instance_stats.npz equal eq. 4.30 of the per-example average recomputed from every step's logged
    per-example loss (a callback reads what each step wrote)."""
    log = {}

    def record(step, state):
        inst = jax.device_get(state.extra["instance"])
        hit = np.flatnonzero(inst["logged_step"][:1438] == step - 1)  # (rows past 1438: padding)
        for i in hit:
            log.setdefault(int(i), []).append(float(inst["logged_loss"][i]))
        return False

    c = _tiny_config("_logging_standard")
    train(c, str(tmp_path), callbacks=[record])
    setup = build_run(with_defaults(c))
    n_idx = setup.num_indices
    mean = np.full(n_idx, np.nan)
    for i, v in log.items():
        mean[i] = np.mean(v)
    assert 2 * 1400 == sum(len(v) for v in log.values())  # 14 steps of 100 examples
    with np.load(tmp_path / "instance_stats.npz") as z:
        np.testing.assert_allclose(z["mean_loss"], mean, rtol=1e-5, equal_nan=True)
        assert int(z["count"].sum()) == 2800 and set(np.unique(z["count"])) <= {0.0, 1.0, 2.0}
    d = np.load(tmp_path / "difficulty.npy")
    np.testing.assert_allclose(d, D.difficulty_from_losses(mean), atol=1e-6, equal_nan=True)
    summary = json.load(open(tmp_path / "difficulty.json"))
    assert summary["instances"] == int(np.isfinite(mean).sum()) and summary["step"] == 28
    assert np.isfinite(D.load_difficulty(str(tmp_path))).sum() == summary["instances"]


def test_difficulty_tracking_refuses_objectives_without_per_example_values(tmp_path):
    register("_no_per_example", lambda ctx, p, ms, e, b, k, s: get_objective("standard").loss(
        ctx, p, ms, e, b, k, s)[0:1] + (ObjectiveOutput(ms, {}, {}),))
    c = _tiny_config("_no_per_example")
    with pytest.raises(ValueError, match="does not report per-example values.*pgd_at"):
        train(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "config.json")  # nothing written


# ----------------------------------------------------------------------------- subsets
def test_subsets_are_disjoint_by_rank_class_balanced_and_of_the_asked_size():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    d = rng.uniform(size=400)
    d[:10] = np.nan  # unknown instances are never ranked
    easy = S.select_subset(d, labels, "easy", 40)
    hard = S.select_subset(d, labels, "hard", 40)
    rand = S.select_subset(d, labels, "random", 41, seed=3)
    assert len(easy) == len(hard) == 40 and len(rand) == 41
    assert not np.intersect1d(easy, hard).size and np.isfinite(d[easy]).all()
    for k in range(4):
        e, h = easy[labels[easy] == k], hard[labels[hard] == k]
        assert len(e) == len(h) == 10
        assert d[e].min() > d[h].max()  # every easy instance is easier than every hard one
        rest = np.setdiff1d(np.flatnonzero((labels == k) & np.isfinite(d)), e)
        assert d[e].min() >= d[rest].max()  # the easiest of its class
    assert sorted(np.bincount(labels[rand], minlength=4)) == [10, 10, 10, 11]
    np.testing.assert_array_equal(rand, S.select_subset(d, labels, "random", 41, seed=3))
    unbal = S.select_subset(d, labels, "hard", 30, class_balanced=False)
    assert d[unbal].max() <= np.sort(d[np.isfinite(d)])[29]
    with pytest.raises(ValueError, match="kind must be one of"):
        S.select_subset(d, labels, "medium", 10)
    with pytest.raises(ValueError, match="size must be an integer"):
        S.select_subset(d, labels, "easy", 0)
    with pytest.raises(ValueError, match="known difficulty"):
        S.select_subset(np.full(400, np.nan), labels, "easy", 40)


def test_extra_data_batches_are_half_and_half():
    from jaxrobust.data import batch_iterator
    xp = np.zeros((10, 2), np.float32)
    xe = np.ones((30, 2), np.float32)
    p, e = in_memory_split(xp, np.arange(10) % 3), in_memory_split(xe, np.arange(30) % 3)
    m = S.mixed_split(p, e, offset=10)
    assert len(m) == 60  # one epoch = one pass over the extra data
    seen_e = []
    for b in batch_iterator(m, 8, shuffle=True, seed=1, drop_remainder=True):
        extra = b["index"] >= 10
        assert extra.sum() == 4  # exactly half of every batch
        np.testing.assert_array_equal(b["image"][extra], 1.0)
        np.testing.assert_array_equal(b["image"][~extra], 0.0)
        seen_e += list(b["index"][extra])
    assert len(set(seen_e)) == len(seen_e)  # each extra example at most once per epoch
    # the rest of a subset is the extra data ('rest'): one index space
    full = in_memory_split(np.arange(40, dtype=np.float32)[:, None], np.arange(40) % 2)
    sub, rest = full.subset(np.arange(10)), full.subset(np.arange(10, 40))
    mr = S.mixed_split(sub, rest, offset=0)
    got = mr.get(np.arange(6))
    np.testing.assert_array_equal(got["image"][:, 0], got["index"])


def test_subset_run_trains_its_reference_first(tmp_path):
    """configs/subsets.py:mnist5k_hard,smoke on a fresh directory: the reference run is trained first
    (its difficulty written), then the run trains on the 200 hardest of it, 20 per class."""
    from configs import subsets
    wd = tmp_path / "mnist5k_hard"
    s = train(subsets.get_config("mnist5k_hard,smoke"), str(wd))
    ref = tmp_path / "mnist5k_reference_pgd_smoke"
    assert (ref / "difficulty.npy").exists() and (ref / "summary.json").exists()
    cfg = json.load(open(wd / "config.json"))
    assert cfg["data"]["subset"]["reference"] == str(ref)  # stored absolute
    setup = build_run(with_defaults(__import__("ml_collections").ConfigDict(cfg)))
    train_split = setup.dataset.split("train")
    assert len(train_split) == 200 and s["steps"] == 1
    d = np.load(ref / "difficulty.npy")
    from jaxrobust.data import load_dataset
    full = load_dataset("mnist5k").split("train")
    want = S.select_subset(d[full.dataset_indices], full.labels(), "hard", 200)
    np.testing.assert_array_equal(np.sort(train_split.dataset_indices),
                                  np.sort(full.dataset_indices[want]))
    # the hard subset's difficulty under the reference is below the set's
    assert np.nanmean(d[train_split.dataset_indices]) < 0.25 < np.nanmean(d)


# ----------------------------------------------------------------------------- Algorithm 4.1
def _ctx(**rw):
    cfg = with_defaults(base_config())
    cfg.objective.attack.steps = 2
    for k, v in rw.items():
        cfg.objective.rw[k] = v
    model = create_model("fc", 4, widths=(8,))
    from jaxrobust.threat import ThreatModel
    threat = ThreatModel("linf", 0.1, box=(0.0, 1.0))
    ctx = ObjectiveContext(model, threat, {"eps": lambda s: jnp.float32(0.1)}, cfg.objective, 4,
                           n_train=16, steps_per_epoch=2)
    params = init_variables(model, jax.random.PRNGKey(0), (6,))["params"]
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 6))
    batch = {"image": x, "label": jnp.arange(8) % 4, "index": jnp.arange(8) * 2,
             "mask": jnp.arange(8) < 7, "crop_offset": jnp.full((8, 2), 4), "flip": jnp.zeros(8, bool)}
    return ctx, params, batch


def _extra(ctx, name):
    return get_objective(name).init_extra(ctx, None, 16, (6,))


def test_uniform_weights_and_one_hot_targets_equal_the_unweighted_objective():
    key = jax.random.PRNGKey(3)
    for rw_name, base in (("at_rw", "pgd_at"), ("atta_rw", "atta")):
        ctx, params, batch = _ctx(reweight=False, beta=1.0, warmup_epochs=0.0)
        ex_rw, ex_b = _extra(ctx, rw_name), _extra(ctx, base)
        f_rw = lambda p: get_objective(rw_name).loss(ctx, p, {}, ex_rw, batch, key, 5)
        f_b = lambda p: get_objective(base).loss(ctx, p, {}, ex_b, batch, key, 5)
        (l1, o1), g1 = jax.value_and_grad(f_rw, has_aux=True)(params)
        (l2, o2), g2 = jax.value_and_grad(f_b, has_aux=True)(params)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
        if base == "atta":  # the ATTA cache is updated alike
            np.testing.assert_allclose(o1.instance_updates["delta"], o2.instance_updates["delta"])
    # the weighted soft cross-entropy with uniform weights is the masked mean cross-entropy
    logits = jax.random.normal(jax.random.PRNGKey(4), (8, 4))
    y, mask = batch["label"], batch["mask"]
    want = np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y))[:7])
    got = R.reweighted_soft_ce(logits, jax.nn.one_hot(y, 4), jnp.full((8,), 0.3), mask)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_reweighting_uses_the_true_class_probability_of_the_adversarial_output():
    ctx, params, batch = _ctx(reweight=True, beta=1.0, warmup_epochs=0.0)
    key = jax.random.PRNGKey(3)
    loss, out = get_objective("at_rw").loss(ctx, params, {}, _extra(ctx, "at_rw"), batch, key, 5)
    from jaxrobust.train.objectives import pgd_points
    xa, _ = pgd_points(ctx, params, {}, batch, key, 5)
    logits = np.asarray(ctx.model.apply({"params": params}, xa), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y, m = np.asarray(batch["label"]), np.asarray(batch["mask"], float)
    w = p[np.arange(8), y] * m
    ce = -np.log(p[np.arange(8), y])
    assert float(loss) == pytest.approx(np.sum(w * ce) / np.sum(w), rel=1e-5)
    # during the warm-up: weights 1 (the plain mean)
    l_warm, _ = get_objective("at_rw").loss(dataclasses_replace(ctx, rw_warm=True), params, {},
                                            _extra(ctx, "at_rw"), batch, key, 0)
    assert float(l_warm) == pytest.approx(np.sum(m * ce) / np.sum(m), rel=1e-5)


def dataclasses_replace(ctx, rw_warm):
    cfg = ctx.cfg.copy_and_resolve_references()
    cfg.rw.warmup_epochs = 1.0 if rw_warm else 0.0
    import dataclasses
    return dataclasses.replace(ctx, cfg=cfg)


def test_adaptive_targets_with_no_update_stay_one_hot_and_otherwise_follow_alg_4_1():
    y = jnp.array([0, 2, 1])
    probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (3, 3)))
    stored = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (3, 3)))
    seen = jnp.array([False, True, True])
    onehot = np.eye(3)[np.asarray(y)]
    # ρ = 1 (the outputs never enter the average): targets one-hot from the first visit on, any β
    t, new = R.adaptive_targets(stored, jnp.zeros(3, bool), y, probs, 1.0, 0.0, 3)
    np.testing.assert_allclose(t, onehot)
    np.testing.assert_allclose(new, onehot)
    # β = 1: one-hot whatever the average
    t, _ = R.adaptive_targets(stored, seen, y, probs, 0.9, 1.0, 3)
    np.testing.assert_allclose(t, onehot)
    # general case: t~ = ρ t~_old + (1-ρ) o' (t~_old = one-hot on the first visit), t = β 1_y + (1-β) t~
    t, new = R.adaptive_targets(stored, seen, y, probs, 0.7, 0.2, 3)
    old = np.where(np.asarray(seen)[:, None], np.asarray(stored), onehot)
    want_new = 0.7 * old + 0.3 * np.asarray(probs)
    np.testing.assert_allclose(new, want_new, rtol=1e-6)
    np.testing.assert_allclose(t, 0.2 * onehot + 0.8 * want_new, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t).sum(1), 1.0, rtol=1e-6)
    # in the objective: the stored targets are scattered back and flagged as seen
    ctx, params, batch = _ctx(reweight=False, beta=0.0, rho=0.0, warmup_epochs=0.0)
    _, out = get_objective("at_rw").loss(ctx, params, {}, _extra(ctx, "at_rw"), batch,
                                         jax.random.PRNGKey(3), 5)
    tgt = np.asarray(out.instance_updates["target"])
    np.testing.assert_allclose(tgt.sum(1), 1.0, rtol=1e-5)
    assert np.asarray(out.instance_updates["target_seen"]).all()
    assert tgt.max(1).mean() < 0.99  # ρ = 0: the adversarial output itself, not one-hot


def test_iat_epsilon_rule():
    eps_i = jnp.array([0.0, 0.05, 0.1, 0.1])
    robust = jnp.array([True, False, True, False])
    new = R.iat_eps_update(eps_i, robust, 0.1, 0.25, 0.5)
    # robust: + γ ε (clipped to ε), not robust: − γ ε (clipped to 0), then averaged with β
    np.testing.assert_allclose(new, [0.5 * 0.0 + 0.5 * 0.025, 0.5 * 0.05 + 0.5 * 0.025,
                                     0.1, 0.5 * 0.1 + 0.5 * 0.075], rtol=1e-6)


def test_objective_settings_are_validated():
    c = _tiny_config("at_rw")
    c.objective.rw.beta = 1.5
    with pytest.raises(ValueError, match="rw.beta must be a number in"):
        build_run(with_defaults(c))
    c = _tiny_config("iat")
    c.objective.iat.beta = -1
    with pytest.raises(ValueError, match="iat.beta"):
        build_run(with_defaults(c))
    c = _tiny_config()
    c.data.subset.kind = "hard"
    c.data.subset.size = 10
    with pytest.raises(ValueError, match="needs data.subset.reference"):
        build_run(with_defaults(c))
