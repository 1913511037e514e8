"""The registry of analyses run by ``python -m experiments.analyze`` and the context they receive.

An analysis is a function ``run(ctx: AnalysisContext) -> dict`` (JSON-able: numbers, lists, dicts;
numpy arrays are converted) registered under a name, with optional ``plot(result, path, cfg)``
(writes one PNG), ``validate(cfg)`` (raises ValueError before anything runs) and ``summary(result)``
(the few numbers printed on stdout)::

    from jaxrobust.analysis import register_analysis

    @register_analysis("weight_norm", plot=None)
    def weight_norm(ctx):
        leaves = jax.tree.leaves(ctx.params)
        return {"norm": float(jnp.sqrt(sum(jnp.sum(p ** 2) for p in leaves)))}

The entry point writes ``RUN/analysis/<name>.json`` and ``RUN/plots/<name>.png`` (``name`` =
``config.name`` or the analysis's). Modules that register analyses are imported by
``jaxrobust.analysis`` (built-in) or through ``--config.imports=my_pkg.my_analyses``. An analysis's
settings live in its own section of the analyze config (``configs/analyze/common.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from jaxrobust.train.metrics import Progress

_ANALYSES: Dict[str, "Analysis"] = {}


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A registered analysis (see the module docstring). ``needs_run``: the workdir must be a training
    run (False: e.g. an analysis of several runs named in the config)."""
    run: Callable[["AnalysisContext"], dict]
    plot: Optional[Callable[[dict, str, Any], Optional[str]]] = None
    validate: Optional[Callable[[Any], None]] = None
    summary: Optional[Callable[[dict], dict]] = None
    needs_run: bool = True


def register_analysis(name: str, run: Optional[Callable] = None, *, plot=None, validate=None,
                      summary=None, needs_run: bool = True):
    """Registers ``run`` under ``name``; usable as ``register_analysis('x', fn, plot=...)`` or as a
    decorator ``@register_analysis('x', plot=...)``. Re-registering a name replaces it."""
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
        raise ValueError(f"analysis names are non-empty identifiers (letters, digits, _), got {name!r}.")

    def add(fn):
        if not callable(fn):
            raise TypeError(f"register_analysis expects a function, got {type(fn).__name__}.")
        _ANALYSES[name] = Analysis(run=fn, plot=plot, validate=validate, summary=summary,
                                   needs_run=needs_run)
        return fn

    return add(run) if run is not None else add


def get_analysis(name: str) -> Analysis:
    if name not in _ANALYSES:
        raise ValueError(f"Unknown analysis {name!r}; available: {list_analyses()}.")
    return _ANALYSES[name]


def list_analyses():
    return sorted(_ANALYSES)


class AnalysisContext:
    """What an analysis gets: the analyze config ``cfg`` (its own section: ``cfg[<analysis>]``), the
    ``workdir``, a base PRNG ``key`` (``cfg.seed``), and, loaded lazily from the workdir's training run,
    ``run`` (:class:`jaxrobust.train.TrainedRun` at ``cfg.checkpoint.step``, ``cfg.checkpoint.weights``),
    ``params``, ``apply_fn(params, x) -> logits`` (eval mode, the run's other collections fixed),
    :meth:`subset` (the fixed data subset in masked batches) and :meth:`attack` (the PGD of the
    adversarial loss)."""

    def __init__(self, cfg, workdir: str):
        self.cfg = cfg
        self.workdir = workdir
        self.key = jax.random.PRNGKey(int(cfg.seed))

    @functools.cached_property
    def run(self):
        from jaxrobust.train import load_trained
        step = None if int(self.cfg.checkpoint.step) < 0 else int(self.cfg.checkpoint.step)
        return load_trained(self.workdir, step=step, weights=self.cfg.checkpoint.weights)

    @property
    def params(self):
        return self.run.variables["params"]

    @functools.cached_property
    def apply_fn(self):
        return apply_fn_of(self.run.model, self.run.variables)

    def threat(self, eps=None, norm=None):
        """The run's threat model (box = its data range) at ``eps``/``norm`` (None: ``cfg.loss``'s,
        whose None/"" mean the run's training values)."""
        from jaxrobust.train import build_threat
        loss = self.cfg.loss
        eps = loss.eps if eps is None else eps
        return build_threat(self.run.config, self.run.dataset.info, norm=norm or loss.norm or None,
                            eps=eps)

    def attack(self, kind: Optional[str] = None, eps=None):
        """The :class:`AttackSpec` of ``cfg.loss`` (``kind`` overrides ``cfg.loss.kind``): None for the
        clean loss or ε = 0."""
        from jaxrobust.analysis.subset import AttackSpec
        kind = self.cfg.loss.kind if kind is None else kind
        if kind == "clean":
            return None
        loss = self.cfg.loss
        spec = AttackSpec(threat=self.threat(eps), steps=int(loss.steps),
                          step_size=None if loss.step_size <= 0 else float(loss.step_size),
                          restarts=int(loss.restarts), random_start=bool(loss.random_start))
        return spec if spec.active else None

    def subset(self, split: Optional[str] = None, num_examples: Optional[int] = None):
        """The analysis's fixed data subset (``cfg.data``: split, num_examples, batch_size, seed)."""
        from jaxrobust.analysis.subset import subset_from_split
        d = self.cfg.data
        split = split or d.split
        ds = self.run.dataset
        if split not in ds.splits:
            raise ValueError(f"data.split={split!r} is not a split of {ds.info.name}; "
                             f"available: {sorted(ds.splits)}.")
        n = int(d.num_examples if num_examples is None else num_examples)
        return subset_from_split(ds.split(split), n, int(d.batch_size), seed=int(d.subset_seed))

    def progress(self, total: int, unit: str = "steps", every: int = 1) -> Progress:
        return Progress(int(total), every=max(int(every), 1), name=str(self.cfg.name or self.cfg.analysis),
                        unit=unit)

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)


def apply_fn_of(model, variables) -> Callable:
    """``(params, x) -> logits`` of ``model`` in eval mode with ``variables``' other collections."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    return lambda params, x: model.apply({"params": params, **rest}, x, train=False)


def to_jsonable(obj):
    """numpy/jax arrays and scalars -> lists and floats, recursively (dict keys become strings)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj
