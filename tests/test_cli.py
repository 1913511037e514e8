"""The command line (experiments/__init__.py): one-line user errors with exit status 2 (before any
training), clean exits on SIGINT/SIGTERM that leave a resumable run, --config.imports, rounded JSON."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import gather_examples, process_slice, round_floats, suggest_paths, write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "experiments.train", "--config=configs/mnist5k_fc1_pgd.py:smoke"]


def _run(args, timeout=240, env=None):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _user_error(out):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("override,expect", [
    ("--config.threat.epsilon=0.2", "unknown config key 'threat.epsilon'"),
    ("--config.eps=0.2", "did you mean threat.eps?"),
    ("--config.optimizer.lrr=0.1", "did you mean optimizer.lr?"),
    ("--config.modle.name=fc", "did you mean model.name?"),
    ("--config.threat.eps=abc", "could not convert string to float"),
])
def test_unknown_keys_and_unparsable_values(tmp_path, override, expect):
    line = _user_error(_run(TRAIN + [f"--workdir={tmp_path}", override]))
    assert expect in line
    assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.parametrize("args,expect", [
    (["--config.threat.norm=l3"], "Unknown norm 'l3'"),
    (["--config.data.name=cifar10", "--config.data.data_dir={tmp}/none"], "not prepared"),
    (["--config.optimizer.name=lion9000"], "Unknown optimizer"),
])
def test_invalid_values_and_missing_data(tmp_path, args, expect):
    wd = tmp_path / "run"
    line = _user_error(_run(TRAIN + [f"--workdir={wd}"] + [a.format(tmp=tmp_path) for a in args]))
    assert expect in line
    assert not os.path.exists(wd / "config.json")  # nothing written before validation passed


def test_config_file_errors(tmp_path):
    line = _user_error(_run([sys.executable, "-m", "experiments.train", "--config=configs/nope.py",
                             f"--workdir={tmp_path}"]))
    assert "configs/nope.py" in line and "No such file" in line
    line = _user_error(_run([sys.executable, "-m", "experiments.evaluate",
                             "--config=configs/eval/pgd20.py:bogus", f"--workdir={tmp_path}"]))
    assert "Unknown config variant 'bogus'" in line
    line = _user_error(_run([sys.executable, "-m", "experiments.certify",
                             "--config=configs/certify/table3_6.py", f"--workdir={tmp_path}/none"]))
    assert "config.json not found" in line


def test_suggestions():
    valid = ["threat.eps", "threat.norm", "threat.box", "optimizer.lr", "data.name", "model.name"]
    assert suggest_paths("threat.epsilon", valid) == ["threat.eps"]
    assert suggest_paths("eps", valid) == ["threat.eps"]
    assert suggest_paths("zzzzzz", valid) == []


def _wait_for(pred, proc, timeout=180):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _checkpoints(wd):
    d = wd / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.is_dir() else []


@pytest.mark.parametrize("sig,code,when", [
    (signal.SIGINT, 130, "training"),
    pytest.param(signal.SIGTERM, 143, "compilation", marks=pytest.mark.slow)])
def test_interrupt_exits_cleanly_and_resumes(tmp_path, sig, code, when):
    """Ctrl-C / SIGTERM: status 130 / 143, no 'Fatal Python error' (the interpreter teardown while XLA
    threads run), one line saying how to resume; the same run then resumes from its checkpoint."""
    wd = tmp_path / "run"
    args = TRAIN + [f"--workdir={wd}", "--config.train.num_steps=100000",
                    "--config.train.checkpoint_every_steps=3", "--config.train.log_every=1000"]
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        if when == "training":
            ready = lambda: len(_checkpoints(wd)) > 0
        else:  # config.json is written right before the state is created and the step compiled
            ready = lambda: (wd / "config.json").exists()
        assert _wait_for(ready, proc), "the run ended or never got there"
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err.seek(0)
    stderr = err.read()
    assert rc == code, (rc, stderr[-3000:])
    assert "Fatal Python error" not in stderr and "Segmentation fault" not in stderr
    assert "resume with the same command: python -m experiments.train" in stderr
    assert f"--workdir={wd}" in stderr.splitlines()[-1]
    with open(wd / "config.json") as f:
        assert json.load(f)["train"]["num_steps"] == 100000
    done = _checkpoints(wd)
    target = (done[-1] if done else 0) + 2
    out = _run(args[:-3] + [f"--config.train.num_steps={target}"])
    assert out.returncode == 0, out.stderr[-3000:]
    if done:
        assert f"Resumed from step {done[-1]}" in out.stdout + out.stderr
    with open(wd / "summary.json") as f:
        assert json.load(f)["steps"] == target


def test_imports_register_an_objective_from_the_command_line(tmp_path):
    """--config.imports imports the user's module before the config is validated."""
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    readme = open(os.path.join(REPO, "README.md")).read()  # the README's example module, verbatim
    start = readme.index("# my_pkg/my_objectives.py")
    code = readme[start:readme.index("```", start)].replace('"my_method"', '"my_cli_objective"')
    (pkg / "my_objectives.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    base = TRAIN + [f"--workdir={tmp_path / 'run'}", "--config.objective.name=my_cli_objective",
                    "--config.train.num_steps=2"]
    line = _user_error(_run(base, env=env))
    assert "Unknown objective 'my_cli_objective'" in line
    out = _run(base + ["--config.imports=my_pkg.my_objectives"], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["steps"] == 2
    line = _user_error(_run(base + ["--config.imports=my_pkg.nope"], env=env))
    assert "my_pkg.nope" in line and "not found" in line


def test_round_floats_and_json(tmp_path):
    assert round_floats(100 * (1 - 0.974)) == 2.6 and 100 * (1 - 0.974) != 2.6
    assert round_floats({"a": [np.float32(0.1), np.int64(3), True, "x", None], "b": (1.0 / 3,)}) == \
        {"a": [0.1, 3, True, "x", None], "b": [0.3333333]}
    assert round_floats(1234567891.0) == 1234568000.0 and round_floats(1e-12 / 3) == 3.333333e-13
    assert math.isnan(round_floats(float("nan"))) and round_floats(float("inf")) == float("inf")
    assert round_floats(np.array([0.1 + 0.2, 2.0])) == [0.3, 2.0]
    write_json_atomic({"CTE": 2.6000000000000023, "n": 5}, str(tmp_path / "x.json"))
    assert (tmp_path / "x.json").read_text() == '{\n  "CTE": 2.6,\n  "n": 5\n}'
    assert os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("n,k", [(10, 1), (10, 3), (2, 4), (0, 2), (9, 3)])
def test_process_slices_cover_every_example_once(n, k):
    """Each process's padded slice, gathered in process order without the padding, is 0..n-1."""
    slices = [process_slice(n, p, k) for p in range(k)]
    assert len({len(i) for i, _ in slices}) == 1  # static shapes for the all-gather
    vals = [{"idx": i, "sq": i.astype(float) ** 2} for i, _ in slices]
    fake_allgather = lambda tree: {key: np.stack([({"mask": m, **v})[key] for (_, m), v in zip(slices, vals)])
                                   for key in tree}
    out = gather_examples(vals[0], slices[0][1], allgather=fake_allgather)
    np.testing.assert_array_equal(out["idx"], np.arange(n))
    np.testing.assert_array_equal(out["sq"], np.arange(n) ** 2.0)
    single = gather_examples({"v": np.arange(n) * 2}, process_slice(n, 0, 1)[1])
    np.testing.assert_array_equal(single["v"], np.arange(n) * 2)
    with pytest.raises(ValueError, match="process_index"):
        process_slice(n, k, k)


def test_evaluate_combines_process_results_by_counts():
    """Two processes with 3 and 2 examples: accuracies are the pooled counts / 5, seconds the slowest."""
    from experiments.evaluate import combine_process_results
    r0 = {"num_examples": 3, "clean_accuracy": 2 / 3, "worst_case_robust_accuracy": 1 / 3, "mode": "standard",
          "robust_accuracy": {"apgd-ce": 1 / 3}, "seconds": {"apgd-ce": 2.0}, "warnings": []}
    r1 = dict(r0, num_examples=2, clean_accuracy=1.0, worst_case_robust_accuracy=0.5,
              robust_accuracy={"apgd-ce": 0.5}, seconds={"apgd-ce": 5.0})
    trees = []
    for r, n in ((r0, 3), (r1, 2)):  # what each process contributes to the all-gather
        combine_process_results(r, n, allgather=lambda t: trees.append(t) or {k: v[None] for k, v in t.items()})
    gathered = {k: np.stack([t[k] for t in trees]) for k in trees[0]}
    out = combine_process_results(r0, 3, allgather=lambda t: gathered)
    assert out["num_examples"] == 5 and out["clean_accuracy"] == 4 / 5
    assert out["worst_case_robust_accuracy"] == 2 / 5 and out["robust_accuracy"] == {"apgd-ce": 2 / 5}
    assert out["seconds"] == {"apgd-ce": 5.0}
    assert combine_process_results(r0, 3) is r0  # one process: unchanged
