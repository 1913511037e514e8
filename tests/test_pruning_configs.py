"""Configs of Tables 5.2–5.10 (runs, row sets, claims), the CIFAR / SVHN / ImageNet-100 variants on
TFDS mock data, HYDRA's chained stages through experiments.reproduce and AutoAttack on the exported
artifact (slow)."""
import json
import math
import os

import jax
import numpy as np
import pytest

from configs import table5_2, table5_7, table5_10
from configs.common import with_defaults
from experiments.reproduce import validate


# ----------------------------------------------------------------------------- parsing (default)
def test_table5_2_run_arguments():
    c = with_defaults(table5_2.get_config("mnist5k_cnn_r0.99_g0.1"))
    k = c.model.kwargs
    assert c.model.name == "subnet" and k.base == "cnn_small" and math.isclose(k.keep_rate, 0.01)
    assert k.gamma == 0.1 and k.weight_init == "binary" and k.score_init == "uniform"
    assert k.score_scale == 0.01 and k.last_bn
    assert c.optimizer.param_groups.frozen.pattern == "^weights/" and c.optimizer.param_groups.frozen.freeze
    assert c.train.finish_hooks == ("jaxrobust.pruning.export:export_run",)
    assert c.objective.name == "pgd_at" and c.threat.eps == 0.1
    c = table5_2.get_config("cifar10_rn34_r0.5_g1,skc,nolbn,a0.5")
    k = c.model.kwargs
    assert (k.base, k.base_kwargs.w, k.keep_rate, k.gamma) == ("cifar_resnet34", 16, 0.5, 1.0)
    assert (k.weight_init, k.score_init, k.score_scale, k.last_bn) == \
        ("signed_kaiming_constant", "fan_uniform", 0.5, False)
    assert c.train.num_epochs == 400 and c.data.augment == "crop_flip"
    assert c.objective.attack.steps == 10 and math.isclose(c.objective.attack.step_size, 2 / 255)
    f = table5_2.get_config("cifar100_rn18_r0.99_g0.1,fast")
    assert f.objective.name == "atta" and f.train.num_epochs == 100 and math.isclose(f.threat.eps, 4 / 255)
    d = table5_2.get_config("fashion_mnist_cnn_dense")
    assert d.model.name == "cnn_small" and d.train.finish_hooks == () and d.train.num_steps == 200
    for bad, match in (("mnist5k_cnn_r1.5_g0.1", "pruning rate"), ("mnist5k_cnn_r0.9_g0.1,xyz", "unknown option"),
                       ("mnist5k_mlp_r0.9_g0.1", "bad config"), ("mnist5k_cnn_r0.9", "bad config"),
                       ("mnist5k_cnn_r0.9_g0.1,fast,trades", "exclude")):
        with pytest.raises(ValueError, match=match):
            table5_2.get_config(bad)


def test_table5_7_and_5_10_methods():
    h = table5_7.get_config("cifar10_rn34_hydra_prune")
    k = h.model.kwargs
    assert (k.weight_init, k.score_init, k.last_bn, k.gamma) == ("pretrained", "magnitude", False, 0.1)
    assert h.optimizer.param_groups.frozen.pattern == "^weights/" and h.train.num_epochs == 20
    f = table5_7.get_config("cifar10_rn34_hydra_finetune")
    assert f.optimizer.param_groups.frozen.pattern == "^scores/" and f.optimizer.lr == 0.01
    assert f.model.kwargs.score_init == "pretrained"
    e = table5_7.get_config("mnist5k_cnn_edgepopup").model.kwargs
    assert (e.weight_init, e.last_bn, e.gamma) == ("signed_kaiming_constant", False, 1.0)
    assert table5_7.get_config("cifar10_rn18_at_lbn").model.kwargs.last_bn
    i = table5_10.get_config("rn34_hydra_prune")
    assert i.data.name == "imagenet100" and i.objective.name == "atta" and i.train.num_epochs == 10
    assert i.model.kwargs.base_kwargs.stem == "imagenet" and i.objective.fast.cache_resolution == 32
    for bad in ("cifar10_rn34_lottery", "cifar10_rn34_ours,skc"):
        with pytest.raises(ValueError, match="table5_7"):
            table5_7.get_config(bad)
    with pytest.raises(ValueError, match="ResNet"):
        table5_7.get_config("mnist5k_cnn_at_lbn")
    with pytest.raises(ValueError, match="table5_10"):
        table5_10.get_config("rn34_ours,fast")


def test_row_sets_validate_and_chain_hydra():
    t = table5_2.get_config("mnist5k_cnn")
    validate(t.reproduce)
    assert list(t.reproduce.order)[:2] == ["r05_g01", "r05_g1"] and "dense" in t.reproduce.order
    assert t.reproduce.rows.r099_g01.thesis[2] == 44.88  # Table 5.2, γ = 0.1, r = 0.99
    assert t.reproduce.rows.r099_g01_skc.thesis[2] == 45.01  # Table 5.4
    assert "source=export" in t.reproduce.steps.aa.overrides
    r = table5_7.get_config("cifar10_rn34").reproduce
    validate(r)
    assert r.rows.hydra_finetune.overrides == ("model.kwargs.weights_from={root}/at/s{seed}",
                                               "model.kwargs.scores_from={root}/hydra_prune/s{seed}")
    assert r.rows.ours.thesis[0] == 76.59 and r.rows.ours.thesis[2] == 45.06
    validate(table5_10.get_config("rn34").reproduce)


def test_claims_read_our_numbers():
    means = {"r099_g01": {"PGD-20 (%)": 40.0, "AA (%)": 35.0}, "r099_g1": {"PGD-20 (%)": 30.0, "AA (%)": 25.0},
             "r05_g01": {"PGD-20 (%)": 10.0}, "r05_g1": {"PGD-20 (%)": 38.0},
             "r09_g01": {"PGD-20 (%)": 35.0}, "r09_g1": {"PGD-20 (%)": 36.0},
             "r099_g01_nolbn": {"PGD-20 (%)": 20.0}, "dense": {"PGD-20 (%)": 50.0, "AA (%)": 45.0}}
    out = {c["claim"]: c for c in table5_2.claims(means)}
    assert out["at r = 0.99 a small γ (0.1) beats the fixed pruning rate (γ = 1) (Table 5.2)"]["holds"]
    assert "AA (%)" in out["at r = 0.99 a small γ (0.1) beats the fixed pruning rate (γ = 1) (Table 5.2)"]["evidence"]
    best = out["the best γ decreases as the pruning rate r grows (Table 5.2)"]
    assert best["holds"] and "r=0.99: γ=0.1" in best["evidence"]
    assert out["LBN helps the binary initialisation (r = 0.99, γ = 0.1; Tables 5.3/5.4)"]["holds"]
    skc = [c for c in out.values() if "Signed Kaiming" in c["claim"]][0]
    assert skc["holds"] is None  # rows missing: not decided
    dense = [c for c in out.values() if "dense AT" in c["claim"]][0]
    assert dense["holds"] is False
    means["r099_g1"]["AA (%)"] = 36.0
    assert not table5_2.claims(means)[0]["holds"]
    m7 = table5_7.claims({"ours": {"AA (%)": 40.0}, "hydra_finetune": {"PGD-20 (%)": 45.0}})
    assert m7[0]["holds"] is False and "PGD-20" in m7[0]["evidence"]


# ----------------------------------------------------------------------------- smoke runs (slow)
@pytest.mark.slow
@pytest.mark.parametrize("arg", ["cifar10_rn18_r0.99_g0.1,smoke", "cifar100_vgg_r0.9_g0.5,smoke,fast",
                                 "svhn_wrn_r0.99_g0.1,smoke,trades"])
def test_table5_2_smoke_on_mock_data(arg, tmp_path):
    import tensorflow_datasets as tfds
    from jaxrobust.pruning import load_artifact
    from jaxrobust.train import load_trained, train
    with tfds.testing.mock_data(num_examples=32):
        s = train(table5_2.get_config(arg), str(tmp_path))
        run = load_trained(str(tmp_path))
        x = run.dataset.split("test").get(np.arange(8))["image"]
        art = load_artifact(str(tmp_path / "export"))
        assert np.array_equal(np.asarray(run.logits_fn(x)), np.asarray(art.logits_fn(x)))
    assert s["steps"] == 3 and 0.0 <= s["eval"]["test"]["pgd_accuracy"] <= 1.0


@pytest.mark.slow
def test_table5_10_imagenet100_smoke_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    from jaxrobust.train import train
    c = table5_10.get_config("rn18_ours,smoke")
    with tfds.testing.mock_data(num_examples=400):  # ~10% of the mock labels are ImageNet-100 classes
        s = train(c, str(tmp_path))
    m = json.load(open(tmp_path / "export" / "manifest.json"))
    assert m["input_shape"] == [224, 224, 3] and m["base"]["kwargs"]["stem"] == "imagenet"
    assert s["steps"] == 3 and m["bytes"]["dense_over_total"] > 10


@pytest.mark.slow
def test_hydra_stages_chain_through_reproduce_and_autoattack_runs_on_the_artifact(tmp_path):
    from experiments import reproduce as rp
    from jaxrobust.pruning import load_artifact, masks_of
    from jaxrobust.train import load_trained
    cfg = table5_7.get_config("mnist5k_cnn,smoke")
    cfg.reproduce.only = "at,hydra_prune,hydra_finetune,ours"
    root = str(tmp_path / "t57")
    table = rp.reproduce(cfg, root)
    at, pr, ft = (load_trained(os.path.join(root, m, "s0")) for m in ("at", "hydra_prune", "hydra_finetune"))
    w_at = jax.device_get(at.variables["params"])
    w_pr = jax.device_get(pr.variables["params"])
    w_ft = jax.device_get(ft.variables["params"])
    for a, b in zip(jax.tree.leaves(w_at), jax.tree.leaves(w_pr["weights"])):
        assert np.array_equal(a, b)  # pruning stage: the pre-trained weights, frozen
    for a, b in zip(jax.tree.leaves(w_pr["scores"]), jax.tree.leaves(w_ft["scores"])):
        assert np.array_equal(a, b)  # fine-tuning stage: the mask of the pruning stage, fixed
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(w_pr["weights"]),
                                                       jax.tree.leaves(w_ft["weights"])))
    for (_, m1), (_, m2) in zip(masks_of(pr.model, pr.variables, (28, 28, 1)),
                                masks_of(ft.model, ft.variables, (28, 28, 1))):
        assert np.array_equal(m1, m2)
    art = load_artifact(os.path.join(root, "hydra_finetune", "s0", "export"))
    assert not any(layer["binary"] for layer in art.manifest["layers"])  # fine-tuned FP weights
    x = ft.dataset.split("test").get(np.arange(16))["image"]
    assert np.array_equal(np.asarray(ft.logits_fn(x)), np.asarray(art.logits_fn(x)))
    for row in ("hydra_finetune", "ours"):  # AutoAttack (smoke) on the exported artifacts
        ev = json.load(open(os.path.join(root, row, "s0", "eval_aa.json")))
        assert ev["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and ev["num_examples"] == 64
        assert 0.0 <= ev["worst_case_robust_accuracy"] <= ev["clean_accuracy"] <= 1.0
    assert table["rows"]["ours"]["columns"]["AA (%)"]["mean"] is not None
