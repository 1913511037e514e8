"""Peak memory and time of ``jaxrobust.certify.certify`` on MNIST-5k with the fc1 net (issue #10).

    python -m bench.certify_memory --n 64 --norm l2 [--eps 0.5] [--budget-mib 1024]

Prints one JSON line: images, norm, first-call and second-call seconds, peak RSS (MiB, whole process,
so it includes the dataset and JAX itself: run one configuration per process).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.certify import certify
from jaxrobust.data import load_dataset
from jaxrobust.models import create_model, init_variables, make_logits_fn
from jaxrobust.threat import ThreatModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--norm", default="l2")
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--budget-mib", type=float, default=None, help="memory_budget_bytes (MiB); default: library's")
    ap.add_argument("--method", default="crown")
    ap.add_argument("--save", default=None, help="write radius/lower/certified to this .npz")
    a = ap.parse_args()
    ds = load_dataset("mnist5k")
    batch = ds.split("test").get(np.arange(a.n))
    x = jnp.asarray(np.asarray(batch["image"], np.float32))
    y = jnp.asarray(np.asarray(batch["label"], np.int32))
    model = create_model("fc1")
    variables = init_variables(model, jax.random.PRNGKey(0), x.shape[1:])
    fn = make_logits_fn(model, variables)
    y = jnp.argmax(fn(x), -1).astype(jnp.int32)  # untrained net: certify its own predictions (radius > 0)
    threat = ThreatModel(a.norm, a.eps)
    kw = {} if a.budget_mib is None else {"memory_budget_bytes": int(a.budget_mib * 2 ** 20)}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        c = certify(fn, x, y, threat, method=a.method, **kw)
        jax.block_until_ready(c)
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.save:
        np.savez(a.save, **{k: np.asarray(v) for k, v in c._asdict().items()})
    print(json.dumps({"images": a.n, "norm": a.norm, "eps": a.eps, "method": a.method, "first_s": round(times[0], 2),
                      "second_s": round(times[1], 2), "peak_rss_mib": round(rss), "rss_before_mib": round(rss0),
                      "certified": int(np.sum(np.asarray(c.certified))), "mean_radius": float(np.mean(np.asarray(c.radius))),
                      "radius_checksum": float(np.sum(np.asarray(c.radius, np.float64)))}))


if __name__ == "__main__":
    main()
