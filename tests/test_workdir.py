"""A run's config.json: written only after validation, atomically, and never silently replaced by a
different config on resume (jaxrobust/train/workdir.py, through ``jaxrobust.train.train``)."""
import json
import os

import pytest

from test_train import tiny_config
from jaxrobust.train import load_trained, train
from jaxrobust.train.workdir import (RESUMABLE_KEYS, diff_configs, import_modules, is_resumable,
                                     parse_imports, prepare_workdir)


def tiny(**overrides):
    """test_train's tiny run, shorter: clean training, 4 steps, checkpoints every 2."""
    base = {"model.kwargs.widths": (16,), "objective.name": "standard", "schedule.name": "constant",
            "train.num_steps": 4, "train.checkpoint_every_steps": 2, "eval.attack.steps": 1,
            "eval.num_examples": 32}
    return tiny_config(**{**base, **overrides})


def _stored(wd):
    with open(os.path.join(wd, "config.json")) as f:
        return json.load(f)


def test_changed_eps_is_refused_and_resumable_keys_are_not(tmp_path):
    wd = str(tmp_path)
    train(tiny(), wd)
    with pytest.raises(ValueError, match=r"threat\.eps: 0\.1 -> 0\.2") as e:
        train(tiny(**{"threat.eps": 0.2}), wd)
    assert "allow_config_changes" in str(e.value)
    assert _stored(wd)["threat"]["eps"] == 0.1  # the record of the trained model is untouched
    # longer training, other logging/evaluation settings: resumes and records them
    s = train(tiny(**{"train.num_steps": 6, "train.log_every": 3, "eval.num_examples": 16}), wd)
    assert s["steps"] == 6 and _stored(wd)["train"]["num_steps"] == 6
    assert not os.path.exists(os.path.join(wd, "config_changes.jsonl"))
    # the user asks for it: resumes with the new ε, the change is kept in config_changes.jsonl
    s = train(tiny(**{"threat.eps": 0.2, "train.num_steps": 8, "allow_config_changes": True}), wd)
    assert s["steps"] == 8 and _stored(wd)["threat"]["eps"] == 0.2
    with open(os.path.join(wd, "config_changes.jsonl")) as f:
        rec = [json.loads(line) for line in f]
    assert rec[-1]["changes"] == [{"key": "threat.eps", "old": 0.1, "new": 0.2}]


def test_changed_model_is_refused_and_the_run_stays_loadable(tmp_path):
    wd = str(tmp_path)
    train(tiny(), wd)
    with pytest.raises(ValueError, match=r"model\.kwargs\.widths: \[16\] -> \[32\].*"
                                         r"optimizer\.lr: 0\.05 -> 0\.1"):
        train(tiny(**{"model.kwargs.widths": (32,), "optimizer.lr": 0.1}), wd)
    run = load_trained(wd)  # before the fix the stored config named the new model: restore failed
    assert run.step == 4 and run.variables["params"]["Dense_0"]["kernel"].shape[1] == 16


@pytest.mark.parametrize("field,value,error", [
    ("threat.norm", "l3", ValueError),  # raised by ThreatModel, after validate_config
    ("optimizer.name", "lion9000", ValueError),
    ("data.batch_size", 4096, ValueError),  # larger than the training set
])
def test_invalid_config_writes_nothing(tmp_path, field, value, error):
    wd = str(tmp_path / "run")
    with pytest.raises(error):
        train(tiny(**{field: value}), wd)
    assert not os.path.exists(os.path.join(wd, "config.json"))


def test_missing_dataset_writes_nothing_and_keeps_existing_config(tmp_path):
    wd = str(tmp_path)
    train(tiny(), wd)
    before = _stored(wd)
    with pytest.raises(FileNotFoundError):
        train(tiny(**{"data.name": "cifar10", "data.data_dir": str(tmp_path / "no_data")}), wd)
    assert _stored(wd) == before


def test_diff_and_resumable_keys():
    old = {"a": 1, "train": {"num_steps": 5, "seed": 0}, "eval": {"attack": {"steps": 3}}}
    new = {"a": 1, "train": {"num_steps": 9, "seed": 1}, "eval": {"attack": {"steps": 4}}, "b": 2}
    assert diff_configs(old, new) == [("b", "<absent>", 2), ("eval.attack.steps", 3, 4),
                                      ("train.num_steps", 5, 9), ("train.seed", 0, 1)]
    assert is_resumable("eval.attack.steps") and is_resumable("train.num_steps")
    assert not is_resumable("train.seed") and not is_resumable("threat.eps") and not is_resumable("b")
    assert "eval.*" in RESUMABLE_KEYS


def test_prepare_without_checkpoints_replaces_config_and_is_atomic(tmp_path):
    c = tiny()
    prepare_workdir(c, str(tmp_path))
    c2 = tiny(**{"threat.eps": 0.3})  # nothing trained yet: a new config simply replaces it
    assert prepare_workdir(c2, str(tmp_path)) == []
    assert _stored(str(tmp_path))["threat"]["eps"] == 0.3
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # no temporary file left
    os.makedirs(tmp_path / "checkpoints" / "4")
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no config.json"):
        prepare_workdir(c, str(tmp_path))


def test_imports(tmp_path, monkeypatch):
    assert parse_imports("a.b, c") == ("a.b", "c") and parse_imports(("a", "b,c")) == ("a", "b", "c")
    assert parse_imports(()) == () and parse_imports(None) == ()
    with pytest.raises(TypeError, match="module names"):
        parse_imports((1,))
    with pytest.raises(ValueError, match="not found"):
        import_modules("no_such_module_xyz")
    (tmp_path / "mymod_ok.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_modules("mymod_ok") == ("mymod_ok",)
