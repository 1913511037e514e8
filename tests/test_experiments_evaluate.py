"""experiments.evaluate on a freshly trained smoke run: eval.json contents, overrides, outputs."""
import json
import os

import numpy as np
import pytest

from configs import mnist5k_fc1_pgd
from configs.eval import autoattack_standard, pgd20, table4_2
from experiments.evaluate import evaluate
from jaxrobust.train import train


def test_evaluate_writes_eval_json(tmp_path):
    wd = str(tmp_path)
    train(mnist5k_fc1_pgd.get_config("smoke"), wd)
    c = table4_2.get_config("smoke")
    out = evaluate(c, wd)
    with open(os.path.join(wd, "eval.json")) as f:
        saved = json.load(f)
    assert saved["num_examples"] == 64 and saved["mode"] == "individual"
    assert set(saved["robust_accuracy"]) == {"pgd", "apgd-ce", "apgd-dlr", "square"}
    assert saved["worst_case_robust_accuracy"] <= min(saved["robust_accuracy"].values()) + 1e-9
    assert saved["worst_case_robust_accuracy"] <= saved["clean_accuracy"]
    assert set(saved["seconds"]) == set(saved["robust_accuracy"]) and saved["threat"]["eps"] == 0.1
    assert c.threat.eps is None and saved["threat"]["box"] == [0.0, 1.0] and saved["processes"] == 1
    # accuracies are counts / 64: written exactly, without float noise
    assert all(round(v * 64) == v * 64 for v in saved["robust_accuracy"].values())
    assert not os.path.exists(os.path.join(wd, "eval_state.npz"))  # finished evaluations clean up
    # overrides of eps and norm, adversarial examples saved
    c = autoattack_standard.get_config("smoke")
    c.threat.eps, c.threat.norm, c.save_adversarial = 1.0, "l2", True
    out = evaluate(c, wd)
    assert out["threat"] == {"norm": "l2", "eps": 1.0, "box": [0.0, 1.0]}  # the box used is recorded
    adv = np.load(os.path.join(wd, "eval_adversarial.npz"))
    assert adv["x_adv"].shape == (64, 28, 28, 1)
    d = np.sqrt(((adv["x_adv"] - 0) ** 2).sum((1, 2, 3)))  # finite, inside the box
    assert np.all(np.isfinite(d)) and adv["x_adv"].min() >= 0 and adv["x_adv"].max() <= 1
    # a larger budget can only lower robust accuracy
    c = pgd20.get_config("smoke")
    small = evaluate(c, wd)["worst_case_robust_accuracy"]
    c.threat.eps = 0.3
    assert evaluate(c, wd)["worst_case_robust_accuracy"] <= small


def test_negative_eps_is_rejected_not_the_training_eps(tmp_path):
    """eps=None (the default) means the training ε; a negative ε used to mean it too, silently."""
    wd = str(tmp_path)
    train(mnist5k_fc1_pgd.get_config("smoke"), wd)
    c = pgd20.get_config("smoke")
    c.threat.eps = -1.0
    with pytest.raises(ValueError, match="eps must be >= 0"):
        evaluate(c, wd)
    assert not os.path.exists(os.path.join(wd, "eval.json"))
