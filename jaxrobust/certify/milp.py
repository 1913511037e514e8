"""Complete verification of small ReLU networks by mixed-integer linear programming.

Thesis reference: Chen Liu, EPFL 2022, Table 3.6, column "CRE MIP" (the certified robust error of a
complete verifier, the yardstick for the incomplete bounds of §3.3). The encoding is the big-M
formulation of MIPVerify (Tjeng, Xiao & Tedrake, "Evaluating Robustness of Neural Networks with
Mixed Integer Programming", ICLR 2019): intermediate bounds from a fast incomplete method (here the
CROWN / IBP intervals of :func:`jaxrobust.bounds.bound_graph`) fix stable neurons and give the big-M
constants of the unstable ones, so only unstable ReLUs carry a binary variable.

For one example x with label y and the l_inf set S(x) (scalar or per-example ε, optional per-feature
ε⃗, optional box), the MILP over the traced network is

    min_{x' ∈ S(x)}  z_y(x') - z_i(x')     for every class i ≠ y,

with one continuous variable per input feature and per activation output, affine nodes substituted
(their dense Jacobians are composed into the pre-activations of the next activation), and every
activation o = max(z, c) (ReLU when c = 0; min(z, c) by symmetry) encoded with w = z - c, l <= w <= u:

    u <= 0          : o = c                                   (stable inactive)
    l >= 0          : o = z                                   (stable active)
    l < 0 < u       : o - c >= w,  o - c >= 0,  o - c <= u·a,  o - c <= w - l·(1 - a),  a ∈ {0, 1}.

The encoding is exact (for any x' ∈ S(x) the network's values are the only feasible completion),
so the MILP optimum is the exact minimal margin. HiGHS (``scipy.optimize.milp``) solves it; a class
is *proven* when the solver's dual bound is > 0 (also when it stops at the time limit) and
*refuted* by any feasible point with a non-positive objective, which is a real counterexample that
we re-check with a forward pass of ``fn``.

Two modes. By default (the verdict, as for CRE MIP) classes whose CROWN/IBP margin bound is already
> 0 are skipped, the most suspicious class is solved first, the search stops at the first
counterexample, and every MILP carries the extra row z_y - z_i <= 0 (MIPVerify's form: robust ⇔
infeasible), which lets HiGHS prune any branch whose relaxation is positive instead of proving a
positive optimum -- much faster on robust points, so their exact margin is then not computed. With
``exact_margin=True`` the plain minimisation is solved for every class that can hold the minimum,
and ``min_margin`` is exact for every example decided within the time limit.

Numerics: the network is encoded in float64 from the float32 weights; intermediate bounds are
float32 and are widened by a small relative slack before being used as big-M constants, so a
rounding error in them cannot cut off a true network state. A neuron whose float32 upper bound is
<= 0 is fixed inactive; if rounding made that wrong its output is off by about one float32 ulp.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import time
import types
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from jaxrobust.bounds.backward import Ref as _Ref
from jaxrobust.bounds.linear import METHODS, bound_graph, margin_bounds, node_function
from jaxrobust.bounds.relaxations import RELU_LIKE
from jaxrobust.certify.pec import check_entry_point
from jaxrobust.threat import ThreatModel

STATUSES = ("verified", "falsified", "timeout", "misclassified")
# Relative slack added to the big-M constants of unstable neurons (see the module docstring).
_BIGM_SLACK = 1e-5
# A forward pass of fn at a counterexample that disagrees with the MILP value by more than this is
# reported in the result's notes.
_MISMATCH_TOL = 1e-3
# Fraction of an example's time limit kept back from the HiGHS time limits for the solver's own
# set-up (it checks its clock only now and then) and the counterexample check after the last solve.
_TIME_RESERVE = 0.05
# Largest overrun of a HiGHS solve past its time limit seen in this process (seconds, at most 1).
_HIGHS_OVERRUN = [0.0]


class MILPResult(NamedTuple):
    """Per-example outcome of :func:`milp_verify` (numpy arrays, B = batch size).

    status: (B,) one of 'verified', 'falsified', 'timeout', 'misclassified'.
    min_margin: (B,) exact min over S(x) and i ≠ y of z_y - z_i (to the MIP gap) where the solves
      performed determine it, else NaN: time-outs, misclassified points and, without
      ``exact_margin``, most verified points (their classes are proven by infeasibility or by the
      bounds alone, which gives no optimum).
    margin_lower: (B,) a proven lower bound of that minimum (bounds, MILP optima and dual bounds).
    margins: (B, K) exact per-class minima of z_y - z_i for the classes solved to optimality, NaN
      elsewhere (and at y).
    seconds: (B,) wall time per example (its intervals, MILP rows, solves and checks), which the
      time limit bounds; the one-off tracing, compilation and encoding of the architecture (shared by
      the batch and by later calls with the same fn) are not included.
    counterexample: (B, *f) the falsifying input (x itself where there is none); None when
      ``return_counterexample=False``.
    counterexample_ok: (B,) the forward pass of fn at the counterexample predicts a class ≠ y and the
      point lies in S(x) (within 1e-6); True for misclassified points (x itself), False otherwise.
    mismatch: (B,) a forward pass disagreed with a MILP value by more than 1e-3 (see notes).
    n_binary: (B,) unstable neurons (binary variables) in the example's MILP.
    n_solves: (B,) MILPs solved (classes not certified by the bounds alone).
    notes: tuple of B strings: anything unusual (solver anomalies, forward-pass mismatches).
    """
    status: np.ndarray
    min_margin: np.ndarray
    margin_lower: np.ndarray
    margins: np.ndarray
    seconds: np.ndarray
    counterexample: Optional[np.ndarray]
    counterexample_ok: np.ndarray
    mismatch: np.ndarray
    n_binary: np.ndarray
    n_solves: np.ndarray
    notes: Tuple[str, ...]

    @property
    def verified(self) -> np.ndarray:
        return self.status == "verified"


# ----------------------------------------------------------------------------- encoding of the tape
class _ActLayer(NamedTuple):
    dep_id: int          # ref id of the activation's input-dependent operand z
    size: int            # number of neurons
    offset: int          # column of the first output variable
    sign: float          # +1: o = max(z, c); -1: o = min(z, c) = -max(-z, -c)
    const: np.ndarray    # c broadcast to the neurons, float64 (size,)
    Z: sp.csr_matrix     # z = Z v + z0 over the continuous variables v
    z0: np.ndarray


class _Encoding(NamedTuple):
    signature: tuple
    input_id: int
    n_input: int
    n_cont: int
    layers: List[_ActLayer]
    out: sp.csr_matrix   # logits = out v + out0
    out0: np.ndarray


def _signature(g) -> tuple:
    """Structure of a tape: identical for every example of one function (same trace)."""
    return (g.input.id, getattr(g.output, "id", None),
            tuple((n.kind, n.prim.name, n.out.id, tuple(g.shapes[n.out.id])) for n in g.nodes))


def _check_supported(g) -> None:
    for n in g.nodes:
        name = n.prim.name
        if n.kind == "maxpool":
            raise ValueError(f"milp_verify does not encode max pooling (primitive '{name}', at "
                             f"{n.where}); only affine layers and max/min with a constant (ReLU, "
                             "clipping) are supported.")
        if n.kind == "act" and n.prim not in RELU_LIKE:
            raise ValueError(f"milp_verify cannot encode the activation primitive '{name}' (at "
                             f"{n.where}) exactly as a MILP; only ReLU-like max/min with a constant "
                             "are supported.")


def _affine_jacobians(node, g):
    """Dense Jacobians (as sparse matrices) of an affine node w.r.t. each dependent operand, and
    the constant part h(0). The node is affine, so h(v) = Σ_j J_j v_j + h(0) exactly."""
    dep_pos, h = node_function(node)
    # Evaluate at zeros of each operand's own shape and dtype (that of its interval bounds).
    zeros = [jnp.zeros(g.shapes[node.ins[i].id], jnp.asarray(g.intervals[node.ins[i].id][0]).dtype)
             for i in dep_pos]
    const = np.asarray(h(*zeros), np.float64).reshape(-1)
    jacs = jax.jacfwd(h, argnums=tuple(range(len(dep_pos))))(*zeros)
    n_out = const.size
    out = []
    for i, J in zip(dep_pos, jacs):
        J = np.asarray(J, np.float64).reshape(n_out, -1)
        out.append((node.ins[i].id, sp.csr_matrix(J)))
    return out, const


def _build_encoding(g) -> _Encoding:
    """Expresses every pre-activation and the logits as affine maps of the continuous variables
    (input features, then the outputs of each activation node in tape order). Independent of the
    example's intervals, so it is built once per function and reused for the whole batch."""
    _check_supported(g)
    in_id = g.input.id
    n_input = int(np.prod(g.shapes[in_id]))
    # An expression is ({block: csr (n, n_block)}, const (n,)); block 0 is the input and block k
    # the output of the k-th activation node. Keeping blocks separate keeps the products small.
    exprs: Dict[int, Tuple[Dict[int, sp.csr_matrix], np.ndarray]] = {
        in_id: ({0: sp.identity(n_input, format="csr")}, np.zeros(n_input))}
    block_sizes = [n_input]
    acts = []  # (dep_id, size, sign, const)
    for node in g.nodes:
        n_out = int(np.prod(g.shapes[node.out.id]))
        if node.kind == "affine":
            jacs, const = _affine_jacobians(node, g)
            blocks: Dict[int, sp.csr_matrix] = {}
            for rid, J in jacs:
                b_in, c_in = exprs[rid]
                const = const + J @ c_in
                for b, M in b_in.items():
                    blocks[b] = blocks[b] + J @ M if b in blocks else (J @ M).tocsr()
            exprs[node.out.id] = (blocks, const)
        else:  # 'act' max/min with one constant operand (checked above)
            dep_i = 0 if isinstance(node.ins[0], _Ref) else 1
            dep = node.ins[dep_i]
            c = np.broadcast_to(np.asarray(node.ins[1 - dep_i], np.float64),
                                g.shapes[dep.id]).reshape(-1).copy()
            sign = 1.0 if node.prim.name == "max" else -1.0
            acts.append((dep.id, n_out, sign, c))
            block = len(block_sizes)
            block_sizes.append(n_out)
            exprs[node.out.id] = ({block: sp.identity(n_out, format="csr")}, np.zeros(n_out))
    offsets = np.concatenate([[0], np.cumsum(block_sizes)]).astype(int)
    n_cont = int(offsets[-1])

    def to_global(expr, n_rows):
        blocks, const = expr
        M = sp.csr_matrix((n_rows, n_cont))
        for b, B in blocks.items():
            coo = B.tocoo()
            M = M + sp.csr_matrix((coo.data, (coo.row, coo.col + offsets[b])), shape=(n_rows, n_cont))
        return M.tocsr(), np.asarray(const, np.float64)

    layers = []
    for k, (dep_id, size, sign, c) in enumerate(acts):
        Z, z0 = to_global(exprs[dep_id], size)
        layers.append(_ActLayer(dep_id, size, int(offsets[k + 1]), sign, c, Z, z0))
    if isinstance(g.output, _Ref):
        K = int(np.prod(g.shapes[g.output.id]))
        out, out0 = to_global(exprs[g.output.id], K)
    else:  # logits independent of the input
        out0 = np.asarray(g.output, np.float64).reshape(-1)
        out = sp.csr_matrix((out0.size, n_cont))
    return _Encoding(_signature(g), in_id, n_input, n_cont, layers, out, out0)


class _Problem(NamedTuple):
    A: sp.csr_matrix
    lb_rows: np.ndarray
    ub_rows: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray
    n_binary: int


def _build_problem(enc: _Encoding, intervals) -> _Problem:
    """The example's constraints: variable bounds from its intervals and the big-M rows."""
    lo_in, hi_in = (np.asarray(a, np.float64).reshape(-1) for a in intervals[enc.input_id])
    lb = [lo_in]
    ub = [hi_in]
    cont_rows, rlo, rhi = [], [], []  # rows over the continuous variables only
    n_bin = 0
    bin_cols = []  # per layer: (layer, unstable neurons, first binary, widened l, widened u)
    for layer in enc.layers:
        l, u = (np.asarray(a, np.float64).reshape(-1) for a in intervals[layer.dep_id])
        s, c = layer.sign, layer.const
        # w = s (z - c): o = c + s relu(w).
        lw, uw = (l - c, u - c) if s > 0 else (c - u, c - l)
        inactive = uw <= 0
        active = (lw >= 0) & ~inactive
        unstable = ~(inactive | active)
        o_lb = np.full(layer.size, -np.inf)
        o_ub = np.full(layer.size, np.inf)
        o_lb[inactive] = o_ub[inactive] = c[inactive]
        idx_act = np.flatnonzero(active)
        idx_un = np.flatnonzero(unstable)
        # Widened big-M constants: float32 rounding in the intervals must not cut off true states.
        slack = _BIGM_SLACK * (1.0 + np.maximum(np.abs(lw), np.abs(uw)))
        lw_u, uw_u = lw[idx_un] - slack[idx_un], uw[idx_un] + slack[idx_un]
        if s > 0:
            o_lb[idx_un], o_ub[idx_un] = c[idx_un], c[idx_un] + uw_u
        else:
            o_lb[idx_un], o_ub[idx_un] = c[idx_un] - uw_u, c[idx_un]
        lb.append(o_lb)
        ub.append(o_ub)
        n_un = idx_un.size
        bin_cols.append((layer, idx_un, n_bin, lw_u, uw_u))
        n_bin += n_un
        # Stable active: o - z = z0.
        if idx_act.size:
            E = sp.csr_matrix((np.ones(idx_act.size), (np.arange(idx_act.size), layer.offset + idx_act)),
                              shape=(idx_act.size, enc.n_cont))
            cont_rows.append(E - layer.Z[idx_act])
            rlo.append(layer.z0[idx_act])
            rhi.append(layer.z0[idx_act])
    n_var = enc.n_cont + n_bin
    # Pad the continuous-only rows with zero binary columns (the binaries are the last n_bin).
    mats = [sp.hstack([M, sp.csr_matrix((M.shape[0], n_bin))], format="csr") for M in cont_rows]
    for layer, idx_un, b0, lw_u, uw_u in bin_cols:
        n_un = idx_un.size
        if n_un == 0:
            continue
        s, c = layer.sign, layer.const[idx_un]
        r = np.arange(n_un)
        E = sp.csr_matrix((np.ones(n_un), (r, layer.offset + idx_un)), shape=(n_un, n_var))
        Abin = sp.csr_matrix((np.ones(n_un), (r, enc.n_cont + b0 + r)), shape=(n_un, n_var))
        Zu = sp.hstack([layer.Z[idx_un], sp.csr_matrix((n_un, n_bin))], format="csr")
        z0 = layer.z0[idx_un]
        # (a) s·o - s·z >= s·z0                    (o - c >= w)
        mats.append(s * E - s * Zu)
        rlo.append(s * z0)
        rhi.append(np.full(n_un, np.inf))
        # (b) s·o - u·a <= s·c                     (o - c <= u a)
        mats.append(s * E - sp.diags(uw_u) @ Abin)
        rlo.append(np.full(n_un, -np.inf))
        rhi.append(s * c)
        # (c) s·o - s·z - l·a <= s·z0 - l           (o - c <= w - l (1 - a))
        mats.append(s * E - s * Zu - sp.diags(lw_u) @ Abin)
        rlo.append(np.full(n_un, -np.inf))
        rhi.append(s * z0 - lw_u)
    lb.append(np.zeros(n_bin))
    ub.append(np.ones(n_bin))
    integrality = np.concatenate([np.zeros(enc.n_cont), np.ones(n_bin)])
    if mats:
        A = sp.vstack(mats, format="csr")
        lo_r, hi_r = np.concatenate(rlo), np.concatenate(rhi)
    else:
        A, lo_r, hi_r = sp.csr_matrix((0, n_var)), np.zeros(0), np.zeros(0)
    return _Problem(A, lo_r, hi_r, np.concatenate(lb), np.concatenate(ub), integrality, n_bin)


class _ClassSolve(NamedTuple):
    lower: float              # proven lower bound of min z_y - z_i (-inf if none)
    proven: bool              # min z_y - z_i > 0 is proven
    value: Optional[float]    # margin at the best point found (a real point of S(x)), if any
    optimal: bool             # value is the exact minimum (to the MIP gap)
    x_input: Optional[np.ndarray]
    note: str


def _milp_child(conn, c, kwargs):
    try:
        r = milp(c, **kwargs)
        conn.send({"status": r.status, "message": r.message, "x": r.x, "fun": r.fun,
                   "mip_dual_bound": getattr(r, "mip_dual_bound", None)})
    finally:
        conn.close()


def _milp_with_deadline(c, kwargs, deadline: float):
    """scipy's ``milp`` in a forked child that is killed after ``deadline`` seconds: HiGHS checks its
    own time limit only now and then (seconds late on MILPs with thousands of rows, e.g. its root LP),
    and scipy offers no way to interrupt it. The child runs HiGHS only (no JAX). Returns the result
    (a namespace with scipy's fields) or None when it was killed. Without ``os.fork``: a plain call."""
    if not hasattr(os, "fork"):
        return milp(c, **kwargs)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # JAX warns on fork; the child never uses JAX
        proc = ctx.Process(target=_milp_child, args=(send, c, kwargs), daemon=True)
        proc.start()
    send.close()
    res = None
    try:
        if recv.poll(max(deadline, 0.0)):
            res = types.SimpleNamespace(**recv.recv())
    except EOFError:  # the child died without an answer
        res = None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    return res


def _solve_class(enc: _Encoding, prob: _Problem, y: int, i: int, *, cutoff: bool, time_limit: float,
                 mip_rel_gap: float, hard_deadline: Optional[float] = None) -> _ClassSolve:
    """min z_y - z_i over the example's MILP with HiGHS.

    With ``cutoff`` the row z_y - z_i <= 0 is added (MIPVerify's formulation: robust ⇔ infeasible),
    so HiGHS prunes every branch whose relaxation is already positive instead of proving a positive
    optimum; the optimum of a feasible problem is then still the exact (negative) minimum."""
    n_var = prob.lb.size
    c = np.zeros(n_var)
    c[:enc.n_cont] = (enc.out[y] - enc.out[i]).toarray().ravel()
    c0 = float(enc.out0[y] - enc.out0[i])  # scipy's milp has no objective offset
    A, lo, hi = prob.A, prob.lb_rows, prob.ub_rows
    if cutoff:
        A = sp.vstack([A, sp.csr_matrix(c[None])], format="csr")
        lo, hi = np.r_[lo, -np.inf], np.r_[hi, -c0]
    cons = LinearConstraint(A, lo, hi) if A.shape[0] else None
    kwargs = dict(integrality=prob.integrality, bounds=Bounds(prob.lb, prob.ub), constraints=cons,
                  options={"disp": False, "presolve": True, "mip_rel_gap": float(mip_rel_gap),
                           "time_limit": float(time_limit)})
    res = _milp_with_deadline(c, kwargs, hard_deadline) if hard_deadline is not None else milp(c, **kwargs)
    if res is None:  # HiGHS overran its own limit past the example's budget and was stopped
        return _ClassSolve(-np.inf, False, None, False, None, "stopped at the time limit (HiGHS overran it)")
    lower, proven, note = -np.inf, False, ""
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
        d = float(dual) + c0
        if not cutoff:
            lower, proven = d, d > 0  # a dual bound proves the class even at the time limit
        elif d > 0:
            # With the cutoff a positive dual bound means the cut problem is infeasible: the class
            # is proven, but d is no bound of the uncut minimum (only 0 is).
            lower, proven = 0.0, True
        else:
            lower = d  # the cut problem's minimum is the global one when feasible, else > 0 >= d
    if res.status == 2 and cutoff:
        lower, proven = max(lower, 0.0), True  # no point of S(x) with z_i >= z_y
    elif res.status not in (0, 1):
        note = f"HiGHS status {res.status} ({res.message})"
    value, optimal, x_input = None, False, None
    if res.x is not None:  # any feasible point is a real point of S(x): the encoding is exact
        value = float(res.fun) + c0
        optimal = res.status == 0
        x_input = np.asarray(res.x[:enc.n_input])
        if optimal and dual is None:
            # No binaries (every neuron stable): HiGHS solved an LP and reports no MIP dual bound;
            # its optimum is exact, and with the cutoff it is the global minimum as well.
            lower, proven = max(lower, value), value > 0 and not cutoff
    if not proven and not (value is not None and value <= 0) and not note:
        note = (f"optimum {value:.3g} within the MIP gap of 0" if optimal
                else "undecided at the time limit")
    return _ClassSolve(lower, proven, value, optimal, x_input, note)


# ----------------------------------------------------------------------------- compiled pieces
class _CompiledPieces:
    """The JAX parts of :func:`milp_verify` for one (fn, method), jitted and kept across calls: the
    logits, the batch's margin-bound pre-screen and one example's intermediate intervals (the tape of
    :func:`jaxrobust.bounds.bound_graph` traced under jit). Eager, these ran op by op (~30 s the first
    time per architecture); jitted, each compiles once per input shape and threat structure.
    ``traces`` counts the traces (for tests)."""

    def __init__(self, fn: Callable, method: str):
        self.traces = 0
        self.structures: Dict[tuple, object] = {}

        def intervals(x1, t):
            self.traces += 1
            g = bound_graph(fn, x1, t, method=method)
            self.structures[(x1.shape, x1.dtype.name, t.norm, t.box, t.per_feature_eps is None)] = \
                g._replace(intervals=None)
            return g.intervals

        def logits(x):
            self.traces += 1
            return fn(x)

        def prescreen(x, y, t):
            self.traces += 1
            return margin_bounds(fn, x, y, t, method=method).lower

        self.intervals = jax.jit(intervals)
        self.logits = jax.jit(logits)
        self.prescreen = jax.jit(prescreen)

    def graph(self, fn, method, x1, t):
        """(structure, intervals as float numpy arrays) of one example. The structure (nodes, shapes)
        comes from the jit trace when its constant operands are concrete, else from one eager trace."""
        iv = self.intervals(x1, t)
        key = (x1.shape, x1.dtype.name, t.norm, t.box, t.per_feature_eps is None)
        g = self.structures.get(key)
        if g is None or isinstance(g.output, jax.core.Tracer) or any(
                isinstance(a, jax.core.Tracer) for n in g.nodes for a in n.ins):
            g = bound_graph(fn, x1, t, method=method)._replace(intervals=None)
            self.structures[key] = g
        iv = {k: (np.asarray(lo), np.asarray(hi)) for k, (lo, hi) in iv.items()}
        return g._replace(intervals=iv), iv


@functools.lru_cache(maxsize=8)
def _compiled_pieces(fn: Callable, method: str) -> _CompiledPieces:
    return _CompiledPieces(fn, method)


# ----------------------------------------------------------------------------- public API
def milp_verify(fn: Callable, x, y, threat: ThreatModel, *, method: str = "crown",
                time_limit: float = 60.0, return_counterexample: bool = True, progress: bool = False,
                exact_margin: bool = False, mip_rel_gap: float = 1e-6) -> MILPResult:
    """Complete l_inf verification of a small ReLU network (Table 3.6 "CRE MIP"; MIPVerify, Tjeng et
    al. 2019): for each example, is z_y(x') > z_i(x') for every x' in S(x) and i ≠ y?

    Args:
      fn: maps a batch (B, *f) to logits (B, K); affine layers (dense, conv, reshapes, eval-mode
        BatchNorm, ...) and max/min with a constant (ReLU, clipping) only -- sigmoid/tanh and max
        pooling raise a ValueError.
      x: (B, *f) inputs in the threat's box; y: (B,) integer labels.
      threat: an l_inf ThreatModel (scalar or per-example ε, optional per-feature ε⃗ and box).
      method: bound method (see :data:`jaxrobust.bounds.METHODS`) for the intermediate intervals
        (big-M constants, stable neurons) and for the pre-screen: classes whose margin lower bound is
        already > 0 are certified without a MILP.
      time_limit: per-example budget in seconds of wall time (intervals, MILP rows, solves and
        checks; each solve gets what is left, and HiGHS runs in a forked child process that is
        stopped at the deadline, since it may overrun its own limit), shared by its classes. A class still
        undecided when it runs out (or when the solver stops without a proof) makes the example
        'timeout', i.e. not certified; a dual bound > 0 at the limit still proves the class.
      return_counterexample: keep the (B, *f) counterexamples in the result.
      progress: print one line per example.
      exact_margin: solve the plain minimisation (no cutoff row) for every class whose lower bound
        is below the smallest margin found, so that ``min_margin`` is exact, instead of stopping at
        the verdict; slower on robust points. The verdicts of both modes agree.
      mip_rel_gap: HiGHS relative MIP gap (with HiGHS's absolute gap of 1e-6).

    Returns a :class:`MILPResult`. Status per example: 'misclassified' when fn(x) does not predict
    y; 'falsified' when a point of S(x) has z_i >= z_y for some i ≠ y (a tie counts: it is not
    robust); 'verified' when every class is proven; 'timeout' otherwise.
    """
    if threat.norm != "linf":
        raise ValueError(f"milp_verify supports l_inf threat models only (the set must be a box for "
                         f"a MILP), got norm {threat.norm!r}.")
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose from {sorted(METHODS)}")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}.")
    x = jnp.asarray(x)
    # the entry checks shared with certify: fn's output shape, NaN, box, label shape and range
    K = check_entry_point("milp_verify", fn, x, y, threat)
    y_np = np.asarray(y)
    B = x.shape[0]
    feat = tuple(x.shape[1:])
    chex.assert_rank(y_np, 1)
    chex.assert_axis_dimension(y_np, 0, B)
    if K < 2:
        raise ValueError(f"fn must return at least 2 logits per example, got {K}.")
    try:
        pieces = _compiled_pieces(fn, method)
    except TypeError:  # an unhashable callable: compile for this call only
        pieces = _CompiledPieces(fn, method)
    logits = np.asarray(pieces.logits(x), np.float64)

    eps_all = np.broadcast_to(np.asarray(threat.eps, np.float32), (B,))
    pf = threat.per_feature_eps
    pf_per_example = pf is not None and np.ndim(pf) == len(feat) + 1

    def threat_of(b):
        # bound_graph traces one example and needs a scalar ε (and one example's ε⃗).
        return threat.replace(eps=jnp.asarray(eps_all[b], x.dtype),
                              per_feature_eps=(jnp.asarray(pf[b]) if pf_per_example else pf))

    # Fail fast on unsupported primitives before any bounds are computed for the batch. The one-off
    # tracing, compilation and encoding of the architecture are shared by the batch (and by later
    # calls with the same fn), so they are not charged to any example's time limit.
    g0, iv0 = pieces.graph(fn, method, x[0], threat_of(0))
    enc = _build_encoding(g0)
    lower_bp = np.asarray(pieces.prescreen(x, jnp.asarray(y_np, jnp.int32), threat), np.float64)

    status = np.empty(B, dtype=object)
    min_margin = np.full(B, np.nan)
    margin_lower = np.full(B, np.nan)
    margins = np.full((B, K), np.nan)
    seconds = np.zeros(B)
    cex = np.array(x, dtype=np.asarray(x).dtype, copy=True)
    cex_ok = np.zeros(B, bool)
    mismatch = np.zeros(B, bool)
    n_binary = np.zeros(B, int)
    n_solves = np.zeros(B, int)
    notes = [""] * B

    for b in range(B):
        t_start = time.perf_counter()
        yb = int(y_np[b])
        others = [i for i in range(K) if i != yb]
        lower = lower_bp[b].copy()  # best proven lower bound of each class's margin
        note: List[str] = []
        if int(np.argmax(logits[b])) != yb:
            status[b] = "misclassified"
            cex_ok[b] = True  # x itself is in S(x) and misclassified
            margin_lower[b] = float(np.min(lower[others]))
            seconds[b] = time.perf_counter() - t_start
            if progress:
                print(f"[milp] {b + 1}/{B}: misclassified")
            continue

        tb = threat_of(b)
        g, intervals = (g0, iv0) if b == 0 else pieces.graph(fn, method, x[b], tb)
        if _signature(g) != enc.signature:  # a different trace: never reuse the maps blindly
            enc = _build_encoding(g)
        prob = _build_problem(enc, intervals)
        n_binary[b] = prob.n_binary
        lo_in, hi_in = (np.asarray(a, np.float32).reshape(-1) for a in intervals[enc.input_id])

        # Most suspicious classes first (smallest bound): a counterexample ends the search early.
        order = [int(i) for i in np.argsort(lower, kind="stable") if i != yb]
        proven = lower > 0  # classes certified by the bounds alone need no MILP
        solved = np.zeros(K, bool)  # exact optimum known (margins[b, i])
        upper = logits[b, yb] - logits[b]  # the clean point bounds every class's minimum above
        # (value, input point, class) of the most negative point found; a tie z_i = z_y at x itself
        # (argmax resolved it to y) is already one.
        best = None
        i_tie = min(others, key=lambda i: upper[i])
        if upper[i_tie] <= 0:
            best = (float(upper[i_tie]), np.asarray(x[b], np.float64).reshape(-1), i_tie)
        for i in order:
            if exact_margin:
                if lower[i] >= np.min(upper[others]):
                    break  # sorted: no class from here on can hold a smaller minimum
            elif best is not None:
                break  # falsified: the verdict is known
            elif proven[i]:
                continue
            # The example's wall time so far (its intervals, MILP rows, earlier solves) counts: each
            # solve gets only what is left, less a reserve for HiGHS's own set-up and our checks.
            # HiGHS also runs past its own limit by up to a few tenths of a second (it checks its clock
            # between nodes): the largest overrun seen so far is kept back as well.
            remaining = (time_limit - (time.perf_counter() - t_start) - _TIME_RESERVE * time_limit
                         - _HIGHS_OVERRUN[0])
            if remaining <= 0:
                note.append("time budget exhausted")
                break
            t_solve = time.perf_counter()
            r = _solve_class(enc, prob, yb, i, cutoff=not exact_margin, time_limit=remaining,
                             mip_rel_gap=mip_rel_gap,
                             hard_deadline=time_limit - (time.perf_counter() - t_start))
            overrun = time.perf_counter() - t_solve - remaining
            _HIGHS_OVERRUN[0] = min(max(_HIGHS_OVERRUN[0], overrun), 1.0)
            n_solves[b] += 1
            lower[i] = max(lower[i], r.lower)
            proven[i] |= r.proven
            if r.value is not None:
                upper[i] = min(upper[i], r.value)
                if r.optimal:
                    margins[b, i], solved[i] = r.value, True
                if r.value <= 0 and (best is None or r.value < best[0]):
                    best = (r.value, r.x_input, i)
            if r.note:
                note.append(f"class {i}: {r.note}")
        # Verdict: a counterexample, or every class proven, or neither (not certified).
        if best is not None:
            status[b] = "falsified"
        elif all(proven[i] for i in others):
            status[b] = "verified"
        else:
            status[b] = "timeout"
        margin_lower[b] = float(np.min(lower[others]))
        # min_margin is exact (to the MIP tolerance) when the smallest margin attained by a point of
        # S(x) (the clean point or a MILP solution) is not above the proven lower bound of any
        # class that was not solved to optimality.
        m = float(np.min(upper[others]))
        tol = 1e-6 + mip_rel_gap * (1.0 + abs(m))
        if status[b] != "timeout" and all(solved[j] or lower[j] >= m - tol for j in others):
            min_margin[b] = m
        # Re-check the counterexample with the network itself (float32 forward pass).
        if best is not None:
            val, xs, i_c = best
            xs = np.clip(np.asarray(xs, np.float32), lo_in, hi_in).reshape(feat)
            inside = bool(np.asarray(tb.contains(x[b:b + 1], jnp.asarray(xs)[None], atol=1e-6))[0])
            # (evaluated in the batch's shape, so the compiled logits are reused: no new trace)
            lg = np.asarray(pieces.logits(x.at[b].set(jnp.asarray(xs, x.dtype))), np.float64)[b]
            fwd = lg[yb] - lg[i_c]
            if abs(fwd - val) > _MISMATCH_TOL:
                mismatch[b] = True
                note.append(f"forward pass margin {fwd:.6g} vs MILP {val:.6g} for class {i_c}")
            if not inside:
                note.append("counterexample outside the threat set")
            cex[b] = xs
            cex_ok[b] = inside and int(np.argmax(lg)) != yb
        seconds[b] = time.perf_counter() - t_start
        notes[b] = "; ".join(note)
        if progress:
            print(f"[milp] {b + 1}/{B}: {status[b]} ({seconds[b]:.2f}s, {n_binary[b]} binaries, "
                  f"{n_solves[b]} solves){' ' + notes[b] if notes[b] else ''}")
    return MILPResult(status.astype(str), min_margin, margin_lower, margins, seconds,
                      cex if return_counterexample else None, cex_ok, mismatch, n_binary, n_solves,
                      tuple(notes))


def milp_certified_error(result: MILPResult) -> float:
    """Fraction of points not verified (CRE MIP of Table 3.6): misclassified, falsified and timed-out
    points all count as errors."""
    return float(np.mean(result.status != "verified")) if len(result.status) else float("nan")


def summary(result: MILPResult) -> dict:
    """Counts per status, the certified robust error and the time per example."""
    out = {"n": int(len(result.status))}
    for s in STATUSES:
        out[s] = int(np.sum(result.status == s))
    out["certified_error"] = milp_certified_error(result)
    out["mean_seconds"] = float(np.mean(result.seconds)) if out["n"] else float("nan")
    out["max_seconds"] = float(np.max(result.seconds)) if out["n"] else float("nan")
    out["mismatches"] = int(np.sum(result.mismatch))
    return out
