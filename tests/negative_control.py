"""A plausible but wrong verifier: recursive rejection that forgets to update the residual.

Every draft is checked against p itself instead of the running residual, and a full rejection
draws from normalize(max(p - q, 0)).  With one draft this is exactly right; with k >= 2 it
over-emits tokens where p > q.  The exactness tests must catch it.
"""

import torch

from multidraft.verifiers.base import Verifier, sample_categorical


class ForgetfulRejection(Verifier):
    name = "forgetful-rrs"

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)

    def _kernel(self, p, q, drafts):
        kern = torch.zeros_like(p)
        reach = torch.ones_like(p[:, :1])
        for i in range(drafts.shape[1]):
            x = drafts[:, i : i + 1]
            accept = (p.gather(1, x) / q.gather(1, x)).clamp(max=1)  # the bug: always p, never the residual
            kern.scatter_add_(1, x, reach * accept)
            reach = reach * (1 - accept)
        residual = (p - q).clamp(min=0)
        mass = residual.sum(dim=1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-300), p)
        return kern + reach * residual
