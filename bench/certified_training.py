"""Benchmark: one certified-training step (bounds, loss, backward, Adam) of ``ibp``, ``crown_ibp``,
``kw`` and ``lper`` (thesis §3.3.4, Table 3.4's methods) -- ours (the library's jitted update step with
the registered objective) vs auto_LiRPA (``BoundedModule`` + ``compute_bounds`` with the same method,
the same loss in torch, ``loss.backward()``, ``torch.optim.Adam.step()``) on the SAME weights and the
SAME batch, in one run; plus each method's cost relative to one PGD-10 adversarial-training step
(``at``) of ours.

    python -m bench.certified_training [--quick] [--nets=fc1,cnn_small] [--shapes=mnist,cifar]

auto_LiRPA comes from a source checkout in third_party/auto_LiRPA (see bench/bounds.py's docstring).

Nets: FC1 (784-1024-10; CIFAR shape: 3072-1024-10) and the thesis CNN (``cnn_small``: conv16 4x4/2,
conv32 4x4/2, fc100, fc10), at MNIST (28x28x1) and CIFAR (32x32x3) shapes, batch 100, l_inf, ε = 0.1
(MNIST) / 2/255 (CIFAR), random inputs in [0, 1], freshly initialised weights (identity input
normalisation, so both libraries bound the same function), Adam lr 1e-3.

Per method, at a point of training where every term is active (ε > 0, κ = 0.5, β = 0.5):
  * ibp:        κ CE(z(x)) + (1-κ) CE(-m_IBP)                 auto_LiRPA method 'IBP'
  * crown_ibp:  κ CE(z(x)) + (1-κ) CE(-(β m_CROWN-IBP + (1-β) m_IBP))   'IBP' and 'CROWN-IBP'
  * kw:         CE(-m_Fast-Lin)                                 'CROWN', same-slope ReLU relaxation,
                                                               CROWN ∩ IBP intermediate bounds
  * lper:       CE(z(x)) + PER (eq 3.20, α = 0.15, β = 0.1, C = 4) from the Fast-Lin envelope (U, p):
                auto_LiRPA 'CROWN' (same options as kw) with ``return_A`` for the input's lA, lbias
m = the margin lower bounds z_y - z_i with the last layer elided (auto_LiRPA: the C matrix of
margins). ``loss_rel_diff`` = |ours - auto_LiRPA| / |auto_LiRPA| of the first step's loss (same
weights, same batch): the two implementations compute the same thing.

Timing: median seconds of warm steps (ours: the jitted, donated update; auto_LiRPA: BoundedModule
built once, 2 torch threads); ``speedup`` = auto_LiRPA seconds / ours (> 1: ours faster);
``cost_vs_at`` = ours seconds / our PGD-10 AT step. Writes bench/results/certified_training.json.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bench.bounds import import_auto_lirpa, torch_port
from bench.common import time_fn, write_results
from configs import table3_6
from configs.common import with_defaults
from jaxrobust import models as jmodels
from jaxrobust.threat import ThreatModel
from jaxrobust.train import certified  # noqa: F401  (registers the objectives)
from jaxrobust.train import objectives as jobj
from jaxrobust.train.loop import create_train_state, make_mesh, make_update_fn
from jaxrobust.train.optim import make_optimizer

METHODS = ("ibp", "crown_ibp", "kw", "lper")
SHAPES = {"mnist": ((28, 28, 1), 0.1), "cifar": ((32, 32, 3), 2.0 / 255)}
KAPPA, BETA = 0.5, 0.5
ALPHA, PER_BETA, PER_C = 0.15, 0.1, 4


def batch_of(shape, n=100, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (n,) + shape).astype(np.float32), rng.integers(0, 10, n).astype(np.int32))


# ----------------------------------------------------------------------------- ours
def our_step(net, method, shape, eps, x, y, iters):
    """(seconds per warm step, first step's loss, initial variables) of our update for ``method``."""
    c = with_defaults(table3_6.get_config(f"mnist5k_fc1_{'at' if method == 'at' else method}"))
    c.objective.certified.per_alpha, c.objective.certified.per_beta = ALPHA, PER_BETA
    c.objective.certified.per_c, c.objective.certified.subsample = PER_C, 0
    c.objective.attack.steps, c.objective.attack.step_size = 10, eps / 4
    c.optimizer.name, c.optimizer.lr = "adam", 1e-3
    c.schedule.name = "constant"
    model = jmodels.create_model(net, 10)
    tx, lr = make_optimizer(c.optimizer, c.schedule, 1000, 100)
    objective = jobj.get_objective(c.objective.name)
    scheds = {"eps": lambda s: jnp.float32(eps), "kappa": lambda s: jnp.float32(KAPPA),
              "crown_beta": lambda s: jnp.float32(BETA)}
    ctx = jobj.ObjectiveContext(model, ThreatModel("linf", eps, box=(0.0, 1.0)), scheds, c.objective,
                                10, len(x), 1)
    state = create_train_state(model, shape, tx, objective, ctx, seed=0, n_train=len(x))
    variables = {"params": jax.tree.map(np.asarray, state.params)}
    mesh = make_mesh()
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    update = jax.jit(make_update_fn(ctx, objective, lr, "none"), in_shardings=(rep, dat),
                     out_shardings=(rep, rep), donate_argnums=(0,))
    b = {"image": jnp.asarray(x), "label": jnp.asarray(y), "index": jnp.arange(len(x), dtype=jnp.int32),
         "mask": jnp.ones(len(x), bool)}
    holder = [jax.device_put(state, rep)]
    holder[0], m = update(holder[0], b)
    first_loss = float(m["loss"])

    def step():
        holder[0], met = update(holder[0], b)
        return met["loss"]

    return time_fn(step, warmup=1, iters=iters, sync=lambda o: o.block_until_ready()), first_loss, variables


# ----------------------------------------------------------------------------- auto_LiRPA
def lirpa_step(net, method, shape, eps, x, y, variables, iters):
    """(seconds per warm step, first step's loss) of the same step with auto_LiRPA and torch."""
    import torch
    import torch.nn.functional as F
    auto_lirpa = import_auto_lirpa()
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    torch.set_num_threads(2)
    model = torch_port(net, variables, shape)
    xt = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.tensor(y, dtype=torch.long)
    opts = {"relu": "same-slope"} if method in ("kw", "lper") else {}
    bound_opts = {"compare_crown_with_ibp": True, "activation_bound_option": "same-slope"} \
        if method in ("kw", "lper") else {}
    del opts
    lirpa = BoundedModule(model, torch.zeros((1,) + tuple(xt.shape[1:])), bound_opts=bound_opts,
                          device="cpu", verbose=0)
    opt = torch.optim.Adam(lirpa.parameters(), lr=1e-3)
    K = 10
    eye = torch.eye(K)
    C = (eye[yt].unsqueeze(1) - eye.unsqueeze(0))  # (B, K, K): e_y - e_i
    keep = ~torch.eye(K, dtype=torch.bool)[yt]  # drop row i = y
    C = C[keep].view(len(yt), K - 1, K)
    ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=(xt - eps).clamp(0, 1), x_U=(xt + eps).clamp(0, 1))
    bx = BoundedTensor(xt, ptb)
    needed = defaultdict(set)
    needed[lirpa.output_name[0]].add(lirpa.input_name[0])
    zeros = torch.zeros(len(yt), 1)
    target0 = torch.zeros(len(yt), dtype=torch.long)

    def robust_ce(lb):  # CE of the worst-case logits (0 for y, -lb for the others)
        return F.cross_entropy(torch.cat([zeros, -lb], dim=1), target0)

    def step():
        opt.zero_grad()
        logits = lirpa(bx)
        clean = F.cross_entropy(logits, yt)
        if method == "ibp":
            lb, _ = lirpa.compute_bounds(x=(bx,), C=C, method="IBP", bound_upper=False)
            loss = KAPPA * clean + (1 - KAPPA) * robust_ce(lb)
        elif method == "crown_ibp":
            ilb, _ = lirpa.compute_bounds(x=(bx,), C=C, method="IBP", bound_upper=False)
            clb, _ = lirpa.compute_bounds(x=(bx,), C=C, method="CROWN-IBP", bound_upper=False)
            loss = KAPPA * clean + (1 - KAPPA) * robust_ce(BETA * clb + (1 - BETA) * ilb)
        elif method == "kw":
            lb, _ = lirpa.compute_bounds(x=(bx,), C=C, method="CROWN", bound_upper=False)
            loss = robust_ce(lb)
        else:  # lper: PER from the envelope (lA, lbias) at x
            lb, _, A = lirpa.compute_bounds(x=(bx,), C=C, method="CROWN", bound_upper=False,
                                            return_A=True, needed_A_dict=needed)
            a = A[lirpa.output_name[0]][lirpa.input_name[0]]
            lA, lbias = a["lA"].flatten(2), a["lbias"]
            d = (torch.einsum("bkd,bd->bk", lA, xt.flatten(1)) + lbias) / lA.abs().sum(-1).clamp(min=1e-12)
            smallest = torch.topk(d, PER_C, dim=1, largest=False).values
            per = PER_BETA * torch.where(smallest < ALPHA, 1 - smallest / ALPHA, torch.zeros_like(smallest)).sum(1)
            loss = clean + per.mean()
        loss.backward()
        opt.step()
        return float(loss)

    first = step()
    return time_fn(step, warmup=0, iters=iters), first


# ----------------------------------------------------------------------------- main
def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nets", default="fc1,cnn_small")
    ap.add_argument("--shapes", default="mnist,cifar")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv[1:])
    iters = 2 if args.quick else 5
    results = {}
    for shape_name in args.shapes.split(","):
        shape, eps = SHAPES[shape_name]
        x, y = batch_of(shape)
        for net in args.nets.split(","):
            key = f"{net}_{shape_name}"
            t_at, _, _ = our_step(net, "at", shape, eps, x, y, iters)
            results[key] = {"at_seconds": t_at, "eps": eps, "batch": len(x)}
            for method in args.methods.split(","):
                slow = net != "fc1" and method in ("kw", "lper")
                n = 1 if slow else iters
                t_ours, loss_ours, variables = our_step(net, method, shape, eps, x, y, n)
                t_al, loss_al = lirpa_step(net, method, shape, eps, x, y, variables, n)
                r = {"ours_steps_per_sec": 1 / t_ours, "auto_lirpa_steps_per_sec": 1 / t_al,
                     "speedup": t_al / t_ours, "cost_vs_at": t_ours / t_at,
                     "loss_ours": loss_ours, "loss_auto_lirpa": loss_al,
                     "loss_rel_diff": abs(loss_ours - loss_al) / max(abs(loss_al), 1e-12),
                     "timed_steps": n}
                results[key][method] = r
                print(key, method, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                      flush=True)
    ratios = [r[m]["speedup"] for r in results.values() for m in METHODS if m in r]
    write_results("certified_training", {
        "benchmark": "one certified-training step (bounds, loss, backward, Adam): ours vs auto_LiRPA",
        "geomean_speedup": float(math.exp(np.mean(np.log(ratios)))) if ratios else None,
        "results": results})


if __name__ == "__main__":
    main(sys.argv)
