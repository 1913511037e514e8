"""experiments.analyze: the registry, outputs in RUN/analysis and RUN/plots, and the eigenvalues it
writes for a trained run equal the dense Hessian's."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxrobust.analysis as ja
from configs.analyze import hessian as hessian_cfg
from experiments import analyze as an
from jaxrobust.analysis import hessian as H
from jaxrobust.analysis.subset import subset_from_split
from jaxrobust.train import load_trained, train
from test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny digits run: 64-8-10 net (610 parameters), 12 PGD-AT steps."""
    wd = str(tmp_path_factory.mktemp("analysis_run"))
    train(tiny_config(**{"model.kwargs.widths": (8,), "train.num_steps": 12}), wd)
    return wd


def test_hessian_json_holds_the_dense_top_eigenvalues(run_dir):
    cfg = hessian_cfg.get_config("smoke")
    cfg.loss.kind = "clean"
    cfg.hessian.lanczos_steps, cfg.hessian.power_iters, cfg.hessian.power_tol = 40, 300, 1e-7
    an.analyze(cfg, run_dir)
    with open(os.path.join(run_dir, "analysis", "hessian.json")) as f:
        res = json.load(f)
    assert os.path.getsize(os.path.join(run_dir, "plots", "hessian.png")) > 1000
    assert res["plot"] == os.path.join("plots", "hessian.png") and res["num_params"] == 610
    run = load_trained(run_dir)
    batches = subset_from_split(run.dataset.split("train"), 64, 32)
    dense = H.dense_hessian(ja.apply_fn_of(run.model, run.variables), run.variables["params"], batches)
    top = np.linalg.eigvalsh(dense)[::-1][:3]
    np.testing.assert_allclose(res["lanczos"], top, rtol=1e-4)
    np.testing.assert_allclose(res["power"], top, rtol=1e-3)
    np.testing.assert_allclose(res["relative"]["lanczos"], top / top[0], rtol=1e-4)
    assert res["loss"]["kind"] == "clean" and res["loss"]["num_examples"] == 64
    np.testing.assert_allclose(res["normalized"]["lanczos"], np.asarray(res["lanczos"]) / res["loss_scale"],
                               rtol=1e-5)
    assert res["settings"]["hessian"]["top_k"] == 3 and res["step"] == 12


def test_registered_analyses_run_through_the_entry_point(run_dir):
    @ja.register_analysis("weight_count_test", summary=lambda r: {"n": r["n"]})
    def count(ctx):
        return {"n": int(sum(np.size(p) for p in jax.tree.leaves(ctx.params))),
                "array": np.arange(3.0)}

    cfg = hessian_cfg.get_config("smoke")
    cfg.analysis, cfg.name = "weight_count_test", "counted"
    out = an.analyze(cfg, run_dir)
    assert an.summarise(out) == {"name": "counted", "n": 610}
    with open(os.path.join(run_dir, "analysis", "counted.json")) as f:
        res = json.load(f)
    assert res["n"] == 610 and res["array"] == [0.0, 1.0, 2.0] and res["analysis"] == "weight_count_test"
    assert "weight_count_test" in ja.list_analyses() and {"hessian", "density"} <= set(ja.list_analyses())


def test_bad_analyze_configs_raise_one_clear_error(run_dir, tmp_path):
    cfg = hessian_cfg.get_config("smoke")
    cfg.analysis = "nope"
    with pytest.raises(ValueError, match=r"Unknown analysis 'nope'; available: \[.*'hessian'"):
        an.analyze(cfg, run_dir)
    for field, value, msg in (("loss.kind", "robust", "loss.kind"), ("loss.points", "x", "loss.points"),
                              ("hessian.methods", "lanczos,qr", "hessian.methods"),
                              ("name", "a/b", "config.name")):
        cfg = hessian_cfg.get_config("smoke")
        section, _, key = field.rpartition(".")
        (cfg[section] if section else cfg)[key] = value
        with pytest.raises(ValueError, match=msg):
            an.analyze(cfg, run_dir)
    with pytest.raises(FileNotFoundError, match="not a training run"):
        an.analyze(hessian_cfg.get_config("smoke"), str(tmp_path))
    with pytest.raises(ValueError, match="names are non-empty identifiers"):
        ja.register_analysis("bad name", lambda ctx: {})


@pytest.mark.slow
def test_cli_user_error_is_one_line_with_status_2(run_dir):
    p = subprocess.run([sys.executable, "-m", "experiments.analyze",
                        f"--config={REPO}/configs/analyze/hessian.py:smoke", f"--workdir={run_dir}",
                        "--config.analysis=nope"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "available" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
