from __future__ import annotations

import json
import sys
from pathlib import Path


from multidraft.cli import main
from multidraft.verifiers import base

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_compare_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["compare", "--vocab", "50", "--pairs", "64", "--ks", "1,2", "--temperatures", "1.0", "--out", str(out),
                 "--verifiers", "rrs,rrs-wor,single", "--families", "dirichlet", "--no-pair", "--no-costs", "--quiet"])
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    rows = {(r["verifier"], r["k"]): r for r in data["rows"]}
    assert rows[("single", 2)]["acceptance"] is None and "at most 1" in rows[("single", 2)]["note"]
    for (name, _k), row in rows.items():
        if row["acceptance"] is not None and name != "rrs-wor":
            assert row["acceptance"] <= row["optimal_iid"] + 3 * row["ci95"] + 1e-9
    assert (out / "report.md").read_text().startswith("# multidraft acceptance comparison")
    assert "| dirichlet | 1 | 2 | rrs | " in capsys.readouterr().out


def test_unknown_verifier_is_a_clean_error(capsys):
    assert main(["verify-exactness", "nope"]) == 2
    assert "unknown verifier 'nope'; known verifiers:" in capsys.readouterr().err


def test_verify_exactness_on_a_user_verifier(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        code = main(["verify-exactness", "coin-flip-rrs", "--import", "custom_verifier",
                     "--max-k", "2", "--samples", "20000"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "coin-flip-rrs: exact on all" in out
    finally:
        base._REGISTRY.pop("coin-flip-rrs", None)
        sys.modules.pop("custom_verifier", None)


def test_verify_exactness_rejects_a_wrong_verifier(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import negative_control

    base.register_verifier("test-forgetful")(type("F", (negative_control.ForgetfulRejection,), {}))
    try:
        assert main(["verify-exactness", "test-forgetful", "--max-k", "2", "--samples", "20000"]) == 1
        assert "NOT EXACT" in capsys.readouterr().out
    finally:
        base._REGISTRY.pop("test-forgetful", None)


def test_verifiers_listing(capsys):
    assert main(["verifiers"]) == 0
    assert "rrs-wor" in capsys.readouterr().out


def test_a_user_verifier_runs_in_the_report_and_the_engine(tmp_path, capsys, monkeypatch):
    # Registered by importing the user's module: no change to the library.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        out = tmp_path / "report"
        assert main(["compare", "--import", "custom_verifier", "--verifiers", "coin-flip-rrs,rrs", "--families", "",
                     "--pairs", "16", "--ks", "1,2", "--temperatures", "1.0", "--tree-shapes", "2x2,2-1",
                     "--no-costs", "--quiet", "--out", str(out)]) == 0
        data = json.loads((out / "report.json").read_text())
        mine = {r["k"]: r for r in data["rows"] if r["verifier"] == "coin-flip-rrs"}
        theirs = {r["k"]: r for r in data["rows"] if r["verifier"] == "rrs"}
        for k in (1, 2):  # the same scheme as rrs: its sampled estimate covers rrs's exact value
            assert not mine[k]["exact_per_pair"] and theirs[k]["exact_per_pair"]
            assert abs(mine[k]["acceptance"] - theirs[k]["acceptance"]) < 3 * mine[k]["ci95"] + 1e-9
        engine = [r for r in data["engine"] if r["verifier"] == "coin-flip-rrs"]
        assert engine and engine[0]["block_efficiency"] >= 1
        capsys.readouterr()
        assert main(["generate", "--import", "custom_verifier", "--verifier", "coin-flip-rrs", "-n", "6", "--device", "cpu"]) == 0
        assert "verifier coin-flip-rrs" in capsys.readouterr().out
    finally:
        base._REGISTRY.pop("coin-flip-rrs", None)
        sys.modules.pop("custom_verifier", None)
