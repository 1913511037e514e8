"""Checked variants of the attacks: input validation that also works under ``jax.jit``.

Called eagerly, every attack validates its inputs (:meth:`ThreatModel.validate_inputs` via
``check_attack_inputs``): NaN/inf inputs, points outside the box and labels outside ``[0, K)`` raise
a ``ValueError``. Under ``jax.jit`` the values are unknown while tracing, so those checks are skipped
(shape checks still run: they are static) and bad values pass silently. This module closes that gap
with :mod:`jax.experimental.checkify`, which turns run-time checks into an error value returned by
the compiled program:

    from jaxrobust import checks
    attack = checks.checked(lambda x, y, k: checks.pgd(logits_fn, x, y, k, threat, steps=10))
    x_adv = attack(x, y, key)   # jitted once; raises ValueError on NaN x, x outside the box,
                                # or labels outside [0, K) -- inside the compiled program

* :func:`check_inputs` emits the checks (finite x, x in the box, labels in range) with
  ``checkify.check``; it must run under :func:`checked` (or ``checkify.checkify``), or eagerly.
* :func:`checked_attack` wraps any attack ``(logits_fn, x, y, key, threat, ...)`` so that it first
  runs :func:`check_inputs` with ``K`` read from ``jax.eval_shape(logits_fn, x)`` (nothing compiled).
  ``checks.pgd``, ``checks.fgsm``, ``checks.multi_targeted_pgd``, ``checks.apgd``,
  ``checks.apgd_targeted``, ``checks.fab``, ``checks.square`` are the wrapped public attacks.
* :func:`checked` is ``jit(checkify(fn))`` plus raising the error on the host as a ``ValueError``.

The checks cost a few reductions over the batch per call; the unchecked attacks (and the training
step) are unchanged and pay nothing.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxrobust import attacks as _attacks
from jaxrobust.threat import ThreatModel

__all__ = ["check_inputs", "checked_attack", "checked", "pgd", "fgsm", "multi_targeted_pgd", "apgd",
           "apgd_targeted", "fab", "square"]


def check_inputs(x, threat: ThreatModel, y=None, num_classes: Optional[int] = None,
                 y_target=None) -> None:
    """Run-time (jit-compatible) checks: x finite and inside the threat's box; y and y_target in
    ``[0, num_classes)`` (only ``>= 0`` without num_classes). Emits ``checkify.check`` calls: use
    under :func:`checked` / ``checkify.checkify``, or eagerly (where a failed check raises at once).
    """
    x = jnp.asarray(x)
    checkify.check(jnp.all(jnp.isfinite(x)), "x contains {n} NaN or inf values.",
                   n=jnp.sum(~jnp.isfinite(x)))
    if threat.box is not None:
        lo, hi = threat.box
        checkify.check((jnp.min(x) >= lo - 1e-6) & (jnp.max(x) <= hi + 1e-6),
                       f"x lies outside the input box {threat.box}: range [{{lo}}, {{hi}}]. Pixels are "
                       "expected in the box; normalisation belongs inside the model.",
                       lo=jnp.min(x), hi=jnp.max(x))
    for name, lab in (("y", y), ("y_target", y_target)):
        if lab is None:
            continue
        lab = jnp.asarray(lab)
        checkify.check(jnp.min(lab) >= 0, f"{name} contains negative labels (min {{m}}); labels must "
                       "be class indices.", m=jnp.min(lab))
        if num_classes is not None:
            checkify.check(jnp.max(lab) < num_classes,
                           f"{name} contains label {{m}} out of range for {num_classes} classes: "
                           f"labels must lie in [0, {num_classes}).", m=jnp.max(lab))


def checked_attack(attack: Callable) -> Callable:
    """``attack(logits_fn, x, y, key, threat, **kw)`` preceded by :func:`check_inputs` (K from
    ``jax.eval_shape(logits_fn, x)``, ``y_target`` from the keyword arguments when given)."""
    @functools.wraps(attack)
    def wrapped(logits_fn, x, y, key, threat: ThreatModel, **kwargs):
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a jaxrobust.threat.ThreatModel, got {type(threat).__name__}.")
        out = jax.eval_shape(logits_fn, x)
        if len(out.shape) != 2:
            raise ValueError(f"logits_fn(x) must return logits of shape (B, K), got {out.shape}.")
        check_inputs(x, threat, y, out.shape[1], kwargs.get("y_target"))
        return attack(logits_fn, x, y, key, threat, **kwargs)
    wrapped.__doc__ = (f"Checked {attack.__name__} (see :mod:`jaxrobust.checks`): inputs are "
                       f"validated inside jit.\n\n" + (attack.__doc__ or ""))
    return wrapped


def checked(fn: Callable, *, errors=checkify.user_checks, jit: bool = True, **jit_kwargs) -> Callable:
    """``jax.jit(checkify.checkify(fn))`` that raises a failed check on the host as a ValueError.

    ``fn`` may contain :func:`check_inputs` / the checked attacks of this module (or any
    ``checkify.check``). ``errors``: the checkify error set (default: only the explicit checks;
    e.g. ``checkify.user_checks | checkify.nan_checks`` also flags NaNs produced inside ``fn``).
    ``jit_kwargs`` go to ``jax.jit`` (e.g. ``static_argnames``).
    """
    cf = checkify.checkify(fn, errors=errors)
    if jit:
        cf = jax.jit(cf, **jit_kwargs)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        err, out = cf(*args, **kwargs)
        msg = err.get()
        if msg is not None:
            raise ValueError(msg)
        return out
    return run


pgd = checked_attack(_attacks.pgd)
fgsm = checked_attack(_attacks.fgsm)
multi_targeted_pgd = checked_attack(_attacks.multi_targeted_pgd)
apgd = checked_attack(_attacks.apgd)
apgd_targeted = checked_attack(_attacks.apgd_targeted)
fab = checked_attack(_attacks.fab)
square = checked_attack(_attacks.square)
