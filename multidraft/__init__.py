"""multidraft: multi-draft speculative decoding with interchangeable, provably exact verifiers."""

from .verifiers import Verdict, Verifier, available_verifiers, get_verifier, register_verifier
from . import proofs  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Verdict",
    "Verifier",
    "available_verifiers",
    "get_verifier",
    "register_verifier",
    "proofs",
]
