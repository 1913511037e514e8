"""Figures of the certification results (thesis Ch. 3): Fig 3.3 (2-D uniform vs non-uniform regions),
Fig 3.5 (bounding maps), Fig 3.6 (certified bound vs ε), Fig 3.9 (distribution of optimal certified
bounds), and the pairwise cosine similarity of bounding maps (Table 3.3). Each function writes one PNG
and returns its path; inputs are numpy or jax arrays.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence

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
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(e, e, ":", color="grey", lw=1, label="certified = ε")
    ax.plot(e, plain, "o-", ms=3, label="KW / Fast-Lin / CROWN")
    ax.plot(e, pec, "s-", ms=3, label="PEC")
    for curve, c in ((plain, "C0"), (pec, "C1")):
        i = int(np.argmax(curve))
        ax.plot([e[i]], [curve[i]], "*", ms=12, color=c)
    ax.set_xlabel(f"ε of the linear bounds ({norm})")
    ax.set_ylabel("certified radius")
    ax.set_title(title or "certified bound vs budget")
    ax.legend(frameon=False)
    return _save(fig, path)


def plot_bounding_maps(images, maps: Sequence, path, *, row_titles=None, col_titles=None):
    """Fig 3.5: images and per-feature certified radii ε⃗ (lighter = smaller bound)."""
    images = np.asarray(images, float)
    maps = [np.asarray(m, float) for m in maps]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got {images.shape}.")
    for m in maps:
        if m.shape != images.shape:
            raise ValueError(f"each bounding map set must have the images' shape {images.shape}, got {m.shape}.")
    n, cols = images.shape[0], 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for r in range(n):
        img = images[r]
        axes[r, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        for j, m in enumerate(maps):
            im = axes[r, j + 1].imshow(m[r].mean(-1), cmap="gray_r")  # reversed: light = small
            fig.colorbar(im, ax=axes[r, j + 1], fraction=0.046, pad=0.04)
        for a in axes[r]:
            a.set_xticks([]), a.set_yticks([])
        if row_titles is not None:
            axes[r, 0].set_ylabel(row_titles[r])
    if col_titles is not None:
        for j, t in enumerate(col_titles[:cols]):
            axes[0, j].set_title(t)
    return _save(fig, path)


def plot_radius_distribution(radii: Dict[str, np.ndarray], path, *, eps=None, xlabel="certified radius"):
    """Fig 3.9: histograms of optimal certified bounds and the certified-accuracy curve."""
    if not radii:
        raise ValueError("radii must map at least one name to an array of radii.")
    arrs = {k: np.asarray(v, float).reshape(-1) for k, v in radii.items()}
    top = max(float(np.max(v)) for v in arrs.values())
    bins = np.linspace(0, top if top > 0 else 1.0, 30)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for k, v in arrs.items():
        a1.hist(v, bins=bins, alpha=0.5, label=k)
        r = np.linspace(0, bins[-1], 200)
        a2.plot(r, [(v >= t).mean() for t in r], label=k)
    for a in (a1, a2):
        a.set_xlabel(xlabel)
        if eps is not None:
            a.axvline(eps, color="k", ls="--", lw=1)
    a1.set_ylabel("inputs")
    a2.set_ylabel("fraction certified at radius ≥ r")
    a1.legend(frameon=False)
    return _save(fig, path)


def decision_grid(logits_fn: Callable, box=(-1.0, 1.0), grid: int = 400):
    """Predicted labels of a 2-D classifier on a grid×grid lattice of the box: (xs, ys, labels)."""
    xs = np.linspace(box[0], box[1], grid, dtype=np.float32)
    X, Y = np.meshgrid(xs, xs)
    pts = np.stack([X.ravel(), Y.ravel()], 1)
    labels = np.concatenate([np.asarray(np.argmax(np.asarray(logits_fn(pts[i:i + 20000])), -1))
                             for i in range(0, len(pts), 20000)])
    return xs, xs, labels.reshape(grid, grid)


def _region_patch(center, radius, norm, **kw):
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
    """Fig 3.3: decision regions of a 2-D classifier with uniform (yellow) and non-uniform (blue)
    certified regions around each point."""
    pts = np.asarray(points, float)
    u = np.asarray(uniform_eps, float).reshape(-1)
    nu = np.asarray(nonuniform_eps, float)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got {pts.shape}.")
    if u.shape != (pts.shape[0],):
        raise ValueError(f"uniform_eps must have one radius per point ({pts.shape[0]},), got {u.shape}.")
    if nu.shape != pts.shape:
        raise ValueError(f"nonuniform_eps must be (N, 2) like points {pts.shape}, got {nu.shape}.")
    xs, ys, lab = decision_grid(logits_fn, box, grid)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(lab, origin="lower", extent=(box[0], box[1], box[0], box[1]), cmap="tab10", alpha=0.15,
              interpolation="nearest", vmin=0, vmax=9)
    ax.contour(xs, ys, lab, levels=np.arange(lab.max() + 1) - 0.5, colors="k", linewidths=0.8)
    for i, (p, r, rn) in enumerate(zip(pts, u, nu)):
        ax.add_patch(_region_patch(p, (r, r), norm, facecolor="gold", alpha=0.6, edgecolor="none"))
        ax.add_patch(_region_patch(p, rn, norm, facecolor="none", edgecolor="tab:blue", lw=1.2))
        if annotate:
            ax.annotate(str(i), p, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter(pts[:, 0], pts[:, 1], c=np.asarray(labels), cmap="tab10", s=10, vmin=0, vmax=9, zorder=3)
    ax.set_xlim(box), ax.set_ylim(box), ax.set_aspect("equal")
    ax.set_title("uniform (yellow) and non-uniform (blue) certified regions")
    return _save(fig, path)


def plot_cosine_similarity(eps_maps, path):
    """Histogram of pairwise cosine similarities of bounding maps (Table 3.3: mean and minimum)."""
    v = np.asarray(eps_maps, float).reshape(np.shape(eps_maps)[0], -1)
    if v.shape[0] < 2:
        raise ValueError("need at least two bounding maps for pairwise similarities.")
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    s = (u @ u.T)[np.triu_indices(v.shape[0], 1)]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.hist(s, bins=30)
    ax.axvline(s.mean(), color="k", ls="--", label=f"mean {s.mean():.4f}")
    ax.axvline(s.min(), color="r", ls=":", label=f"min {s.min():.4f}")
    ax.set_xlabel("cosine similarity of ε⃗ between inputs")
    ax.legend(frameon=False)
    return _save(fig, path)
