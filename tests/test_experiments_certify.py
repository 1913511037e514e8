"""experiments.certify on a freshly trained 2-D run: certify.json metrics obey the orderings that must
hold (complete <= incomplete, PEC >= plain, empirical <= certified error), figures are written."""
import json
import os

import pytest

from configs import synthetic2d_fc
from configs.certify import demo, nonuniform, table3_6
from experiments.certify import certify_run
from jaxrobust.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("syn2d"))
    c = synthetic2d_fc.get_config()
    c.train.num_steps, c.train.eval_every_epochs, c.train.log_every = 400, 0.0, 200
    train(c, wd)
    return wd


def test_table3_6(run_dir):
    c = table3_6.get_config("smoke")
    c.milp.enabled, c.threat.eps = True, 0.05
    out = certify_run(c, run_dir)
    with open(os.path.join(run_dir, "certify.json")) as f:
        saved = json.load(f)
    assert saved["num_examples"] == 32 and saved["threat"] == {"norm": "linf", "eps": 0.05, "box": [-1.0, 1.0]}
    assert saved["CTE"] == round(saved["CTE"] * 32 / 100) * 100 / 32  # a count / 32, without float noise
    assert all(len(repr(v)) <= 16 for v in saved.values() if isinstance(v, float))
    assert {k: out[k] for k in ("CTE", "PGD", "CRE Lin")} == {k: saved[k] for k in ("CTE", "PGD", "CRE Lin")}
    assert saved["certified_but_attacked"] == 0
    assert saved["CTE"] <= saved["PGD"] <= saved["CRE Lin"] + 1e-9 and saved["PGD"] <= saved["CRE IBP"] + 1e-9
    assert saved["ACB PEC"] >= saved["ACB Lin"] - 1e-9
    assert saved["T_PEC"] <= saved["T_Lin"]
    m = saved["milp"]
    assert m["num_examples"] == 4 and saved["CRE MIP"] <= m["CRE Lin (same points)"] + 1e-9
    assert os.path.exists(os.path.join(run_dir, "plots", "fig3_6_certified_vs_eps.png"))
    assert os.path.exists(os.path.join(run_dir, "plots", "fig3_9_radius_distribution.png"))


def test_nonuniform(run_dir):
    c = nonuniform.get_config("smoke")
    c.num_examples, c.threat.eps = 8, 0.05
    out = certify_run(c, run_dir)
    assert out["num_certified"] > 0
    assert out["ratio"] >= 1 - 1e-6  # the uniform region is a feasible non-uniform one
    assert os.path.exists(os.path.join(run_dir, "certify_nonuniform.json"))
    assert os.path.exists(os.path.join(run_dir, "plots", "fig3_3_synthetic_regions.png"))


def test_configs_and_errors(run_dir):
    c = demo.get_config("smoke")
    assert c.milp.enabled and c.threat.eps == 0.03
    with pytest.raises(ValueError, match="variant"):
        table3_6.get_config("nope")
    c = table3_6.get_config("smoke")
    c.mode = "bogus"
    with pytest.raises(ValueError, match="mode"):
        certify_run(c, run_dir)
    c = table3_6.get_config("smoke")
    assert c.threat.eps is None  # None: the training run's eps; negative values are errors
    c.threat.eps = -0.1
    with pytest.raises(ValueError, match="eps must be >= 0"):
        certify_run(c, run_dir)
