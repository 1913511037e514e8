"""Bound propagation for any JAX function (thesis §3.1): interval bound propagation and linear
relaxation bounds (CROWN / Fast-Lin / CROWN-IBP / IBP-inspired) over a traced jaxpr; exact
l_p-ball-and-box geometry.

Modules: ``tape`` (the one jaxpr interpreter and primitive table), ``ibp`` (Algorithm 3.2),
``relaxations`` (ReLU / sigmoid / tanh / max-pool lines as functions of (l, u)), ``backward`` (the
linear-bound tape, pull-backs, concretisation), ``patches`` (receptive-field form of conv layers),
``linear`` (the linear-bound API), ``geometry`` (exact l_p ball ∩ box solvers)."""
from jaxrobust.bounds.ibp import (Interval, UnsupportedPrimitiveError, ibp_bounds,
                                  ibp_margin_lower_bounds, input_interval, interval_bounds,
                                  supported_primitives)
from jaxrobust.bounds.linear import (METHODS, BoundGraph, LinearBounds, MarginBounds, bound_graph,
                                     certified_by_bounds, crown_bounds, linear_spec_bounds,
                                     margin_bounds, margin_spec)
from jaxrobust.bounds.relaxations import (RELU_RELAXATIONS, SIGMOID_RELAXATIONS, maxpool_lines,
                                          relu_lines, sigmoid_lines)

__all__ = ["ibp_bounds", "ibp_margin_lower_bounds", "interval_bounds", "input_interval", "Interval",
           "UnsupportedPrimitiveError", "supported_primitives", "METHODS", "BoundGraph",
           "LinearBounds", "MarginBounds", "bound_graph", "certified_by_bounds", "crown_bounds",
           "linear_spec_bounds", "margin_bounds", "margin_spec", "RELU_RELAXATIONS",
           "SIGMOID_RELAXATIONS", "relu_lines", "sigmoid_lines", "maxpool_lines"]
