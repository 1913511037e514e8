"""Benchmark: the cost of one training step of the adversarial training objectives of thesis §4.1
(jaxrobust/train/adversarial.py) relative to PGD-AT on the same net, and of jaxrobust's PGD-AT and
TRADES steps against PyTorch implementations of the same steps (written after the reference TRADES /
Madry codes), measured in the same run.

    python -m bench.adversarial_training [--quick]

Nets: Table 4.1's LeNet (MNIST shape 28x28x1, ε = 0.4) and a CIFAR-shape ResNet18 of small width
(32x32x3, ε = 8/255). Every method runs 10 inner steps of size ε/4 (PGD for at / MART, the KL
ascent for TRADES from x + 0.001·N(0, I)), then its outer loss and one SGD-momentum update; AWP adds
one weight-space ascent step (a forward-backward of the outer loss). JAX: the loop's jitted, donated
update step (``make_update_fn``); PyTorch: eager autograd with the attack in eval mode and the update in
train mode, as the reference codes. Reported: steps/s, each method's cost relative to ``at`` (JAX and,
for TRADES, PyTorch) and JAX's speedup over PyTorch. Writes bench/results/adversarial_training.json.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bench.common import time_fn, write_results
from configs.common import base_config, with_defaults
from jaxrobust import models as jmodels
from jaxrobust.threat import ThreatModel
from jaxrobust.train import objectives as jobj
from jaxrobust.train.loop import build_schedules, create_train_state, make_mesh, make_update_fn
from jaxrobust.train.optim import make_optimizer

METHODS = ("at", "trades", "mart", "awp_at", "awp_trades")
OBJECTIVE = {"at": "pgd_at", "trades": "trades", "mart": "mart", "awp_at": "awp_at",
             "awp_trades": "awp_trades"}
STEPS = 10


def jax_step_time(method, model_name, kwargs, shape, batch, eps, iters):
    c = with_defaults(base_config())
    c.model.name = model_name
    c.threat.eps = eps
    c.objective.name = OBJECTIVE[method]
    c.objective.attack.steps = STEPS
    c.objective.attack.step_size = eps / 4
    c.objective.beta = 6.0
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 0.01, 0.9
    c.schedule.name = "constant"
    model = jmodels.create_model(model_name, 10, **kwargs)
    tx, lr = make_optimizer(c.optimizer, c.schedule, 1000, 100)
    objective = jobj.get_objective(c.objective.name)
    ctx = jobj.ObjectiveContext(model, ThreatModel("linf", eps, box=(0.0, 1.0)),
                                build_schedules(c, 1000, 100), c.objective, 10, batch, 100)
    state = create_train_state(model, shape, tx, objective, ctx, seed=0, n_train=batch)
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


def torch_nets():
    import torch.nn as tnn
    import torch.nn.functional as F

    class LeNet(tnn.Module):  # Table 4.1: Conv(2w) M Conv(4w) M FC(196w, 64w) FC(64w, 10)
        def __init__(self, w):
            super().__init__()
            self.c1 = tnn.Conv2d(1, 2 * w, 5, 1, 2)
            self.c2 = tnn.Conv2d(2 * w, 4 * w, 5, 1, 2)
            self.f1, self.f2 = tnn.Linear(196 * w, 64 * w), tnn.Linear(64 * w, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.max_pool2d(F.relu(self.c2(x)), 2)
            return self.f2(F.relu(self.f1(x.flatten(1))))

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
        def __init__(self, w):
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

    return {"lenet": LeNet, "resnet18": ResNet18}


def torch_step_time(method, model_name, w, shape, batch, eps, iters, beta=6.0):
    """PGD-AT (Madry et al.) or TRADES (Zhang et al. 2019, its reference train loop) in PyTorch."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = torch_nets()[model_name](w)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand((batch, shape[2], shape[0], shape[1]))
    y = torch.randint(0, 10, (batch,))
    alpha = eps / 4

    def project(xa):
        return torch.min(torch.max(xa, x - eps), x + eps).clamp(0.0, 1.0)

    def at_step():
        net.eval()
        xa = project(x + (torch.rand_like(x) * 2 - 1) * eps)
        for _ in range(STEPS):
            xa.requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(net(xa), y), xa)
            xa = project(xa.detach() + alpha * g.sign())
        net.train()
        loss = F.cross_entropy(net(xa), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    def trades_step():
        net.eval()
        with torch.no_grad():
            p_nat = F.softmax(net(x), dim=1)
        xa = project(x + 0.001 * torch.randn_like(x))
        for _ in range(STEPS):
            xa.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(net(xa), dim=1), p_nat, reduction="sum")
            g, = torch.autograd.grad(kl, xa)
            xa = project(xa.detach() + alpha * g.sign())
        net.train()
        logits = net(x)
        loss = F.cross_entropy(logits, y) + beta * F.kl_div(
            F.log_softmax(net(xa), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return time_fn({"at": at_step, "trades": trades_step}[method], warmup=1, iters=iters)


def main(argv):
    quick = "--quick" in argv
    cases = [("lenet_w16_mnist", "lenet", 16, (28, 28, 1), 64, 0.4, 2 if quick else 4),
             ("resnet18_w4_cifar", "resnet18", 4, (32, 32, 3), 32, 8 / 255, 2 if quick else 3)]
    results = {}
    for label, name, w, shape, batch, eps, iters in cases:
        jax_t = {m: jax_step_time(m, name, {"w": w}, shape, batch, eps, iters) for m in METHODS}
        torch_t = {m: torch_step_time(m, name, w, shape, batch, eps, iters) for m in ("at", "trades")}
        r = {"batch": batch, "inner_steps": STEPS, "eps": eps,
             "jax_steps_per_sec": {m: 1 / t for m, t in jax_t.items()},
             "jax_cost_relative_to_at": {m: t / jax_t["at"] for m, t in jax_t.items()},
             "torch_steps_per_sec": {m: 1 / t for m, t in torch_t.items()},
             "torch_cost_relative_to_at": {m: t / torch_t["at"] for m, t in torch_t.items()},
             "speedup_jax_over_torch": {m: torch_t[m] / jax_t[m] for m in torch_t}}
        results[label] = r
        print(label, r, flush=True)
    write_results("adversarial_training", {
        "benchmark": "one adversarial training step per method (10 inner steps), relative to PGD-AT; "
                     "PGD-AT and TRADES vs PyTorch", "results": results})


if __name__ == "__main__":
    main(sys.argv)
