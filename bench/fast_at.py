"""Benchmark: the training-step cost of every fast adversarial-training method (thesis §5.2, Table
5.11) relative to FGSM-RS and to PGD-10 AT on the same net, measured in the same run, and the memory
of the ATTA/ATAS perturbation cache per device at CIFAR and ImageNet sizes.

    python -m bench.fast_at [--quick] [--no-torch]

Each method runs through the training loop's own jitted, donated update (``make_update_fn``: the
crop/flip augmentation, the objective, the optimizer; Free's m replays inside the step) on a
ResNet-18 of width w = 4 (16-128 channels) at CIFAR shape (32x32x3), batch 64, l_inf ε = 8/255,
with a per-instance cache of the full CIFAR-10 training set (50,000 rows), as in a real run.
Reported per method: seconds per step (one batch), the ratio to FGSM-RS and to PGD-10, and the
ratio of a whole Table 5.11 protocol (per-step time x the protocol's number of steps: 30 epochs,
FreeAT 10 epochs of m = 8 replays, YOPO-5-3 12 epochs) beside the thesis's training-time ratio
(Table 5.11a, ResNet-18, one GPU). The external reference is a PyTorch FGSM-RS step of the same net
(CPU torch, same threads), when torch is installed. Writes bench/results/fast_at.json.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bench.common import time_fn, write_results
from configs import table5_11
from configs.common import with_defaults
from jaxrobust import models as jmodels
from jaxrobust.threat import ThreatModel
from jaxrobust.train import fast_at, objectives as jobj
from jaxrobust.train.loop import build_schedules, make_mesh, make_update_fn, state_shardings
from jaxrobust.train.optim import make_optimizer
from jaxrobust.train.state import TrainState

METHODS = ("pgd10", "fgsm_rs", "atta", "atas", "nfgsm", "fgsm_ga", "free", "yopo")
EPS = 8 / 255
SHAPE = (32, 32, 3)
WIDTH = 4
N_TRAIN = 50_000
# Table 5.11a (CIFAR-10, ResNet-18): training hours on one GPU
THESIS_HOURS = {"pgd10": 1.23, "free": 0.33, "yopo": 0.28, "fgsm_rs": 0.22, "fgsm_ga": 0.57,
                "atta": 0.30, "atas": 0.30}
# forward+backward passes per batch of each method (the papers' cost model; FGSM-GA's double
# back-propagation counted as ~2 more passes)
PASSES = {"pgd10": 11, "fgsm_rs": 2, "atta": 2, "atas": 2, "nfgsm": 2, "fgsm_ga": 4, "free": 8,
          "yopo": 5}


def method_config(method: str, batch: int):
    """The Table 5.11 CIFAR-10 config of ``method`` (its objective, optimizer and schedule) at
    ``batch``; the net is :func:`init_variables`'s ResNet-18 of width :data:`WIDTH`."""
    c = with_defaults(table5_11.get_config(f"cifar10_rn18_{method}"))
    c.data.batch_size = batch
    return c


def protocol_steps(c, steps_per_epoch: int) -> float:
    return float(c.train.num_epochs) * steps_per_epoch


def init_variables(batch: int):
    """The ResNet's initial (params, model_state), compiled once and shared by every method (jitting
    flax's initialisers is the slowest compilation of this benchmark on a loaded CPU)."""
    model = jmodels.create_model("resnet18", 10, w=WIDTH)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + SHAPE), train=False))(jax.random.PRNGKey(0))
    return model, v["params"], {k: x for k, x in v.items() if k != "params"}


def step_time(method: str, batch: int, iters: int, variables, n_train: int = N_TRAIN):
    """(seconds per training step, protocol steps, cache bytes) of ``method`` through the loop's
    update step (``make_update_fn``), jitted and donated as in :func:`jaxrobust.train.train`."""
    model, params, model_state = variables
    c = method_config(method, batch)
    spe = n_train // batch
    objective = jobj.get_objective(c.objective.name)
    m = objective.replays(c.objective) if callable(objective.replays) else objective.replays
    objective = dataclasses.replace(objective, replays=int(m))
    total = int(protocol_steps(c, spe))
    tx, lr = make_optimizer(c.optimizer, c.schedule, total * m, spe * m)
    ctx = jobj.ObjectiveContext(model, ThreatModel("linf", EPS, box=(0.0, 1.0)),
                                build_schedules(c, total, spe, objective), c.objective, 10,
                                n_train, spe)
    extra = objective.init_extra(ctx, params, n_train, SHAPE)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       opt_state=jax.jit(tx.init)(params), key=jax.random.PRNGKey(1), extra=extra,
                       nonfinite_step=jnp.full((), -1, jnp.int32), tx=tx)
    mesh = make_mesh()
    shardings = state_shardings(state, mesh)
    state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)  # donated: a private copy
    dat, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    update = jax.jit(make_update_fn(ctx, objective, lr, "crop_flip"),
                     in_shardings=(shardings, dat), out_shardings=(shardings, rep),
                     donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batches = []
    for i in range(4):  # different examples each step, as in an epoch
        idx = rng.choice(n_train, batch, replace=False)
        batches.append({"image": jnp.asarray(rng.uniform(0, 1, (batch,) + SHAPE), jnp.float32),
                        "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
                        "index": jnp.asarray(idx, jnp.int32), "mask": jnp.ones(batch, bool)})
    holder, it = [state], [0]

    def step():
        holder[0], metrics = update(holder[0], batches[it[0] % len(batches)])
        it[0] += 1
        return metrics["loss"]

    t = time_fn(step, warmup=2, iters=iters, sync=lambda o: o.block_until_ready())
    inst = holder[0].extra.get("instance", {}) if isinstance(holder[0].extra, dict) else {}
    cache = int(sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(inst)))
    return t, total, cache


def torch_fgsm_rs_time(batch: int, iters: int):
    """A PyTorch FGSM-RS step (Wong et al.'s: uniform start, α = 1.25ε, clamp, then the update) of
    the same ResNet-18 (width w), BN in train mode throughout as in their code."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.sc = None if stride == 1 and cin == cout else tnn.Sequential(
                tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            return F.relu(y + (x if self.sc is None else self.sc(x)))

    class ResNet18(tnn.Module):
        def __init__(self, w):
            super().__init__()
            c = 4 * w
            self.stem = tnn.Sequential(tnn.Conv2d(3, c, 3, 1, 1, bias=False), tnn.BatchNorm2d(c),
                                       tnn.ReLU())
            layers, cin = [], c
            for i in range(4):
                for j in range(2):
                    layers.append(Block(cin, c * 2 ** i, 2 if (i > 0 and j == 0) else 1))
                    cin = c * 2 ** i
            self.layers, self.fc = tnn.Sequential(*layers), tnn.Linear(cin, 10)

        def forward(self, x):
            return self.fc(self.layers(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    net = ResNet18(WIDTH)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.rand((batch, SHAPE[2], SHAPE[0], SHAPE[1]))
    y = torch.randint(0, 10, (batch,))
    alpha = 1.25 * EPS

    def step():
        delta = ((torch.rand_like(x) * 2 - 1) * EPS).requires_grad_(True)
        loss = F.cross_entropy(net((x + delta).clamp(0, 1)), y)
        g, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
        loss = F.cross_entropy(net(x + delta), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return time_fn(step, warmup=1, iters=iters), torch.get_num_threads()


def cache_memory():
    """Computed memory of the δ cache (+ 'seen' flags, + ATAS's v) per device."""
    cases = {"cifar10 (50,000 x 32x32x3)": (50_000, (32, 32, 3), (0, 16)),
             "imagenet (1,281,167 x 224x224x3)": (1_281_167, (224, 224, 3), (0, 64, 32))}
    out = {}
    for name, (n, shape, resolutions) in cases.items():
        for res in resolutions:
            for dtype in ("float32", "bfloat16"):
                for devices in (1, 8):
                    total, per = fast_at.cache_bytes(n, shape, res, dtype, devices, with_v=True)
                    key = f"{name} stored {'full' if not res else f'{res}x{res}'} {dtype}, {devices} devices"
                    out[key] = {"GiB_total": round(total / 2 ** 30, 3), "GiB_per_device": round(per / 2 ** 30, 3)}
    return out


def main(argv):
    quick = "--quick" in argv
    batch, iters = (32, 2) if quick else (64, 5)
    n_train = 4096 if quick else N_TRAIN
    methods = METHODS if not quick else ("pgd10", "fgsm_rs", "atas")
    times, results = {}, {}
    variables = init_variables(batch)
    for method in methods:
        t, steps, cache = step_time(method, batch, iters, variables, n_train)
        times[method] = (t, steps)
        results[method] = {"seconds_per_step": t, "protocol_steps": steps,
                           "passes_per_batch": PASSES[method], "cache_MiB": round(cache / 2 ** 20, 1)}
        print(method, results[method], flush=True)
    base, ref = times["fgsm_rs"], times["pgd10"]
    for method, (t, steps) in times.items():
        r = results[method]
        r["per_step_vs_fgsm_rs"] = t / base[0]
        r["per_step_vs_pgd10"] = t / ref[0]
        r["passes_vs_fgsm_rs"] = PASSES[method] / PASSES["fgsm_rs"]
        r["protocol_vs_fgsm_rs"] = t * steps / (base[0] * base[1])
        if method in THESIS_HOURS:
            r["thesis_time_vs_fgsm_rs"] = THESIS_HOURS[method] / THESIS_HOURS["fgsm_rs"]
    payload = {"benchmark": "fast AT training step per method (thesis Table 5.11)",
               "net": f"resnet18 w={WIDTH} (CIFAR shape 32x32x3)", "batch": batch, "eps": EPS,
               "n_train_cache_rows": n_train, "iters": iters, "results": results,
               "goal": "ATAS and ATTA per step <= 1.1x FGSM-RS; Free/YOPO at their passes per batch",
               "cache_memory": cache_memory()}
    if "--no-torch" not in argv:
        try:
            tt, threads = torch_fgsm_rs_time(batch, iters)
            payload["torch_fgsm_rs"] = {"seconds_per_step": tt, "threads": threads,
                                        "jax_speedup_over_torch": tt / base[0]}
        except ImportError:
            payload["torch_fgsm_rs"] = "torch not installed (pip install torch)"
    write_results("fast_at" if not quick else "fast_at_quick", payload)


if __name__ == "__main__":
    main(sys.argv)
