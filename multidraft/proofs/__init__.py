"""Exact analysis: enumeration of a verifier's output law and the optimal acceptance bound."""

from .checks import ExactnessReport, check_exactness, chi_square
from .enumeration import acceptance_rate, output_distribution
from .optimal import (
    optimal_acceptance,
    optimal_acceptance_bruteforce,
    optimal_acceptance_for_scheme,
)

__all__ = [
    "ExactnessReport",
    "acceptance_rate",
    "check_exactness",
    "chi_square",
    "optimal_acceptance",
    "optimal_acceptance_bruteforce",
    "optimal_acceptance_for_scheme",
    "output_distribution",
]
