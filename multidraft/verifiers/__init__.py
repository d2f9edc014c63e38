"""Interchangeable multi-draft verifiers, chosen by name (see base.py for the contract)."""

from .base import (
    Verdict,
    Verifier,
    available_verifiers,
    get_verifier,
    register_verifier,
)

# Importing a verifier module registers it.
from . import single, rrs, rrs_wor, kseq, greedy, spechub, otm, optimal, optimal_wor, importance, gls  # noqa: E402,F401

__all__ = ["Verdict", "Verifier", "available_verifiers", "get_verifier", "register_verifier"]
