"""Benchmark: robust binary sub-networks (thesis §5.1), measured in one run.

    python -m bench.pruning [--quick]

1. Training step: one PGD-10 adversarial-training step (the training loop's jitted, donated update)
   of the score-masked SubNet (1% kept, γ = 0.1, binary + LBN, weights frozen) against the dense net
   of the same architecture, and against a PyTorch edge-popup step (the released code's scheme: a
   sort-based top-k mask with a straight-through gradient in every forward pass; written here).
2. Inference: the exported artifact's logits (masked kernels, eval mode) against the dense net and
   against the SubNet itself (which recomputes its masks from the scores in every call).
3. Memory: bytes of the frozen weights + scores against the dense parameters, and the artifact's size.

Nets: the small CNN (MNIST shape, batch 100) and the §5.1 CIFAR ResNet-18 (w = 4: 16-128 channels,
CIFAR shape, batch 32). Writes bench/results/pruning.json.
"""
from __future__ import annotations

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import time_fn, write_results
from configs.common import base_config, subnet_model, with_defaults
from jaxrobust.models import count_params
from jaxrobust.pruning import export_subnet, load_artifact
from jaxrobust.train.loop import build_run, create_train_state, make_update_fn


def _config(base, base_kwargs, pruned, batch, eps):
    c = base_config()
    c.data.name = "mnist5k"  # only for build_run; the benchmark feeds random batches of `shape`
    c.data.batch_size = batch
    c.model.name = base
    for k, v in base_kwargs.items():
        c.model.kwargs[k] = v
    if pruned:
        subnet_model(c, base, base_kwargs, keep_rate=0.01, gamma=0.1)
    c.model.normalize = False
    c.threat.eps = eps
    c.objective.attack.steps = 10
    c.objective.attack.step_size = eps / 4
    return with_defaults(c)


def jax_case(base, base_kwargs, shape, batch, eps, iters):
    out = {}
    rng = np.random.default_rng(0)
    b = {"image": jnp.asarray(rng.uniform(0, 1, (batch,) + shape), jnp.float32),
         "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
         "index": jnp.arange(batch, dtype=jnp.int32), "mask": jnp.ones(batch, bool)}
    x_eval = jnp.asarray(rng.uniform(0, 1, (4 * batch,) + shape), jnp.float32)
    for pruned in (False, True):
        c = _config(base, base_kwargs, pruned, batch, eps)
        setup = build_run(c)
        model = setup.model  # shape-agnostic: initialised below for `shape`
        state = create_train_state(model, shape, setup.tx, setup.objective, setup.ctx, seed=0,
                                   n_train=batch)
        update = jax.jit(make_update_fn(setup.ctx, setup.objective, setup.lr_schedule, "none"),
                         donate_argnums=(0,))
        holder = [state]

        def step():
            holder[0], m = update(holder[0], b)
            return m["loss"]
        key = "subnet" if pruned else "dense"
        out[f"{key}_train_step_s"] = time_fn(step, warmup=2, iters=iters,
                                             sync=lambda o: o.block_until_ready())
        variables = holder[0].variables()
        out[f"{key}_param_bytes"] = 4 * count_params(variables["params"])
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
        out[f"{key}_eval_s"] = time_fn(lambda: fwd(variables, x_eval), warmup=2, iters=iters,
                                       sync=lambda o: o.block_until_ready())
        if pruned:
            with tempfile.TemporaryDirectory() as d:
                m = export_subnet(model, variables, shape, d)
                art = load_artifact(d)
            logits = art.logits_fn(x_eval)
            assert np.array_equal(np.asarray(logits), np.asarray(fwd(variables, x_eval)))
            out["artifact_eval_s"] = time_fn(lambda: art.logits_fn(x_eval), warmup=2, iters=iters,
                                             sync=lambda o: o.block_until_ready())
            out["artifact_bytes"] = m["bytes"]["total"]
            out["dense_fp32_bytes"] = m["bytes"]["dense_fp32"]
            out["kept_weights"], out["prunable_weights"] = m["kept_weights"], m["prunable_weights"]
            out["table5_1_binary_saving"] = m["flops"]["binary_saving"]
    out["train_step_subnet_over_dense"] = out["subnet_train_step_s"] / out["dense_train_step_s"]
    out["eval_artifact_over_dense"] = out["artifact_eval_s"] / out["dense_eval_s"]
    out["eval_artifact_over_subnet"] = out["artifact_eval_s"] / out["subnet_eval_s"]
    out["params_subnet_over_dense"] = out["subnet_param_bytes"] / out["dense_param_bytes"]
    out["dense_fp32_over_artifact"] = out["dense_fp32_bytes"] / out["artifact_bytes"]
    return out


def torch_edgepopup_step(net: str, shape, batch, eps, iters, keep=0.01):
    """A PyTorch edge-popup PGD-10 step: every conv/linear uses W ⊙ topk(|s|) with a straight-through
    gradient; weights frozen, SGD on the scores (fixed keep rate per layer: the cost is the same)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
    torch.manual_seed(0)

    class TopK(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, k):
            flat = s.flatten()
            m = torch.zeros_like(flat)
            m[flat.topk(k).indices] = 1.0
            return m.view_as(s)

        @staticmethod
        def backward(ctx, g):
            return g, None

    def masked(layer):
        s = tnn.Parameter(torch.empty_like(layer.weight).uniform_(-0.01, 0.01))
        layer.weight.requires_grad_(False)
        layer.scores = s
        return layer

    def w(layer):
        return layer.weight * TopK.apply(layer.scores.abs(), max(1, int(keep * layer.weight.numel())))

    if net == "cnn":
        class Net(tnn.Module):
            def __init__(self):
                super().__init__()
                self.c1 = masked(tnn.Conv2d(shape[-1], 16, 4, 2, 1, bias=False))
                self.c2 = masked(tnn.Conv2d(16, 32, 4, 2, 1, bias=False))
                self.f1 = masked(tnn.Linear(32 * 7 * 7, 100, bias=False))
                self.f2 = masked(tnn.Linear(100, 10, bias=False))
                self.lbn = tnn.BatchNorm1d(10, affine=False)

            def forward(self, x):
                x = F.relu(F.conv2d(x, w(self.c1), stride=2, padding=1))
                x = F.relu(F.conv2d(x, w(self.c2), stride=2, padding=1)).flatten(1)
                x = F.relu(F.linear(x, w(self.f1)))
                return self.lbn(F.linear(x, w(self.f2)))
    else:
        class Block(tnn.Module):
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.c1 = masked(tnn.Conv2d(cin, cout, 3, stride, 1, bias=False))
                self.b1 = tnn.BatchNorm2d(cout, affine=False)
                self.c2 = masked(tnn.Conv2d(cout, cout, 3, 1, 1, bias=False))
                self.b2 = tnn.BatchNorm2d(cout, affine=False)
                self.sc = masked(tnn.Conv2d(cin, cout, 1, stride, bias=False)) \
                    if stride != 1 or cin != cout else None
                self.bs = tnn.BatchNorm2d(cout, affine=False) if self.sc is not None else None
                self.stride = stride

            def forward(self, x):
                y = F.relu(self.b1(F.conv2d(x, w(self.c1), stride=self.stride, padding=1)))
                y = self.b2(F.conv2d(y, w(self.c2), padding=1))
                s = x if self.sc is None else self.bs(F.conv2d(x, w(self.sc), stride=self.stride))
                return F.relu(y + s)

        class Net(tnn.Module):
            def __init__(self, width=4):
                super().__init__()
                c = 4 * width
                self.stem = masked(tnn.Conv2d(shape[-1], c, 3, 1, 1, bias=False))
                self.bn = tnn.BatchNorm2d(c, affine=False)
                blocks, cin = [], c
                for i in range(4):
                    for j in range(2):
                        blocks.append(Block(cin, c * 2 ** i, 2 if i > 0 and j == 0 else 1))
                        cin = c * 2 ** i
                self.blocks = tnn.Sequential(*blocks)
                self.fc = masked(tnn.Linear(cin, 10, bias=False))
                self.lbn = tnn.BatchNorm1d(10, affine=False)

            def forward(self, x):
                x = F.relu(self.bn(F.conv2d(x, w(self.stem), padding=1)))
                x = self.blocks(x).mean((2, 3))
                return self.lbn(F.linear(x, w(self.fc)))

    model = Net()
    scores = [p for n, p in model.named_parameters() if n.endswith("scores")]
    opt = torch.optim.SGD(scores, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.rand((batch, shape[-1]) + tuple(shape[:2]))
    y = torch.randint(0, 10, (batch,))

    def step():
        model.eval()
        delta = (torch.rand_like(x) * 2 - 1) * eps
        for _ in range(10):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            g, = torch.autograd.grad(loss, delta)
            delta = (delta + eps / 4 * g.sign()).clamp(-eps, eps).detach()
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        loss.backward()
        opt.step()
        return loss
    return time_fn(step, warmup=1, iters=iters)


def main(argv):
    quick = "--quick" in argv
    cases = [("cnn", "cnn_small", {}, (28, 28, 1), 100, 0.1, 5 if quick else 20),
             ("rn18", "cifar_resnet18", {"w": 4}, (32, 32, 3), 32, 8 / 255, 2 if quick else 5)]
    results = {}
    for name, base, kwargs, shape, batch, eps, iters in cases:
        r = jax_case(base, kwargs, shape, batch, eps, iters)
        try:
            t = torch_edgepopup_step(name, shape, batch, eps, iters)
            r["torch_edgepopup_train_step_s"] = t
            r["train_step_subnet_over_torch_edgepopup"] = r["subnet_train_step_s"] / t
        except ImportError:
            r["torch_edgepopup_train_step_s"] = None
        r.update(base=base, base_kwargs=kwargs, input_shape=list(shape), batch=batch)
        results[name] = r
        print(name, {k: v for k, v in r.items() if "over" in k}, flush=True)
    write_results("pruning", {"cases": results, "quick": quick,
                              "note": "PGD-10 training step (l_inf, step ε/4), 1% kept, γ = 0.1, binary + "
                                      "LBN, weights frozen; ratios < 1 mean the first is faster. XLA runs "
                                      "the masked kernels as dense convolutions (irregular sparsity: no "
                                      "speed-up without sparse kernels, Table 5.1's FLOPs are counted, "
                                      "not realised)."})


if __name__ == "__main__":
    main(sys.argv[1:])
