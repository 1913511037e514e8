"""Figures of robust sub-networks (thesis §5.1): kept fraction per layer (eq. 5.11's allocation), the
pattern of a pruned convolution's mask (§5.1.4, "Analysis of the Subnetwork Pattern") and robust
accuracy against the keep rate for each γ (Table 5.2 as a figure).

    python -m jaxrobust.pruning.plots D/table5_2_mnist5k_cnn.json   # -> D/plots/accuracy_vs_keep.png

Each function writes one PNG (matplotlib, Agg) and returns its path.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Dict, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_keep(layers: Sequence[Dict], path: str, *, title: str = ""):
    """Bars of m_i / n_i per prunable layer (``layers``: dicts with layer, size, kept)."""
    if not layers:
        raise ValueError("plot_layer_keep: no layers.")
    frac = [l["kept"] / l["size"] for l in layers]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(layers)), 3.5))
    ax.bar(range(len(layers)), frac, color="C0")
    ax.set_yscale("log")
    ax.set_ylim(min(frac) / 2, 1.5)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([l["layer"].replace("/kernel", "") for l in layers], rotation=90, fontsize=7)
    ax.set_ylabel("kept fraction m_i / n_i")
    total = sum(l["kept"] for l in layers) / sum(l["size"] for l in layers)
    ax.axhline(total, ls="--", color="grey", lw=1, label=f"overall {total:.3g}")
    ax.legend(fontsize=8)
    ax.set_title(title or "weights kept per layer (eq. 5.11)")
    return _save(fig, path)


def plot_kernel_mask(mask: np.ndarray, path: str, *, title: str = ""):
    """A conv mask (kh, kw, c_in, c_out) as a c_in x c_out image of kept entries per kernel (a dense
    mask (d_in, d_out) directly)."""
    m = np.asarray(mask, bool)
    img = m.reshape(-1, m.shape[-2], m.shape[-1]).sum(0) if m.ndim == 4 else m.astype(int)
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(img.T, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="kept weights per kernel" if m.ndim == 4 else "kept")
    ax.set_xlabel("input channel")
    ax.set_ylabel("output channel")
    ax.set_title(title or f"mask {tuple(m.shape)}: {int(m.sum())} kept")
    return _save(fig, path)


def _parse_row(name: str):
    m = re.fullmatch(r"r(\d+)_g(\d+)", name)
    if not m:
        return None
    as_float = lambda s: float(s[0] + "." + s[1:]) if len(s) > 1 else float(s)
    return as_float(m.group(1)), as_float(m.group(2))


def plot_accuracy_vs_keep(table: Dict, path: str, *, column: str = "PGD-20 (%)"):
    """Table 5.2 as a figure: ``column`` of the r x γ grid rows (``r099_g01``...) against the keep rate
    1 - r (log scale), one line per γ, dense AT as a horizontal line."""
    curves: Dict[float, list] = {}
    for name, row in table["rows"].items():
        rg = _parse_row(name)
        v = row["columns"].get(column, {}).get("mean")
        if rg is not None and v is not None:
            curves.setdefault(rg[1], []).append((1.0 - rg[0], v))
    if not curves:
        raise ValueError(f"plot_accuracy_vs_keep: no grid rows with {column!r} in the table.")
    fig, ax = plt.subplots(figsize=(5, 4))
    for g in sorted(curves):
        pts = sorted(curves[g])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"γ = {g:g}")
    dense = table["rows"].get("dense", {}).get("columns", {}).get(column, {}).get("mean")
    if dense is not None:
        ax.axhline(dense, ls="--", color="grey", label="dense AT")
    ax.set_xscale("log")
    ax.set_xlabel("kept fraction 1 - r")
    ax.set_ylabel(column)
    ax.legend(fontsize=8)
    ax.set_title(table.get("title", ""), fontsize=9)
    return _save(fig, path)


def main(argv):
    if len(argv) != 1:
        raise SystemExit("usage: python -m jaxrobust.pruning.plots D/<table>.json")
    with open(argv[0]) as f:
        table = json.load(f)
    out = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "plots")
    paths = [plot_accuracy_vs_keep(table, os.path.join(out, "accuracy_vs_keep.png"))]
    try:
        paths.append(plot_accuracy_vs_keep(table, os.path.join(out, "aa_vs_keep.png"), column="AA (%)"))
    except ValueError:  # no AutoAttack numbers on the grid rows
        pass
    print("\n".join(paths))


if __name__ == "__main__":
    main(sys.argv[1:])
