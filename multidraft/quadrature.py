"""Exp-sinh quadrature on (0, inf): the proofs' optimum without replacement and gls's kernel
integrate smooth functions of a race's time with it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# t = exp(pi/2 sinh(tau)) on a uniform tau grid.  Step and range checked against exact
# enumeration (error ~1e-14; docs/proofs/optimal-acceptance.md, docs/verifiers/gls.md).
EXP_SINH_STEP = 1 / 32
EXP_SINH_REACH = 4.5


def exp_sinh_nodes(step: float = EXP_SINH_STEP, reach: float = EXP_SINH_REACH, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Nodes t [N] and weights w [N] (float64) with sum(w f(t)) ~ integral_0^inf f(t) dt for f
    smooth on (0, inf) and decaying at infinity; the substitution makes both ends decay doubly
    exponentially, so t from ~2e-31 to ~5e30 is covered (at the default reach) and endpoint
    behaviour costs no accuracy.

    ``offset``: the grid shifted by that much in tau; ``offset = step / 2`` gives the midpoints
    that halving the step adds (their weights still carry ``step``: halve them for the finer sum,
    which is then half the coarse sum plus theirs)."""
    tau = torch.arange(-reach + offset, reach + step / 2, step, dtype=torch.float64)
    t = torch.exp(torch.pi / 2 * torch.sinh(tau))
    return t, step * t * torch.pi / 2 * torch.cosh(tau)


def reach_for(smallest_rate: float, reach: float = EXP_SINH_REACH) -> float:
    """A reach whose nodes go past 64 / smallest_rate (an integrand e^{-rate t} has died out
    there), and never below ``reach``."""
    if not smallest_rate > 0:
        return reach
    # log(64) - log(rate), not log(64 / rate): that overflows for a subnormal rate (1e-310)
    return max(reach, math.asinh(2 / math.pi * (math.log(64) - math.log(smallest_rate))))
