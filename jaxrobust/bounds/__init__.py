"""Bound propagation for any JAX function (thesis §3.1): interval bound propagation over a traced
jaxpr with a per-primitive rule table."""
from jaxrobust.bounds.ibp import (Interval, UnsupportedPrimitiveError, ibp_bounds,
                                  ibp_margin_lower_bounds, input_interval, interval_bounds,
                                  supported_primitives)

__all__ = ["ibp_bounds", "ibp_margin_lower_bounds", "interval_bounds", "input_interval", "Interval",
           "UnsupportedPrimitiveError", "supported_primitives"]
