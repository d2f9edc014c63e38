"""Recursive rejection sampling with replacement (SpecInfer): k i.i.d. drafts from q.

Draft i is checked against the running residual r_{i-1} (r_0 = p) and accepted with
probability min(1, r_{i-1}(x_i) / q(x_i)); on rejection the residual becomes
r_i = normalize(max(r_{i-1} - q, 0)); if every draft is rejected the token is drawn from r_k.

Every residual has the closed form r_i = max(p - c_i q, 0) / m_i with one scalar c_i per row:
c_0 = 0, c_{i+1} = c_i + m_i / Z_i, where m_i = sum(max(p - c_i q, 0)) is the residual's mass
and Z_i = 1 for drafts with replacement (Z_i = mass of q not yet drafted without replacement,
see rrs_wor.py).  So no [B, V] residual is ever stored: a step costs one fused reduction over V
and a gather, and the acceptance test needs only the gathered values at the draft.
On a CPU, ``verify`` runs in a fused kernel (rrs_cpu.py) that walks each row only as far as its
first accepted draft, one pass over the row per rejection (docs/performance.md).
The written proof is in docs/verifiers/rrs.md.
"""

from __future__ import annotations

import numpy
import torch
from torch import Tensor

from .base import (
    Verdict,
    Verifier,
    first_match,
    register_verifier,
    sample_categorical,
    sample_from_weights_with,
)
from .cpu_kernels import check_kernel_inputs, kernel_array, raise_for_draft_ids, row_chunks, run_on_chunks, runs_fused


def unnormalized_residual(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """max(p - c q, 0): [B, V].  p is the target, q the draft, c [B, 1]."""
    return torch.addcmul(p, c, q, value=-1).clamp_(min=0)


def acceptance_probability(p, q, x, c, m, z) -> Tensor:
    """min(1, r(x) / q_cur(x)) [B, 1] for the draft x [B, 1], with r = max(p - c q, 0) / m
    the residual and q_cur = q / z the draft law over tokens still draftable.

    Where m = 0 the step is reached with probability 0 in exact arithmetic (the previous
    step accepted surely); accepting there keeps every later term of the kernel finite.
    """
    return acceptance_at(p.gather(1, x), q.gather(1, x), c, m, z)


def acceptance_at(px: Tensor, qx: Tensor, c: Tensor, m: Tensor, z: Tensor) -> Tensor:
    """``acceptance_probability`` from the values px = p(x), qx = q(x) [B, 1] at the draft."""
    ratio = torch.addcmul(px, c, qx, value=-1).clamp_(min=0) * z / (m * qx)
    return torch.where(m > 0, ratio.clamp(max=1), torch.ones_like(ratio))


# Below this much draftable mass the running ``total - drafted`` loses more than ~1e-14 of its
# relative precision (float64), and the rows concerned take the exact sum instead.  In a lower
# precision the guard is 1/2: below it the difference would carry several ulps of error (a float32
# z of 0.0103 carried 6e-6 relative, review), while the exact sum keeps about one.
CANCELLATION_GUARD = 1e-2
LOW_PRECISION_GUARD = 0.5


def draftable_mass(q: Tensor, drafts: Tensor) -> Tensor:
    """z [B, k]: the q-mass of the tokens not drafted before step i, for drafts without
    replacement.  ``q.sum() - cumsum`` cancels when the first drafts hold nearly all of q (a
    peaked, low-temperature draft: 1 - max q = 4e-10 moved rrs-wor's output law by 1.3e-8); rows
    where it falls below CANCELLATION_GUARD are recomputed as the undrafted tokens' own sum
    plus the later drafts, both sums of positive terms, in float64 and rounded to q's dtype once
    (LOW_PRECISION_GUARD for float32 rows)."""
    qx = q.gather(1, drafts)  # [B, k]
    z = q.sum(dim=-1, keepdim=True) - qx.cumsum(dim=1) + qx  # [B, k]
    guard = CANCELLATION_GUARD if q.dtype == torch.float64 else LOW_PRECISION_GUARD
    low = (z < guard).any(dim=1)  # [B]
    if bool(low.any()):
        rows = low.nonzero().squeeze(1)
        # in float64 (only these rows), rounded once: positive terms, no cancellation
        qx_low = qx[rows].double()
        undrafted = q[rows].double().scatter(1, drafts[rows], 0.0).sum(dim=-1, keepdim=True)  # [n, 1]
        z[rows] = (undrafted + qx_low.flip(1).cumsum(dim=1).flip(1)).to(q.dtype)
    return z


def draftable_q_mass(q: Tensor, drafts: Tensor, without_replacement: bool) -> Tensor:
    """The q-mass z [B, k] the walk divides by at each step: all of q with replacement, the
    tokens not yet drafted without (``draftable_mass``)."""
    if without_replacement:
        return draftable_mass(q, drafts)
    return q.sum(dim=-1, keepdim=True).expand(-1, drafts.shape[1])


def rejection_walk(p: Tensor, q: Tensor, drafts: Tensor, without_replacement: bool):
    """Acceptance probabilities of the k drafts in order, and the final residual.

    Returns (accepts: list of k tensors [B, 1], residual [B, V] unnormalized, mass [B, 1]).
    """
    c = torch.zeros_like(p[:, :1])  # [B, 1]
    m = p.sum(dim=-1, keepdim=True)  # [B, 1] residual mass (1 up to rounding)
    zs = draftable_q_mass(q, drafts, without_replacement)  # [B, k]
    accepts = []
    k = drafts.shape[1]
    for i in range(k):
        x = drafts[:, i : i + 1]  # [B, 1]
        z = zs[:, i : i + 1]  # [B, 1] q-mass of the tokens still draftable
        accepts.append(acceptance_probability(p, q, x, c, m, z))
        c = c + torch.where(m > 0, m / z, torch.zeros_like(m))
        if i < k - 1:
            m = unnormalized_residual(p, q, c).sum(dim=-1, keepdim=True)
    residual = unnormalized_residual(p, q, c)  # [B, V]
    return accepts, residual, residual.sum(dim=-1, keepdim=True)


def recursive_rejection_kernel(p: Tensor, q: Tensor, drafts: Tensor, without_replacement: bool) -> Tensor:
    """Exact distribution [B, V] of the token emitted by recursive rejection sampling."""
    accepts, residual, mass = rejection_walk(p, q, drafts, without_replacement)
    kern = torch.zeros_like(p)  # [B, V]
    reach = torch.ones_like(mass)  # [B, 1] probability that draft i is examined
    for i, accept in enumerate(accepts):
        kern.scatter_add_(1, drafts[:, i : i + 1], reach * accept)
        reach = reach * (1 - accept)
    # Where the last residual has no mass, reach is 0 in exact arithmetic; p keeps it finite.
    last = torch.where(mass > 0, residual / torch.where(mass > 0, mass, torch.ones_like(mass)), p)
    return kern + reach * last


def recursive_rejection_verify(
    p: Tensor, q: Tensor, drafts: Tensor, without_replacement: bool, generator: torch.Generator | None
) -> Verdict:
    """Sample the recursive rejection scheme directly: one uniform per draft, no [B, V] kernel.

    Both paths below make the same decisions from the same uniforms (up to rounding in the
    row sums): tensor ops over the whole batch (accelerators, or no numba), or on the CPU a
    fused kernel that walks each row only as far as its first accepted draft.
    """
    uniforms = torch.rand(drafts.shape, generator=generator, device=p.device, dtype=p.dtype)  # [B, k]
    u_fallback = torch.rand((p.shape[0], 1), generator=generator, device=p.device, dtype=p.dtype)  # [B, 1]
    if runs_fused(p.device):
        return _verify_fused(p, q, drafts, without_replacement, uniforms, u_fallback)
    token = _verify_dense(p, q, drafts, without_replacement, uniforms, u_fallback)
    return Verdict(token, first_match(drafts, token))


def _verify_dense(p, q, drafts, without_replacement, uniforms, u_fallback) -> Tensor:
    """Every row walks all k drafts and draws a fallback: no host sync (for accelerators)."""
    accepts, residual, mass = rejection_walk(p, q, drafts, without_replacement)
    passed = uniforms < torch.cat(accepts, dim=1)  # [B, k]
    chosen = torch.where(passed.any(dim=1), passed.to(torch.uint8).argmax(dim=1), -1)  # [B]
    fallback = sample_from_weights_with(torch.where(mass > 0, residual, p), u_fallback)  # [B]
    accepted_token = drafts.gather(1, chosen.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(chosen >= 0, accepted_token, fallback)


def _verify_fused(p, q, drafts, without_replacement, uniforms, u_fallback) -> Verdict:
    """The same walk one row at a time in a fused CPU kernel (``rrs_cpu``): a row stops at its
    first accepted draft, and each rejection costs one pass over its p and q.  The kernel also
    finds which draft the token is (``first_match``), sparing the tensor ops."""
    from .rrs_cpu import verify_rows  # numba compiles the kernel, or loads it from its cache

    check_kernel_inputs(p, q, drafts)
    rows = [kernel_array(p), kernel_array(q), kernel_array(drafts, numpy.int64), kernel_array(uniforms),
            kernel_array(u_fallback.squeeze(1))]
    token, accepted = numpy.empty(drafts.shape[0], numpy.int64), numpy.empty(drafts.shape[0], numpy.int64)

    def verify(chunk: slice) -> bool:
        return verify_rows(*(x[chunk] for x in rows), without_replacement, token[chunk], accepted[chunk])

    if not all(run_on_chunks(verify, row_chunks(drafts.shape[0]))):
        raise_for_draft_ids(drafts, p.shape[1])
    return Verdict(torch.from_numpy(token), torch.from_numpy(accepted))


@register_verifier("rrs")
class RecursiveRejection(Verifier):
    """Recursive rejection sampling over k i.i.d. drafts (SpecInfer)."""

    iid_drafts = True
    exact_acceptance = True
    needs_exact_sums = False  # its tests and residuals divide by the rows' own sums

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)  # [B, k]

    def _expected_acceptance(self, p, q, k):
        # Averaged over i.i.d. drafts, all k are rejected with probability m_k (docs/verifiers/rrs.md).
        c = torch.zeros_like(p[:, :1])
        m = p.sum(dim=-1, keepdim=True)
        for _ in range(k):
            c = c + m
            m = unnormalized_residual(p, q, c).sum(dim=-1, keepdim=True)
        return 1 - m.squeeze(1)

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)  # [B]

    def _kernel(self, p, q, drafts):
        return recursive_rejection_kernel(p, q, drafts, without_replacement=False)

    def _verify(self, p, q, drafts, generator):
        return recursive_rejection_verify(p, q, drafts, False, generator)
