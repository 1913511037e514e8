"""jaxrobust: verifiable, generalizable and efficient robust deep learning in JAX/Flax.

Reimplements (and extends) the methods of C. Liu, "Towards Verifiable, Generalizable and
Efficient Robust Deep Neural Networks", EPFL thesis 2022.
"""
from jaxrobust import _xla_flags  # noqa: F401  (before JAX starts its CPU backend)
from jaxrobust.threat import ThreatModel, lp_norm, canonical_norm

__version__ = "0.1.0"
__all__ = ["ThreatModel", "lp_norm", "canonical_norm", "__version__"]
