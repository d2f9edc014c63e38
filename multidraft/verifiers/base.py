"""The verifier contract, the registry, argument validation and shared sampling helpers.

Conventions used by every verifier (the same names run through the engine and proofs):

    p       [B, V]  target probabilities: the large model, the law the output must follow
    q       [B, V]  draft probabilities: the small model, the law that proposes tokens
    drafts  [B, k]  LongTensor of ordered draft tokens, one row per tree node

A verifier is a pair (draft scheme, kernel).  ``draft`` samples the ordered k-tuple of
drafts from q by the verifier's own scheme; ``draft_probability`` is the exact probability of
a given tuple under that scheme; ``kernel`` is the exact distribution of the emitted token
given p, q and the tuple; ``verify`` samples from ``kernel``.  A verifier is exact when for all
p, q, k

    sum over tuples t of draft_probability(q, t) * kernel(p, q, t) == p.

Subclasses implement ``_draft``, ``_draft_probability``, ``_kernel`` and optionally a faster
``_verify``; the public methods validate arguments (unless switched off) and dispatch.
"""

from __future__ import annotations

from typing import Callable, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Verdict",
    "Verifier",
    "available_verifiers",
    "get_verifier",
    "register_verifier",
    "as_law",
    "sample_from_weights",
    "sample_from_weights_with",
    "sample_categorical",
    "inverse_cdf",
    "first_match",
]


class Verdict(NamedTuple):
    """What ``verify`` decides for each of the B nodes."""

    token: Tensor  # [B] the emitted token
    accepted: Tensor  # [B] index of the first draft equal to ``token``, or -1 if none is


# Row sums may drift from 1 by rounding; beyond these the input is not a distribution.
SUM_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}


class Verifier:
    """Base class of all verifiers.  See the module docstring for the contract."""

    # Capability flags: class attributes, read by the engine, the proofs and the reports.
    name: ClassVar[str] = ""
    min_drafts: ClassVar[int] = 1
    max_drafts: ClassVar[int | None] = None  # None: any k >= min_drafts
    distinct_drafts: ClassVar[bool] = False  # True: draft() never repeats a token in a row
    iid_drafts: ClassVar[bool] = True  # True: draft() is k i.i.d. samples from q

    exact_acceptance: ClassVar[bool] = False  # True: expected_acceptance() has a closed form
    # True: the kernel and verify read p and q as exact distributions, so rows that pass
    # validation while off from 1 by up to SUM_TOLERANCE are divided by their sums before they
    # see them (without that the output law was off by as much); False: they work from the sums
    # themselves and spare the pass.  True by default, the safe side for a verifier that does not
    # say.  expected_acceptance (closed forms, off the hot path) always gets normalized rows.
    needs_exact_sums: ClassVar[bool] = True

    _default_validate_args: ClassVar[bool] = True

    def __init__(self, validate_args: bool | None = None):
        self.validate_args = (
            Verifier._default_validate_args if validate_args is None else bool(validate_args)
        )

    @staticmethod
    def set_default_validate_args(value: bool) -> None:
        """Switch argument validation on or off for verifiers created afterwards.

        Validation syncs with the device (it reads values back to report them); turn it off
        in a serving loop once the inputs are known to be well formed.
        """
        Verifier._default_validate_args = bool(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, validate_args={self.validate_args})"

    # ---- public API -------------------------------------------------------------------

    def draft(self, q: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Sample drafts by this verifier's own scheme: LongTensor [B, k]."""
        if self.validate_args:
            check_distribution("q", q)
            self.check_num_drafts(k, q)
        return self._draft(q, k, generator)

    def draft_probability(self, q: Tensor, drafts: Tensor) -> Tensor:
        """Exact probability [B] that ``draft(q, k)`` returns each ordered tuple in ``drafts``.

        Tuples the scheme cannot produce (a token with q = 0, a repeat under a scheme that
        draws distinct tokens) get probability 0 rather than an error: this is the function
        that exact enumeration sums over.
        """
        if self.validate_args:
            check_distribution("q", q)
            check_drafts(drafts, q, require_positive_q=False)
            self.check_num_drafts(drafts.shape[1], q)
        # draft() draws from q as a law (every sampler divides by the row's mass), so the
        # probability of a tuple is that of the normalized row
        return self._draft_probability(as_distribution(q), drafts)

    def kernel(self, p: Tensor, q: Tensor, drafts: Tensor) -> Tensor:
        """Exact distribution [B, V] of the emitted token given p, q and the drafts."""
        if self.validate_args:
            self.check_inputs(p, q, drafts)
        if self.needs_exact_sums:
            p, q = as_distribution(p), as_distribution(q)
        return self._kernel(p, q, drafts)

    def verify(
        self, p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator | None = None
    ) -> Verdict:
        """Sample the emitted token from ``kernel`` and report which draft (if any) it is."""
        if self.validate_args:
            self.check_inputs(p, q, drafts)
        if self.needs_exact_sums:
            p, q = as_distribution(p), as_distribution(q)
        return self._verify(p, q, drafts, generator)

    def expected_acceptance(self, p: Tensor, q: Tensor, k: int) -> Tensor:
        """Exact probability [B] that the emitted token is a draft, averaged over this
        verifier's own drafts.  Only for verifiers with ``exact_acceptance = True``; reports
        estimate the others by sampling."""
        if not self.exact_acceptance:
            raise NotImplementedError(f"{self.name} has no closed-form acceptance; estimate it by sampling")
        if self.validate_args:
            check_distribution("p", p)
            check_distribution("q", q)
            if p.shape != q.shape:
                raise ValueError(f"p and q must have the same shape [B, V], got {tuple(p.shape)} and {tuple(q.shape)}")
            self.check_num_drafts(k, q)
        return self._expected_acceptance(as_distribution(p), as_distribution(q), k)

    # ---- what subclasses implement ----------------------------------------------------

    def _expected_acceptance(self, p: Tensor, q: Tensor, k: int) -> Tensor:
        raise NotImplementedError

    def _draft(self, q: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _draft_probability(self, q: Tensor, drafts: Tensor) -> Tensor:
        raise NotImplementedError

    def _kernel(self, p: Tensor, q: Tensor, drafts: Tensor) -> Tensor:
        raise NotImplementedError

    def _verify(
        self, p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator | None
    ) -> Verdict:
        # Correct for every verifier; subclasses override it when a direct sampler is cheaper.
        token = sample_from_weights(self._kernel(p, q, drafts), generator)
        return Verdict(token, first_match(drafts, token))

    # ---- validation -------------------------------------------------------------------

    def check_num_drafts(self, k: int, q: Tensor) -> None:
        """Raise ValueError unless this verifier can draft k tokens from every row of q."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"k must be an int, got {k!r} of type {type(k).__name__}")
        if k < self.min_drafts:
            raise ValueError(f"{self.name} needs k >= {self.min_drafts} drafts, got k = {k}")
        if self.max_drafts is not None and k > self.max_drafts:
            raise ValueError(f"{self.name} supports at most {self.max_drafts} drafts, got k = {k}")
        if self.distinct_drafts:
            support = (q > 0).sum(dim=-1)  # [B]
            row = int(torch.argmin(support))
            if int(support[row]) < k:
                raise ValueError(
                    f"{self.name} draws k = {k} distinct drafts, but row {row} of q has only "
                    f"{int(support[row])} tokens with positive probability"
                )

    def check_inputs(self, p: Tensor, q: Tensor, drafts: Tensor) -> None:
        check_distribution("p", p)
        check_distribution("q", q)
        if p.shape != q.shape:
            raise ValueError(f"p and q must have the same shape [B, V], got {tuple(p.shape)} and {tuple(q.shape)}")
        if p.device != q.device:
            raise ValueError(f"p and q must be on the same device, got {p.device} and {q.device}")
        if p.dtype != q.dtype:
            raise ValueError(f"p and q must have the same dtype, got {p.dtype} and {q.dtype}")
        check_drafts(drafts, q, require_positive_q=True)
        self.check_num_drafts(drafts.shape[1], q)
        if self.distinct_drafts and drafts.shape[1] > 1:
            ordered = drafts.sort(dim=-1).values
            repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)  # [B]
            if bool(repeats.any()):
                row = int(repeats.nonzero()[0, 0])
                raise ValueError(
                    f"{self.name} drafts must be distinct, but row {row} repeats a token: "
                    f"{drafts[row].tolist()}"
                )


def as_distribution(x: Tensor) -> Tensor:
    """Each row of x [B, V] divided by its sum, in x's dtype (``needs_exact_sums``; ``as_law``
    also moves to float64).  Rows that sum to 0 are left as they are."""
    total = x.sum(dim=-1, keepdim=True)
    return x / torch.where(total > 0, total, torch.ones_like(total))


def check_distribution(name: str, x: Tensor) -> None:
    """Raise ValueError unless x is a [B, V] float32/float64 tensor of probability rows."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, V], got {x.dim()} dims: {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have B >= 1 rows and V >= 1 columns, got {tuple(x.shape)}")
    if x.dtype not in SUM_TOLERANCE:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}; cast it with .float()")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        b, v = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name}[{b}, {v}] = {x[b, v].item()} is not finite")
    if bool((x < 0).any()):
        b, v = (x < 0).nonzero()[0].tolist()
        raise ValueError(f"{name}[{b}, {v}] = {x[b, v].item():.6g} is negative; probabilities must be >= 0")
    tol = SUM_TOLERANCE[x.dtype]
    sums = x.sum(dim=-1, dtype=torch.float64)  # [B]
    row = int(torch.argmax((sums - 1).abs()))
    if abs(float(sums[row]) - 1) > tol:
        raise ValueError(
            f"row {row} of {name} sums to {float(sums[row]):.12g}, more than {tol:g} "
            f"(the {x.dtype} tolerance) from 1"
        )


def check_drafts(drafts: Tensor, q: Tensor, require_positive_q: bool) -> None:
    """Raise ValueError unless drafts is a LongTensor [B, k] of valid token ids for q."""
    if not isinstance(drafts, Tensor):
        raise ValueError(f"drafts must be a torch.Tensor, got {type(drafts).__name__}")
    if drafts.dtype != torch.long:
        raise ValueError(f"drafts must be a LongTensor (torch.int64), got {drafts.dtype}")
    if drafts.dim() != 2 or drafts.shape[0] != q.shape[0]:
        raise ValueError(
            f"drafts must have shape [B, k] with B = {q.shape[0]} rows like q, got {tuple(drafts.shape)}"
        )
    if drafts.device != q.device:
        raise ValueError(f"drafts must be on q's device {q.device}, got {drafts.device}")
    vocab = q.shape[1]
    bad = (drafts < 0) | (drafts >= vocab)
    if bool(bad.any()):
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(
            f"drafts[{b}, {i}] = {int(drafts[b, i])} is out of range for a vocabulary of "
            f"V = {vocab} (ids must be in 0..{vocab - 1})"
        )
    if require_positive_q:
        zero = q.gather(1, drafts) <= 0  # [B, k]
        if bool(zero.any()):
            b, i = zero.nonzero()[0].tolist()
            raise ValueError(
                f"drafts[{b}, {i}] = {int(drafts[b, i])} has q[{b}, {int(drafts[b, i])}] = 0: "
                f"the draft model cannot propose it"
            )


# ---- sampling helpers shared by verifiers -----------------------------------------------


def as_law(x: Tensor) -> Tensor:
    """Rows [B, V] in float64, renormalized: for verifiers whose arithmetic takes p and q to be
    exact distributions (optimal's plan, gls's quadratures).  Float32 rows sum to 1 only within
    ~1e-6, which at large k moves q(T)^k by more than optimal's tolerance; the output law is
    then the renormalized row."""
    x = x.to(torch.float64)
    return x / x.sum(dim=-1, keepdim=True)


def sample_from_weights(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row [B] with probability proportional to the nonnegative ``weights`` [B, V].

    Inverse-CDF sampling (``inverse_cdf``).  A token of weight 0 is never returned, which
    keeps every verifier inside p's support.  Every row must have positive total weight.
    """
    u = torch.rand((weights.shape[0], 1), generator=generator, device=weights.device, dtype=weights.dtype)
    return sample_from_weights_with(weights, u)


def sample_from_weights_with(weights: Tensor, u: Tensor) -> Tensor:
    """``sample_from_weights`` driven by given uniforms u [B, 1] in [0, 1): the same token
    for the same u.  Lets a caller draw its uniforms up front and use only some rows."""
    return inverse_cdf(weights, u).squeeze(1)


def sample_categorical(q: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k i.i.d. tokens per row [B, k] from the probability rows q [B, V]."""
    u = torch.rand((q.shape[0], k), generator=generator, device=q.device, dtype=q.dtype)
    return inverse_cdf(q, u)


CDF_BLOCK = 128  # tokens per block in the two-level inverse CDF


def block_reduce(x: Tensor, reduce) -> Tensor:
    """``reduce(block, dim=-1)`` of every block of CDF_BLOCK columns of x [B, V]: [B, nb], the
    last block partial when CDF_BLOCK does not divide V.

    One read of x, like one reduction over the row, but it leaves a [B, V / CDF_BLOCK] summary
    that later steps can search instead of the row.
    """
    batch, vocab = x.shape
    whole = vocab - vocab % CDF_BLOCK
    out = reduce(x[:, :whole].reshape(batch, whole // CDF_BLOCK, CDF_BLOCK), dim=-1)  # [B, V // CDF_BLOCK]
    if whole < vocab:
        out = torch.cat([out, reduce(x[:, whole:], dim=-1, keepdim=True)], dim=1)
    return out


def block_weights(weights: Tensor, block: Tensor, exclude: Tensor | None = None) -> Tensor:
    """The entries [B, k, CDF_BLOCK] of the blocks ``block`` [B, k] of weights [B, V]; columns
    past V (in a partial last block) and the ``exclude`` column [B, 1] read as 0."""
    vocab = weights.shape[1]
    columns = block.unsqueeze(-1) * CDF_BLOCK + torch.arange(CDF_BLOCK, device=weights.device)
    inside = weights.gather(1, columns.clamp(max=vocab - 1).flatten(1)).view(columns.shape)
    keep = columns < vocab
    if exclude is not None:
        keep &= columns != exclude.unsqueeze(-1)
    return torch.where(keep, inside, torch.zeros_like(inside))


def inverse_cdf(weights: Tensor, u: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Tokens [B, k]: for each uniform u[b, j] in [0, 1), the first token whose cumulative
    weight exceeds u[b, j] times the row's total.  ``weights`` [B, V] is nonnegative; with
    ``exclude`` [B, 1] that column counts as weight 0 (without copying the weights).  Every
    row must have positive total.

    A token of weight 0 is never returned (its CDF step is flat), which keeps every verifier
    inside p's support.  For a large V the search runs in two levels: block sums (one read of
    the row), a search among the blocks, and a cumsum of the chosen block only.  A cumsum over
    the whole row is a sequential scan, several times dearer than the read, and the two-level
    search returns the same token up to rounding in the partial sums.
    """
    batch, vocab = weights.shape
    if vocab < 4 * CDF_BLOCK:
        if exclude is not None:
            weights = weights.scatter(1, exclude, 0.0)
        cdf = weights.cumsum(dim=-1)  # [B, V]
        return _search_cdf(cdf, _below_total(u * cdf[:, -1:], cdf[:, -1:]))
    block_sums = block_reduce(weights, torch.sum)  # [B, nb]
    if exclude is not None:
        # The excluded column's block is summed again without it (subtracting its weight
        # from the block sum would cancel when that weight dominates the block).
        home = exclude // CDF_BLOCK  # [B, 1]
        home_weights = block_weights(weights, home, exclude)  # [B, 1, CDF_BLOCK]
        block_sums = block_sums.scatter(1, home, home_weights.sum(dim=-1))
    block_cdf = block_sums.cumsum(dim=-1)  # [B, nb]
    target = _below_total(u * block_cdf[:, -1:], block_cdf[:, -1:])  # [B, k]
    block = _search_cdf(block_cdf, target)  # [B, k]
    below = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inside_cdf = block_weights(weights, block, exclude).cumsum(dim=-1)  # [B, k, CDF_BLOCK]
    # Rounding can put target - below at or past the block's own total: keep it inside.
    offset = _search_cdf(inside_cdf, _below_total((target - below).clamp(min=0).unsqueeze(-1), inside_cdf[..., -1:]))
    return block * CDF_BLOCK + offset.squeeze(-1)


def _below_total(target: Tensor, total: Tensor) -> Tensor:
    """target capped just below total: a search for it can then never step past the last
    token of positive weight."""
    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))


def _search_cdf(cdf: Tensor, target: Tensor) -> Tensor:
    """Index [..., k] of the first cdf entry above ``target`` (within the row)."""
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)


def first_match(drafts: Tensor, token: Tensor) -> Tensor:
    """Index [B] of the first draft equal to ``token`` in each row, or -1 if none is."""
    match = drafts == token.unsqueeze(1)  # [B, k]
    first = match.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index
    return torch.where(match.any(dim=1), first, torch.full_like(first, -1))


# ---- registry -----------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Verifier]] = {}

V = TypeVar("V", bound=type[Verifier])


def register_verifier(name: str, *, replace: bool = False) -> Callable[[V], V]:
    """Class decorator: make a Verifier subclass available as ``get_verifier(name)``."""

    def decorate(cls: V) -> V:
        if not (isinstance(cls, type) and issubclass(cls, Verifier)):
            raise ValueError(f"register_verifier({name!r}) decorates Verifier subclasses, got {cls!r}")
        if name in _REGISTRY and not replace:
            raise ValueError(
                f"a verifier named {name!r} is already registered ({_REGISTRY[name]!r}); "
                f"pass replace=True to override it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


PLUGIN_GROUP = "multidraft.verifiers"
_plugins_loaded = False


def load_plugins() -> None:
    """Register the verifiers other packages declare under the ``multidraft.verifiers`` entry
    point group (``name = "package.module:VerifierClass"``), once per process."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name in _REGISTRY:
            continue
        loaded = entry.load()  # importing a module that uses @register_verifier registers it
        if isinstance(loaded, type) and issubclass(loaded, Verifier) and entry.name not in _REGISTRY:
            register_verifier(entry.name)(loaded)


def available_verifiers() -> list[str]:
    """Names accepted by ``get_verifier``, sorted (plug-ins included)."""
    load_plugins()
    return sorted(_REGISTRY)


def get_verifier(name: str, **options) -> Verifier:
    """A new instance of the verifier registered as ``name`` (options go to its constructor)."""
    load_plugins()
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown verifier {name!r}; known verifiers: {', '.join(available_verifiers())}"
        ) from None
    return cls(**options)
