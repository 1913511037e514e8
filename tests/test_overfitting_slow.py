"""Robust overfitting toolkit, slow checks: the analyses on smoke runs through experiments.analyze, the
new objectives resume bit-exactly, and the CIFAR-10 / CIFAR-10-C configs on tfds mock data."""
import json
import os

import jax
import numpy as np
import pytest

from jaxrobust.analysis import difficulty as D
from jaxrobust.train import train

pytestmark = pytest.mark.slow


def _analyze(name, workdir, **overrides):
    from experiments.analyze import analyze
    import importlib
    cfg = importlib.import_module(f"configs.analyze.{name}").get_config("smoke")
    for k, v in overrides.items():
        section, key = k.split("__")
        cfg[section][key] = v
    return analyze(cfg, str(workdir))["result"]


def test_analyses_of_a_reference_and_a_subset_run(tmp_path):
    from configs import subsets
    c = subsets.get_config("mnist5k_hard,smoke")
    c.train.eval_every_epochs = 0.5
    train(c, str(tmp_path / "hard"))
    ref = tmp_path / "mnist5k_reference_pgd_smoke"
    r = _analyze("difficulty", ref)
    assert r["instances"] == 4000 and -1 <= r["loss_vs_01_correlation"] <= 1
    assert sum(r["group_sizes"]) == 4000 and os.path.exists(ref / "plots" / "difficulty.png")
    rc = subsets.get_config("mnist5k_random,smoke")
    rc.train.instance_eval.groups_reference = str(ref)
    train(rc, str(tmp_path / "random"))
    live = [json.loads(l) for l in open(tmp_path / "random" / "groups.jsonl")]
    g = _analyze("groups", tmp_path / "random", groups__reference=str(ref))
    for tag in ("train:clean", "train:pgd"):
        s = g["sources"][tag]
        assert sum(s["group_sizes"]) == 100 and np.asarray(s["loss"]).shape == (len(s["steps"]), 10)
        h = D.load_instance_history(str(tmp_path / "random"), tag)
        # group means are means of the recorded per-instance values, as logged live
        groups = D.difficulty_groups(np.load(ref / "difficulty.npy"))[h["index"]]
        for j in (0, 9):
            if (groups == j).any():
                np.testing.assert_allclose(np.asarray(s["loss"], float)[:, j],
                                           h["loss"][:, groups == j].mean(1), rtol=1e-6)
        rec = [r for r in live if r["source"] == tag][-1]
        np.testing.assert_allclose([np.nan if v is None else v for v in rec["loss"]],
                                   np.asarray(s["loss"], float)[-1], rtol=1e-5)
    o = _analyze("overfitting", tmp_path / "hard")
    vals = [m["pgd_accuracy"] for m in map(json.loads, open(tmp_path / "hard" / "metrics.jsonl"))
            if m["split"] == "test"]
    assert o["best"] == max(vals) and o["last"] == vals[-1] and o["gap"] == max(vals) - vals[-1]
    lip = _analyze("lipschitz", tmp_path / "hard")
    assert lip["gradient_norm"]["max"] <= lip["seqlip"]["min"] <= lip["autolip"]["min"] * (1 + 1e-4)
    dd = _analyze("ddistance", tmp_path / "hard",
                  ddistance__against=f"ref={ref};me={tmp_path / 'hard'}@configs/subsets.py:mnist5k_hard,smoke",
                  ddistance__twins="me")
    assert (tmp_path / "hard_twin" / "difficulty.npy").exists()  # the twin (seed + 100) was trained
    assert 0 <= dd["distances"]["me"] <= 1 and 0 <= dd["distances"]["ref"] <= 1
    with pytest.raises(ValueError, match="ddistance.against is empty"):
        _analyze("ddistance", tmp_path / "hard")


@pytest.mark.parametrize("cfg_ref", ["table4_6:mnist5k_atta_rw_at", "table4_6:mnist5k_iat",
                                     "table4_6:mnist5k_sat"])
def test_new_objectives_resume_bit_exactly(tmp_path, cfg_ref):
    import importlib
    mod, arg = cfg_ref.split(":")
    get = importlib.import_module(f"configs.{mod}").get_config

    def cfg():
        c = get(arg + ",smoke")
        c.train.num_steps = 4
        c.train.checkpoint_every_steps = 1
        c.objective.rw.warmup_epochs = c.objective.iat.warmup_epochs = 0.0
        return c

    full = tmp_path / "full"
    train(cfg(), str(full))
    part = tmp_path / "part"
    train(cfg(), str(part), callbacks=[lambda step, state: step == 2])
    train(cfg(), str(part))
    from jaxrobust.train import load_trained
    a, b = load_trained(str(full)), load_trained(str(part))
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
    jax.tree.map(np.testing.assert_array_equal, a.extra, b.extra)


def test_cifar10_configs_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    from configs import subsets, table4_4, table4_6, table4_7
    with tfds.testing.mock_data(num_examples=400):
        s = train(subsets.get_config("cifar10_hard,smoke"), str(tmp_path / "cifar10_hard"))
        assert s["steps"] == 1 and (tmp_path / "cifar10_reference_pgd_smoke" / "difficulty.npy").exists()
        c = table4_6.get_config("cifar10_atta_rw_at,smoke")
        c.train.num_steps = 2
        assert train(c, str(tmp_path / "atta_rw"))["steps"] == 2
        c = table4_7.get_config("cifar10_rwkl,smoke")
        c.train.num_steps = 2
        assert train(c, str(tmp_path / "ft"))["steps"] == 2
        c = table4_4.get_config("cifar10_clean,smoke")
        c.train.instance_eval.sources = c.train.instance_eval.sources[:3]
        train(c, str(tmp_path / "c44"))
        h = D.load_instance_history(str(tmp_path / "c44"), "cifar10_corrupted/brightness_3@test:clean")
        assert h["loss"].shape[1] == 16 and np.isfinite(h["loss"]).all()
