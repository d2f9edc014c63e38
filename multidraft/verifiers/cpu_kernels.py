"""What the fused CPU kernels (``rrs_cpu``, ``optimal_cpu``, numba) share: whether they can
run, the input checks they cannot skip, and the split of a batch's rows over threads."""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util

import numpy
import torch
from torch import Tensor


@functools.cache
def have_numba() -> bool:
    """numba is a dependency of the package; without it the tensor paths serve."""
    return importlib.util.find_spec("numba") is not None


def runs_fused(device: torch.device) -> bool:
    """Whether a verifier's ``verify`` takes its fused kernel: CPU tensors, numba installed."""
    return device.type == "cpu" and have_numba()


def check_kernel_inputs(p: Tensor, q: Tensor, drafts: Tensor | None = None) -> None:
    """Checked even with validate_args=False: the kernels index p, q and drafts without bounds
    checks, so their shapes must agree (with mismatched rows a kernel had read and written past
    its arrays).  That every draft id is a token the kernels check themselves, before they index
    anything, and report (``raise_for_draft_ids``): a check here cost two cold numpy calls."""
    if p.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape [B, V], got {tuple(p.shape)} and {tuple(q.shape)}")
    if drafts is not None and (drafts.dim() != 2 or drafts.shape[0] != p.shape[0]):
        raise ValueError(f"drafts must have shape [B, k] with B = {p.shape[0]} (p's rows), got {tuple(drafts.shape)}")


def raise_for_draft_ids(drafts: Tensor, vocab: int) -> None:
    """The error for a kernel that found draft ids outside [0, vocab)."""
    ids = drafts.detach()
    raise ValueError(f"drafts must be token ids in [0, {vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")


def kernel_array(x: Tensor, dtype=None) -> numpy.ndarray:
    """A CPU tensor as the C-contiguous numpy array a kernel takes (its own memory where it is
    contiguous and of that dtype already), converted by numpy rather than torch: right after a
    kernel has swept a few MB, the caches are cold and each torch op costs ~40-110 µs (numpy's:
    ~20-40), which at B = 1 was a fifth of an `optimal` call."""
    return numpy.ascontiguousarray(x.detach().numpy(), dtype=dtype)


def row_chunks(batch: int) -> list[slice]:
    """Slices covering range(batch): one, or one per thread (torch.get_num_threads()) for
    several rows."""
    workers = max(1, min(batch, torch.get_num_threads()))
    bounds = [batch * i // workers for i in range(workers + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def run_on_chunks(fn, chunks: list[slice], *per_chunk) -> list:
    """[fn(chunk, *(x[i] for x in per_chunk)) for each chunk], in parallel threads when there are
    several: the kernels release the GIL, so rows run in parallel the way torch's own ops would
    (Python threads, not numba's threading layer, which is not safe under every fork and
    threading setup)."""
    if len(chunks) == 1:
        return [fn(chunks[0], *(x[0] for x in per_chunk))]
    with concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:
        return list(pool.map(fn, chunks, *per_chunk))
