"""XLA:CPU flags set before JAX starts its CPU backend (imported first by ``jaxrobust``).

jaxlib 0.10's XLA:CPU hands dots, reductions and element-wise fusions to YNNPACK ("YNN fusions") by
default. Its reduce / element-wise fusions crash the process (SIGSEGV in
``ynn::make_transpose_impl`` / ``slinky::fuse_contiguous_dims``) on jitted gradients of the
patch-form bound passes (tests/test_bounds_patches.py). Keeping only the dot fusions avoids the
crash and was also the fastest setting measured here (2 cores): CROWN on the small CNN 0.38 s vs
0.52 s with the defaults, a PGD-10 training step of FC1 46 vs 45 steps/s and of ResNet18 (w=8)
0.16 vs 0.13 steps/s. So, unless the user already chose a value, importing jaxrobust keeps only
the dot fusions for jaxlib 0.10.x. It takes effect only if no JAX computation ran in the process
before ``import jaxrobust`` (a warning says so); other jaxlib versions are left alone (an XLA build
that does not know a flag aborts on it).

Backends: the flag is read by XLA:CPU only, so GPU/TPU programs compile exactly as without it (the
CUDA/TPU compilers of the same jaxlib release know the flag and ignore it). It stays set on
accelerator hosts because JAX still runs host-side programs on its CPU backend there; it is skipped
when ``JAX_PLATFORMS`` names platforms without ``cpu`` (no CPU backend is created, nothing to fix).
"""
import os
import warnings

_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot"


def _apply():
    try:
        from importlib.metadata import version
        jaxlib_version = version("jaxlib")
    except Exception:  # not installed as a distribution: leave the flags alone
        return
    if not jaxlib_version.startswith("0.10."):
        return
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms and "cpu" not in [p.strip() for p in platforms.lower().split(",")]:
        return  # no XLA:CPU backend in this process
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
                      "jaxlib 0.10's XLA:CPU YNN reduce/element-wise fusions, which can crash jitted bound "
                      "gradients on CPU. "
                      f"Import jaxrobust first, or set XLA_FLAGS='{_FLAG}'.", RuntimeWarning, stacklevel=3)
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}".strip()


_apply()
