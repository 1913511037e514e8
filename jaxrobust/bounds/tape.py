"""The one traced-jaxpr interpreter and the one primitive table of the bound passes.

Every bound pass (IBP :mod:`~jaxrobust.bounds.ibp`, the linear/CROWN tape of
:mod:`~jaxrobust.bounds.backward`, the patch form of :mod:`~jaxrobust.bounds.patches` and the MILP
encoder of :mod:`jaxrobust.certify.milp`) reads a function through :func:`interpret`: equations whose
operands are all constants (parameters, BatchNorm statistics, ``rsqrt(var + eps)`` ...) are evaluated
concretely, calls (``jit``, ``closed_call``, ``custom_jvp_call`` such as ``jax.nn.relu``,
``custom_vjp_call``, ``checkpoint``) are inlined, and every equation with an input-dependent operand is
handed to the pass, together with the user's call site for error messages.

:data:`PRIMITIVES` is keyed on the ``jax.lax`` primitive objects and gives each supported primitive a
category; the category says which passes must have a rule for it (:func:`passes_for`), and
``tests/test_bounds_tape.py`` checks that every pass does. Adding a primitive (``abs``, ``erf``...)
means one entry here plus its rules (an IBP rule; a relaxation in
:mod:`~jaxrobust.bounds.relaxations` for an activation), and the test names what is missing.

Categories:

* ``affine``: linear in every operand (add, sub, neg, sums);
* ``bilinear``: affine when the operands listed in ``const_operands`` are constants (dot/conv, mul, div);
* ``layout``: moves or copies elements (reshape, transpose, slice, pad, ...);
* ``structural``: selects elements with constant indices/predicates (select_n, gather, dynamic_slice);
* ``pooling``: windowed sums and maxima;
* ``activation``: element-wise nonlinearities with a linear relaxation (max/min with a constant, i.e.
  relu / clipping; sigmoid; tanh);
* ``monotone``: element-wise or reducing monotone maps without a linear relaxation yet (exp, log,
  reduce_max...): IBP only.
"""
from __future__ import annotations

from typing import Callable, Dict, FrozenSet, NamedTuple, Optional, Sequence, Tuple, Union

from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P


class UnsupportedPrimitiveError(ValueError):
    """A primitive of the traced function has no bound-propagation rule."""


class Interval:
    """Element-wise bounds lo <= v <= hi of a value that depends on the input."""
    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    @property
    def center(self):
        return 0.5 * (self.lo + self.hi)

    @property
    def radius(self):
        return 0.5 * (self.hi - self.lo)


# ----------------------------------------------------------------------------- the primitive table
AFFINE, BILINEAR, LAYOUT, STRUCTURAL, POOLING, ACTIVATION, MONOTONE = (
    "affine", "bilinear", "layout", "structural", "pooling", "activation", "monotone")
CATEGORIES = (AFFINE, BILINEAR, LAYOUT, STRUCTURAL, POOLING, ACTIVATION, MONOTONE)
PASSES = ("ibp", "linear", "patches", "milp")

# Operands that must be constants: "one" = at most one input-dependent operand, a tuple of operand
# positions, or "tail" = every operand after the first.
ConstOperands = Union[None, str, Tuple[int, ...]]


class PrimInfo(NamedTuple):
    """One row of the table.

    category: see the module docstring.
    const_operands: operands that must not depend on the input for the linear passes.
    mixing: each output element combines several input elements (exactness bookkeeping of IBP).
    local: the rows of a backward pass keep their receptive-field windows through it (patch form):
      element-wise maps, shape-preserving layout changes, spatial convolutions and pooling.
    piecewise_linear: an activation that a MILP can encode exactly (max/min with a constant).
    """
    category: str
    const_operands: ConstOperands = None
    mixing: bool = False
    local: bool = False
    piecewise_linear: bool = False


PRIMITIVES: Dict[jcore.Primitive, PrimInfo] = {
    # affine
    lax.add_p: PrimInfo(AFFINE, local=True), P.add_jaxvals_p: PrimInfo(AFFINE, local=True),
    lax.sub_p: PrimInfo(AFFINE, local=True), lax.neg_p: PrimInfo(AFFINE, local=True),
    lax.reduce_sum_p: PrimInfo(AFFINE, mixing=True), lax.cumsum_p: PrimInfo(AFFINE, mixing=True),
    # bilinear
    lax.dot_general_p: PrimInfo(BILINEAR, "one", mixing=True),
    lax.conv_general_dilated_p: PrimInfo(BILINEAR, "one", mixing=True, local=True),
    lax.mul_p: PrimInfo(BILINEAR, "one", local=True), lax.div_p: PrimInfo(BILINEAR, (1,), local=True),
    # layout
    lax.reshape_p: PrimInfo(LAYOUT, local=True), lax.broadcast_in_dim_p: PrimInfo(LAYOUT, local=True),
    lax.squeeze_p: PrimInfo(LAYOUT, local=True),
    lax.convert_element_type_p: PrimInfo(LAYOUT, local=True), lax.copy_p: PrimInfo(LAYOUT, local=True),
    lax.reduce_precision_p: PrimInfo(LAYOUT, local=True),
    lax.transpose_p: PrimInfo(LAYOUT), lax.slice_p: PrimInfo(LAYOUT), lax.concatenate_p: PrimInfo(LAYOUT),
    lax.pad_p: PrimInfo(LAYOUT, (1,)), lax.rev_p: PrimInfo(LAYOUT),
    # structural
    lax.select_n_p: PrimInfo(STRUCTURAL, (0,), local=True), lax.gather_p: PrimInfo(STRUCTURAL, (1,)),
    lax.dynamic_slice_p: PrimInfo(STRUCTURAL, "tail"),
    # pooling
    lax.reduce_window_sum_p: PrimInfo(POOLING, mixing=True, local=True),
    lax.reduce_window_max_p: PrimInfo(POOLING, local=True),
    # activations
    lax.max_p: PrimInfo(ACTIVATION, "one", local=True, piecewise_linear=True),
    lax.min_p: PrimInfo(ACTIVATION, "one", local=True, piecewise_linear=True),
    lax.logistic_p: PrimInfo(ACTIVATION, local=True), lax.tanh_p: PrimInfo(ACTIVATION, local=True),
    # monotone, IBP only
    lax.exp_p: PrimInfo(MONOTONE), lax.log_p: PrimInfo(MONOTONE),
    lax.reduce_max_p: PrimInfo(MONOTONE), lax.reduce_min_p: PrimInfo(MONOTONE),
}

# Calls that are inlined: primitive -> params key of the inner (closed) jaxpr.
CALLS: Dict[jcore.Primitive, str] = {
    P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr", P.call_p: "call_jaxpr",
    P.custom_jvp_call_p: "call_jaxpr", P.custom_vjp_call_p: "call_jaxpr", P.remat_p: "jaxpr",
}


def passes_for(prim) -> FrozenSet[str]:
    """The passes that must have a rule for ``prim`` (empty for primitives outside the table)."""
    info = PRIMITIVES.get(prim)
    if info is None:
        return frozenset()
    passes = {"ibp"}
    if info.category != MONOTONE:
        passes.add("linear")
        if info.local:
            passes.add("patches")
        # MILP encodes affine maps exactly and piecewise-linear activations with binaries; max
        # pooling and smooth activations have no exact encoding there.
        if info.category not in (ACTIVATION, POOLING) or info.piecewise_linear or \
                (info.category == POOLING and info.mixing):
            passes.add("milp")
    return frozenset(passes)


def primitives_of(category: str) -> Tuple[jcore.Primitive, ...]:
    if category not in CATEGORIES:
        raise ValueError(f"unknown primitive category {category!r}; choose from {CATEGORIES}")
    return tuple(p for p, i in PRIMITIVES.items() if i.category == category)


def primitive_names(prims) -> str:
    return ", ".join(sorted(p.name for p in prims))


def supported_primitives(pass_name: str = "ibp"):
    """Names of the primitives (and inlined calls) that ``pass_name`` handles, sorted."""
    if pass_name not in PASSES:
        raise ValueError(f"unknown bound pass {pass_name!r}; choose from {PASSES}")
    return sorted({p.name for p in PRIMITIVES if pass_name in passes_for(p)} | {p.name for p in CALLS})


# ----------------------------------------------------------------------------- errors
def call_site(eqn, index: int) -> str:
    """'file:line (function)' of the user's code that emitted the equation, and its index."""
    loc = ""
    try:  # source info is best effort across JAX versions
        from jax._src import source_info_util
        frame = source_info_util.user_frame(eqn.source_info.traceback)
        if frame is not None:
            loc = f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
        else:
            loc = source_info_util.summarize(eqn.source_info)
    except Exception:
        pass
    return f"{loc or 'unknown location'}, equation {index} of the traced function"


def unsupported(pass_label: str, name: str, where: str, pass_name: str) -> UnsupportedPrimitiveError:
    """The error for a primitive without a rule in a pass, naming it and the user's call site."""
    return UnsupportedPrimitiveError(
        f"{pass_label} has no rule for primitive '{name}' (at {where}). "
        f"Supported: {', '.join(supported_primitives(pass_name))}.")


def check_const_operands(prim, is_dep: Sequence[bool], where: str) -> None:
    """Raises when an operand that the table requires to be constant depends on the input."""
    rule = PRIMITIVES[prim].const_operands
    name = prim.name
    if rule == "one" and sum(is_dep) > 1:
        if PRIMITIVES[prim].category == ACTIVATION:
            raise UnsupportedPrimitiveError(
                f"'{name}' of two input-dependent operands (at {where}) has no linear relaxation; "
                "only max/min with a constant (relu, clipping) is supported.")
        raise UnsupportedPrimitiveError(
            f"'{name}' of two input-dependent operands (at {where}) is not affine; linear "
            "relaxation bounds support products with constants only.")
    if isinstance(rule, tuple) and any(is_dep[i] for i in rule):
        raise UnsupportedPrimitiveError(
            f"'{name}' with an input-dependent operand {rule} (at {where}) is not affine.")
    if rule == "tail" and any(is_dep[1:]):
        raise UnsupportedPrimitiveError(f"'{name}' with input-dependent indices (at {where}).")


# ----------------------------------------------------------------------------- the interpreter
class JaxprEnv(dict):
    """Values of a jaxpr's variables while it is interpreted, starting from its constants and
    arguments; ``read`` also accepts literals."""

    def __init__(self, jaxpr, consts, args):
        super().__init__(zip(jaxpr.constvars, consts))
        self.update(zip(jaxpr.invars, args))

    def read(self, v):
        return v.val if isinstance(v, jcore.Literal) else self[v]


def interpret(jaxpr, consts, args, is_dependent: Callable[[object], bool],
              apply: Callable[[object, list, str], list], context: str = ""):
    """Interprets ``jaxpr`` on ``args`` (some of them input-dependent values of a pass).

    Equations without input-dependent operands are evaluated with ``bind``; calls are inlined (their
    equations report the call site of the outermost call when they have no user frame of their own);
    every other equation goes to ``apply(eqn, operands, where) -> list of outputs``. Returns the
    values of the outputs."""
    env = JaxprEnv(jaxpr, consts, args)
    read = env.read
    for index, eqn in enumerate(jaxpr.eqns):
        ins = [read(v) for v in eqn.invars]
        if not any(is_dependent(a) for a in ins):
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        elif eqn.primitive in CALLS:
            inner = eqn.params[CALLS[eqn.primitive]]
            # Errors inside library calls (e.g. jnp.sort is a jit) report the user's call site.
            ctx = context or call_site(eqn, index)
            if hasattr(inner, "jaxpr"):  # ClosedJaxpr
                outs = interpret(inner.jaxpr, inner.consts, ins, is_dependent, apply, ctx)
            else:
                outs = interpret(inner, [], ins, is_dependent, apply, ctx)
        else:
            where = call_site(eqn, index)
            if context and where.startswith("unknown location"):
                where = f"{context}, inside that call"
            outs = apply(eqn, ins, where)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def info(prim) -> Optional[PrimInfo]:
    """The table row of ``prim`` or None."""
    return PRIMITIVES.get(prim)
