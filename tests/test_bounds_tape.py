"""The bounds package's one interpreter and one primitive table (jaxrobust.bounds.tape): every
primitive of every category has a rule in every pass that applies to it, calls are inlined, each
bounds module imports alone and no module imports another's private names."""
import ast
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxrobust.bounds import backward, ibp, patches, relaxations, tape
from jaxrobust.bounds import UnsupportedPrimitiveError, crown_bounds, ibp_bounds
from jaxrobust.threat import ThreatModel

BOUNDS_DIR = pathlib.Path(tape.__file__).parent
MODULES = ["tape", "relaxations", "ibp", "backward", "patches", "linear", "geometry"]


def missing_rules(table=None):
    """{pass: [primitive names without a rule]} for the passes that apply to each table entry."""
    table = tape.PRIMITIVES if table is None else table
    missing = {p: [] for p in tape.PASSES}
    for prim, info in table.items():
        for pass_name in _passes(prim, info):
            if pass_name == "ibp":
                ok = prim in ibp.IBP_RULES
            elif pass_name == "linear":
                ok = prim in backward.LINEAR_RULES and (
                    info.category != tape.ACTIVATION or prim in relaxations.ACTIVATION_LINES)
            elif pass_name == "patches":
                ok = prim in patches.PATCH_RULES
            else:  # milp: affine nodes are encoded generically, activations need a ReLU form
                ok = (prim in relaxations.RELU_LIKE if info.category == tape.ACTIVATION
                      else backward.LINEAR_RULES.get(prim) == "affine")
            if not ok:
                missing[pass_name].append(prim.name)
    return {k: v for k, v in missing.items() if v}


def _passes(prim, info):
    saved = tape.PRIMITIVES.get(prim)
    tape.PRIMITIVES[prim] = info
    try:
        return tape.passes_for(prim)
    finally:
        if saved is None:
            del tape.PRIMITIVES[prim]
        else:
            tape.PRIMITIVES[prim] = saved


def test_every_primitive_has_a_rule_in_every_pass_that_applies():
    assert missing_rules() == {}, f"primitives without a rule, by pass: {missing_rules()}"
    # every category is populated and every table key is a primitive object, not a name
    for cat in tape.CATEGORIES:
        assert tape.primitives_of(cat), cat
    assert all(isinstance(p, jax.extend.core.Primitive) for p in tape.PRIMITIVES)
    assert all(isinstance(p, jax.extend.core.Primitive) for p in ibp.IBP_RULES)


def test_a_new_table_entry_without_rules_is_reported_by_pass():
    """Adding `abs` as an activation or `erf` as a monotone map: the check names what is missing."""
    table = dict(tape.PRIMITIVES)
    table[lax.abs_p] = tape.PrimInfo(tape.ACTIVATION, local=True, piecewise_linear=True)
    table[lax.erf_p] = tape.PrimInfo(tape.MONOTONE)
    missing = missing_rules(table)
    assert missing == {"ibp": ["abs", "erf"], "linear": ["abs"], "patches": ["abs"], "milp": ["abs"]}


def test_passes_by_category():
    assert tape.passes_for(lax.exp_p) == {"ibp"}
    assert tape.passes_for(lax.logistic_p) == {"ibp", "linear", "patches"}
    assert tape.passes_for(lax.max_p) == {"ibp", "linear", "patches", "milp"}
    assert tape.passes_for(lax.dot_general_p) == {"ibp", "linear", "milp"}
    assert tape.passes_for(lax.reduce_window_max_p) == {"ibp", "linear", "patches"}
    assert tape.passes_for(lax.sin_p) == frozenset()
    with pytest.raises(ValueError, match="category"):
        tape.primitives_of("nonlinear")


def test_checkpointed_and_custom_vjp_calls_are_inlined():
    """jax.checkpoint binds 'remat2' (the former string table only knew 'remat'/'checkpoint')."""
    W = jax.random.normal(jax.random.PRNGKey(0), (4, 3))

    @jax.custom_vjp
    def lin(z):
        return z @ W

    lin.defvjp(lambda z: (lin(z), z), lambda z, g: (g @ W.T,))
    f = jax.checkpoint(lambda z: jax.nn.relu(lin(z)) + jnp.tanh(z[:, :3]))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 4))
    tm = ThreatModel("linf", 0.1)
    lo, hi = ibp_bounds(f, x, tm)
    clo, chi = crown_bounds(f, x, tm)
    pts = x[None] + jax.random.uniform(jax.random.PRNGKey(2), (200,) + x.shape, minval=-0.1, maxval=0.1)
    v = jax.vmap(f)(jnp.clip(pts, 0, 1))
    assert bool(jnp.all(v >= lo - 1e-5)) and bool(jnp.all(v <= hi + 1e-5))
    assert bool(jnp.all(v >= clo - 1e-5)) and bool(jnp.all(v <= chi + 1e-5))


def test_ibp_selects_with_constant_indices_and_rejects_dependent_ones():
    """gather / dynamic_slice / select_n with constant indices were linear-only before the table."""
    x = jnp.array([[0.2, 0.5, 0.9], [0.4, 0.1, 0.6]])
    tm = ThreatModel("linf", 0.1)
    f = lambda z: jnp.where(jnp.array([True, False, True]), z[:, jnp.array([2, 0, 1])], -z)
    lo, hi = ibp_bounds(f, x, tm)
    xl, xh = jnp.clip(x - 0.1, 0, 1), jnp.clip(x + 0.1, 0, 1)
    keep = jnp.array([True, False, True])
    np.testing.assert_allclose(lo, jnp.where(keep, xl[:, jnp.array([2, 0, 1])], -xh), atol=1e-6)
    np.testing.assert_allclose(hi, jnp.where(keep, xh[:, jnp.array([2, 0, 1])], -xl), atol=1e-6)
    g = lambda z: jax.lax.dynamic_slice_in_dim(z, 1, 2, axis=1)
    lo, hi = ibp_bounds(g, x, tm)
    np.testing.assert_allclose(lo, xl[:, 1:], atol=1e-6)
    with pytest.raises(UnsupportedPrimitiveError, match="'gt'"):  # an input-dependent predicate
        ibp_bounds(lambda z: jnp.where(z > 0.5, z, 0.0 * z + 1.0), x, tm)

def test_unsupported_primitive_names_pass_and_call_site():
    x = jnp.full((2, 3), 0.5)
    with pytest.raises(UnsupportedPrimitiveError, match=r"Linear bound propagation has no rule for primitive 'exp' "
                                                        r"\(at .*test_bounds_tape.py"):
        crown_bounds(lambda z: jnp.exp(z), x, ThreatModel("linf", 0.1))
    lo, hi = ibp_bounds(lambda z: jnp.exp(z), x, ThreatModel("linf", 0.1))  # IBP has a rule
    np.testing.assert_allclose(lo, np.exp(0.4), rtol=1e-6)


@pytest.mark.parametrize("module", MODULES)
def test_each_bounds_module_imports_alone(module):
    """A fresh interpreter imports the module first (an import cycle fails here)."""
    r = subprocess.run([sys.executable, "-c", f"import jaxrobust.bounds.{module}"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_module_imports_private_names_of_another():
    """The bounds modules and the MILP encoder (a client of the tape) use public names only."""
    offenders = []
    for path in sorted(BOUNDS_DIR.glob("*.py")) + [BOUNDS_DIR.parent / "certify" / "milp.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxrobust"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert offenders == []
