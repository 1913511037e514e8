"""The training loop: bitwise resume, multi-device equality, optimizers, schedules, configs, errors."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import cifar10_resnet18_pgd, fashion_mnist_fc_pgd, mnist5k_fc1_pgd
from configs.common import base_config
from jaxrobust.train import load_trained, train
from jaxrobust.train.schedules import make_scalar_schedule
from jaxrobust.train.metrics import read_metrics
from jaxrobust.train.optim import make_optimizer, make_schedule, weight_decay_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    c = base_config()
    c.data.name = "digits"
    c.data.batch_size = 32
    c.data.eval_batch_size = 128
    c.model.name = "fc"
    c.model.kwargs.widths = (32,)
    c.threat.eps = 0.1
    c.objective.attack.steps = 3
    c.optimizer.name, c.optimizer.lr = "sgd", 0.05
    c.schedule.name = "cosine"
    c.train.num_steps = 10
    c.train.log_every = 2
    c.train.eval_every_epochs = 0.0
    c.train.checkpoint_every_steps = 4
    c.train.tensorboard = False
    c.eval.attack.steps = 2
    c.eval.num_examples = 64
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def stop_at(n):
    """A callback that stops (after checkpointing) once step ``n`` is reached."""
    return lambda step, state: step >= n


def _params(workdir):
    run = load_trained(workdir)
    return run, jax.tree.map(np.asarray, run.variables)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    full = tiny_config()
    summary = train(full, str(tmp_path / "full"))
    assert summary["steps"] == 10
    killed = train(tiny_config(), str(tmp_path / "resumed"), callbacks=[stop_at(5)])
    assert killed["stopped_at"] == 5  # "killed" after step 5 (mid-epoch)
    resumed = train(tiny_config(), str(tmp_path / "resumed"))
    assert resumed["steps"] == 10
    _, a = _params(str(tmp_path / "full"))
    _, b = _params(str(tmp_path / "resumed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise on CPU
    assert resumed["eval"] == summary["eval"]


def test_outputs_metrics_and_load_trained(tmp_path):
    wd = str(tmp_path / "run")
    summary = train(tiny_config(**{"train.eval_every_epochs": 0.5}), wd)
    for f in ("config.json", "metrics.jsonl", "summary.json"):
        assert os.path.exists(os.path.join(wd, f))
    lines = read_metrics(wd)
    assert {l["split"] for l in lines} == {"train", "test"}
    assert all("step" in l for l in lines)
    train_lines = [l for l in lines if l["split"] == "train"]
    assert [l["step"] for l in train_lines] == [2, 4, 6, 8, 10]
    assert {"loss", "adv_accuracy", "lr", "grad_norm", "steps_per_sec"} <= set(train_lines[0])
    run = load_trained(wd)
    assert run.step == 10
    x = run.dataset.split("test").get(np.arange(64))
    acc = float(np.mean(np.argmax(run.logits_fn(x["image"]), -1) == x["label"]))
    assert acc == pytest.approx(summary["eval"]["test"]["clean_accuracy"])
    with open(os.path.join(wd, "summary.json")) as f:
        assert json.load(f)["steps"] == 10


def test_four_fake_devices_equal_one_device(tmp_path):
    code = textwrap.dedent(f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_train_platform import platform_config
        from jaxrobust.train import train, load_trained
        wd = sys.argv[1]
        # an objective with per-instance state (sharded over the devices), EMA weights and a frozen layer
        train(platform_config(**{{'train.num_steps': 4, 'model.name': 'cnn_small',
                                 'model.kwargs': {{}}}}), wd)
        run = load_trained(wd)
        flat = jax.tree_util.tree_flatten_with_path({{'v': run.variables, 'extra': run.extra}})[0]
        np.savez(wd + '/params.npz', **{{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}})
        print('devices', jax.device_count())
    """)
    results = {}
    for n in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                   JAX_PLATFORMS="cpu")
        wd = str(tmp_path / f"d{n}")
        out = subprocess.run([sys.executable, "-c", code, wd], env=env, capture_output=True,
                             text=True, timeout=600, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"devices {n}" in out.stdout
        results[n] = dict(np.load(wd + "/params.npz"))
    assert results[1].keys() == results[4].keys()
    for k in results[1]:
        np.testing.assert_allclose(results[4][k], results[1][k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_weight_decay_skips_bias_and_bn():
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "bn": {"scale": jnp.ones(2)}}
    mask = weight_decay_mask(params, True)
    assert mask["dense"]["kernel"] and not mask["dense"]["bias"] and not mask["bn"]["scale"]
    c = base_config()
    c.optimizer.weight_decay, c.optimizer.lr, c.optimizer.momentum = 0.5, 1.0, 0.0
    c.schedule.name = "constant"
    tx, _ = make_optimizer(c.optimizer, c.schedule, 10, 5)
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(upd["dense"]["kernel"], -0.5)  # decayed
    np.testing.assert_allclose(upd["dense"]["bias"], 0.0)  # skipped
    np.testing.assert_allclose(upd["bn"]["scale"], 0.0)


def test_lr_schedules():
    c = base_config().schedule
    c.name, c.milestones, c.gamma = "multistep", (0.5, 0.75), 0.1
    s = make_schedule(c, 0.1, 100, 10)
    assert s(0) == pytest.approx(0.1) and s(60) == pytest.approx(0.01) and s(80) == pytest.approx(0.001)
    c.warmup_epochs = 1.0  # 10 warm-up steps
    s = make_schedule(c, 0.1, 100, 10)
    assert s(0) == pytest.approx(0.0) and s(5) == pytest.approx(0.05) and s(10) == pytest.approx(0.1)
    c.warmup_epochs, c.name = 0.0, "cosine"
    s = make_schedule(c, 0.1, 100, 10)
    assert s(50) == pytest.approx(0.05, rel=1e-3) and s(100) == pytest.approx(0.0, abs=1e-6)
    c.name = "cyclic"
    s = make_schedule(c, 0.2, 100, 10)
    vals = np.array([s(i) for i in range(100)])
    assert int(np.argmax(vals)) == 40 and vals.max() == pytest.approx(0.2, rel=1e-3)
    c.name = "nope"
    with pytest.raises(ValueError, match="Unknown schedule"):
        make_schedule(c, 0.1, 100, 10)


def test_eps_schedules():
    c = base_config().objective.eps_schedule
    c.name, c.ramp_epochs = "linear", 2.0
    f = make_scalar_schedule(c, 0.3, 100, 10)
    assert float(f(0)) == 0.0 and float(f(10)) == pytest.approx(0.15) and float(f(50)) == pytest.approx(0.3)
    c.name = "cosine"
    f = make_scalar_schedule(c, 0.3, 100, 10)
    assert float(f(10)) == pytest.approx(0.15) and float(f(20)) == pytest.approx(0.3)
    assert float(jax.jit(f)(jnp.int32(5))) < 0.15


@pytest.mark.parametrize("field,value,match", [
    ("objective.name", "trades9000", "Unknown objective"),
    ("model.name", "resnet1000", "Unknown model"),
    ("data.name", "mnist9000", "Unknown dataset"),
    ("optimizer.name", "lion9000", "Unknown optimizer"),
    ("data.augment", "mixup", "data.augment"),
    ("threat.eps", -0.1, "eps"),
])
def test_bad_config_values_raise(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(**{field: value}), str(tmp_path))


def test_bad_config_key_on_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.train",
                          "--config=configs/mnist5k_fc1_pgd.py:smoke", f"--workdir={tmp_path}",
                          "--config.optimizer.lrr=0.1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "lrr" in out.stderr


def test_smoke_configs_run(tmp_path):
    s = train(mnist5k_fc1_pgd.get_config("smoke"), str(tmp_path / "a"))
    assert s["eval"]["test"]["clean_accuracy"] > 0.3  # 6 steps of PGD-AT already learn something
    s = train(fashion_mnist_fc_pgd.get_config("smoke"), str(tmp_path / "b"))
    assert set(s["eval"]) == {"val", "test"}
    with tfds.testing.mock_data(num_examples=32):
        s = train(cifar10_resnet18_pgd.get_config("smoke"), str(tmp_path / "c"))
    assert s["steps"] == 3 and 0.0 <= s["eval"]["test"]["pgd_accuracy"] <= s["eval"]["test"]["clean_accuracy"]


def test_entrypoint_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.train",
                          "--config=configs/mnist5k_fc1_pgd.py:smoke", f"--workdir={tmp_path}",
                          "--config.train.num_steps=4"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps/s" in out.stderr and "ETA" in out.stderr
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["steps"] == 4


def test_registered_objective_with_per_instance_state(tmp_path):
    """A new method is one registered Objective; per-instance arrays are indexed by dataset index."""
    from jaxrobust.train import Objective, ObjectiveOutput, register
    from jaxrobust.train.objectives import ce_and_accuracy, forward_train

    def loss(ctx, params, model_state, extra, batch, key, step):
        logits, new_state = forward_train(ctx.model, params, model_state, batch["image"])
        ce, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        seen = extra["instance"]["times_seen"][batch["index"]] + 1
        return ce, ObjectiveOutput(new_state, {"last_loss": per_example, "times_seen": seen},
                                   {"loss": ce})

    init = lambda ctx, params, n, shape: {"instance": {
        "last_loss": -jnp.ones((n,)), "times_seen": jnp.zeros((n,), jnp.int32)}}
    register("test_track_loss", Objective(init=init, loss=loss))
    c = tiny_config(**{"objective.name": "test_track_loss", "train.num_steps": 88})  # 2 epochs of 44 batches
    wd = str(tmp_path)
    train(c, wd)
    inst = load_trained(wd).extra["instance"]
    seen = np.asarray(inst["times_seen"])
    n_train = 1438  # digits train split size: state is indexed by dataset index
    assert len(seen) >= n_train and np.all(seen[n_train:] == 0)  # padding rows never touched
    # 2 epochs x 44 batches x 32 = 2816 updates; each epoch sees every example at most once
    assert seen.sum() == 88 * 32 and seen.max() <= 2
    last = np.asarray(inst["last_loss"])[:n_train]
    assert np.all((last >= 0) == (seen[:n_train] > 0))
