"""Property tests: every attack returns points inside the budget and the box."""
import jax
import jax.numpy as jnp
from hypothesis import given, settings, strategies as st

from jaxrobust.attacks import apgd, fab, fgsm, pgd, square
from jaxrobust.threat import ThreatModel

W = jax.random.normal(jax.random.PRNGKey(0), (12, 4))
f = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) @ W)

ATTACKS = {
    "fgsm": lambda x, y, k, t: fgsm(f, x, y, k, t, random_start=True),
    "pgd": lambda x, y, k, t: pgd(f, x, y, k, t, steps=3, restarts=2),
    "apgd": lambda x, y, k, t: apgd(f, x, y, k, t, n_iter=5),
    "fab": lambda x, y, k, t: fab(f, x, y, k, t, n_iter=3, n_target_classes=2),
    "square": lambda x, y, k, t: square(f, x, y, k, t, n_queries=5),
}
JITTED = {k: jax.jit(v) for k, v in ATTACKS.items()}


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(sorted(ATTACKS)), norm=st.sampled_from(["linf", "l2", "l1"]),
       eps=st.floats(0.0, 2.0), seed=st.integers(0, 1000), box=st.booleans())
def test_attack_outputs_inside_threat_set(name, norm, eps, seed, box):
    if name == "square" and norm == "l1":
        return
    x = jax.random.uniform(jax.random.PRNGKey(seed), (3, 2, 2, 3))
    y = jnp.argmax(f(x), 1)
    tm = ThreatModel(norm=norm, eps=eps, box=(0.0, 1.0) if box else None)
    xa = JITTED[name](x, y, jax.random.PRNGKey(seed + 1), tm)
    assert xa.shape == x.shape and bool(jnp.all(jnp.isfinite(xa)))
    assert bool(jnp.all(tm.contains(x, xa)))
