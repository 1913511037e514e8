"""Figures of the landscape analyses (thesis §4.2.3): Hessian spectra (Fig 4.5), spectral densities,
1-D / 2-D loss landscapes (Fig 4.6), perturbation and gradient similarities (Figs 4.3, 4.4, 4.7) and
mode connectivity (Fig 4.8). Each function writes one PNG and returns its path; inputs are numpy
arrays or lists."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from jaxrobust.plots import _save, plt


def _as_curves(curves: Dict[str, Sequence[float]]):
    out = {k: np.asarray(v, float).reshape(-1) for k, v in curves.items()}
    if not out:
        raise ValueError("nothing to plot: no curves given.")
    return out


def plot_spectra(spectra: Dict[str, Sequence[float]], path: str, *, normalized=None,
                 title: str = "top Hessian eigenvalues", ylabel: str = "eigenvalue"):
    """Fig 4.5: the top-k eigenvalues of each run / method, by rank. With ``normalized`` (same keys),
    the normalised values are drawn solid on the left axis and the original ones dashed on the
    right axis, as in the thesis."""
    spectra = _as_curves(spectra)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax2 = ax.twinx() if normalized is not None else None
    for i, (label, vals) in enumerate(spectra.items()):
        rank = np.arange(1, len(vals) + 1)
        color = f"C{i % 10}"
        if normalized is not None:
            ax.plot(rank, np.asarray(normalized[label], float), "o-", ms=3, color=color, label=label)
            ax2.plot(rank, vals, "--", color=color, alpha=0.7)
        else:
            ax.plot(rank, vals, "o-", ms=3, color=color, label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("normalised eigenvalue (solid)" if normalized is not None else ylabel)
    if ax2 is not None:
        ax2.set_ylabel(f"{ylabel} (dashed)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_density(grid, density, path: str, *, title: str = "Hessian spectral density (SLQ)",
                 top: Optional[Sequence[float]] = None):
    """The smoothed spectral density on a log scale (as Ghorbani et al.), top eigenvalues marked."""
    grid, density = np.asarray(grid, float), np.asarray(density, float)
    if grid.shape != density.shape or grid.ndim != 1:
        raise ValueError(f"grid and density must be 1-d of one shape, got {grid.shape}, {density.shape}.")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.semilogy(grid, np.maximum(density, 1e-12), color="C0")
    for v in (top or ()):
        ax.axvline(v, color="C3", lw=0.6, alpha=0.5)
    ax.set_ylim(bottom=max(1e-8, float(np.max(density)) * 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    return _save(fig, path)


def plot_landscape_1d(alphas, curves: Dict[str, Sequence[float]], path: str, *,
                      title: str = "loss landscape", xlabel: str = "a", ylabel: str = "loss",
                      secondary: Optional[Dict[str, Sequence[float]]] = None, secondary_label="accuracy"):
    """1-D landscape: loss curves along a direction (solid); ``secondary`` curves (accuracy) dotted
    on a right axis."""
    a = np.asarray(alphas, float)
    curves = _as_curves(curves)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (label, v) in enumerate(curves.items()):
        ax.plot(a, v, "-", color=f"C{i % 10}", label=label)
    if secondary:
        ax2 = ax.twinx()
        for i, (label, v) in enumerate(_as_curves(secondary).items()):
            ax2.plot(a, v, ":", color=f"C{i % 10}", label=label)
        ax2.set_ylabel(f"{secondary_label} (dotted)")
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_landscape_2d(a, b, surfaces: Dict[str, np.ndarray], path: str, *,
                      title: str = "loss landscape", xlabel="a", ylabel="b", log: bool = False):
    """Fig 4.6: one 3-D surface and one contour plot per surface (rows: surfaces), Z of shape
    (len(a), len(b)) with Z[i, j] = L(θ + a_i d1 + b_j d2)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    surfaces = {k: np.asarray(v, float) for k, v in surfaces.items()}
    if not surfaces:
        raise ValueError("nothing to plot: no surfaces given.")
    for k, z in surfaces.items():
        if z.shape != (a.size, b.size):
            raise ValueError(f"surface {k!r} must be ({a.size}, {b.size}), got {z.shape}.")
    A, B = np.meshgrid(a, b, indexing="ij")
    n = len(surfaces)
    fig = plt.figure(figsize=(10, 4.2 * n))
    for r, (label, z) in enumerate(surfaces.items()):
        zz = np.log(np.maximum(z, 1e-12)) if log else z
        ax = fig.add_subplot(n, 2, 2 * r + 1, projection="3d")
        ax.plot_surface(A, B, zz, cmap="viridis", linewidth=0, antialiased=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {label}")
        ax2 = fig.add_subplot(n, 2, 2 * r + 2)
        cs = ax2.contour(A, B, zz, levels=20, cmap="viridis")
        ax2.clabel(cs, fontsize=6)
        ax2.plot([0], [0], "r*")
        ax2.set_xlabel(xlabel)
        ax2.set_ylabel(ylabel)
        ax2.set_title(f"contours{' (log)' if log else ''}: {label}")
    return _save(fig, path)


def plot_connectivity(t, curves: Dict[str, Sequence[float]], path: str, *,
                      errors: Optional[Dict[str, Sequence[float]]] = None,
                      title: str = "loss along the path between two minima"):
    """Fig 4.8: training loss (left) and test error (right) along t ∈ [0, 1] of each path."""
    t = np.asarray(t, float)
    curves = _as_curves(curves)
    cols = 2 if errors else 1
    fig, axes = plt.subplots(1, cols, figsize=(5.2 * cols, 3.8), squeeze=False)
    for i, (label, v) in enumerate(curves.items()):
        axes[0, 0].plot(t, v, "o-" if len(t) < 30 else "-", ms=3, color=f"C{i % 10}", label=label)
    axes[0, 0].set_xlabel("t")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].set_title(title)
    axes[0, 0].legend(frameon=False, fontsize=8)
    if errors:
        for i, (label, v) in enumerate(_as_curves(errors).items()):
            axes[0, 1].plot(t, np.asarray(v) * 100, "o-" if len(t) < 30 else "-", ms=3,
                            color=f"C{i % 10}", label=label)
        axes[0, 1].set_xlabel("t")
        axes[0, 1].set_ylabel("error (%)")
        axes[0, 1].set_title("error along the path")
        axes[0, 1].legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_matrix(matrix, path: str, *, labels: Optional[Sequence[str]] = None,
                title: str = "cosine similarity", vmin: float = -1.0, vmax: float = 1.0):
    """A square similarity matrix as a heat map (values written in the cells when small)."""
    m = np.asarray(matrix, float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square, got {m.shape}.")
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * m.shape[0] + 2, 0.45 * m.shape[0] + 2))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="coolwarm")
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if m.shape[0] <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    return _save(fig, path)


def plot_series(x, series: Dict[str, Sequence[float]], path: str, *, xlabel="step", ylabel="value",
                title="", logy: bool = False):
    """Curves over a shared x (e.g. the gradient norm over training, Figs 4.3-4.4)."""
    x = np.asarray(x, float)
    series = _as_curves(series)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (label, v) in enumerate(series.items()):
        ax.plot(x[:len(v)], v, "-", color=f"C{i % 10}", label=label, lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)
