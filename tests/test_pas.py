"""Periodic adversarial scheduling (jaxrobust/train/pas.py, thesis §4.2.4) and the Table 4.2 configs:
period ends, schedules restarted and scaled per period (against eq. 4.29 and the thesis code's
``cycle_*`` formulas), period-end checkpoints that are the states at those steps (also after a kill
and resume), the ensemble = log of the averaged softmax (one member = that member), evaluation of the
ensemble through ``experiments.evaluate``, and the configs' names and row sets."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import table4_2, table4_2_eval
from configs.common import schedule_config, with_defaults
from jaxrobust.attacks import pgd
from jaxrobust.attacks import losses as attack_losses
from jaxrobust.threat import ThreatModel
from jaxrobust.train import build_run, load_trained, train
from jaxrobust.train import pas
from jaxrobust.train.metrics import read_metrics
from jaxrobust.train.schedules import make_scalar_schedule
from test_train import stop_at, tiny_config


# ----------------------------------------------------------------------------- periods
def test_period_ends_from_epochs_or_fractions_and_clear_errors():
    assert pas.period_ends((100, 150, 200), 2000, 10) == (1000, 1500, 2000)
    assert pas.period_ends((0.5, 0.75, 1.0), 2000, 10) == (1000, 1500, 2000)
    assert pas.period_ends((1.0,), 7, 3) == (7,)
    for bad, match in [((), "empty"), ((100, 150), "end with the run"), ((0.5, 0.75), "end with"),
                       ((150, 100, 200), "increasing"), ((0.5, 0.5, 1.0), "increasing"),
                       ((-1, 200), "positive"), ((float("nan"), 1.0), "positive"),
                       ((True, 1.0), "positive"), ((0.0001, 1.0), "at least one step")]:
        with pytest.raises(ValueError, match=match):
            pas.period_ends(bad, 2000, 10)


def _cycle_linear(x, ckpts, eps_min, eps_max, eps_target):
    """The thesis code's cycle_linear ε (util/seq_parser.py), clipped at ε_target: within the period
    [l, r), eps_min + (x − l)/(r − l)·(eps_max − eps_min)."""
    for l, r in zip(ckpts[:-1], ckpts[1:]):
        if l <= x < r:
            return min(max(eps_min + (x - l) / (r - l) * (eps_max - eps_min), 0.0), eps_target)
    return eps_target


def _cycle_cos(x, ckpts, eps_min, eps_max, eps_target):
    for l, r in zip(ckpts[:-1], ckpts[1:]):
        if l <= x < r:
            v = eps_min + 0.5 * (eps_max - eps_min) * (1 - math.cos((x - l) / (r - l) * math.pi))
            return min(max(v, 0.0), eps_target)
    return eps_target


def test_eps_schedules_restart_per_period_as_eq_4_29_scaled_to_each_period():
    """CIFAR-10 PAS: 200 epochs in periods ending at 100, 150, 200; ε_max = 16/255 = 2ε_target."""
    spe, total, target = 5, 1000, 8 / 255
    c = with_defaults(table4_2.build("cifar10_vgg", "lin", pas=True))
    ends = pas.period_ends(c.pas.periods, total, spe)
    assert ends == (500, 750, 1000)
    for kind, ref in (("lin", _cycle_linear), ("cos", _cycle_cos)):
        sc = table4_2.build("cifar10_vgg", kind, pas=True).objective.eps_schedule
        f = pas.restarted_schedule(sc, target, ends, total, spe)
        steps = list(range(0, total, 7)) + [499, 500, 501, 749, 750, 999]
        got = _values(lambda s: jnp.clip(f(s), 0.0, target), steps)
        want = [ref(step / spe, (0, 100, 150, 200), 0.0, 16 / 255, target) for step in steps]
        np.testing.assert_allclose(got, want, atol=1e-7, err_msg=kind)
        assert got[steps.index(500)] == 0.0 and got[steps.index(750)] == 0.0  # restarted from ε_min
        # without PAS the same config ramps once over the whole run
        once = make_scalar_schedule(sc, target, total, spe)
        np.testing.assert_allclose(np.minimum(_values(once, steps), target),
                                   [ref(t / spe, (0, 200), 0.0, 16 / 255, target) for t in steps], atol=1e-7)


def _values(f, steps):
    """A schedule's values at ``steps``, traced once (jit of vmap)."""
    return np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(steps)))


def test_lr_schedule_restarts_with_milestones_and_ramps_scaled_to_each_period():
    spe, total, ends = 4, 800, (400, 600, 800)  # 200 epochs; periods of 100, 50, 50 epochs
    step_sched = schedule_config("multistep", milestones=(0.5, 0.75), gamma=0.1)
    f = jax.jit(pas.restarted_schedule(step_sched, 0.1, ends, total, spe))
    for start, length in ((0, 400), (400, 200), (600, 200)):
        for t, want in ((0, 0.1), (length // 2 - 1, 0.1), (length // 2, 0.01),
                        (3 * length // 4 - 1, 0.01), (3 * length // 4, 0.001), (length - 1, 0.001)):
            assert float(f(start + t)) == pytest.approx(want, rel=1e-6), (start, t)
    # milestones in epochs (drops at epochs 100 and 150 of the 200-epoch run) scale with the period
    g = pas.restarted_schedule(schedule_config("multistep", milestones=(100.0, 150.0), gamma=0.1),
                               0.1, ends, total, spe)
    np.testing.assert_allclose(_values(g, np.arange(total)), _values(f, np.arange(total)), rtol=1e-6)
    # a warm-up of 20 epochs and a 40-epoch cosine ramp: 10 and 20 epochs in the 100-epoch period,
    # 5 and 10 in the 50-epoch ones
    cos = schedule_config("cosine", warmup_epochs=20.0, ramp_epochs=40.0, start_fraction=1.0,
                          final_fraction=0.0)
    h = jax.jit(pas.restarted_schedule(cos, 1.0, ends, total, spe))
    for start, factor in ((0, 0.5), (400, 0.25), (600, 0.25)):
        warm, ramp = 20 * factor * spe, 40 * factor * spe
        assert float(h(start + warm / 2)) == pytest.approx(0.5, abs=1e-6)
        assert float(h(start + warm + ramp / 2)) == pytest.approx(0.5, abs=1e-6)
        assert float(h(start + warm + ramp)) == pytest.approx(0.0, abs=1e-6)
    # an exponential schedule keeps its shape over the scaled period (rate per epoch ** (1/factor))
    e = schedule_config("exponential", start_fraction=0.01, final_fraction=1.0, rate=1.1)
    full = make_scalar_schedule(e, 1.0, total, spe)
    x = pas.restarted_schedule(e, 1.0, ends, total, spe)
    np.testing.assert_allclose(_values(x, [500, 650, 700]), _values(full, [400, 600, 800]), rtol=1e-5)


def test_schedule_for_is_the_plain_schedule_without_pas_or_for_unrestarted_names():
    c = with_defaults(tiny_config())
    sc = schedule_config("linear", ramp_epochs=0.0)
    plain = make_scalar_schedule(sc, 0.3, 40, 4)
    for cfg in (c, with_defaults(tiny_config(**{"pas.periods": (0.5, 1.0), "pas.restart": ("lr",)}))):
        f = pas.schedule_for(cfg, "eps", sc, 0.3, 40, 4)
        np.testing.assert_array_equal(_values(f, np.arange(40)), _values(plain, np.arange(40)))


# ----------------------------------------------------------------------------- the ensemble
def _members(n, seed=0, d=6, k=4, scale=1.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return [{"w": scale * jax.random.normal(kk, (d, k)), "b": jnp.arange(k, dtype=jnp.float32)}
            for kk in keys]


def _apply(v, x):
    return x @ v["w"] + v["b"]


def test_ensemble_is_the_log_of_the_averaged_softmax():
    x = jax.random.uniform(jax.random.PRNGKey(9), (5, 6))
    for scale in (1.0, 300.0):  # 300: members with saturated softmax (log-sum-exp keeps it finite)
        members = _members(3, scale=scale)
        got = np.asarray(pas.ensemble_log_probs(_apply, members, x), np.float64)
        probs = []
        for v in members:
            z = np.asarray(_apply(v, x), np.float64)
            z = z - z.max(1, keepdims=True)
            probs.append(np.exp(z) / np.exp(z).sum(1, keepdims=True))
        want = np.mean(probs, 0)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(np.exp(got), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at least one member"):
        pas.ensemble_log_probs(_apply, [], x)


def test_ensemble_of_one_checkpoint_equals_that_checkpoint():
    """Same softmax, predictions, CE gradients and attack results as the member alone."""
    v = _members(1)[0]
    one = jax.jit(lambda x: pas.ensemble_log_probs(_apply, [v], x))
    alone = jax.jit(lambda x: _apply(v, x))
    x = jax.random.uniform(jax.random.PRNGKey(3), (64, 6))
    y = jnp.argmax(alone(x), -1).at[::3].set(0)
    np.testing.assert_allclose(jax.nn.softmax(one(x)), jax.nn.softmax(alone(x)), rtol=1e-6, atol=1e-7)
    assert np.array_equal(jnp.argmax(one(x), -1), jnp.argmax(alone(x), -1))
    for loss in (attack_losses.ce, attack_losses.dlr):  # the losses the attacks ascend
        g = lambda f: jax.grad(lambda z: jnp.sum(loss(f(z), y)))(x)
        np.testing.assert_allclose(g(one), g(alone), rtol=1e-4, atol=1e-6)
    threat = ThreatModel(norm="linf", eps=0.1, box=(0.0, 1.0))
    key = jax.random.PRNGKey(0)
    xa, xb = pgd(one, x, y, key, threat, steps=5), pgd(alone, x, y, key, threat, steps=5)
    np.testing.assert_allclose(xa, xb, atol=1e-6)
    assert np.array_equal(jnp.argmax(one(xa), -1), jnp.argmax(alone(xb), -1))


class _State:
    def __init__(self, v):
        self.v = v

    def variables(self):
        return self.v


def test_period_checkpoints_keep_params_and_batch_stats_once_per_period_end(tmp_path):
    cb = pas.PeriodCheckpoints(str(tmp_path), (2, 5))
    states = {s: {"params": {"w": jnp.full((2, 2), float(s))},
                  "batch_stats": {"mean": jnp.full((2,), -float(s))}} for s in range(1, 7)}
    for s in range(1, 7):
        assert cb(s, _State(states[s])) is False  # never stops the run
    cb(5, _State(states[1]))  # a resumed run replaying step 5: the saved one is kept
    cb.close()
    assert pas.saved_period_ends(str(tmp_path)) == (2, 5)
    got = pas.load_members(str(tmp_path), states[1], (2, 5))
    for s in (2, 5):
        jax.tree.map(np.testing.assert_array_equal, got[s], states[s])
    with pytest.raises(ValueError, match=r"\[7\] are missing"):
        pas.load_members(str(tmp_path), states[1], (2, 5, 7))


# ----------------------------------------------------------------------------- end to end
def _pas_config(**over):
    return tiny_config(**{"pas.periods": (0.5, 0.75, 1.0), "train.num_steps": 8, "train.log_every": 1,
                          "train.checkpoint_every_steps": 3, "schedule.name": "multistep",
                          "schedule.milestones": (0.5,), "objective.eps_schedule": schedule_config(
                              "linear", final_fraction=2.0), **over})


def test_pas_run_restarts_schedules_keeps_period_ends_and_evaluates_the_ensemble(tmp_path):
    snapshots = {}
    record = lambda step, state: snapshots.update({step: jax.tree.map(np.asarray, state.variables())}) \
        and False
    wd = str(tmp_path / "full")
    s = train(_pas_config(), wd, callbacks=[record])
    assert s["steps"] == 8 and s["compiles"] == {"update": 1}
    assert pas.saved_period_ends(wd) == (4, 6, 8)
    # the lr (drop at half of each period) and ε (0 -> 2ε_target over each period, clipped) the
    # training step used, from metrics.jsonl (the record at step k is the schedules at step k - 1)
    train_rec = {r["step"] - 1: r for r in read_metrics(wd) if r["split"] == "train"}
    lr = {t: train_rec[t]["lr"] for t in range(8)}
    eps = {t: train_rec[t]["eps"] for t in range(8)}
    assert [round(lr[t] / 0.05, 6) for t in range(8)] == [1, 1, 0.1, 0.1, 1, 0.1, 1, 0.1]
    np.testing.assert_allclose([eps[t] for t in range(8)],
                               [0.0, 0.05, 0.1, 0.1, 0.0, 0.1, 0.0, 0.1], atol=1e-7)
    run = load_trained(wd, weights="pas_ensemble")
    assert list(run.members) == [4, 6, 8]
    for e in (4, 6, 8):  # the checkpoints are the states at the period ends
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run.members[e]), snapshots[e])
    x = run.dataset.split("test").get(np.arange(32))["image"]
    want = np.mean([jax.nn.softmax(run.model.apply(snapshots[e], x)) for e in (4, 6, 8)], 0)
    np.testing.assert_allclose(np.exp(run.logits_fn(x)), want, rtol=1e-5, atol=1e-7)
    # experiments.evaluate on the ensemble (the entry point's function, no subprocess)
    from experiments import evaluate as ev
    cfg = table4_2_eval.get_config("mnist_pgd,smoke")
    cfg.weights, cfg.num_examples, cfg.output = "pas_ensemble", 32, "eval_ens.json"
    out = ev.evaluate(cfg, wd)
    assert out["weights"] == "pas_ensemble" and out["num_examples"] == 32
    clean = np.mean(np.argmax(want, -1) == run.dataset.split("test").get(np.arange(32))["label"])
    assert out["clean_accuracy"] == pytest.approx(clean)
    with open(os.path.join(wd, "eval_ens.json")) as f:
        assert json.load(f)["robust_accuracy"]["pgd"] <= out["clean_accuracy"]
    with pytest.raises(ValueError, match="step=None"):
        load_trained(wd, step=4, weights="pas_ensemble")


@pytest.mark.slow
def test_killed_and_resumed_pas_run_keeps_the_same_period_ends(tmp_path):
    run = load_trained(_full_run(tmp_path), weights="pas_ensemble")
    wd2 = str(tmp_path / "resumed")
    assert train(_pas_config(), wd2, callbacks=[stop_at(5)])["stopped_at"] == 5
    assert pas.saved_period_ends(wd2) == (4,)
    with pytest.raises(ValueError, match=r"\[6, 8\] are missing"):
        load_trained(wd2, weights="pas_ensemble")
    train(_pas_config(), wd2)
    again = load_trained(wd2, weights="pas_ensemble")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again.members),
                 jax.tree.map(np.asarray, run.members))
    np.testing.assert_array_equal(again.logits_fn(_x(run)), run.logits_fn(_x(run)))


def _full_run(tmp_path):
    wd = str(tmp_path / "full")
    train(_pas_config(), wd)
    return wd


def _x(run):
    return run.dataset.split("test").get(np.arange(32))["image"]


def test_bad_pas_settings_raise_before_anything_is_written(tmp_path):
    for over, match in [({"pas.restart": ("lr", "kappa")}, "unknown schedules"),
                        ({"pas.periods": (0.5, 0.9)}, "end with the run"),
                        ({"pas.periods": (4, 10)}, "end with the run")]:
        wd = tmp_path / str(len(os.listdir(tmp_path)))
        with pytest.raises(ValueError, match=match):
            train(_pas_config(**over), str(wd))
        assert not (wd / "config.json").exists()
    # a named objective schedule may restart too
    c = with_defaults(_pas_config(**{"pas.restart": ("eps", "beta"), "objective.name": "trades"}))
    c.objective.schedules.beta = schedule_config("linear", value=6.0)
    setup = build_run(c)
    assert [round(float(setup.ctx.schedules["beta"](t)), 5) for t in (0, 2, 4, 5, 6, 7)] == \
        [0.0, 3.0, 0.0, 3.0, 0.0, 3.0]
    wd = str(tmp_path / "plain")
    train(tiny_config(**{"train.num_steps": 2}), wd)
    with pytest.raises(ValueError, match="does not use periodic adversarial scheduling"):
        load_trained(wd, weights="pas_ensemble")
    with pytest.raises(ValueError, match="'final', 'ema' or 'pas_ensemble'"):
        load_trained(wd, weights="ensemble")


# ----------------------------------------------------------------------------- Table 4.2 configs
def test_table4_2_config_names_and_protocol():
    for task in table4_2.TASKS:
        for sched in table4_2.SCHEDULERS:
            for p in ("", "_pas"):
                for m in ("",) + tuple("_" + x for x in table4_2.METHODS):
                    c = with_defaults(table4_2.get_config(f"{task}_{sched}{p}{m},smoke"))
                    assert c.objective.name == table4_2.OBJECTIVES[m[1:] or "at"]
                    assert tuple(c.pas.periods) == ((0.5, 0.75, 1.0) if p else ())
    c = table4_2.get_config("mnist_lenet_cos")
    assert (c.data.name, c.model.kwargs.w, c.threat.eps, c.objective.attack.steps) == ("mnist", 16, 0.4, 50)
    assert c.objective.eps_schedule.final_fraction == pytest.approx(1.5)  # ε_max = 0.6
    assert table4_2.get_config("mnist5k_lenet_lin").objective.eps_schedule.final_fraction == 2.0
    c = table4_2.get_config("cifar10_resnet18_cos_pas")
    assert (c.model.name, c.model.kwargs.w, c.optimizer.weight_decay, c.train.num_epochs) == \
        ("resnet18", 8, 1e-3, 200.0)
    assert c.objective.attack.step_size == pytest.approx(2 / 255)
    assert table4_2.get_config("cifar10_vgg_constant").objective.eps_schedule.name == "constant"
    for bad in ("mnist5k_lenet_cosine", "mnist5k_lenet_cos_sgd", "svhn_lenet_cos", "mnist5k_lenet_cos,fast",
                "mnist5k_lenet_cos_pas_at_at", "mnist5k_lenet_pas"):
        with pytest.raises(ValueError, match=r"task in \['mnist_lenet'"):
            table4_2.get_config(bad)
    assert table4_2_eval.get_config("cifar10_pgd").pgd_steps == 10
    assert table4_2_eval.get_config("mnist_pgd100").pgd_step_size == 0.01
    assert table4_2_eval.get_config("mnist_pgd100").output == "eval_pgd100.json"
    assert table4_2_eval.get_config("mnist_apgd_square").attacks == ("apgd-ce", "apgd-dlr", "square")
    with pytest.raises(ValueError, match=r"part in \['pgd', 'pgd100', 'apgd_square'\]"):
        table4_2_eval.get_config("mnist_square")


def test_table4_2_row_sets_carry_the_thesis_numbers_and_validate():
    from experiments import reproduce as rp
    for task in table4_2.TASKS:
        r = table4_2.get_config(task).reproduce
        rp.validate(r)
        assert r.seeds == ("0,1" if task == "mnist5k_lenet" else "0,1,2")  # mnist5k: the CPU protocol
    r = table4_2.get_config("cifar10_resnet18").reproduce
    assert set(r.rows) == {"constant", "cos", "lin", "constant_pas", "cos_pas", "lin_pas"}
    labels = [label for label, _ in r.columns]
    lin_pas = dict(zip(labels, r.rows.lin_pas.thesis))
    assert lin_pas["Clean (%)"] == pytest.approx(100 - 20.26) and lin_pas["PGD (%)"] == pytest.approx(51.40)
    assert math.isnan(lin_pas["PGD100 (%)"]) and lin_pas["Square5K (%)"] == pytest.approx(100 - 46.47)
    assert r.rows.lin_pas.steps == "pgd_pas,pgd100_pas,aa_pas"
    assert "weights=pas_ensemble" in r.steps.aa_pas.overrides
    m = table4_2.get_config("mnist_lenet").reproduce
    assert set(m.rows) == {"constant", "cos", "lin"}
    assert dict(zip(labels, m.rows.constant.thesis))["APGD100 CE (%)"] == pytest.approx(100 - 15.18)
    # the claims on the thesis's own numbers: warm-up better on every attack (its caption)
    means = {row: dict(zip(labels, r.rows[row].thesis)) for row in r.rows}
    means = {row: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
             for row, d in means.items()}
    verdicts = {c["claim"]: c["holds"] for c in table4_2.claims_cifar10(means)}
    assert verdicts["PAS (ensemble of the period-end models) improves PGD accuracy over lin ε without "
                    "periods"] is True
    assert verdicts["ε_lin warm-up beats constant ε on every attack"] is True


@pytest.mark.slow
def test_table4_2_cifar10_pas_smoke_on_mock_data(tmp_path):
    """VGG / ResNet18 with BatchNorm: the period-end checkpoints hold the BatchNorm statistics."""
    import tensorflow_datasets as tfds
    for name in ("cifar10_vgg_lin_pas", "cifar10_resnet18_cos_pas_trades"):
        wd = str(tmp_path / name)
        with tfds.testing.mock_data(num_examples=32):
            s = train(table4_2.get_config(f"{name},smoke"), wd)
            run = load_trained(wd, weights="pas_ensemble")
        assert s["steps"] == 4 and list(run.members) == [2, 3, 4]
        assert all("batch_stats" in v for v in run.members.values())
        final = load_trained(wd)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run.members[4]),
                     jax.tree.map(np.asarray, final.variables))


@pytest.mark.slow
def test_table4_2_mnist5k_smoke_runs_every_method(tmp_path):
    for method in table4_2.METHODS:
        s = train(table4_2.get_config(f"mnist5k_lenet_cos_{method},smoke"), str(tmp_path / method))
        assert s["steps"] == 4 and 0.0 <= s["eval"]["test"]["pgd_accuracy"] <= s["eval"]["test"]["clean_accuracy"]
