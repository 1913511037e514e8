"""Metrics as JSON lines (``WORKDIR/metrics.jsonl``) + TensorBoard events, and a progress meter."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


def _to_py(v):
    v = np.asarray(jax.device_get(v))
    return v.item() if v.ndim == 0 else v.tolist()


class MetricWriter:
    """Writes ``{"step", "split", **metrics}`` lines; only process 0 writes."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self.tb = None

    def write(self, step: int, split: str, metrics: dict):
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split, **{k: _to_py(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Rate and ETA for long loops (printed every ``every`` steps to stderr); ``unit`` names what is
    counted (``"steps"``: ``step 10/100 | 2.0 steps/s``; e.g. ``"images"``: ``images 10/100 | 2.0
    images/s``)."""

    def __init__(self, total: int, start: int = 0, every: int = 50, name: str = "train",
                 unit: str = "steps"):
        self.total, self.start, self.every, self.name, self.unit = total, start, every, name, unit
        self.t0 = time.time()

    def rate(self, step: int) -> float:
        return (step - self.start) / max(time.time() - self.t0, 1e-9)

    def line(self, step: int, extra: str = "") -> str:
        r = self.rate(step)
        eta = (self.total - step) / r if r > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        what = "step" if self.unit == "steps" else self.unit
        return (f"[{self.name}] {what} {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) "
                f"| {r:.2f} {self.unit}/s | ETA {eta_s} {extra}")

    def maybe_print(self, step: int, extra: str = ""):
        if jax.process_index() == 0 and (step % self.every == 0 or step == self.total):
            print(self.line(step, extra), file=sys.stderr, flush=True)


def _round_float(x: float, digits: int) -> float:
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def round_floats(obj, digits: int = 7):
    """Rounds every float of a nested result (dicts, lists, tuples, numpy scalars and arrays) to
    ``digits`` significant digits, which removes float noise (``2.6000000000000023`` -> ``2.6``,
    ``100 * 8 / 100`` stays ``8.0``) and keeps what float32 results and counts fractions carry.
    Integers, booleans and strings are unchanged; numpy arrays become lists."""
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _round_float(float(obj), digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    if isinstance(obj, np.ndarray):
        return round_floats(obj.tolist(), digits)
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):  # jax arrays
        return round_floats(np.asarray(obj).tolist(), digits)
    return obj
