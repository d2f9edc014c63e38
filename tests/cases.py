"""Moved: the corner cases live in multidraft.proofs.cases (kept for in-flight imports)."""
from multidraft.proofs.cases import *  # noqa: F401,F403
from multidraft.proofs.cases import CASES, exactness_cases, supported_ks  # noqa: F401
