"""rrs / rrs-wor (and single, rrs at k = 1) sample through two code paths: a fused kernel on
the CPU (rrs_cpu.py), tensor ops over the whole batch on accelerators or without numba.  Given
the same uniforms they must emit the same tokens."""

from __future__ import annotations

import pytest
import torch

import multidraft as md
from multidraft.verifiers import cpu_kernels
from multidraft.verifiers.base import first_match
from multidraft.verifiers.rrs import _verify_dense, _verify_fused
from rows_and_threads import on_threads


def _rows(name: str, k: int, dtype, batch: int = 512, vocab: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed + k)
    logits = 3 * torch.randn(batch, vocab, generator=g, dtype=torch.float64)
    p = logits.softmax(-1).to(dtype)
    q = (logits + torch.randn(batch, vocab, generator=g, dtype=torch.float64)).softmax(-1).to(dtype)
    drafts = md.get_verifier(name).draft(q, k, generator=g)
    uniforms = torch.rand(drafts.shape, generator=g, dtype=dtype)
    u_fallback = torch.rand((batch, 1), generator=g, dtype=dtype)
    return p, q, drafts, uniforms, u_fallback


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,without_replacement", [("rrs", False), ("rrs-wor", True)])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_dense_and_fused_paths_agree(name, without_replacement, k, dtype):
    """The kernel sums in float64, the tensor path in the rows' dtype: on float32 rows the two
    could part only where a uniform falls within ~1e-7 of a threshold (none do here)."""
    p, q, drafts, uniforms, u_fallback = _rows(name, k, dtype)
    dense = _verify_dense(p, q, drafts, without_replacement, uniforms, u_fallback)
    fused = _verify_fused(p, q, drafts, without_replacement, uniforms, u_fallback)
    assert torch.equal(dense, fused.token)
    assert torch.equal(fused.accepted, first_match(drafts, dense))  # found in the kernel
    # many rows reject their first draft: the later steps (at k = 1 the residual draws) are compared too
    assert (dense != drafts[:, 0]).float().mean() > 0.1


@pytest.mark.parametrize("name,without_replacement", [("rrs", False), ("rrs-wor", True)])
def test_dense_and_fused_paths_agree_on_rows_off_from_one(name, without_replacement):
    """rrs and rrs-wor work from the rows' own sums (needs_exact_sums = False): a fused kernel
    that took sum(p) = 1 would part from the dense path on rows that do not sum to 1 (a mutation
    audit: 872 of 4096 rows with m = 1 in the fused kernel; the suite had not noticed)."""
    p, q, drafts, uniforms, u_fallback = _rows(name, 3, torch.float64, batch=4096)
    p, q = p * 0.7, q * 1.3
    dense = _verify_dense(p, q, drafts, without_replacement, uniforms, u_fallback)
    fused = _verify_fused(p, q, drafts, without_replacement, uniforms, u_fallback)
    assert torch.equal(dense, fused.token)


def test_fused_path_is_the_same_on_any_number_of_threads():
    rows = _rows("rrs", 3, torch.float32, batch=37)
    one = on_threads(1, lambda: _verify_fused(*rows[:3], False, *rows[3:]))
    split = on_threads(3, lambda: _verify_fused(*rows[:3], False, *rows[3:]))  # 37 rows in chunks of 12-13
    assert torch.equal(one.token, split.token) and torch.equal(one.accepted, split.accepted)


def test_without_numba_the_dense_path_serves(monkeypatch):
    from multidraft.verifiers import rrs

    calls = []
    monkeypatch.setattr(cpu_kernels, "have_numba", lambda: False)
    monkeypatch.setattr(rrs, "_verify_dense", lambda *a: calls.append(1) or _verify_dense(*a))
    p, q, drafts, _, _ = _rows("rrs", 2, torch.float32, batch=4)
    md.get_verifier("rrs").verify(p, q, drafts, torch.Generator().manual_seed(0))
    assert calls == [1]


@pytest.mark.parametrize("name", ["rrs", "rrs-wor", "single"])
def test_fused_path_checks_draft_ids_even_without_validation(name):
    p, q, drafts, _, _ = _rows(name, 1 if name == "single" else 2, torch.float32, batch=2, vocab=50)
    verifier = md.get_verifier(name, validate_args=False)
    for bad in (drafts + 50, drafts - 60):
        with pytest.raises(ValueError, match=r"drafts must be token ids in \[0, 50\)"):
            verifier.verify(p, q, bad, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.3])
def test_a_peaked_draft_without_replacement_stays_exact(temperature):
    """1 - max q down to 2e-16: the draftable mass after the top draft is summed from the
    undrafted tokens, not taken as 1 - q(top) (which cancelled: 1.3e-8 off at 1 - max q = 4e-10),
    and both verify paths see the same values."""
    q = (torch.tensor([12.0, 1, 0.5, 0, -1, -2], dtype=torch.float64) / temperature).softmax(-1)
    p = torch.full((6,), 1 / 6, dtype=torch.float64)
    verifier = md.get_verifier("rrs-wor")
    for k in (2, 3):
        torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    drafts = verifier.draft(q.expand(512, -1), 3, generator=g)
    uniforms = torch.rand(512, 3, generator=g, dtype=torch.float64)
    fallback = torch.rand(512, 1, generator=g, dtype=torch.float64)
    rows = (p.expand(512, -1), q.expand(512, -1), drafts, True, uniforms, fallback)
    assert torch.equal(_verify_dense(*rows), _verify_fused(*rows).token)


def test_drafts_without_replacement_use_float64_clocks_for_float32_q():
    """rrs-wor's (and optimal-wor's) race: a float32 uniform of exactly 0 (probability 2^-24)
    gave a clock of 0, which finishes first whatever its q (a 2e-3 bias at V = 32000); the
    uniforms are float64, so float32 and float64 rows of the same values draw the same."""
    from multidraft.verifiers.rrs_wor import sample_without_replacement

    q = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 8.0]) / 16  # exact in both dtypes
    one, two = (sample_without_replacement(q.to(dtype).expand(2000, -1), 3, torch.Generator().manual_seed(5))
                for dtype in (torch.float32, torch.float64))
    assert torch.equal(one, two)


@pytest.mark.parametrize("name", ["rrs", "rrs-wor", "optimal"])
def test_fused_paths_refuse_mismatched_shapes_even_without_validation(name):
    """The kernels index without bounds checks: rows that disagree had been read and written
    past their arrays (tokens of uninitialized memory came back)."""
    verifier = md.get_verifier(name, validate_args=False)
    p, q, drafts, _, _ = _rows("rrs", 2, torch.float64, batch=4, vocab=16)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"drafts must have shape \[B, k\] with B = 4"):
        verifier.verify(p, q, drafts[:1], g)
    with pytest.raises(ValueError, match=r"drafts must have shape \[B, k\] with B = 1"):
        verifier.verify(p[:1], q[:1], drafts, g)
    with pytest.raises(ValueError, match=r"p and q must have the same shape \[B, V\]"):
        verifier.verify(p, q[:, :8].contiguous(), drafts.clamp(max=7), g)


def test_an_empty_residual_draws_from_p_not_a_zero_weight_token():
    """p and q equal up to ulps, the one draft rejected by a uniform just below 1: the residual
    is empty, and the draw must come from p (it had returned the last token, of p = 0)."""
    from multidraft.verifiers import rrs_cpu

    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15, 0.0], dtype=torch.float64)
    q = (p * (1 + 1e-15 * torch.tensor([1.0, -1, 1, -1, 0, 0], dtype=torch.float64)))
    for u in (0.0, 0.5, 1 - 2**-53):
        token = rrs_cpu.residual_draw(p.numpy(), q.numpy(), 1.0 + 2e-16, 0.0, u)
        assert p[token] > 0
