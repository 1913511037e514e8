"""Certification: PEC, optimal-eps search, non-uniform regions, MILP."""
from jaxrobust.certify.pec import (Certificate, EpsSearch, certified_radius_curve, certify,
                                   hyperplane_distances, optimal_eps_search, pec_radius,
                                   signed_distances)

__all__ = ["Certificate", "EpsSearch", "certified_radius_curve", "certify", "hyperplane_distances",
           "optimal_eps_search", "pec_radius", "signed_distances"]
from jaxrobust.certify.nonuniform import NonUniformResult, cosine_similarity_stats, nonuniform_bounds

__all__ += ["NonUniformResult", "cosine_similarity_stats", "nonuniform_bounds"]
