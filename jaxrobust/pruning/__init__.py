"""Robust binary sub-networks (thesis §5.1): edge-popup score masks, adaptive per-layer allocation,
binary initialisation with the last BatchNorm, and the compact export of the pruned network.

- :mod:`~jaxrobust.pruning.allocation`: keep counts per layer, fixed rate and eq. 5.11 (γ).
- :mod:`~jaxrobust.pruning.masks`: top-k masks with the straight-through gradient (eqs. 5.1–5.2).
- :mod:`~jaxrobust.pruning.subnet`: :class:`SubNet`, any zoo model with score-masked kernels
  (``create_model('subnet', base='cifar_resnet34', ...)``; config: ``configs.common.subnet_model``).
- :mod:`~jaxrobust.pruning.export`: the bit-packed artifact, its loader and Table 5.1's FLOPs.

Training uses the library's objectives unchanged (``pgd_at``, ``atta``, ``trades``...): the weights
are the optimizer group ``frozen``, only the scores (and the BatchNorm statistics) change.
"""
from jaxrobust.pruning.allocation import adaptive_shares, allocate_keep_counts, keep_fractions
from jaxrobust.pruning.export import (Artifact, dense_fp32_bytes, export_run, export_subnet,
                                      load_artifact, load_export_run, table5_1_flops)
from jaxrobust.pruning.masks import hard_mask, masked_kernel, topk_mask
from jaxrobust.pruning.subnet import (SubNet, create_subnet, effective_params, layer_table,
                                      masks_of, prunable_layers)

__all__ = ["allocate_keep_counts", "adaptive_shares", "keep_fractions", "topk_mask", "masked_kernel",
           "hard_mask", "SubNet", "create_subnet", "effective_params", "layer_table", "masks_of",
           "prunable_layers", "export_subnet", "load_artifact", "Artifact", "table5_1_flops",
           "dense_fp32_bytes", "export_run", "load_export_run"]
