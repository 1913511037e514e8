"""XLA:CPU flags set before JAX starts its CPU backend (imported first by ``jaxrobust``).

jaxlib 0.10's XLA:CPU fuses dots, reductions and transposes into "YNN" fusions by default. One of
them crashes the process (SIGSEGV in ``ynn::make_transpose_impl`` / ``slinky::fuse_contiguous_dims``)
on jitted gradients of the patch-form bound passes, and disabling them made those passes 1.4x
faster (measured on CROWN for the small CNN). So, unless the user already chose a value, importing
jaxrobust turns them off for jaxlib 0.10.x. It only takes effect if no JAX computation ran in the
process before ``import jaxrobust``; other jaxlib versions are left alone (an XLA build that does
not know a flag aborts on it).
"""
import os
import warnings

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _apply():
    try:
        from importlib.metadata import version
        jaxlib_version = version("jaxlib")
    except Exception:  # not installed as a distribution: leave the flags alone
        return
    if not jaxlib_version.startswith("0.10."):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    try:
        from jax._src import xla_bridge
        started = xla_bridge.backends_are_initialized()
    except Exception:  # private API moved: assume not started
        started = False
    if started:
        warnings.warn("jaxrobust was imported after JAX started its backends, so it could not turn off "
                      "jaxlib 0.10's XLA:CPU YNN fusions, which can crash jitted bound gradients on CPU. "
                      f"Import jaxrobust first, or set XLA_FLAGS='{_FLAG}'.", RuntimeWarning, stacklevel=3)
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}".strip()


_apply()
