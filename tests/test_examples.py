"""Every example runs as shipped (small, fast settings where it takes an argument)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from multidraft.verifiers import base

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *argv: str) -> None:
    old = sys.argv
    sys.argv = [str(EXAMPLES / name), *argv]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = old


def test_compare_your_own(capsys):
    run_example("compare_your_own.py")
    out = capsys.readouterr().out
    assert "T = 0.6" in out and "optimum" in out and "importance" in out


def test_shipped_pair(capsys):
    run_example("shipped_pair.py")
    out = capsys.readouterr().out
    assert out.count("tokens per target pass") == 6 and "target alone" in out
    assert "spechub (widths=(2, 2, 2))" in out and "draft2=bigram" in out


def test_transformers_pair(tmp_path, capsys):
    pytest.importorskip("transformers")
    run_example("transformers_pair.py", str(tmp_path / "report"))
    out = capsys.readouterr().out
    assert "block efficiency" in out and "## Acceptance" in out
    assert (tmp_path / "report" / "report.json").is_file()


def test_custom_verifier(capsys):
    try:
        run_example("custom_verifier.py")
        assert "coin-flip-rrs: exact on" in capsys.readouterr().out
    finally:
        base._REGISTRY.pop("coin-flip-rrs", None)
