"""Multi-host training and evaluation, exercised for real: two processes on localhost, each with two
CPU devices, joined by ``jax.distributed.initialize`` (a local coordinator on 127.0.0.1, CPU
collectives over gloo), run the ``experiments.train`` and ``experiments.evaluate`` entry points
exactly as a 2-host job would (BUILD.md, "Multi-host"). A single process with four devices runs the
same config as the reference: the 2x2 job must train the same model (metrics, final checkpoint,
per-instance state sharded across the processes) and evaluate the same examples.

Default run: training only (about 85 CPU-s: three processes compile and train); the slow test runs
the evaluation entry point after it as well.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_CONFIG = "configs/mnist5k_fc1_pgd.py:smoke"
# ATAS keeps per-instance arrays (cached perturbation, step-size statistics) sharded over the 4
# devices, i.e. split across the two processes: the checkpoint then has rows written by each host.
TRAIN_OVERRIDES = {"objective.name": "atas", "train.num_steps": 4, "train.checkpoint_every_steps": 2,
                   "eval.num_examples": 100}
EVAL_CONFIG = "configs/eval/pgd20.py:smoke"
EVAL_OVERRIDES = {"save_adversarial": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _flags(wd: str, config: str, overrides: dict) -> list:
    """The command line of an entry point: ``--config.a.b=v`` for each override."""
    return [f"--config={config}", f"--workdir={wd}",
            *(f"--config.{k}={v!r}" if not isinstance(v, str) else f"--config.{k}={v}"
              for k, v in overrides.items())]


def _reference(wd: str, evaluate: bool) -> subprocess.Popen:
    """One process, four devices: the same entry points, run in-process (one import)."""
    code = textwrap.dedent(f"""
        import importlib
        import jax
        from experiments.evaluate import evaluate
        from jaxrobust.train import train
        assert jax.device_count() == 4 and jax.process_count() == 1
        def config(spec, overrides):
            path, _, arg = spec.partition(':')
            c = importlib.import_module(path[:-3].replace('/', '.')).get_config(arg)
            for k, v in overrides.items():
                *parents, last = k.split('.')
                node = c
                for p in parents:
                    node = node[p]
                node[last] = v
            return c
        train(config({TRAIN_CONFIG!r}, {TRAIN_OVERRIDES!r}), {wd!r})
        if {evaluate!r}:
            evaluate(config({EVAL_CONFIG!r}, {EVAL_OVERRIDES!r}), {wd!r})
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _host(wd: str, process_id: int, ports, evaluate: bool) -> subprocess.Popen:
    """Host ``process_id`` of the 2-host job: train, then (``evaluate``) evaluate, a new coordinator
    port each."""
    py = [sys.executable, "-m"]
    train = py + ["experiments.train"] + _flags(wd, TRAIN_CONFIG, TRAIN_OVERRIDES) + \
        ["--config.distributed=True"]
    evaluation = py + ["experiments.evaluate"] + _flags(wd, EVAL_CONFIG, EVAL_OVERRIDES) + \
        ["--config.distributed=True"]
    script = " && ".join(
        f"JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} " + " ".join(map(_quote, cmd))
        for port, cmd in zip(ports, (train, evaluation)[:2 if evaluate else 1]))
    return subprocess.Popen(["/bin/sh", "-c", script], cwd=REPO,
                            env=_env(2, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=process_id),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


def _wait_all(procs, timeout: float = 900) -> dict:
    """Outputs of every process; the first failure (or the timeout) kills the rest, so a host left
    waiting for its dead peer at the coordinator does not hang the test."""
    import time
    deadline = time.time() + timeout
    while any(p.poll() is None for _, p in procs):
        failed = [w for w, p in procs if p.poll() not in (None, 0)]
        if failed or time.time() > deadline:
            break
        time.sleep(0.2)
    timed_out = [w for w, p in procs if p.poll() is None]
    for _, p in procs:
        if p.poll() is None:
            p.kill()
    outs = {w: p.communicate()[0] for w, p in procs}
    if timed_out and not [w for w, p in procs if p.returncode not in (0, -9)]:
        pytest.fail(f"{timed_out} still running after {timeout:.0f} s:\n" +
                    "\n".join(f"--- {w}\n{outs[w][-2000:]}" for w in timed_out))
    for w, p in procs:
        assert p.returncode == 0, f"{w} failed ({p.returncode}):\n{outs[w][-4000:]}"
    return outs


def _restore_on_one_device(wd: str, step: int):
    """A run's checkpoint as saved (every leaf), restored onto this process's one device."""
    import orbax.checkpoint as ocp
    path = os.path.join(wd, "checkpoints", str(step), "default")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    out = ckptr.restore(path, target)
    ckptr.close()
    return jax.tree.map(np.asarray, out)


def _metrics(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _launch(root, evaluate: bool):
    ref, mh = str(root / "ref"), str(root / "mh")
    ports = (_free_port(), _free_port())
    procs = [("reference (1 process x 4 devices)", _reference(ref, evaluate))] + \
        [(f"host {p} of 2", _host(mh, p, ports, evaluate)) for p in (0, 1)]
    outs = _wait_all(procs)
    from jaxrobust.train import load_trained
    return ref, mh, outs, load_trained(ref) if evaluate else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("multihost_train"), evaluate=False)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("multihost_eval"), evaluate=True)


def test_two_hosts_train_the_same_model_as_one_host_with_four_devices(trained):
    _check_training(*trained)


@pytest.mark.slow
def test_two_hosts_train_then_evaluate_their_slices_and_host0_writes_the_whole_result(evaluated):
    _check_training(*evaluated)
    _check_evaluation(*evaluated)


def _check_training(ref, mh, outs, ref_run):
    host0, host1 = outs["host 0 of 2"], outs["host 1 of 2"]
    # a real 2-process job: each host saw 2 local devices of 4; only host 0 logs progress
    assert "[train] step 4/4" in host0 and "[train] step" not in host1
    a, b = _metrics(ref), _metrics(mh)
    # one writer (host 0): the same lines, no duplicates from host 1
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k == "steps_per_sec" or isinstance(v, str):
                assert k == "steps_per_sec" or rb[k] == v
                continue
            np.testing.assert_allclose(rb[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{k} at {ra['step']}")
    with open(os.path.join(ref, "summary.json")) as f:
        s_ref = json.load(f)
    with open(os.path.join(mh, "summary.json")) as f:
        s_mh = json.load(f)
    assert s_mh["devices"] == s_ref["devices"] == 4
    assert s_mh["eval"] == s_ref["eval"]  # clean accuracy over the same 100 examples
    assert s_mh["compiles"] == {"update": 1}
    # the final checkpoints (written by both hosts through orbax) hold the same state, and a
    # single process restores the 2-host checkpoint (onto another device count)
    assert sorted(os.listdir(os.path.join(mh, "checkpoints"))) == \
        sorted(os.listdir(os.path.join(ref, "checkpoints"))) == ["2", "4"]
    c1, c2 = _restore_on_one_device(ref, 4), _restore_on_one_device(mh, 4)
    assert int(c1["step"]) == int(c2["step"]) == 4
    t1 = jax.tree_util.tree_flatten_with_path(c1)[0]
    t2 = jax.tree.leaves(c2)
    assert len(t1) == len(t2) and len(t1) > 5
    if ref_run is not None:  # what load_trained serves (the evaluation entry points) is this checkpoint
        np.testing.assert_array_equal(np.asarray(ref_run.variables["params"]["Dense_0"]["kernel"]),
                                      np.asarray(c1["params"]["Dense_0"]["kernel"]))
    instance_nonzero = 0
    for (path, x1), x2 in zip(t1, t2):
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(x2), np.asarray(x1), rtol=1e-5, atol=1e-6, err_msg=name)
        if "'instance'" in name:
            instance_nonzero += int(np.count_nonzero(np.asarray(x1)))
    assert instance_nonzero > 0  # the sharded per-instance state was really updated (and compared)


def _check_evaluation(ref, mh, outs, run):
    with open(os.path.join(ref, "eval.json")) as f:
        e_ref = json.load(f)
    with open(os.path.join(mh, "eval.json")) as f:
        e_mh = json.load(f)
    assert e_ref["processes"] == 1 and e_mh["processes"] == 2
    assert e_mh["num_examples"] == e_ref["num_examples"] == 64
    assert e_mh["clean_accuracy"] == e_ref["clean_accuracy"]
    # Each host attacks its half with its own key, so the PGD points differ from the one-host run;
    # what must hold: the gathered per-example results are the examples in their original order,
    # every adversarial point is in the budget, and each broken example is really misclassified by
    # the (same) trained model, with the robust accuracy their count.
    a_ref = np.load(os.path.join(ref, "eval_adversarial.npz"))
    a_mh = np.load(os.path.join(mh, "eval_adversarial.npz"))
    np.testing.assert_array_equal(a_mh["index"], a_ref["index"])
    np.testing.assert_array_equal(a_mh["label"], a_ref["label"])
    x = run.dataset.split("test").get(np.arange(64))
    assert np.array_equal(x["index"], a_mh["index"])
    threat = run.threat
    assert bool(np.all(threat.contains(x["image"], a_mh["x_adv"])))
    pred = np.argmax(np.asarray(run.logits_fn(a_mh["x_adv"])), -1)
    broken = ~a_mh["robust"]
    assert np.all(pred[broken] != a_mh["label"][broken])
    assert e_mh["robust_accuracy"]["pgd"] == pytest.approx(float(np.mean(a_mh["robust"])))
    assert abs(e_mh["robust_accuracy"]["pgd"] - e_ref["robust_accuracy"]["pgd"]) <= 0.1
