"""Figures of the certification results (thesis Ch. 3): Fig 3.3 (2-D uniform vs non-uniform regions),
Fig 3.5 (bounding maps), Fig 3.6 (certified bound vs ε), Fig 3.9 (distribution of optimal certified
bounds), and the pairwise cosine similarity of bounding maps (Table 3.3). Each function writes one PNG
and returns its path; inputs are numpy or jax arrays.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window (clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_certified_vs_eps(eps_values, pec_radius, plain_radius, path, *, title=None, norm="linf"):
    """Fig 3.6: certified bound of one input vs the budget ε used to linearise the network."""
    e, pec, plain = (np.asarray(a, float).reshape(-1) for a in (eps_values, pec_radius, plain_radius))
    if not (e.shape == pec.shape == plain.shape):
        raise ValueError(f"eps_values, pec_radius and plain_radius must have one value per ε, got "
                         f"{e.shape}, {pec.shape}, {plain.shape}.")
    if e.size == 0:
        raise ValueError("eps_values must hold at least one ε.")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(e, e, "--", color="grey", lw=1, label="certified = ε")
    for curve, c, mk, name in ((plain, "C0", "o-", "KW / Fast-Lin / CROWN"), (pec, "C1", "s-", "PEC")):
        i = int(np.argmax(curve))  # the optimal ε is the x of the peak
        ax.plot(e, curve, mk, ms=3, color=c, label=f"{name} (peak {curve[i]:.3g} at ε={e[i]:.3g})")
        ax.plot([e[i]], [curve[i]], "*", ms=13, color=c, markeredgecolor="k", markeredgewidth=0.5, zorder=4)
    ax.set_xlabel(f"ε of the linear bounds ({norm})")
    ax.set_ylabel("certified radius")
    ax.set_title(title or "certified bound vs budget")
    ax.legend(frameon=False)
    return _save(fig, path)


def _check_titles(titles, n, what):
    if titles is not None and len(titles) != n:
        raise ValueError(f"{what} must have {n} entries, got {len(titles)}.")


def plot_bounding_maps(images, maps: Sequence, path, *, row_titles=None, col_titles=None):
    """Fig 3.5: images (N, H, W, C) in the first column, then one column per bounding-map set
    (N, H, W, C) of per-feature certified radii ε⃗, grey with lighter = smaller bound (reversed
    colormap). Each column shares one colour scale and one colorbar; C=3 maps are averaged over
    channels. Images in [-1, 1] (the thesis's §3.2.2 convention) are shown rescaled to [0, 1].
    ``col_titles`` covers all 1 + len(maps) columns."""
    images = np.asarray(images, float)
    maps = [np.asarray(m, float) for m in maps]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got {images.shape}.")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image.")
    for m in maps:
        if m.shape != images.shape:
            raise ValueError(f"each bounding map set must have the images' shape {images.shape}, got {m.shape}.")
    n, cols = images.shape[0], 1 + len(maps)
    _check_titles(row_titles, n, "row_titles")
    _check_titles(col_titles, cols, "col_titles")
    if images.min() < 0:
        images = (images + 1) / 2
    images = np.clip(images, 0, 1)
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.2 * n), squeeze=False, layout="constrained")
    for r in range(n):
        img = images[r]
        axes[r, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    for j, m in enumerate(maps):
        mm = m.mean(-1)
        lo, hi = float(mm.min()), float(mm.max())
        hi = hi if hi > lo else lo + 1e-12
        for r in range(n):
            im = axes[r, j + 1].imshow(mm[r], cmap="gray_r", vmin=lo, vmax=hi)  # reversed: light = small
        fig.colorbar(im, ax=list(axes[:, j + 1]), shrink=0.9)
    for a in axes.ravel():
        a.set_xticks([]), a.set_yticks([])
    if row_titles is not None:
        for r, t in enumerate(row_titles):
            axes[r, 0].set_ylabel(str(t))
    if col_titles is not None:
        for j, t in enumerate(col_titles):
            axes[0, j].set_title(str(t))
    return _save(fig, path)


# Distinct looks per curve (Fig 3.9 compares curves that often coincide: Alg 3.5 and binary search
# find nearly the same radii): colour, line style and marker; the first curve is the widest and drawn
# lowest, each later one thinner, dashed and above it, so coinciding curves all stay visible.
_CURVE_STYLES = (dict(color="C1", ls="-", marker="o", lw=2.2), dict(color="C0", ls="--", marker="s", lw=1.4),
                 dict(color="C2", ls=":", marker="^", lw=1.4), dict(color="C4", ls="-.", marker="D", lw=1.4))
_HATCHES = ("", "//", "\\\\", "..")


def plot_radius_distribution(radii: Dict[str, np.ndarray], path, *, eps=None, xlabel="certified radius"):
    """Fig 3.9: histograms (shared bins) of the optimal certified bound per input on the left, and the
    certified-accuracy curve (fraction of inputs with radius >= r, vs r) on the right; a red
    vertical line at the target ``eps`` if given, with its own legend entry on both panels.

    Each method has its own colour, line style, marker and hatch; the first curve is the widest and
    lowest, later ones thinner and dashed above it, so curves that coincide (Alg 3.5 vs binary
    search) remain visible."""
    if not radii:
        raise ValueError("radii must map at least one name to an array of radii.")
    arrs = {k: np.asarray(v, float).reshape(-1) for k, v in radii.items()}
    for k, v in arrs.items():
        if v.size == 0:
            raise ValueError(f"radii[{k!r}] is empty.")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"radii[{k!r}] contains non-finite values.")
    top = max(float(np.max(v)) for v in arrs.values())
    if eps is not None:
        top = max(top, float(eps))
    top = top if top > 0 else 1.0
    bins = np.linspace(0, top, 31)
    r = np.linspace(0, top * 1.02, 300)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (k, v) in enumerate(arrs.items()):
        st = _CURVE_STYLES[i % len(_CURVE_STYLES)]
        z = 3 + i  # wide first curve below, thinner dashed ones over it
        a1.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=st["color"],
                hatch=_HATCHES[i % len(_HATCHES)], edgecolor=st["color"], lw=1.2, label=k, zorder=z)
        a2.plot(r, (v[None, :] >= r[:, None]).mean(1), color=st["color"], ls=st["ls"], lw=st["lw"],
                marker=st["marker"], markevery=(i * 7, 30), ms=5, label=k, zorder=z)
    for a in (a1, a2):
        a.set_xlabel(xlabel)
        if eps is not None:
            a.axvline(float(eps), color="r", ls="-", lw=1.2, label=f"target ε = {float(eps):.4g}", zorder=2)
    a1.set_ylabel("inputs")
    a2.set_ylabel("fraction certified at radius ≥ r")
    a2.set_ylim(0, 1.02)
    a1.legend(frameon=False)
    a2.legend(frameon=False)
    return _save(fig, path)


def decision_grid(logits_fn: Callable, box=(-1.0, 1.0), grid: int = 400, *, chunk: int = 20000):
    """Predicted labels of a 2-D classifier on a grid×grid lattice of the box.

    Returns (xs, ys, labels) with labels[i, j] = argmax logits_fn([xs[j], ys[i]]) (row = y, so
    ``imshow(labels, origin='lower')`` and ``contour(xs, ys, labels)`` draw it the right way up)."""
    lo, hi = float(box[0]), float(box[1])
    xs = np.linspace(lo, hi, int(grid), dtype=np.float32)
    ys = xs.copy()
    X, Y = np.meshgrid(xs, ys)
    pts = np.stack([X.ravel(), Y.ravel()], 1)
    out = []
    for i in range(0, len(pts), chunk):
        z = np.asarray(logits_fn(pts[i:i + chunk]))
        if z.ndim != 2 or z.shape[0] != len(pts[i:i + chunk]):
            raise ValueError(f"logits_fn must map (N, 2) points to (N, K) logits, got {z.shape} for "
                             f"{len(pts[i:i + chunk])} points.")
        out.append(np.argmax(z, -1))
    return xs, ys, np.concatenate(out).reshape(len(ys), len(xs))


def _region_patch(center, radius, norm, **kw):
    """The l_p region {x + δ : ||δ / ε⃗||_p <= 1}: rectangle (linf), ellipse (l2), diamond (l1)."""
    from matplotlib.patches import Ellipse, Polygon, Rectangle
    cx, cy = center
    rx, ry = radius
    if norm == "linf":
        return Rectangle((cx - rx, cy - ry), 2 * rx, 2 * ry, **kw)
    if norm == "l2":
        return Ellipse((cx, cy), 2 * rx, 2 * ry, **kw)
    return Polygon([(cx - rx, cy), (cx, cy + ry), (cx + rx, cy), (cx, cy - ry)], closed=True, **kw)


def plot_synthetic_regions(logits_fn, points, labels, uniform_eps, nonuniform_eps, path, *,
                           box=(-1.0, 1.0), grid=400, norm="linf", annotate=True):
    """Fig 3.3: decision regions of a 2-D classifier (``logits_fn``: (N, 2) -> (N, K)) on a grid of
    ``box`` (boundaries in black, regions lightly coloured), the points (N, 2) coloured by label, and
    around each its uniform certified region (radius (N,), yellow) and non-uniform one (per-feature
    radii (N, 2), blue): rectangles for linf, ellipses for l2, diamonds for l1."""
    from jaxrobust.threat import canonical_norm
    norm = canonical_norm(norm)
    pts = np.asarray(points, float)
    lbl = np.asarray(labels).reshape(-1)
    u = np.asarray(uniform_eps, float)
    nu = np.asarray(nonuniform_eps, float)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got {pts.shape}.")
    n = pts.shape[0]
    if lbl.shape != (n,):
        raise ValueError(f"labels must have one label per point ({n},), got {np.shape(labels)}.")
    if u.ndim == 2 and u.shape[1] == 1:
        u = u[:, 0]
    if u.shape != (n,):
        raise ValueError(f"uniform_eps must have one radius per point ({n},), got {u.shape}.")
    if nu.shape != pts.shape:
        raise ValueError(f"nonuniform_eps must be (N, 2) like points {pts.shape}, got {nu.shape}.")
    if np.any(u < 0) or np.any(nu < 0):
        raise ValueError("certified radii must be non-negative.")
    box = tuple(float(v) for v in box)
    if len(box) != 2 or not box[0] < box[1]:
        raise ValueError(f"box must be (low, high) with low < high, got {box}.")
    if int(grid) < 2:
        raise ValueError(f"grid must be >= 2, got {grid}.")
    xs, ys, lab = decision_grid(logits_fn, box, int(grid))
    k = int(max(lab.max(), lbl.max() if n else 0)) + 1
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    vmax = 9 if k <= 10 else 19
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(lab, origin="lower", extent=(box[0], box[1], box[0], box[1]), cmap=cmap, alpha=0.15,
              interpolation="nearest", vmin=0, vmax=vmax)
    for c in np.unique(lab):  # the boundary of each region: one line whatever the label values
        if 0 < (lab == c).mean() < 1:
            ax.contour(xs, ys, (lab == c).astype(float), levels=[0.5], colors="k", linewidths=0.9)
    for i, (p, r, rn) in enumerate(zip(pts, u, nu)):
        ax.add_patch(_region_patch(p, rn, norm, facecolor="tab:blue", alpha=0.3, edgecolor="none", zorder=2))
        ax.add_patch(_region_patch(p, (r, r), norm, facecolor="gold", alpha=0.65, edgecolor="none", zorder=2.5))
        ax.add_patch(_region_patch(p, rn, norm, facecolor="none", edgecolor="tab:blue", lw=0.9, zorder=2.7))
        if annotate:
            ax.annotate(str(i), p, fontsize=7, xytext=(3, 3), textcoords="offset points", zorder=4)
    ax.scatter(pts[:, 0], pts[:, 1], c=lbl, cmap=cmap, s=12, vmin=0, vmax=vmax, edgecolors="k",
               linewidths=0.3, zorder=3)
    ax.set_xlim(box), ax.set_ylim(box), ax.set_aspect("equal")
    ax.set_title(f"{norm}: uniform (yellow) and non-uniform (blue) certified regions")
    return _save(fig, path)


def plot_cosine_similarity(eps_maps, path):
    """Histogram of pairwise cosine similarities of bounding maps (Table 3.3: mean and minimum)."""
    v = np.asarray(eps_maps, float)
    if v.ndim < 2 or v.shape[0] < 2:
        raise ValueError(f"eps_maps must be (N, *features) with N >= 2 for pairwise similarities, got {v.shape}.")
    v = v.reshape(v.shape[0], -1)
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    s = (u @ u.T)[np.triu_indices(v.shape[0], 1)]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.hist(s, bins=30, color="tab:blue", alpha=0.8)
    ax.axvline(s.mean(), color="k", ls="--", label=f"mean {s.mean():.4f}")
    ax.axvline(s.min(), color="r", ls=":", label=f"min {s.min():.4f}")
    ax.set_xlabel("cosine similarity of ε⃗ between inputs")
    ax.set_ylabel("pairs")
    ax.set_title(f"{v.shape[0]} bounding maps, {s.size} pairs")
    ax.legend(frameon=False)
    return _save(fig, path)
