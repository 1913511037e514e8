"""Benchmark helpers: timing with warm-up, JSON results under bench/results/."""
from __future__ import annotations

import json
import os
import platform
import time

import jax
import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_fn(fn, warmup: int = 2, iters: int = 5, sync=lambda out: None):
    """Median seconds per call of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def environment():
    env = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
           "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count()}
    try:
        import torch
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return env


def write_results(name: str, payload: dict):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    payload = dict(payload, environment=environment(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                           time.gmtime()))
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
    print(json.dumps(payload, indent=2))
    return path
