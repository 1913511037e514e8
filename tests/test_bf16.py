"""Mixed precision (``config.model.dtype='bfloat16'``): bf16 compute with float32 parameters,
optimizer state, BatchNorm statistics and loss; attacks in bf16 with the perturbation accumulated in
float32; bounds and certification in float32 (jaxrobust/models/__init__.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.attacks import pgd
from jaxrobust.bounds import margin_bounds
from jaxrobust.models import as_float32, compute_dtype_kwargs, create_model, make_logits_fn
from jaxrobust.threat import ThreatModel
from configs.common import with_defaults
from jaxrobust.train import train
from jaxrobust.train.loop import build_run
from jaxrobust.train.metrics import read_metrics
from test_train import tiny_config

# An MLP (64 hidden units) on digits, 20 steps of PGD-3 adversarial training with SGD; no evaluation
# pass (the test evaluates the final states itself: one compile less per run).
OVERRIDES = {"model.kwargs.widths": (64,), "train.num_steps": 20, "train.checkpoint_every_steps": 20,
             "optimizer.lr": 0.2, "threat.eps": 0.05, "eval.splits": ()}


def _config(dtype):
    return tiny_config(**OVERRIDES, **{"model.dtype": dtype})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dtype -> (model, final TrainState, train metrics lines) of the same run in that dtype."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        wd = str(tmp_path_factory.mktemp(dtype))
        final = {}
        config = with_defaults(_config(dtype))
        train(config, wd, callbacks=[lambda step, state: final.update(state=state)])
        out[dtype] = (build_run(config).model, final["state"],
                      [r for r in read_metrics(wd) if r["split"] == "train"])
    return out


def _rel(a, b):
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


def _test_batch(n=128):
    from jaxrobust.data import load_dataset
    b = load_dataset("digits").split("test").get(np.arange(n))
    return jnp.asarray(b["image"]), jnp.asarray(b["label"])


def test_bf16_training_agrees_with_float32_and_keeps_float32_state(runs):
    (m32, st32, log32), (m16, st16, log16) = runs["float32"], runs["bfloat16"]
    assert m16.dtype == jnp.bfloat16 and m32.dtype == jnp.float32
    # parameters, optimizer state and the PRNG key stay float32 / integer
    for leaf in jax.tree.leaves({"p": st16.params, "o": st16.opt_state}):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    x, y = _test_batch()
    v16, v32 = st16.variables(), st32.variables()
    # the forward pass really computes in bf16 and returns float32 logits
    jaxpr = str(jax.make_jaxpr(make_logits_fn(m16, v16))(x))
    assert "dot_general" in jaxpr and "bf16[" in jaxpr
    z16 = make_logits_fn(m16, v16)(x)
    assert z16.dtype == jnp.float32
    # Tolerance: 20 steps of PGD-3 AT from the same initialisation and data order, bf16 (8-bit
    # mantissa, relative rounding 2^-9 per operation) vs float32; the attack's sign steps turn
    # rounding into different perturbations of small-gradient pixels, so the runs drift apart a
    # little. Measured: parameters 2.7% apart (relative l2 over all of them), logged losses within
    # 0.4%, logged adversarial accuracies within 1 of 32 examples. Asserted: parameters within 10%,
    # losses within 2%, adversarial accuracies within 2 of 32, test accuracies within 3 points
    # and the same predictions on >= 90% of 128 test images.
    p32 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(st32.params)])
    p16 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(st16.params)])
    assert _rel(p16, p32) < 0.1, _rel(p16, p32)
    assert [r["step"] for r in log16] == [r["step"] for r in log32] and len(log32) == 10
    for r16, r32 in zip(log16, log32):
        assert r16["loss"] == pytest.approx(r32["loss"], rel=0.02), r16["step"]
        assert abs(r16["adv_accuracy"] - r32["adv_accuracy"]) <= 2 / 32 + 1e-6, r16["step"]
    z32 = make_logits_fn(m32, v32)(x)
    acc16, acc32 = (float(jnp.mean(jnp.argmax(z, -1) == y)) for z in (z16, z32))
    assert acc32 > 0.5 and abs(acc16 - acc32) <= 0.03, (acc16, acc32)  # it learned, and alike
    agree = float(jnp.mean(jnp.argmax(z16, -1) == jnp.argmax(z32, -1)))
    assert agree >= 0.9, agree
    # and bf16 is not float32 in disguise: the same parameters give logits that differ at bf16
    # rounding level
    f32 = make_logits_fn(as_float32(m16), v16)(x)
    diff = float(jnp.max(jnp.abs(z16 - f32)))
    assert 1e-4 < diff < 0.05 * float(jnp.max(jnp.abs(f32))), diff


def test_bf16_batchnorm_keeps_float32_statistics():
    """CNN7 (convs + BatchNorm) in bf16, traced only (no compile): the train-mode pass returns
    float32 running statistics and reduces the batch statistics in float32."""
    from jaxrobust.models import forward_train, init_variables
    model = create_model("cnn7", 10, width=4, linear=8, dtype="bfloat16")
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)),
                                                  train=False))
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
    x = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32)
    logits, new_state = jax.eval_shape(lambda p, s, x: forward_train(model, p, s, x), params, state, x)
    assert logits.dtype == jnp.float32
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(new_state))
    jaxpr = jax.make_jaxpr(lambda p, s, x: forward_train(model, p, s, x))(params, state, x)
    means = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce_sum"]
    assert means and all(e.outvars[0].aval.dtype == jnp.float32 for e in means)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 5 and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)
    del init_variables


def test_certified_bounds_of_a_bf16_trained_model_are_float32_and_sound(runs):
    model, state, _ = runs["bfloat16"]
    x, y = _test_batch(16)
    fn = make_logits_fn(as_float32(model), state.variables())
    assert "bf16" not in str(jax.make_jaxpr(fn)(x))  # the bounded function is float32 throughout
    threat = ThreatModel(norm="linf", eps=0.02, box=(0.0, 1.0))
    lower = jax.jit(lambda x: margin_bounds(fn, x, y, threat, method="crown").lower)(x)  # (16, 10)
    assert lower.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lower)))

    @jax.jit
    def worst_margins(key):
        """min over the clean point, 32 uniform samples of the ball ∩ box and a PGD point (CW loss,
        attacking the float32 model that is certified) of the margins z_y - z_i, (B, K)."""
        def margins(xs):
            z = fn(xs)
            return jnp.take_along_axis(z, y[:, None], 1) - z
        samples = jax.vmap(lambda k: margins(threat.random_init(k, x)))(jax.random.split(key, 32))
        x_pgd = pgd(fn, x, y, key, threat, steps=10, loss="cw", unroll=False)
        return jnp.minimum(jnp.minimum(margins(x), samples.min(0)), margins(x_pgd))

    worst = worst_margins(jax.random.PRNGKey(3))
    assert bool(jnp.all(worst >= lower - 1e-5)), float(jnp.min(worst - lower))
    # the certificate is not vacuous on these examples: some margins are certified positive
    assert bool(jnp.any(lower > 0))


def test_attacks_run_in_bf16_and_accumulate_the_perturbation_in_float32():
    """The model rounds its input to bf16 (spacing 2^-8 on [0.5, 1)), so a PGD step of 1e-3 from
    0.5 is invisible to it and would be lost if the perturbation were accumulated in bf16
    (0.5 + 1e-3 rounds back to 0.5); accumulated in float32 (the attack's iterate is the float32
    input), four such steps add up to 4e-3, which the model does see."""
    model = create_model("fc", 10, widths=(16,), dtype="bfloat16")
    threat = ThreatModel(norm="linf", eps=0.01, box=(0.0, 1.0))
    y = jnp.arange(4)

    @jax.jit
    def run(x):  # one program: init, the attack, the margins before and after
        fn = make_logits_fn(model, model.init(jax.random.PRNGKey(0), x[:1], train=False))
        x_adv = pgd(fn, x, y, jax.random.PRNGKey(1), threat, steps=4, step_size=1e-3,
                    random_start=False, unroll=False)
        def margin(z):
            other = jnp.where(jax.nn.one_hot(y, 10, dtype=bool), -jnp.inf, z)
            return jnp.take_along_axis(z, y[:, None], 1)[:, 0] - jnp.max(other, -1)
        return x_adv, margin(fn(x)), margin(fn(x_adv)), threat.contains(x, x_adv)

    x = jnp.full((4, 64), 0.5, jnp.float32)
    assert float(jnp.asarray(0.5 + 1e-3, jnp.bfloat16)) == 0.5  # one step is below bf16 spacing
    x_adv, m0, m1, inside = run(x)
    assert x_adv.dtype == jnp.float32 and bool(jnp.all(inside))
    moved = np.asarray(jnp.abs(x_adv - x))
    # the returned (best) iterates moved every pixel by whole sign steps of 1e-3, none lost to
    # rounding: 4e-3 after all four steps, 2e-3 or 3e-3 where an earlier iterate was stronger
    assert float(moved.max()) == pytest.approx(4e-3, rel=1e-3)
    steps = moved / 1e-3
    assert np.allclose(steps, np.round(steps), atol=1e-3) and np.all(np.round(steps) != 1)
    assert float(np.mean(np.round(steps) >= 2)) > 0.5
    # and the bf16 model sees the difference: the attack lowered the true-class margin
    assert bool(jnp.all(m1 < m0))


def test_model_dtype_config_is_validated():
    assert compute_dtype_kwargs({"w": 2}, "float32") == {"w": 2}  # float32 adds nothing
    assert compute_dtype_kwargs({}, "bfloat16") == {"dtype": "bfloat16"}
    with pytest.raises(ValueError, match=r"model.dtype must be one of \['float32', 'bfloat16'\]"):
        build_run(tiny_config(**{"model.dtype": "float16"}))
    with pytest.raises(ValueError, match="contradicts"):
        compute_dtype_kwargs({"dtype": "float32"}, "bfloat16")
    assert as_float32(create_model("fc", 10, dtype="bfloat16")).dtype == jnp.float32


# ----------------------------------------------------------------------------- backend rules
def test_attack_loops_unroll_on_cpu_only_and_give_the_same_numbers(monkeypatch):
    """attacks.common.default_unroll: short loops unrolled on XLA:CPU, rolled on GPU/TPU; the two
    programs compute the same attack."""
    from jaxrobust.attacks import common
    assert common.default_unroll(10, "cpu") and common.default_unroll(20, "cpu")
    assert not common.default_unroll(21, "cpu") and not common.default_unroll(0, "cpu")
    assert not common.default_unroll(10, "gpu") and not common.default_unroll(10, "tpu")
    model = create_model("fc", 10, widths=(8,))
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16))
    y = jnp.arange(4)
    threat = ThreatModel(norm="linf", eps=0.1, box=(0.0, 1.0))

    def make_attack():  # a new function each time: traced afresh under the current rule
        def attack(x):
            fn = make_logits_fn(model, model.init(jax.random.PRNGKey(0), x[:1], train=False))
            return pgd(fn, x, y, jax.random.PRNGKey(1), threat, steps=5)
        return attack

    cpu_rule, x_cpu = jax.make_jaxpr(make_attack())(x), jax.jit(make_attack())(x)
    monkeypatch.setattr(common, "UNROLL_MAX_STEPS", {})  # what GPU/TPU get
    gpu_rule, x_gpu = jax.make_jaxpr(make_attack())(x), jax.jit(make_attack())(x)
    # the 5-step loop: a scan unrolled 5 times on CPU, a rolled scan (XLA while loop) otherwise
    unrolls = lambda jaxpr: re.findall(r"unroll=(\w+)", str(jaxpr))  # noqa: E731
    assert unrolls(cpu_rule) == ["5"] and unrolls(gpu_rule) == ["1"]
    np.testing.assert_allclose(np.asarray(x_gpu), np.asarray(x_cpu), atol=1e-6)


def test_xla_cpu_flag_is_left_out_without_a_cpu_backend(monkeypatch):
    from jaxrobust import _xla_flags
    from jax._src import xla_bridge
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    _xla_flags._apply()
    assert "ynn" not in __import__("os").environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    _xla_flags._apply()
    from importlib.metadata import version
    expected = version("jaxlib").startswith("0.10.")
    assert ("ynn_fusion_type" in __import__("os").environ.get("XLA_FLAGS", "")) == expected
