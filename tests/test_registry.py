from __future__ import annotations

import pytest
import torch

import multidraft as md
from multidraft.verifiers import base
from negative_control import ForgetfulRejection


def test_core_verifiers_are_registered():
    assert {"single", "rrs", "rrs-wor"} <= set(md.available_verifiers())
    assert md.available_verifiers() == sorted(md.available_verifiers())


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown verifier 'nope'; known verifiers: .*rrs, rrs-wor"):
        md.get_verifier("nope")


def test_register_a_user_verifier_and_guard_duplicates():
    try:
        md.register_verifier("test-forgetful")(type("Mine", (ForgetfulRejection,), {}))
        assert "test-forgetful" in md.available_verifiers()
        v = md.get_verifier("test-forgetful")
        assert v.name == "test-forgetful"
        with pytest.raises(ValueError, match="already registered"):
            md.register_verifier("test-forgetful")(ForgetfulRejection)
        with pytest.raises(ValueError, match="decorates Verifier subclasses"):
            md.register_verifier("not-a-class")(lambda: None)
    finally:
        base._REGISTRY.pop("test-forgetful", None)


def test_verdict_fields():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    verdict = md.get_verifier("rrs").verify(p, p, torch.tensor([[1, 0]]), generator=torch.Generator().manual_seed(0))
    token, accepted = verdict
    assert token.shape == (1,) and accepted.shape == (1,)
    assert int(accepted) == 0 and int(token) == 1  # p == q: the first draft is always accepted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["single", "rrs", "rrs-wor"])
def test_cuda_matches_cpu_kernel(name):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(8, 50, generator=g, dtype=torch.float64)
    q = torch.rand(8, 50, generator=g, dtype=torch.float64)
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    v = md.get_verifier(name)
    k = 1 if name == "single" else 3
    drafts = v.draft(q, k, generator=g)
    cpu = v.kernel(p, q, drafts)
    gpu = v.kernel(p.cuda(), q.cuda(), drafts.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)
    verdict = v.verify(p.cuda(), q.cuda(), drafts.cuda(), generator=torch.Generator("cuda").manual_seed(0))
    assert verdict.token.device.type == "cuda"
