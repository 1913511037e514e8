"""experiments.reproduce: a two-row table trained and evaluated through the entry points, the thesis's
numbers beside ours, claims checked, and a second invocation that reruns nothing."""
import json
import os
import textwrap

import pytest

from experiments import reproduce as rp

ROWSET = textwrap.dedent('''
    from configs.common import reproduce_config, reproduce_row, reproduce_step

    def claims(means):
        a, b = means["at"]["Clean (%)"], means["erm"]["Clean (%)"]
        return [{"claim": "both rows have a clean accuracy", "holds": a is not None and b is not None,
                 "evidence": f"{a} vs {b}"}]

    def get_config(arg=""):
        c = reproduce_config("tiny", "A tiny table", columns=(
            ("Clean (%)", "eval_small.json:clean_accuracy*100"),
            ("PGD (%)", "eval_small.json:robust_accuracy.pgd*100"),
            ("steps", "summary.json:steps", 0),
            ("absent", "eval_small.json:no.such.key")),
            claims="rowset_cfg:claims", notes="Deviation: 6 training steps.")
        reproduce_row(c, "at", "configs/mnist5k_fc1_pgd.py:smoke", label="AT", thesis=(98.6, 91.0, None, None))
        reproduce_row(c, "erm", "configs/mnist5k_fc1_pgd.py:smoke", label="ERM",
                      overrides=("objective.name=standard",))
        reproduce_step(c, "pgd", "evaluate", "configs/eval/pgd20.py:smoke", "eval_small.json",
                       overrides=("output=eval_small.json", "num_examples=32"))
        return c
''')


def _load(tmp_path, monkeypatch):
    (tmp_path / "rowset_cfg.py").write_text(ROWSET)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import rowset_cfg
    importlib.reload(rowset_cfg)
    return rowset_cfg.get_config()


def test_reproduce_table_resumes_and_reports(tmp_path, monkeypatch):
    cfg = _load(tmp_path, monkeypatch)
    root = str(tmp_path / "table")
    table = rp.reproduce(cfg, root)
    at = table["rows"]["at"]["columns"]
    with open(os.path.join(root, "at", "s0", "eval_small.json")) as f:
        ev = json.load(f)
    assert ev["num_examples"] == 32  # the step's overrides reached the entry point
    assert at["Clean (%)"]["mean"] == pytest.approx(100 * ev["clean_accuracy"])
    assert at["PGD (%)"]["mean"] == pytest.approx(100 * ev["robust_accuracy"]["pgd"])
    assert at["steps"]["mean"] == 6 and at["absent"]["mean"] is None
    assert at["Clean (%)"]["thesis"] == 98.6 and at["steps"]["thesis"] is None
    with open(os.path.join(root, "erm", "s0", "config.json")) as f:
        assert json.load(f)["objective"]["name"] == "standard"  # row overrides applied
    md = open(os.path.join(root, "tiny.md")).read()
    assert "| AT | " in md and " / 98.60" in md and "| ERM |" in md and "Deviation" in md
    assert "| 6 |" in md or " 6 |" in md  # the steps column has its own 0 decimals
    assert table["claims"][0]["holds"] is True and "| yes |" in md
    saved = json.load(open(os.path.join(root, "tiny.json")))
    assert saved["rows"]["erm"]["columns"]["steps"]["values"] == [6]

    # Everything finished: a second invocation starts no child process.
    mtimes = {p: os.path.getmtime(os.path.join(root, p)) for p in
              ("at/s0/summary.json", "at/s0/eval_small.json", "erm/s0/eval_small.json")}
    monkeypatch.setattr(rp, "_run_child", lambda *a, **k: pytest.fail("nothing should rerun"))
    again = rp.reproduce(cfg, root)
    assert again["rows"]["at"]["columns"]["PGD (%)"]["mean"] == at["PGD (%)"]["mean"]
    assert all(os.path.getmtime(os.path.join(root, p)) == t for p, t in mtimes.items())


def test_reproduce_rejects_bad_row_sets(tmp_path, monkeypatch):
    cfg = _load(tmp_path, monkeypatch)
    cfg.reproduce.only = "at,nope"
    with pytest.raises(ValueError, match="unknown rows"):
        rp.reproduce(cfg, str(tmp_path / "x"))
    cfg.reproduce.only = ""
    cfg.reproduce.rows.at.thesis = (1.0,)
    with pytest.raises(ValueError, match="1 values for 4 columns"):
        rp.reproduce(cfg, str(tmp_path / "x"))
    from configs import mnist5k_fc1_pgd
    with pytest.raises(ValueError, match="not a table's row set"):
        rp.reproduce(mnist5k_fc1_pgd.get_config("smoke"), str(tmp_path / "y"))


def test_format_value_matches_the_thesis_notation():
    assert rp.format_value(1.5612, 0.1702, 2) == "1.56(17)"
    assert rp.format_value(None, None, 2) == "–" and rp.format_value(7.0, None, 1) == "7.0"
    assert rp.mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(1.41421356), 2)
