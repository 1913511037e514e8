"""AutoLip (thesis Table 4.5, Scaman & Virmaux 2018) on the small CNN of Wong & Kolter (28x28x1
inputs): our per-segment power iteration (jax.linearize + jax.linear_transpose, one jitted loop per
segment) against the reference algorithm in PyTorch (the lipEstimation code's generic power method:
the adjoint of each layer through autograd) on the same weights, measured in the same run.

    python -m bench.lipschitz [--iters 200] [--repeats 3]

Writes bench/results/lipschitz.json: seconds per AutoLip evaluation (all layers, ``iters`` power
iterations each) for both, their ratio, and the two bounds (they must agree: same algorithm).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from bench.common import time_fn, write_results
from jaxrobust.analysis import lipschitz as L
from jaxrobust.models import create_model, init_variables


def torch_autolip(variables, iters: int, seed: int = 0) -> float:
    """The reference: power iteration on each layer of the equivalent torch net, the adjoint by
    autograd (``torch.autograd.grad(<f(v), u>, v)``), as lipEstimation's ``generic_power_method``."""
    import torch
    torch.manual_seed(seed)
    p = variables["params"]
    std = 0.353

    def conv(name, stride):
        k = torch.tensor(np.asarray(p[name]["kernel"])).permute(3, 2, 0, 1).contiguous()  # OIHW
        return lambda x: torch.nn.functional.conv2d(x, k, stride=stride, padding=1)

    def dense(name, nchw_shape=None):
        w = torch.tensor(np.asarray(p[name]["kernel"]))
        if nchw_shape is None:
            return lambda x: x @ w
        c, h, wd = nchw_shape  # flax flattens NHWC
        return lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) @ w

    layers = [((1, 1, 28, 28), lambda x: conv("Conv_0", 2)(x / std)),
              ((1, 16, 14, 14), conv("Conv_1", 2)),
              ((1, 32, 7, 7), dense("Dense_0", (32, 7, 7))),
              ((1, 100), dense("Dense_1"))]
    bound = 1.0
    for shape, f in layers:
        v = torch.randn(shape)
        for _ in range(iters):
            v = v / v.norm()
            v.requires_grad_(True)
            u = f(v)
            (g,) = torch.autograd.grad(u, v, grad_outputs=u.detach())  # Jᵀ J v
            v = g.detach()
        v = v / v.norm()
        with torch.no_grad():
            bound *= float(f(v).norm())
    return bound


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = create_model("cnn_small", 10, mean=(0.0,), std=(0.353,))
    variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    segs = L.extract_segments(model, variables, (28, 28, 1))
    fns = [L.segment_norm_fn(model, s, (28, 28, 1), args.iters) for s in segs]

    def ours():
        return float(np.prod([float(f(variables, jax.random.PRNGKey(i))) for i, f in enumerate(fns)]))

    t0 = time.perf_counter()
    b_ours = ours()  # includes compilation
    first = time.perf_counter() - t0
    t_ours = time_fn(ours, warmup=1, iters=args.repeats)
    b_ref = torch_autolip(variables, args.iters)
    t_ref = time_fn(lambda: torch_autolip(variables, args.iters), warmup=0, iters=args.repeats)
    write_results("lipschitz", {
        "what": f"AutoLip of cnn_small (28x28x1), {args.iters} power iterations per layer",
        "jax_seconds": t_ours, "jax_first_call_seconds": first, "torch_seconds": t_ref,
        "speedup_vs_torch": t_ref / t_ours, "bound_jax": b_ours, "bound_torch": b_ref,
        "relative_difference": abs(b_ours - b_ref) / b_ref})


if __name__ == "__main__":
    main()
