"""The training text of the shipped model pair: the Python standard library's own source.

It is on every machine that runs Python, needs no download, and suits code completion (the
HumanEval setting of Staged Speculative Decoding).  Tokens are bytes (V = 256): no tokenizer to
ship, and every string round-trips.  Files are split into train and held-out by a hash of their
path relative to the stdlib root, so the split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
HELD_OUT_PERCENT = 5


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library outside tests and bundled apps, sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [
        path for path in root.rglob("*.py")
        if not SKIP_DIRS.intersection(part for part in path.relative_to(root).parts[:-1])
    ]
    return sorted(files)


def is_held_out(relative: str) -> bool:
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 [N] bytes of the training files, each followed by a NUL
    held_out: torch.Tensor  # uint8 [M]
    files: int
    held_out_files: int


def load_corpus(root: Path | None = None) -> Corpus:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, held = bytearray(), bytearray()
    n_held = 0
    files = stdlib_files(root)
    for path in files:
        data = path.read_bytes() + b"\0"  # NUL marks a file boundary; it never occurs in source
        if is_held_out(str(path.relative_to(root))):
            held += data
            n_held += 1
        else:
            train += data
    if not train or not held:
        raise ValueError(f"no Python source found under {root} (found {len(files)} files)")
    return Corpus(_bytes_tensor(train), _bytes_tensor(held), len(files), n_held)


def _bytes_tensor(data: bytearray) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8).clone()  # a bytearray is writable: no warning


def encode(text: str) -> torch.Tensor:
    """Token ids [T] of a string: its UTF-8 bytes."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    """The string of byte token ids (invalid UTF-8 shown as U+FFFD)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
