"""Patch-form backward pass for CROWN intermediate bounds of convolutional layers.

The intermediate bounds of an activation layer of shape (H, W, C) need the identity specification:
H·W·C rows, each pulled back to the input. In dense form every row is a full map of every earlier
layer, although the row of the neuron at (i, j) is zero outside that neuron's receptive field. Here
each row is stored only on its window: the rows of all positions form an array
``(Hs, Ws, R, Kh, Kw, C)`` (positions of the specification layer, rows per position, window, channels)
and the window of a layer is the same for all positions up to a shift, ``start = position · stride
+ offset`` (the "patches" idea of auto_LiRPA, derived here from the traced jaxpr):

* a convolution (stride s, kernel k, dilation d, padding p; any 2-d layout) maps a window (S, o, K) of its
  output to the window (S·s, o·s - p, (K - 1)·s + (k - 1)·d + 1) of its input; the rows are pulled
  back by ``jax.vjp`` of the same convolution applied to a window-sized crop without padding;
* element-wise affine nodes (bias, BatchNorm in eval mode, normalisation, residual sums) multiply the
  rows by the window patches of their derivative and add <Λ, h(0)> to the bias;
* activations take the window patches of their relaxation lines (positive / negative rows);
* sum pooling and max pooling (its relaxation selects one element per window) scatter each window
  offset back with a strided pad.

Entries of a window that fall outside the layer (the convolution's zero padding) are masked to zero
after every spatial pull-back: they stand for constants, not for inputs. At the input the bound is
concretised row by row on the window patches of x and of the box (exact, as in the dense pass).

Layouts: the windows are kept in (H, W, C) order. A value's layout is set by the
``dimension_numbers`` of the convolutions that produce or consume it (NHWC, NCHW, any permutation)
and carried through element-wise, activation, pooling and reshape nodes; values of another layout
are transposed to (H, W, C) when their patches are extracted and the convolution is pulled back
through its NHWC/HWIO equivalent. Convolutions without a 2-d patch form (1-d, 3-d) fall back to
dense rows with one warning giving the rows' memory per example.

The result equals the dense pass to float rounding; it is used when every node on the way back is
one of the above and the windows are smaller than the maps (``local_plan``), otherwise the dense
pass runs. Everything is per example (vmapped by the caller), jit-able and differentiable.
"""
from __future__ import annotations

import warnings
from typing import Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax import lax

from jaxrobust.bounds import tape as T
from jaxrobust.bounds.backward import (Ref, min_linear, node_activation_lines, node_function, pos_neg,
                                       strided_conv_transpose)
from jaxrobust.bounds.relaxations import ACTIVATION_LINES, maxpool_lines

# Patch-form rule of every local primitive (see tape.PrimInfo.local): element-wise affine maps,
# shape-preserving layout changes, spatial maps (convolution, pooling) and activations.
PATCH_RULES = {p: "elementwise" for p in (lax.add_p, T.P.add_jaxvals_p, lax.sub_p, lax.neg_p, lax.mul_p,
                                          lax.div_p, lax.convert_element_type_p, lax.copy_p,
                                          lax.reduce_precision_p, lax.select_n_p)}
PATCH_RULES.update({p: "layout" for p in (lax.reshape_p, lax.broadcast_in_dim_p, lax.squeeze_p)})
PATCH_RULES.update({p: "spatial" for p in (lax.conv_general_dilated_p, lax.reduce_window_sum_p)})
PATCH_RULES[lax.reduce_window_max_p] = "maxpool"
PATCH_RULES.update({p: "act" for p in ACTIVATION_LINES})
# A window-crop convolution is pulled back by one dense (window_out x window_in) matrix when its
# flop inflation over the convolution times min(C_in, C_out) is at most this (XLA:CPU runs
# convolutions of few channels at 2-15 GFLOP/s and matmuls at 120-190: measured on the shapes of
# the bound passes), and the matrix has at most this many entries.
_MATMUL_INFLATION = 80
_MATMUL_ENTRIES = 1 << 22


class NotLocal(Exception):
    """The backward pass from this node cannot run in patch form."""


class Window(NamedTuple):
    """Rows of position (i, j) live on rows i·Sh + oh ... + Kh - 1 (same for columns)."""
    stride: tuple
    offset: tuple
    size: tuple


def _hwc_shape(shape):
    """(H, W, C) of an NHWC value with a unit batch axis, or of an (H, W, C) input."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[0] == 1:
        return shape[1:]
    if len(shape) == 3:
        return shape
    raise NotLocal(f"value of shape {shape} is not an image")


# Layouts: the patch form works on (1, H, W, C) / (H, W, C) arrays; ``tape.layout[rid]`` is the
# permutation that brings a value of another layout (NCHW, ...) there (absent: already NHWC).
def _is_identity(perm):
    return perm is None or tuple(perm) == tuple(range(len(perm)))


def _canon_shape(tape, rid):
    shape, perm = tuple(tape.shape[rid]), tape.layout.get(rid)
    return shape if _is_identity(perm) else tuple(shape[i] for i in perm)


def _hwc(tape, rid):
    """(H, W, C) of the tape value ``rid`` in its layout."""
    return _hwc_shape(_canon_shape(tape, rid))


def canon(tape, rid, arr):
    """A value of ref ``rid``'s shape (or broadcastable to it) in the (1,) H, W, C layout."""
    arr = jnp.broadcast_to(arr, tape.shape[rid])
    perm = tape.layout.get(rid)
    return arr if _is_identity(perm) else jnp.transpose(arr, perm)


def uncanon(tape, rid, arr):
    """Inverse of :func:`canon`: an (H, W, C)-ordered array back to ref ``rid``'s shape."""
    perm = tape.layout.get(rid)
    arr = jnp.reshape(arr, _canon_shape(tape, rid))
    return arr if _is_identity(perm) else jnp.transpose(arr, np.argsort(perm))


def _spec_perm(spec):
    """Permutation from a convolution operand's layout (batch, feature, s0, s1) to (N, H, W, C)."""
    if len(spec) != 4:
        raise NotLocal(f"convolution layout with {len(spec) - 2} spatial dimensions (the patch form "
                       "handles 2-d images)")
    return (spec[0], spec[2], spec[3], spec[1])


def _convert_perm(perm, rank):
    """The same layout for a value with a unit leading axis added (rank 4) or removed (rank 3)."""
    if len(perm) == rank:
        return tuple(perm)
    if len(perm) == 4 and rank == 3 and perm[0] == 0:
        return tuple(a - 1 for a in perm[1:])
    if len(perm) == 3 and rank == 4:
        return (0,) + tuple(a + 1 for a in perm)
    raise NotLocal("a layout change between values that are not images")


def _assign_layouts(tape, start_id):
    """Layouts of the values on the way back from ``start_id``: set by convolutions'
    dimension_numbers and carried through element-wise, activation, pooling and reshape nodes."""
    reach, nodes = {start_id}, []
    for ni in range(tape.producer[start_id], -1, -1):
        node = tape.nodes[ni]
        if node.out.id in reach:
            nodes.append(node)
            reach.update(a.id for a in _deps(node))
    lay = {}

    def put(rid, perm):
        perm = _convert_perm(perm, len(tape.shape[rid]))
        if rid in lay:
            if lay[rid] != perm:
                raise NotLocal("values of different layouts meet")
            return False
        lay[rid] = perm
        return True

    for node in nodes:
        if node.prim is lax.conv_general_dilated_p and isinstance(node.ins[0], Ref):
            dn = node.params["dimension_numbers"]
            put(node.out.id, _spec_perm(dn.out_spec))
            put(node.ins[0].id, _spec_perm(dn.lhs_spec))
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.prim is lax.conv_general_dilated_p or node.prim not in PATCH_RULES:
                continue
            ids = [node.out.id] + [a.id for a in _deps(node)]
            known = [lay[i] for i in ids if i in lay]
            if known:
                for i in ids:
                    changed |= put(i, known[0])
    tape.layout.update({k: v for k, v in lay.items() if not _is_identity(v)})


def _deps(node):
    return [a for a in node.ins if isinstance(a, Ref)]


def _pool_params(node, tape):
    """A reduce_window's parameters in the (N, H, W, C) order of its operand's layout."""
    p = node.params
    perm = tape.layout.get(node.ins[0].id) if isinstance(node.ins[0], Ref) else None
    if _is_identity(perm) or len(p["window_dimensions"]) != 4:
        return p
    if perm[1] > perm[2]:  # window elements must be enumerated H-major, as in the NHWC case
        raise NotLocal("pooling over a W-before-H layout")
    per = lambda v: tuple(v[i] for i in perm)
    out = dict(p, window_dimensions=per(p["window_dimensions"]), window_strides=per(p["window_strides"]),
               padding=per(p["padding"]))
    for k in ("window_dilation", "base_dilation"):
        if k in p:
            out[k] = per(p[k])
    return out


def _spatial_params(node, tape):
    """(strides, low paddings, kernel extents (k - 1)·d + 1) of a conv / pooling node."""
    p = node.params
    if node.prim is lax.conv_general_dilated_p:
        dn = p["dimension_numbers"]
        if len(dn.lhs_spec) != 4:
            raise NotLocal(f"convolution layout {_layout_name(dn)} (the patch form needs 2-d images)")
        if any(v != 1 for v in p["lhs_dilation"]) \
                or p.get("batch_group_count", 1) != 1 or not isinstance(node.ins[0], Ref) \
                or isinstance(node.ins[1], Ref):
            raise NotLocal("convolution layout")
        k = [np.shape(node.ins[1])[d] for d in dn.rhs_spec[2:]]
        ext = [(kk - 1) * dd + 1 for kk, dd in zip(k, p["rhs_dilation"])]
        return tuple(p["window_strides"]), tuple(lo for lo, _ in p["padding"]), tuple(ext)
    # reduce_window_sum / reduce_window_max over (1, H, W, C) with unit batch / channel windows
    p = _pool_params(node, tape)
    dims, strides = p["window_dimensions"], p["window_strides"]
    wdil = p.get("window_dilation", (1,) * len(dims))
    if len(dims) != 4 or dims[0] != 1 or dims[3] != 1 or strides[0] != 1 or strides[3] != 1 \
            or any(v != 1 for v in p.get("base_dilation", (1,) * 4)) or p["padding"][0] != (0, 0) \
            or p["padding"][3] != (0, 0):
        raise NotLocal("pooling layout")
    ext = [(dims[i] - 1) * wdil[i] + 1 for i in (1, 2)]
    return (strides[1], strides[2]), (p["padding"][1][0], p["padding"][2][0]), tuple(ext)


def input_window(node, w: Window, tape) -> Window:
    """Window of the node's input-dependent operand(s) for rows living on ``w`` at its output."""
    name = node.prim.name
    deps = _deps(node)
    out_hwc = _hwc(tape, node.out.id)
    rule = PATCH_RULES.get(node.prim)
    if rule in ("spatial", "maxpool"):
        s, plo, ext = _spatial_params(node, tape)
        return Window(tuple(a * b for a, b in zip(w.stride, s)),
                      tuple(o * ss - pp for o, ss, pp in zip(w.offset, s, plo)),
                      tuple((k - 1) * ss + e for k, ss, e in zip(w.size, s, ext)))
    if rule in ("elementwise", "layout", "act"):
        for a in deps:
            if _hwc(tape, a.id) != out_hwc or int(np.prod(tape.shape[a.id])) != int(np.prod(out_hwc)):
                raise NotLocal(f"'{name}' broadcasts an input-dependent operand")
        return w
    raise NotLocal(f"no patch rule for '{name}'")


def _union(a: Window, b: Window) -> Window:
    if a.stride != b.stride:
        raise NotLocal("two paths reach a value with different strides")
    off = tuple(min(x, y) for x, y in zip(a.offset, b.offset))
    end = tuple(max(x + k, y + m) for x, k, y, m in zip(a.offset, a.size, b.offset, b.size))
    return Window(a.stride, off, tuple(e - o for e, o in zip(end, off)))


class Plan(NamedTuple):
    windows: Dict[int, Window]  # final (union) window of every ref on the way back
    patch_cost: int
    dense_cost: int
    layouts: Optional[Dict[int, tuple]] = None  # non-NHWC layouts (permutations to NHWC)


def plan_or_reason(tape, start_id: int, x_id: int):
    """(Plan, None) for a backward pass from ``start_id`` in patch form, or (None, why not)."""
    try:
        _assign_layouts(tape, start_id)
        hwc = _hwc(tape, start_id)
        if start_id == x_id or hwc[0] * hwc[1] <= 1:
            return None, "not a spatial layer"
        win = {start_id: Window((1, 1), (0, 0), (1, 1))}
        for ni in range(tape.producer[start_id], -1, -1):
            node = tape.nodes[ni]
            if node.out.id not in win:
                continue
            w_in = input_window(node, win[node.out.id], tape)
            for a in _deps(node):
                win[a.id] = _union(win[a.id], w_in) if a.id in win else w_in
        if x_id not in win:
            return None, "the layer does not depend on the input"
    except NotLocal as e:
        return None, str(e)
    patch = dense = 0
    for rid, w in win.items():
        h, wd, c = _hwc(tape, rid)
        patch += w.size[0] * w.size[1] * c
        dense += h * wd * c
    if patch >= dense:
        return None, "the windows are not smaller than the maps"
    return Plan(win, patch, dense, {k: tape.layout[k] for k in win if k in tape.layout}), None


def local_plan(tape, start_id: int, x_id: int) -> Optional[Plan]:
    """Windows of the backward pass from ``start_id`` in patch form, or None if some node has no
    patch rule or the patches would not be smaller than the dense rows."""
    return plan_or_reason(tape, start_id, x_id)[0]


_WARNED = set()
# Dense identity rows of at least this many bytes per example make a fall-back worth a warning.
_WARN_BYTES = 64 << 20


def warn_dense_fallback(reason: str, n_rows: int, n_in: int, itemsize: int, where: str = "") -> None:
    """Warns once per reason when a convolutional layer's CROWN bounds fall back to dense rows
    because of its layout, with the memory those rows take per example."""
    if not reason.startswith("convolution layout"):
        return
    nbytes = 2 * n_rows * n_in * itemsize  # lower and upper rows over the input
    if nbytes < _WARN_BYTES or reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"CROWN intermediate bounds of a convolutional layer{(' at ' + where) if where else ''} "
                  f"use dense rows, not receptive-field patches: {reason}. Dense rows take "
                  f"{nbytes / 2 ** 20:.0f} MiB per example (times the batch under vmap).", stacklevel=3)


def _layout_name(dn) -> str:
    letters = lambda spec, names: "".join(names[spec.index(i)] for i in range(len(spec)))
    try:
        return letters(tuple(dn.lhs_spec), "NCHW") + "->" + letters(tuple(dn.out_spec), "NCHW")
    except (ValueError, IndexError):
        return str(dn)


# ----------------------------------------------------------------------------- window arrays
def _index(n_pos, stride, offset, size, extent):
    """Static (n_pos, size) source indices (clipped) and validity of a window along one axis."""
    idx = np.arange(n_pos)[:, None] * stride + offset + np.arange(size)[None, :]
    return np.clip(idx, 0, extent - 1), (idx >= 0) & (idx < extent)


def extract(arr, w: Window, grid):
    """Window patches of an (H, W, C) / (1, H, W, C) array for each position of ``grid`` (Hs, Ws):
    (Hs, Ws, 1, Kh, Kw, C), zero outside the array."""
    h, wd, c = _hwc_shape(arr.shape)
    a = jnp.reshape(arr, (h, wd, c))
    ih, _ = _index(grid[0], w.stride[0], w.offset[0], w.size[0], h)
    iw, _ = _index(grid[1], w.stride[1], w.offset[1], w.size[1], wd)
    p = a[ih[:, None, :, None], iw[None, :, None, :]][:, :, None]  # one gather: (Hs, Ws, 1, Kh, Kw, C)
    return jnp.where(_mask(w, grid, (h, wd)), p, jnp.zeros((), p.dtype))  # (inf boxes stay out)


def _mask(w: Window, grid, hw):
    _, vh = _index(grid[0], w.stride[0], w.offset[0], w.size[0], hw[0])
    _, vw = _index(grid[1], w.stride[1], w.offset[1], w.size[1], hw[1])
    return (vh[:, None, None, :, None, None] & vw[None, :, None, None, :, None])


def _embed(lam, w: Window, target: Window):
    """Zero-pad rows living on ``w`` to the larger window ``target`` (same stride)."""
    if w == target:
        return lam
    pads = [(0, 0, 0)] * 3
    for ax in range(2):
        lo = w.offset[ax] - target.offset[ax]
        pads.append((lo, target.size[ax] - w.size[ax] - lo, 0))
    pads.append((0, 0, 0))
    return jax.lax.pad(lam, jnp.zeros((), lam.dtype), pads)


def _pool_offsets(params):
    """(spatial offsets of a pooling window's elements, in the order of ``_window_patches``; the
    pooling's spatial strides)."""
    dims = params["window_dimensions"]
    wdil = params.get("window_dilation", (1,) * 4)
    offsets = [(a * wdil[1], b * wdil[2]) for a in range(dims[1]) for b in range(dims[2])]
    return offsets, (params["window_strides"][1], params["window_strides"][2])


def _scatter_offsets(vals, offsets, stride, k_out, k_in):
    """Σ_off of ``vals[off]`` (.., Kh, Kw, C) placed with the given stride at ``off`` inside an
    input window of size k_in: the pull-back of a strided window selection."""
    out = 0
    for v, (a, b) in zip(vals, offsets):
        pads = [(0, 0, 0)] * (v.ndim - 3)
        pads += [(a, k_in[0] - (k_out[0] - 1) * stride[0] - 1 - a, stride[0] - 1),
                 (b, k_in[1] - (k_out[1] - 1) * stride[1] - 1 - b, stride[1] - 1), (0, 0, 0)]
        out = out + jax.lax.pad(v, jnp.zeros((), v.dtype), pads)
    return out


# ----------------------------------------------------------------------------- backward pass
def _pull_spatial(node, lam, w_out: Window, w_in: Window, tape, grid, dep_id):
    """Rows (Hs, Ws, R, Kh, Kw, C) through a conv / pooling node (the non-relaxed part)."""
    hs, ws, r = lam.shape[:3]
    if node.prim is lax.conv_general_dilated_p:
        p = node.params
        rs = p["dimension_numbers"].rhs_spec
        kernel = jnp.transpose(jnp.asarray(node.ins[1]), (rs[2], rs[3], rs[1], rs[0]))  # HWIO
        cin = _hwc(tape, dep_id)[2]
        cout = lam.shape[-1]
        # the same convolution on the windows' (1, H, W, C) layout, whatever the node's layout
        nhwc = lax.conv_dimension_numbers((1, 1, 1, cin), kernel.shape, ("NHWC", "HWIO", "NHWC"))
        crop_params = dict(p, padding=((0, 0), (0, 0)), dimension_numbers=nhwc)

        def crop_conv(z):
            return jax.lax.conv_general_dilated(
                z, kernel, p["window_strides"], ((0, 0), (0, 0)), rhs_dilation=p["rhs_dilation"],
                dimension_numbers=nhwc, feature_group_count=p["feature_group_count"],
                precision=p.get("precision"), preferred_element_type=p.get("preferred_element_type"))

        n = hs * ws * r
        flat = lam.reshape((n,) + lam.shape[3:])
        _, _, ext = _spatial_params(node, tape)
        rows_size, in_size = int(np.prod(lam.shape[3:])), w_in.size[0] * w_in.size[1] * cin
        inflation = (w_in.size[0] * w_in.size[1]) / (ext[0] * ext[1])
        if inflation * min(cin, cout) <= _MATMUL_INFLATION and rows_size * in_size <= _MATMUL_ENTRIES:
            # The crop's transpose as one (window_out, window_in) matrix: more flops than the
            # convolution but run at matmul speed, a net win for few channels (XLA:CPU).
            _, vjp1 = jax.vjp(crop_conv, jnp.zeros((1,) + w_in.size + (cin,), lam.dtype))
            eye = jnp.eye(rows_size, dtype=lam.dtype).reshape((rows_size, 1) + lam.shape[3:])
            m = jax.vmap(lambda e: vjp1(e)[0])(eye).reshape(rows_size, in_size)
            g = (flat.reshape(n, rows_size) @ m).reshape((n,) + w_in.size + (cin,))
        else:
            g = strided_conv_transpose(flat, kernel, crop_params, w_in.size)
            if g is None:
                z0 = jnp.zeros((n,) + w_in.size + (cin,), lam.dtype)
                _, vjp = jax.vjp(crop_conv, z0)
                g = vjp(flat.astype(z0.dtype))[0]
        return g.reshape((hs, ws, r) + g.shape[1:])
    offsets, s = _pool_offsets(_pool_params(node, tape))
    return _scatter_offsets([lam] * len(offsets), offsets, s, w_out.size, w_in.size)


def backward_local(tape, start_id: int, x_id: int, plan: Plan, opts):
    """Identity specification at ``start_id`` (rows: every neuron, lower then upper) pulled back in
    patch form. Returns (Λ at the input (Hs, Ws, 2C, Kh, Kw, Cx), bias (Hs, Ws, 2C))."""
    hs, ws, c = _hwc(tape, start_id)
    grid = (hs, ws)
    dtype = tape.dtype[start_id]
    wins = plan.windows
    lams = {start_id: jnp.broadcast_to(jnp.eye(c, dtype=dtype)[:, None, None, :], (hs, ws, c, 1, 1, c))}
    bias = jnp.zeros((hs, ws, c), dtype)
    paired = True  # rows stand for +Λ and -Λ until the first relaxation

    def add(rid, g, w):
        g = _embed(g, w, wins[rid])
        lams[rid] = lams[rid] + g if rid in lams else g

    def fold(v):
        return jnp.sum(v.reshape(v.shape[:3] + (-1,)), axis=-1)

    for ni in range(tape.producer[start_id], -1, -1):
        node = tape.nodes[ni]
        rid = node.out.id
        if rid not in lams:
            continue
        lam = lams.pop(rid)
        w_out = wins[rid]
        if paired and node.kind != "affine":
            lams = {k: jnp.concatenate([v, -v], axis=2) for k, v in lams.items()}
            lam, bias, paired = jnp.concatenate([lam, -lam], axis=2), jnp.concatenate([bias, -bias], 2), False
        deps = _deps(node)
        w_in = input_window(node, w_out, tape)
        if node.kind == "act":
            al, bl, au, bu = node_activation_lines(node, tape.iv[deps[0].id], opts)
            pos, neg = pos_neg(lam)
            ex = lambda a: extract(canon(tape, rid, a), w_out, grid)
            bias = bias + fold(pos * ex(bl) + neg * ex(bu))
            add(deps[0].id, pos * ex(al) + neg * ex(au), w_in)
        elif node.kind == "maxpool":
            dep = node.ins[0]
            iv = tape.iv[dep.id]
            onehot, dominant, upper = maxpool_lines(iv.lo, iv.hi, node.params, dtype)
            pos, neg = pos_neg(lam)
            bias = bias + fold(neg * extract(canon(tape, rid, upper), w_out, grid))
            lam_sel = pos + neg * extract(canon(tape, rid, dominant), w_out, grid)
            offsets, s = _pool_offsets(_pool_params(node, tape))
            vals = [lam_sel * extract(canon(tape, rid, onehot[k]), w_out, grid) for k in range(len(offsets))]
            g = _scatter_offsets(vals, offsets, s, w_out.size, w_in.size)
            add(dep.id, g * _mask(w_in, grid, _hwc(tape, dep.id)[:2]).astype(dtype), w_in)
        elif PATCH_RULES[node.prim] == "spatial":
            dep = deps[0]
            g = _pull_spatial(node, lam, w_out, w_in, tape, grid, dep.id)
            add(dep.id, g * _mask(w_in, grid, _hwc(tape, dep.id)[:2]).astype(dtype), w_in)
        else:  # element-wise affine or layout: h(v) = Σ_i a_i ⊙ v_i + h(0)
            dep_pos, h = node_function(node)
            zeros = [jnp.zeros(tape.shape[node.ins[i].id], tape.dtype[node.ins[i].id]) for i in dep_pos]
            h0 = h(*zeros)
            layout = PATCH_RULES[node.prim] == "layout"
            if not layout:
                bias = bias + fold(lam * extract(canon(tape, rid, h0), w_out, grid))
            for k, i in enumerate(dep_pos):
                if layout:
                    slope_p = None
                else:
                    tangents = [jnp.ones_like(z) if j == k else jnp.zeros_like(z) for j, z in enumerate(zeros)]
                    slope = jax.jvp(h, zeros, tangents)[1]
                    slope_p = extract(canon(tape, rid, slope), w_out, grid)
                add(node.ins[i].id, lam if slope_p is None else lam * slope_p, w_in)
    if paired:
        lams = {k: jnp.concatenate([v, -v], axis=2) for k, v in lams.items()}
        bias = jnp.concatenate([bias, -bias], axis=2)
    lam_x = lams.get(x_id)
    if lam_x is None:
        lam_x = jnp.zeros((hs, ws, 2 * c) + wins.get(x_id, Window((1, 1), (0, 0), (1, 1))).size
                          + (_hwc(tape, x_id)[2],), dtype)
    return lam_x, bias


def concretise_local(lam_x, bias, w: Window, x, scale, lo, hi, eps, norm, boxed: bool = True):
    """Row-wise exact minimum of <Λ, x'> + bias over S(x) with rows on window patches: (Hs, Ws, R).
    ``boxed=False``: no box (closed dual-norm form, lo/hi unused)."""
    grid = lam_x.shape[:2]
    flat = lambda v: v.reshape(v.shape[:3] + (-1,))
    xp, sp = flat(extract(x, w, grid)), flat(extract(scale, w, grid))
    if not boxed:
        return min_linear(flat(lam_x), bias, xp, sp, None, None, eps, norm, boxed=False)
    lop = flat(extract(jnp.broadcast_to(lo, x.shape), w, grid))
    hip = flat(extract(jnp.broadcast_to(hi, x.shape), w, grid))
    return min_linear(flat(lam_x), bias, xp, sp, lop, hip, eps, norm)


def intermediate_bounds(tape, start_id: int, x_id: int, plan: Plan, opts, x, scale, lo, hi, eps, norm):
    """(lower, upper) of the value ``start_id`` by the patch-form backward pass (its shape)."""
    lam_x, bias = backward_local(tape, start_id, x_id, plan, opts)
    xc = [canon(tape, x_id, v) for v in (x, scale, lo, hi)]
    low = concretise_local(lam_x, bias, plan.windows[x_id], *xc, eps, norm, opts.boxed)
    c = low.shape[2] // 2
    return uncanon(tape, start_id, low[..., :c]), uncanon(tape, start_id, -low[..., c:])
