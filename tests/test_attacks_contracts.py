"""Attack contracts: label / shape validation at every public entry point, checkify-checked variants
under jit, AutoAttack on flat inputs, validation before any attack runs, compile caching across
calls, and progress lines."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import attacks, checks
from jaxrobust.attacks import autoattack
from jaxrobust.attacks.autoattack import evaluate_robustness
from jaxrobust.threat import ThreatModel

K = 10
_W1 = jax.random.normal(jax.random.PRNGKey(0), (16, 24)) * 0.5
_W2 = jax.random.normal(jax.random.PRNGKey(1), (24, K))


def fc(x):
    """A tiny tanh net on any input shape (flattened), K = 10 classes."""
    return jnp.tanh(x.reshape(x.shape[0], -1) @ _W1) @ _W2


def _data(n=4, image=True, seed=2):
    x = jax.random.uniform(jax.random.PRNGKey(seed), (n, 16))
    y = jnp.argmax(fc(x), -1).astype(jnp.int32)
    return (x.reshape(n, 4, 4, 1) if image else x), y


ENTRY_POINTS = {
    "pgd": lambda x, y, k, t: attacks.pgd(fc, x, y, k, t, steps=2),
    "fgsm": lambda x, y, k, t: attacks.fgsm(fc, x, y, k, t),
    "multi_targeted_pgd": lambda x, y, k, t: attacks.multi_targeted_pgd(fc, x, y, k, t, steps=1),
    "apgd": lambda x, y, k, t: attacks.apgd(fc, x, y, k, t, n_iter=2),
    "apgd_targeted": lambda x, y, k, t: attacks.apgd_targeted(fc, x, y, k, t, n_iter=2),
    "fab": lambda x, y, k, t: attacks.fab(fc, x, y, k, t, n_iter=2),
    "square": lambda x, y, k, t: attacks.square(fc, x, y, k, t, n_queries=2),
    "evaluate_robustness": lambda x, y, k, t: evaluate_robustness(
        fc, x, y, k, t, n_iter=2, n_queries=2, log=lambda s: None),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("bad", [K, -1])
def test_out_of_range_labels_rejected_everywhere(entry, bad):
    x, y = _data()
    with pytest.raises(ValueError, match="out of range for 10 classes|negative labels"):
        ENTRY_POINTS[entry](x, y.at[1].set(bad), jax.random.PRNGKey(0), ThreatModel("linf", 0.1))


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_unbatched_input_says_batch_axis_expected(entry):
    x, y = _data()
    with pytest.raises(ValueError, match=r"a batch axis is expected: pass x\[None\]"):
        ENTRY_POINTS[entry](x[0], y[0], jax.random.PRNGKey(0), ThreatModel("linf", 0.1))


def test_shape_assertions_run_under_jit_too():
    x, y = _data()
    tm = ThreatModel("linf", 0.1)
    k = jax.random.PRNGKey(0)
    run = jax.jit(lambda x, y: attacks.apgd(fc, x, y, k, tm, n_iter=2))
    with pytest.raises(ValueError, match=r"y must be integer labels of shape \(4,\)"):
        run(x, y[:3])  # shapes are static: caught while tracing
    with pytest.raises(TypeError, match="integer labels"):
        run(x, y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"logits of shape \(B, K\)"):
        attacks.pgd(lambda z: fc(z)[:, 0], x, y, k, tm, steps=1)
    with pytest.raises(ValueError, match="y_target must be integer labels"):
        attacks.pgd(fc, x, y, k, tm, steps=1, targeted=True, y_target=y[:2])
    with pytest.raises(ValueError, match="y_target contains labels outside"):
        attacks.pgd(fc, x, y, k, tm, steps=1, targeted=True, y_target=y.at[0].set(K))
    with pytest.raises(ValueError, match="num_classes=5 but logits_fn"):
        attacks.multi_targeted_pgd(fc, x, y, k, tm, num_classes=5)


def test_checked_attacks_raise_inside_jit():
    x, y = _data()
    tm = ThreatModel("linf", 0.1)
    k = jax.random.PRNGKey(0)
    traced = {"n": 0}

    def fn(x, y, k):
        traced["n"] += 1
        return checks.pgd(fc, x, y, k, tm, steps=3)

    safe = checks.checked(fn)
    ok = safe(x, y, k)
    np.testing.assert_allclose(np.asarray(ok), np.asarray(attacks.pgd(fc, x, y, k, tm, steps=3)),
                               atol=1e-6)
    with pytest.raises(ValueError, match="NaN or inf"):
        safe(x.at[0, 0, 0, 0].set(jnp.nan), y, k)
    with pytest.raises(ValueError, match="outside the input box"):
        safe(x.at[1, 2, 0, 0].set(1.5), y, k)
    with pytest.raises(ValueError, match="label 10 out of range for 10 classes"):
        safe(x, y.at[2].set(K), k)
    with pytest.raises(ValueError, match="negative labels"):
        safe(x, y.at[2].set(-3), k)
    assert traced["n"] == 1  # all of the above ran the one compiled program
    # The unchecked attack under plain jit cannot see values: the bad label passes silently.
    plain = jax.jit(lambda x, y, k: attacks.pgd(fc, x, y, k, tm, steps=3))
    assert plain(x, y.at[2].set(K), k).shape == x.shape
    # Every checked variant validates (here: eagerly under checkify, no jit).
    small = {"fgsm": {}, "apgd": {"n_iter": 2}, "apgd_targeted": {"n_iter": 2, "n_target_classes": 2},
             "fab": {"n_iter": 2, "n_target_classes": 2}, "square": {"n_queries": 2},
             "multi_targeted_pgd": {"steps": 1}}
    for name, kw in small.items():  # jit=False: checkify alone (no compile of the whole attack)
        f = checks.checked(lambda x, y, k, a=getattr(checks, name), kw=kw: a(fc, x, y, k, tm, **kw),
                           jit=False)
        with pytest.raises(ValueError, match="NaN"):
            f(x.at[0, 0, 0, 0].set(jnp.inf), y, k)


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 0.6)])
def test_square_on_flat_inputs(norm, eps):
    x, y = _data(n=32, image=False)
    tm = ThreatModel(norm, eps)
    xa, q = attacks.square(fc, x, y, jax.random.PRNGKey(0), tm, n_queries=200, return_queries=True)
    assert xa.shape == x.shape and q.shape == (32,)
    assert bool(jnp.all(tm.contains(x, xa)))
    m0 = attacks.losses.margin(fc(x), y)
    m1 = attacks.losses.margin(fc(xa), y)
    assert bool(jnp.all(m1 <= m0 + 1e-5)) and float(jnp.mean(m1 < 0)) > 0.1  # breaks some points


# One small setting shared by the evaluation tests below (the compiled pieces are reused).
SMALL = dict(batch_size=8, n_iter=2, n_target_classes=2, n_queries=20)


def test_autoattack_standard_on_flat_inputs_runs_all_four_attacks():
    x, y = _data(n=12, image=False)
    msgs = []
    res = evaluate_robustness(fc, np.asarray(x), np.asarray(y), jax.random.PRNGKey(0),
                              ThreatModel("linf", 0.15), log=msgs.append, verbose=False, **SMALL)
    for name in autoattack.STANDARD:
        assert any(m.startswith(f"[{name}] robust accuracy") for m in msgs), (name, msgs)
    assert res["x_adv"].shape == x.shape and res["clean_accuracy"] == 1.0
    assert 0.0 <= res["worst_case_robust_accuracy"] < 1.0


def test_everything_validated_before_any_attack_runs():
    x, y = _data(n=8)
    traced = {"n": 0}

    def f(z):
        if isinstance(z, jax.core.Tracer):
            traced["n"] += 1
        return fc(z)

    msgs = []
    bad_calls = [
        dict(threat=ThreatModel("l1", 0.5)),  # Square: linf / l2 only
        dict(x=x.reshape(8, 4, 4)),  # Square: neither NHWC nor flat
        dict(threat=ThreatModel("linf", 0.1, per_feature_eps=np.ones((4, 4, 1)))),  # FAB-T
        dict(n_iter=0),
        dict(n_iters=10),  # a typo in a setting name
        dict(attacks=("apgd-ce", "apgd-ce")),
    ]
    for bad in bad_calls:
        kw = dict(x=x, threat=ThreatModel("linf", 0.1))
        kw.update(bad)
        with pytest.raises((ValueError, TypeError)):
            evaluate_robustness(f, kw.pop("x"), y, jax.random.PRNGKey(0), kw.pop("threat"),
                                log=msgs.append, **kw)
    assert msgs == []  # no attack started (nor the sanity checks)
    assert traced["n"] <= len(bad_calls)  # only jax.eval_shape traced the model, nothing compiled


def test_repeated_evaluation_compiles_once_even_for_a_new_eps():
    x, y = _data(n=12, image=False)
    traced = {"n": 0}

    def f(z):
        if isinstance(z, jax.core.Tracer) and z.shape[0] == 8:  # attack batches (not sanity checks)
            traced["n"] += 1
        return fc(z)

    kw = dict(SMALL, attacks=("apgd-t", "square"), mode="individual", log=lambda s: None)
    r1 = evaluate_robustness(f, x, y, jax.random.PRNGKey(0), ThreatModel("linf", 0.05), **kw)
    first = traced["n"]
    assert first > 0
    r2 = evaluate_robustness(f, x, y, jax.random.PRNGKey(0), ThreatModel("linf", 0.05), **kw)
    assert traced["n"] == first  # nothing retraced (nor recompiled)
    np.testing.assert_array_equal(r1["robust"], r2["robust"])
    r3 = evaluate_robustness(f, x, y, jax.random.PRNGKey(0), ThreatModel("linf", 0.3), **kw)
    assert traced["n"] == first  # eps is a traced argument
    assert r3["worst_case_robust_accuracy"] < r1["worst_case_robust_accuracy"]
    evaluate_robustness(f, x, y, jax.random.PRNGKey(0), ThreatModel("linf", 0.05),
                        **dict(kw, n_queries=21))
    assert traced["n"] > first  # other settings: compiled anew


def test_progress_lines_and_unchanged_results(capsys):
    x, y = _data(n=12, image=False)
    kw = dict(SMALL, attacks=("apgd-ce", "apgd-t", "fab-t"), mode="individual")
    tm = ThreatModel("linf", 0.1)
    loud = evaluate_robustness(fc, x, y, jax.random.PRNGKey(1), tm, **kw)
    out = capsys.readouterr().out
    for name, unit in (("apgd-ce", "batches"), ("apgd-t", "targets"), ("fab-t", "targets")):
        lines = [ln for ln in out.splitlines() if ln.startswith(f"[{name} ")]
        assert lines, out
        assert re.search(rf"\[{name} \d+/\d+ {unit}\] \d+% \| [\d.]+ {unit}/s \| ETA \d\d:\d\d:\d\d",
                         lines[-1]), lines
    assert re.search(r"\[apgd-t 4/4 targets\].*target 2/2", out)  # 2 batches x 2 targets
    quiet = evaluate_robustness(fc, x, y, jax.random.PRNGKey(1), tm, verbose=False, **kw)
    out = capsys.readouterr().out
    assert "ETA" not in out and "[fab-t] robust accuracy" in out
    np.testing.assert_array_equal(loud["robust"], quiet["robust"])
    np.testing.assert_array_equal(loud["x_adv"], quiet["x_adv"])


@pytest.mark.slow  # compiles the reference APGD-T (scan) and FAB-T (unrolled targets): ~20 s
def test_host_target_loops_match_apgd_targeted_and_fab():
    x, y = _data(n=8, image=False)
    tm = ThreatModel("linf", 0.15)
    key = jax.random.PRNGKey(5)
    for name, direct in (
            ("apgd-t", lambda k: attacks.apgd_targeted(fc, x, y, k, tm, n_iter=2, n_target_classes=2)),
            ("fab-t", lambda k: attacks.fab(fc, x, y, k, tm, n_iter=2, n_target_classes=2))):
        res = evaluate_robustness(fc, x, y, key, tm, attacks=(name,), log=lambda s: None, **SMALL)
        ref = direct(jax.random.fold_in(jax.random.fold_in(key, 0), 0))  # evaluate's batch key
        ref_robust = np.asarray(jnp.argmax(fc(ref), -1) == y)
        assert not ref_robust.all()  # the comparison covers broken points
        np.testing.assert_array_equal(res["robust"], ref_robust)
        np.testing.assert_allclose(res["x_adv"][~ref_robust], np.asarray(ref)[~ref_robust], atol=1e-5)
