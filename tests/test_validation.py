"""Bad input gives a ValueError that names the value and the limit; validation can be switched off."""

from __future__ import annotations

import pytest
import torch

import multidraft as md
from multidraft.verifiers.base import Verifier

P = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)
Q = torch.tensor([[0.25, 0.25, 0.5, 0.0]], dtype=torch.float64)
D = torch.tensor([[0, 2]])


def _bad(name, **kw):
    args = {"p": P, "q": Q, "drafts": D}
    args.update(kw)
    return args


@pytest.mark.parametrize("name", ["rrs", "rrs-wor"])
@pytest.mark.parametrize(
    "args,message",
    [
        (_bad("neg", p=torch.tensor([[0.6, 0.5, -0.1, 0.0]], dtype=torch.float64)), r"p\[0, 2\] = -0.1 is negative"),
        (_bad("nan", q=torch.tensor([[0.5, float("nan"), 0.5, 0.0]], dtype=torch.float64)), r"q\[0, 1\] = nan is not finite"),
        (_bad("sum", p=torch.tensor([[0.5, 0.3, 0.3, 0.0]], dtype=torch.float64)), r"row 0 of p sums to 1.1, more than 1e-06"),
        (_bad("shape", p=P[:, :3] / P[:, :3].sum()), r"same shape \[B, V\], got \(1, 3\) and \(1, 4\)"),
        (_bad("dims", p=P[0]), r"p must have shape \[B, V\], got 1 dims"),
        (_bad("dtype", p=P.float()), r"same dtype, got torch.float32 and torch.float64"),
        (_bad("half", p=P.half(), q=Q.half()), r"p must be float32 or float64, got torch.float16"),
        (_bad("range", drafts=torch.tensor([[0, 4]])), r"drafts\[0, 1\] = 4 is out of range for a vocabulary of V = 4 \(ids must be in 0..3\)"),
        (_bad("negative id", drafts=torch.tensor([[-1, 0]])), r"drafts\[0, 0\] = -1 is out of range"),
        (_bad("q zero", drafts=torch.tensor([[0, 3]])), r"drafts\[0, 1\] = 3 has q\[0, 3\] = 0"),
        (_bad("int32", drafts=D.int()), r"LongTensor \(torch.int64\), got torch.int32"),
        (_bad("batch", drafts=torch.tensor([[0, 1], [1, 2]])), r"shape \[B, k\] with B = 1 rows like q, got \(2, 2\)"),
        (_bad("k=0", drafts=torch.zeros(1, 0, dtype=torch.long)), r"needs k >= 1 drafts, got k = 0"),
    ],
)
def test_bad_input_is_named(name, args, message):
    verifier = md.get_verifier(name)
    with pytest.raises(ValueError, match=message):
        verifier.verify(**args)
    with pytest.raises(ValueError, match=message):
        verifier.kernel(**args)


def test_bad_k():
    rrs = md.get_verifier("rrs")
    with pytest.raises(ValueError, match="needs k >= 1 drafts, got k = 0"):
        rrs.draft(Q, 0)
    with pytest.raises(ValueError, match="k must be an int, got 2.0"):
        rrs.draft(Q, 2.0)
    with pytest.raises(ValueError, match="single supports at most 1 drafts, got k = 2"):
        md.get_verifier("single").draft(Q, 2)
    with pytest.raises(ValueError, match="draws k = 4 distinct drafts, but row 0 of q has only 3 tokens"):
        md.get_verifier("rrs-wor").draft(Q, 4)


def test_repeated_draft_for_distinct_scheme():
    with pytest.raises(ValueError, match=r"rrs-wor drafts must be distinct, but row 0 repeats a token: \[2, 2\]"):
        md.get_verifier("rrs-wor").verify(P, Q, torch.tensor([[2, 2]]))


def test_impossible_tuple_has_probability_zero_not_an_error():
    assert float(md.get_verifier("rrs").draft_probability(Q, torch.tensor([[3, 0]]))) == 0
    assert float(md.get_verifier("rrs-wor").draft_probability(Q, torch.tensor([[2, 2]]))) == 0


def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="same device"):
        md.get_verifier("rrs").verify(P, Q.cuda(), D)


def test_validation_can_be_switched_off():
    bad = torch.tensor([[0.5, 0.3, 0.3, 0.0]], dtype=torch.float64)  # sums to 1.1
    quiet = md.get_verifier("rrs", validate_args=False)
    assert not quiet.validate_args
    quiet.kernel(bad, Q, D)  # no check, no error
    Verifier.set_default_validate_args(False)
    try:
        assert not md.get_verifier("rrs").validate_args
    finally:
        Verifier.set_default_validate_args(True)
    assert md.get_verifier("rrs").validate_args
