"""APGD, Square and the ensemble evaluator on a trained model: ordering, budgets, gradient-free
Square, resumable evaluation, warnings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.attacks import losses
from jaxrobust.attacks.apgd import apgd, apgd_targeted, checkpoint_schedule, top_k_targets
from jaxrobust.attacks.autoattack import evaluate_robustness, sanity_warnings
from jaxrobust.attacks.pgd import pgd
from jaxrobust.attacks.square import p_selection, square
from jaxrobust.threat import ThreatModel
from jaxrobust.data import load_dataset


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained with plain ERM on sklearn digits (8x8) for a few seconds."""
    import optax
    from jaxrobust.models import create_model, init_variables
    ds = load_dataset("digits")
    tr = ds.split("train").get(np.arange(len(ds.split("train"))))
    te = ds.split("test").get(np.arange(200))
    model = create_model("fc", 10, widths=(64,))
    v = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    tx = optax.adam(3e-3)
    opt = tx.init(v)

    @jax.jit
    def step(v, opt, x, y):
        g = jax.grad(lambda v: jnp.mean(losses.ce(model.apply(v, x), y)))(v)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(v, u), opt

    for i in range(300):
        s = (i * 64) % (len(tr["label"]) - 64)
        v, opt = step(v, opt, tr["image"][s:s + 64], tr["label"][s:s + 64])
    fn = jax.jit(lambda x: model.apply(v, x))
    return fn, jnp.asarray(te["image"]), jnp.asarray(te["label"])


def _acc(fn, x, y):
    return float(jnp.mean(jnp.argmax(fn(x), -1) == y))


def test_checkpoints_match_the_reference_schedule():
    is_check, _ = checkpoint_schedule(100)
    assert (np.flatnonzero(is_check) + 1).tolist() == [22, 41, 57, 70, 80, 87, 93, 99]


def test_attack_strength_ordering_on_trained_model(trained):
    fn, x, y = trained
    tm = ThreatModel("linf", 0.1)
    key = jax.random.PRNGKey(0)
    clean = _acc(fn, x, y)
    pgd10 = _acc(fn, jax.jit(lambda x, y, k: pgd(fn, x, y, k, tm, steps=10))(x, y, key), y)
    pgd100 = _acc(fn, jax.jit(lambda x, y, k: pgd(fn, x, y, k, tm, steps=100))(x, y, key), y)
    xa = jax.jit(lambda x, y, k: apgd(fn, x, y, k, tm, n_iter=100))(x, y, key)
    assert bool(jnp.all(tm.contains(x, xa)))
    ap = _acc(fn, xa, y)
    res = evaluate_robustness(fn, x, y, key, tm, batch_size=100, n_iter=100, n_queries=300,
                              log=lambda s: None)
    aa = res["worst_case_robust_accuracy"]
    assert clean > 0.9 and pgd10 < clean
    assert aa <= ap + 1e-9 and ap <= pgd100 + 0.01 and pgd100 <= pgd10 + 1e-9 and pgd10 <= clean
    # deterministic given the key
    again = evaluate_robustness(fn, x, y, key, tm, batch_size=100, n_iter=100, n_queries=300,
                                log=lambda s: None)
    np.testing.assert_array_equal(again["robust"], res["robust"])
    assert res["clean_accuracy"] == pytest.approx(clean)


def test_apgd_targeted_uses_top_logits_and_breaks_points(trained):
    fn, x, y = trained
    t = top_k_targets(fn(x), 9)
    assert t.shape == (9, len(y)) and not bool(jnp.any(t[0] == jnp.argmax(fn(x), -1)))
    tm = ThreatModel("l2", 1.0)
    xa = jax.jit(lambda x, y, k: apgd_targeted(fn, x, y, k, tm, n_iter=20, n_target_classes=3))(
        x, y, jax.random.PRNGKey(1))
    assert bool(jnp.all(tm.contains(x, xa)))
    assert _acc(fn, xa, y) < _acc(fn, x, y)


def test_square_is_gradient_free_and_effective(trained):
    fn, x, y = trained

    @jax.custom_jvp
    def no_grad_model(z):
        return fn(z)

    @no_grad_model.defjvp
    def _jvp(primals, tangents):  # any differentiation of the model poisons the result
        out = fn(primals[0])
        return out, jnp.full_like(out, jnp.nan)

    for tm in (ThreatModel("linf", 0.15), ThreatModel("l2", 1.5)):
        xa, q = jax.jit(lambda x, y, k: square(no_grad_model, x, y, k, tm, n_queries=300,
                                               return_queries=True))(x, y, jax.random.PRNGKey(0))
        assert bool(jnp.all(jnp.isfinite(xa))) and bool(jnp.all(tm.contains(x, xa)))
        assert _acc(fn, xa, y) < _acc(fn, x, y) - 0.05
        broken = jnp.argmax(fn(xa), -1) != y
        assert int(q.max()) <= 300 and float(jnp.mean(q[broken])) < 300  # fooled points stop querying


def test_p_schedule():
    assert float(p_selection(0.8, 5)) == pytest.approx(0.8)
    assert float(p_selection(0.8, 11)) == pytest.approx(0.4)
    assert float(p_selection(0.8, 4999)) == pytest.approx(0.8 / 128)
    assert float(p_selection(0.8, 9000)) == pytest.approx(0.8 / 512)


def test_interrupted_evaluation_resumes(trained, tmp_path):
    fn, x, y = trained
    tm = ThreatModel("linf", 0.1)
    path = str(tmp_path / "state.npz")
    full = evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), tm, attacks=("apgd-ce", "square"),
                               batch_size=50, n_iter=10, n_queries=50, log=lambda s: None)
    calls = {"n": 0}

    def flaky(z):
        calls["n"] += 1
        return fn(z)

    class Stop(Exception):
        pass

    def dying_log(msg):
        if msg.startswith("[apgd-ce]"):
            raise Stop()  # "killed" after the first attack finished and its state was saved

    with pytest.raises(Stop):
        evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), tm, attacks=("apgd-ce", "square"),
                            batch_size=50, n_iter=10, n_queries=50, state_path=path, log=dying_log)
    msgs = []
    resumed = evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), tm, attacks=("apgd-ce", "square"),
                                  batch_size=50, n_iter=10, n_queries=50, state_path=path,
                                  log=msgs.append)
    assert any("Resuming" in m for m in msgs) and not any(m.startswith("[apgd-ce]") for m in msgs)
    np.testing.assert_array_equal(resumed["robust"], full["robust"])


def test_warnings_for_softmax_outputs_and_randomised_models(trained):
    fn, x, y = trained
    assert sanity_warnings(fn, x[:8], y[:8]) == []
    w = sanity_warnings(lambda z: jax.nn.softmax(fn(z)), x[:8], y[:8])
    assert any("probabilities" in s for s in w)
    counter = {"k": 0}

    def noisy(z):
        counter["k"] += 1
        return fn(z) + 0.01 * counter["k"]
    assert any("randomised" in s for s in sanity_warnings(noisy, x[:8], y[:8]))
    flat = lambda z: jnp.round(fn(z))  # zero gradients everywhere
    assert any("zero" in s for s in sanity_warnings(flat, x[:8], y[:8]))


def test_bad_arguments(trained):
    fn, x, y = trained
    with pytest.raises(ValueError, match="Unknown attack"):
        evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), ThreatModel("linf", 0.1),
                            attacks=("fab9",), log=lambda s: None)
    with pytest.raises(ValueError, match="mode"):
        evaluate_robustness(fn, x, y, jax.random.PRNGKey(0), ThreatModel("linf", 0.1), mode="x")
    with pytest.raises(ValueError, match="supports"):
        square(fn, x, y, jax.random.PRNGKey(0), ThreatModel("l1", 0.1))
