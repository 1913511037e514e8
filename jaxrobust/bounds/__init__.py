"""Bound propagation for any JAX function (thesis §3.1): interval bound propagation and linear
relaxation bounds (CROWN / Fast-Lin / CROWN-IBP / IBP-inspired) over a traced jaxpr with a
per-primitive rule table; exact l_p-ball-and-box geometry."""
from jaxrobust.bounds.ibp import (Interval, UnsupportedPrimitiveError, ibp_bounds,
                                  ibp_margin_lower_bounds, input_interval, interval_bounds,
                                  supported_primitives)
from jaxrobust.bounds.linear import (METHODS, BoundGraph, LinearBounds, MarginBounds, bound_graph,
                                     certified_by_bounds, crown_bounds, linear_spec_bounds,
                                     margin_bounds, margin_spec)

__all__ = ["ibp_bounds", "ibp_margin_lower_bounds", "interval_bounds", "input_interval", "Interval",
           "UnsupportedPrimitiveError", "supported_primitives", "METHODS", "BoundGraph",
           "LinearBounds", "MarginBounds", "bound_graph", "certified_by_bounds", "crown_bounds",
           "linear_spec_bounds", "margin_bounds", "margin_spec"]
