"""Write your own verifier, register it, and check that it is exact.

Run:  python examples/custom_verifier.py
or:   multidraft verify-exactness coin-flip-rrs --import custom_verifier   (with examples/ on PYTHONPATH)

The verifier below is recursive rejection sampling written the plain way (a full residual per
step), registered under a new name. Because it is registered, the engine, the reports and the
exactness checks can all use it by name; to ship it in your own package instead, declare

    [project.entry-points."multidraft.verifiers"]
    coin-flip-rrs = "yourpackage.module:CoinFlipRRS"
"""

import torch

import multidraft as md
from multidraft.verifiers.base import sample_categorical


@md.register_verifier("coin-flip-rrs")
class CoinFlipRRS(md.Verifier):
    """Recursive rejection sampling, one explicit residual per draft."""

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)  # [B, k] i.i.d. from q

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)  # [B]

    def _kernel(self, p, q, drafts):
        # p: target [B, V]; q: draft [B, V]
        kernel = torch.zeros_like(p)
        reach = torch.ones_like(p[:, :1])  # probability of getting to draft i
        residual = p
        for i in range(drafts.shape[1]):
            x = drafts[:, i : i + 1]
            accept = (residual.gather(1, x) / q.gather(1, x)).clamp(max=1)
            kernel.scatter_add_(1, x, reach * accept)
            reach = reach * (1 - accept)
            leftover = (residual - q).clamp(min=0)
            mass = leftover.sum(dim=1, keepdim=True)
            residual = torch.where(mass > 0, leftover / mass.clamp(min=1e-300), residual)
        return kernel + reach * residual


if __name__ == "__main__":
    report = md.proofs.check_exactness(md.get_verifier("coin-flip-rrs"), max_k=2, samples=50_000)
    print(f"{report.verifier}: {'exact' if report.passed else 'NOT exact'} on {len(report.results)} checks")
