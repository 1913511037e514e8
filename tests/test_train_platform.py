"""The training platform every method plugs into: the Objective protocol (extra state, after_update,
param_labels, schedules), sharded per-instance state, parameter groups, augmentation metadata, one
compilation per run, config defaults."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs.common import base_config, param_group_config, schedule_config, with_defaults
from jaxrobust.train import (Objective, ObjectiveOutput, load_trained, make_scalar_schedule,
                             register, train)
from jaxrobust.train.objectives import ce_and_accuracy, forward_train
from jaxrobust.train.optim import make_optimizer, param_labels
from test_train import REPO, stop_at, tiny_config


# ----------------------------------------------------------------------------- a test objective
def _ema_loss(ctx, params, model_state, extra, batch, key, step):
    logits, new_state = forward_train(ctx.model, params, model_state, batch["image"])
    ce, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
    seen = extra["instance"]["seen"][batch["index"]] + 1
    return ce, ObjectiveOutput(new_state, {"seen": seen, "offset": batch["crop_offset"],
                                           "flip": batch["flip"]},
                               {"loss": ce, "lam": ctx.schedules["lam"](step)})


def _ema_init(ctx, params, n_train, input_shape):
    return {"instance": {"seen": jnp.zeros((n_train,), jnp.int32),
                         "offset": -jnp.ones((n_train, 2), jnp.int32),
                         "flip": jnp.zeros((n_train,), bool)},
            "ema": params, "updates": jnp.zeros((), jnp.int32), "n": jnp.asarray(n_train, jnp.int32)}


def _ema_after_update(ctx, params, extra, step):
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, extra["ema"], params)
    return {**extra, "ema": ema, "updates": extra["updates"] + 1}


def _freeze_first_layer(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if "Dense_0" in jax.tree_util.keystr(path) else "default", params)


register("test_platform", Objective(init=_ema_init, loss=_ema_loss, after_update=_ema_after_update,
                                    param_labels=_freeze_first_layer, schedules=("lam",)))


def platform_config(**overrides):
    c = tiny_config(**{"objective.name": "test_platform", "train.num_steps": 12, **overrides})
    c.objective.schedules.lam = schedule_config("linear", value=2.0, start_fraction=0.0,
                                                final_fraction=1.0)
    return c


def _tree_np(t):
    return jax.tree.map(np.asarray, t)


# ----------------------------------------------------------------------------- tests
def test_objective_protocol_extra_after_update_frozen_and_schedules(tmp_path):
    c = platform_config()
    summary = train(c, str(tmp_path))
    assert summary["compiles"] == {"update": 1}  # the update step compiled once for the whole run
    run = load_trained(str(tmp_path))
    extra = run.extra
    assert int(extra["updates"]) == 12  # after_update ran once per step, inside the jitted step
    # the EMA tracks the params: it moved away from the init but differs from the final params
    init = load_trained_init(c)
    p_final = run.variables["params"]["Dense_1"]["kernel"]
    ema = extra["ema"]["Dense_1"]["kernel"]
    assert not np.allclose(ema, init["Dense_1"]["kernel"]) and not np.allclose(ema, p_final)
    # frozen through the objective's param_labels: bit-identical to its initialisation (even with
    # weight decay on), the other layer trained
    jax.tree.map(np.testing.assert_array_equal, _tree_np(run.variables["params"]["Dense_0"]),
                 _tree_np(init["Dense_0"]))
    assert not np.array_equal(p_final, init["Dense_1"]["kernel"])
    # per-instance state: indexed by dataset index; augmentation 'none' reports the identity crop
    seen = np.asarray(extra["instance"]["seen"])
    assert seen.sum() == 12 * 32
    off = np.asarray(extra["instance"]["offset"])[seen > 0]
    assert np.all(off == 4) and not np.asarray(extra["instance"]["flip"]).any()
    # the named schedule reached the objective and the metrics
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    lam = [l["lam"] for l in lines if l["split"] == "train"]
    assert lam[0] == pytest.approx(2.0 * 1 / 12) and lam == sorted(lam)


def load_trained_init(config):
    """Parameters at initialisation (the seed's), for comparison."""
    from jaxrobust.train import build_run, create_train_state
    setup = build_run(with_defaults(config))
    st = create_train_state(setup.model, setup.dataset.info.image_shape, setup.tx, setup.objective,
                            setup.ctx, seed=config.seed, n_train=setup.train_size)
    return _tree_np(st.params)


def test_killed_and_resumed_equals_uninterrupted_with_extra_state(tmp_path):
    summary = train(platform_config(), str(tmp_path / "full"))
    assert train(platform_config(), str(tmp_path / "res"), callbacks=[stop_at(7)])["stopped_at"] == 7
    resumed = train(platform_config(), str(tmp_path / "res"))
    assert resumed["eval"] == summary["eval"]
    a, b = load_trained(str(tmp_path / "full")), load_trained(str(tmp_path / "res"))
    jax.tree.map(np.testing.assert_array_equal, _tree_np(a.variables), _tree_np(b.variables))
    jax.tree.map(np.testing.assert_array_equal, _tree_np(a.extra), _tree_np(b.extra))


def test_crop_flip_metadata_aligns_with_invert(tmp_path):
    """With crop_flip the batch carries the offsets/flips it went through."""
    from jaxrobust.data.augment import apply_crop_flip, invert_crop_flip
    c = platform_config(**{"data.augment": "crop_flip", "model.name": "cnn_small", "model.kwargs": {},
                           "train.num_steps": 6})
    c.optimizer.param_groups = ml_collections.ConfigDict()
    train(c, str(tmp_path))
    inst = load_trained(str(tmp_path)).extra["instance"]
    seen = np.asarray(inst["seen"]) > 0
    off, flip = np.asarray(inst["offset"])[seen], np.asarray(inst["flip"])[seen]
    assert off.min() >= 0 and off.max() <= 8 and len(np.unique(off, axis=0)) > 5 and 0 < flip.mean() < 1
    # those offsets/flips are what invert_crop_flip needs to bring a cached tensor back
    x = jax.random.uniform(jax.random.PRNGKey(0), (len(off), 8, 8, 3))
    aug = apply_crop_flip(x, jnp.asarray(off), jnp.asarray(flip))
    back = invert_crop_flip(aug, jnp.asarray(off), jnp.asarray(flip))
    np.testing.assert_array_equal(apply_crop_flip(back, jnp.asarray(off), jnp.asarray(flip)) != 0,
                                  aug != 0)


def test_param_groups_from_config_regex_lr_scale_and_weight_decay():
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
              "Dense_1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    c = base_config()
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 1.0, 0.0
    c.optimizer.weight_decay = 0.5
    c.schedule.name = "constant"
    c.optimizer.param_groups.head = param_group_config(r"^Dense_1/", lr_scale=0.1, weight_decay=0.0)
    c.optimizer.param_groups.frozen = param_group_config(r"^Dense_0/bias$")
    labels = param_labels(params, c.optimizer.param_groups)
    assert labels == {"Dense_0": {"kernel": "default", "bias": "frozen"},
                      "Dense_1": {"kernel": "head", "bias": "head"}}
    tx, _ = make_optimizer(c.optimizer, c.schedule, 10, 5, params=params)
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], -(1.0 + 0.5))  # lr 1, grad 1 + wd 0.5·1
    np.testing.assert_allclose(upd["Dense_0"]["bias"], 0.0)  # frozen: no update, no decay
    np.testing.assert_allclose(upd["Dense_1"]["kernel"], -0.1)  # lr x 0.1, no weight decay
    # a group whose pattern matches nothing is an error, as is a bad regex
    c.optimizer.param_groups.typo = param_group_config(r"^Conv_9/")
    with pytest.raises(ValueError, match="match no parameter"):
        make_optimizer(c.optimizer, c.schedule, 10, 5, params=params)
    c.optimizer.param_groups.typo = param_group_config(r"([")
    with pytest.raises(ValueError, match="regular expression"):
        make_optimizer(c.optimizer, c.schedule, 10, 5, params=params)


def test_clipping_ignores_frozen_gradients():
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    c = base_config()
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay = "sgd", 1.0, 0.0, 0.0
    c.optimizer.clip_norm = 1.0
    c.schedule.name = "constant"
    c.optimizer.param_groups.frozen = param_group_config("^b$")
    tx, _ = make_optimizer(c.optimizer, c.schedule, 10, 5, params=params)
    g = {"a": jnp.full(3, 0.1), "b": jnp.full(3, 100.0)}
    upd, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(upd["a"], -0.1, rtol=1e-6)  # norm 0.17 < 1: not clipped by b's grads
    np.testing.assert_allclose(upd["b"], 0.0)


@pytest.mark.parametrize("name,check", [
    ("constant", lambda f: f(0) == f(99) == 2.0),
    ("linear", lambda f: f(0) == 0.0 and abs(f(50) - 1.0) < 1e-6 and f(100) == 2.0),
    ("cosine", lambda f: f(0) == 0.0 and abs(f(50) - 1.0) < 1e-6 and abs(f(100) - 2.0) < 1e-6),
    ("multistep", lambda f: f(0) == 2.0 and abs(f(60) - 0.2) < 1e-6),
    ("exponential", lambda f: abs(f(0) - 0.2) < 1e-6 and abs(f(10) - 0.4) < 1e-6 and abs(f(1000) - 2.0) < 1e-6),
    ("periodic", lambda f: f(0) == 0.0 and abs(f(20) - 0.0) < 1e-6 and f(10) > 0.9),
])
def test_scalar_schedules(name, check):
    sc = schedule_config(name, start_fraction=0.1 if name == "exponential" else 0.0, rate=2.0,
                         period_epochs=2.0)
    f = make_scalar_schedule(sc, 2.0, 100, 10)
    assert check(lambda s: float(f(s)))
    assert float(jax.jit(f)(jnp.int32(10))) == pytest.approx(float(f(10)))


def test_missing_declared_schedule_and_defaults(tmp_path):
    c = platform_config()
    del c.objective.schedules["lam"]
    with pytest.raises(ValueError, match="needs the schedules"):
        train(c, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "config.json")
    # a config that lacks fields (an old config.json, a hand-written dict) is completed from
    # configs/common.py, the one place defaults live
    partial = ml_collections.ConfigDict({"data": {"name": "digits"}, "objective": {"schedules": {
        "k": {"name": "linear"}}}})
    full = with_defaults(partial)
    assert full.data.batch_size == base_config().data.batch_size and full.data.name == "digits"
    assert full.objective.schedules.k.final_fraction == 1.0 and full.schedule.start_fraction == 1.0


def test_instance_state_is_sharded_over_devices(tmp_path):
    code = textwrap.dedent(f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_train_platform import platform_config, stop_at
        from jaxrobust.train import train
        seen = {{}}
        def grab(step, state):
            seen['sharding'] = state.extra['instance']['seen'].sharding
            seen['ema'] = state.extra['ema']['Dense_0']['kernel'].sharding
        s = train(platform_config(**{{'train.num_steps': 4}}), sys.argv[1], callbacks=[grab])
        print('spec', seen['sharding'].spec, 'ema', seen['ema'].spec, 'compiles', s['compiles'])
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "spec P('data',) ema P()" in out.stdout, out.stdout
    assert "'update': 1" in out.stdout


def test_pixel_range_box_is_used_for_training_evaluation_and_certification(tmp_path):
    """One threat constructor: a run on [-1, 1] pixels is trained, attacked and certified in [-1, 1]."""
    from configs.certify import table3_6
    from configs.eval import pgd20
    from experiments.certify import certify_run
    from experiments.evaluate import evaluate
    wd = str(tmp_path)
    c = tiny_config(**{"data.pixel_range": (-1.0, 1.0), "train.num_steps": 6})
    summary = train(c, wd)
    assert summary["threat"]["box"] == [-1.0, 1.0]
    run = load_trained(wd)
    assert run.threat.box == (-1.0, 1.0)
    x = run.dataset.split("test").get(np.arange(64))["image"]
    assert x.min() == -1.0 and x.max() == 1.0
    e = pgd20.get_config("smoke")
    e.threat.eps, e.save_adversarial = 0.3, True
    out = evaluate(e, wd)
    assert out["threat"]["box"] == [-1.0, 1.0]
    with open(os.path.join(wd, "eval.json")) as f:
        assert json.load(f)["threat"]["box"] == [-1.0, 1.0]
    adv = np.load(os.path.join(wd, "eval_adversarial.npz"))["x_adv"]
    assert adv.min() >= -1.0 - 1e-6 and adv.max() <= 1.0 + 1e-6 and adv.min() < -0.5  # not clipped to [0, 1]
    cc = table3_6.get_config("smoke")
    cc.milp.enabled = False
    certify_run(cc, wd)
    with open(os.path.join(wd, "certify.json")) as f:
        assert json.load(f)["threat"]["box"] == [-1.0, 1.0]


def _nan_after(ctx, params, model_state, extra, batch, key, step):
    logits, new_state = forward_train(ctx.model, params, model_state, batch["image"])
    ce, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
    ce = jnp.where(step >= 5, jnp.nan, ce)  # diverges at the 6th update
    return ce, ObjectiveOutput(new_state, {}, {"loss": ce})


register("test_nan_after_5", Objective(init=None, loss=_nan_after))


def test_nan_loss_stops_run_and_keeps_last_finite_checkpoint(tmp_path):
    c = tiny_config(**{"objective.name": "test_nan_after_5", "train.num_steps": 20,
                       "train.checkpoint_every_steps": 4, "train.log_every": 2})
    with pytest.raises(FloatingPointError, match="NaN/inf at step 6.*last finite checkpoint is step 4"):
        train(c, str(tmp_path))
    run = load_trained(str(tmp_path))
    assert run.step == 4
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(run.variables))


def test_any_objective_gets_ema_and_eps_is_clipped_to_the_threat(tmp_path):
    """objective.ema_decay wraps any objective (here pgd_at) with EMA weights; an ε schedule that
    overshoots the target (eq 4.29's ε_max > ε) is clipped to threat.eps."""
    c = tiny_config(**{"train.num_steps": 6, "objective.ema_decay": 0.5})
    c.objective.eps_schedule = schedule_config("linear", start_fraction=0.0, final_fraction=3.0,
                                               ramp_epochs=6 / 44)
    train(c, str(tmp_path))
    eps = [l["eps"] for l in map(json.loads, open(tmp_path / "metrics.jsonl")) if l["split"] == "train"]
    assert eps[0] == pytest.approx(0.05) and max(eps) == pytest.approx(0.1)  # 0.3·(2/6) -> clipped
    run, ema = load_trained(str(tmp_path)), load_trained(str(tmp_path), weights="ema")
    assert "ema" in run.extra
    assert not np.allclose(ema.variables["params"]["Dense_0"]["kernel"],
                           run.variables["params"]["Dense_0"]["kernel"])
    with pytest.raises(ValueError, match="ema_decay"):
        train(tiny_config(**{"objective.ema_decay": 1.0}), str(tmp_path / "bad"))


def test_instance_state_with_a_validation_split_uses_original_indices(tmp_path):
    """Carving a validation split keeps the training examples' original dataset indices (up to the
    full train size - 1): per-instance arrays cover that index space; validation rows never change."""
    c = platform_config(**{"data.val_fraction": 0.3, "train.num_steps": 60})
    train(c, str(tmp_path))
    run = load_trained(str(tmp_path))
    tr = run.dataset.split("train").dataset_indices
    va = run.dataset.split("val").dataset_indices
    assert int(run.extra["n"]) == tr.max() + 1 > len(tr)
    seen = np.asarray(run.extra["instance"]["seen"])
    assert seen.sum() == 60 * 32 and seen[va].sum() == 0 and seen[tr].sum() == 60 * 32


def test_eps_schedule_ending_below_the_threat_eps_warns():
    from jaxrobust.train.loop import build_schedules
    c = with_defaults(tiny_config())
    c.objective.eps_schedule = schedule_config("linear", final_fraction=0.5)
    with pytest.warns(UserWarning, match="ε schedule ends at 0.049"):
        build_schedules(c, 100, 10)
    c.objective.eps_schedule = schedule_config("linear", final_fraction=1.0, ramp_epochs=5.0)
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error")
        build_schedules(c, 100, 10)  # reaches ε: no warning


def test_summary_json_has_no_float_noise(tmp_path):
    train(tiny_config(**{"train.num_steps": 2}), str(tmp_path))
    text = open(tmp_path / "summary.json").read()
    import re
    assert all(len(m) <= 12 for m in re.findall(r"\d+\.\d+", text)), text  # ≤ 7 significant digits
