"""Benchmark: steps/s of one PGD-10 adversarial-training step (jaxrobust's jitted, donated update
from the training loop) against an equivalent PyTorch implementation, measured in the same run.

    python -m bench.train_step [--quick]

Nets: FC1 (784-1024-10, batch 100, MNIST shape) and ResNet18 of Table 4.1 with w=8 (batch 128,
CIFAR shape). Same architecture, PGD-10 (l_inf, ε=8/255 CIFAR / 0.1 MNIST, step ε/4, random start),
SGD momentum 0.9; BN in eval mode during the attack, train mode for the update in both.
Writes bench/results/train_step.json.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bench.common import time_fn, write_results
from configs.common import base_config
from jaxrobust import models as jmodels
from jaxrobust.threat import ThreatModel
from jaxrobust.train import objectives as jobj
from jaxrobust.train.loop import build_schedules, create_train_state, make_mesh, make_update_fn
from jaxrobust.train.optim import make_optimizer


def jax_step_time(model_name, kwargs, shape, batch, eps, iters):
    c = base_config()
    c.model.name = model_name
    c.threat.eps = eps
    c.objective.attack.steps = 10
    c.objective.attack.step_size = eps / 4
    c.schedule.name = "constant"
    model = jmodels.create_model(model_name, 10, **kwargs)
    tx, lr = make_optimizer(c.optimizer, c.schedule, 1000, 100)
    objective = jobj.get_objective("pgd_at")
    ctx = jobj.ObjectiveContext(model, ThreatModel("linf", eps), build_schedules(c, 1000, 100),
                                c.objective, 10, batch)
    state = create_train_state(model, shape, tx, objective, ctx, seed=c.seed, n_train=batch)
    mesh = make_mesh()
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    update = jax.jit(make_update_fn(ctx, objective, lr, "none"),
                     in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    b = {"image": jnp.asarray(rng.uniform(0, 1, (batch,) + shape), jnp.float32),
         "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
         "index": jnp.arange(batch, dtype=jnp.int32), "mask": jnp.ones(batch, bool)}
    holder = [jax.device_put(state, rep)]

    def step():
        holder[0], m = update(holder[0], b)
        return m["loss"]

    return time_fn(step, warmup=2, iters=iters, sync=lambda o: o.block_until_ready())


def torch_step_time(model_name, shape, batch, eps, iters):
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class FC1(tnn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = tnn.Linear(784, 1024), tnn.Linear(1024, 10)

        def forward(self, x):
            return self.l2(F.relu(self.l1(x.flatten(1))))

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.sc = None
            if stride != 1 or cin != cout:
                self.sc = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                         tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return F.relu(y + (x if self.sc is None else self.sc(x)))

    class ResNet18(tnn.Module):
        def __init__(self, w=8):
            super().__init__()
            c = 4 * w
            self.stem = tnn.Sequential(tnn.Conv2d(3, c, 3, 1, 1, bias=False), tnn.BatchNorm2d(c),
                                       tnn.ReLU())
            layers, cin = [], c
            for i in range(4):
                for j in range(2):
                    cout = c * 2 ** i
                    layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                    cin = cout
            self.layers = tnn.Sequential(*layers)
            self.fc = tnn.Linear(cin, 10)

        def forward(self, x):
            return self.fc(self.layers(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    net = FC1() if model_name == "fc1" else ResNet18(8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand((batch,) + ((shape[2], shape[0], shape[1]) if len(shape) == 3 else shape))
    y = torch.randint(0, 10, (batch,))
    alpha = eps / 4

    def step():
        net.eval()  # BN eval mode during the attack, as in the JAX run
        delta = (torch.rand_like(x) * 2 - 1) * eps
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(10):
            delta.requires_grad_(True)
            loss = F.cross_entropy(net(x + delta), y)
            g, = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        net.train()
        loss = F.cross_entropy(net(x + delta), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return time_fn(step, warmup=1, iters=iters)


def main(argv):
    quick = "--quick" in argv
    cases = [("fc1", {}, (28, 28, 1), 100, 0.1, 20 if not quick else 5),
             ("resnet18", {"w": 8}, (32, 32, 3), 128, 8 / 255, 3 if not quick else 1)]
    results = {}
    for name, kw, shape, batch, eps, iters in cases:
        tj = jax_step_time(name, kw, shape, batch, eps, iters)
        tt = torch_step_time(name, shape, batch, eps, iters)
        results[f"{name}{'_w8' if kw else ''}"] = {
            "batch": batch, "pgd_steps": 10, "jax_steps_per_sec": 1 / tj,
            "torch_steps_per_sec": 1 / tt, "speedup_jax_over_torch": tt / tj}
        print(name, results[list(results)[-1]], flush=True)
    write_results("train_step", {"benchmark": "PGD-10 adversarial training step", "results": results})


if __name__ == "__main__":
    main(sys.argv)
