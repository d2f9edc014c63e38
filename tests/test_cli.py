from __future__ import annotations

import json
import sys
from pathlib import Path

import chisquare
import pytest

import multidraft as md
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
        if row["acceptance"] is not None and name != "rrs-wor":  # i.i.d. drafts: at most the optimum, pair by pair
            slack = 0.0 if row["exact_per_pair"] else 4 * row["sampling_se"]  # sampled: the draft tuples' noise only
            assert row["acceptance"] <= row["optimal_iid"] + slack + 1e-9, row
    assert (out / "report.md").read_text().startswith("# multidraft acceptance comparison")
    assert "| dirichlet | 1 | 2 | rrs | " in capsys.readouterr().out


def test_the_bare_command_takes_compare_options(tmp_path):
    """`multidraft --quiet --out DIR ...` is the main job with options (it was 'invalid choice')."""
    out = tmp_path / "bare"
    assert main(["--vocab", "20", "--pairs", "8", "--ks", "2", "--temperatures", "1.0", "--verifiers", "rrs",
                 "--families", "dirichlet", "--no-pair", "--no-costs", "--quiet", "--out", str(out)]) == 0
    assert (out / "report.md").exists()


def test_verify_exactness_refuses_a_bad_family_alpha(capsys):
    assert main(["verify-exactness", "rrs", "--family-alpha", "0"]) == 2
    assert "--family-alpha must be in (0, 1), got 0.0" in capsys.readouterr().err


def test_unknown_verifier_is_a_clean_error(capsys):
    assert main(["verify-exactness", "nope"]) == 2
    assert "unknown verifier 'nope'; known verifiers:" in capsys.readouterr().err


@pytest.mark.parametrize("options,message", [
    (["--max-k", "0"], "--max-k must be >= 1"),
    (["--samples", "1"], "--samples must be >= 1000 per chi-square test, got 1"),
    (["--samples", "-1"], "--samples must be >= 1000"),
])
def test_verify_exactness_refuses_checks_that_cannot_fail(capsys, options, message):
    """0 draft counts or a handful of samples had passed with 'exact on all ... checks' (review)."""
    assert main(["verify-exactness", "rrs", *options]) == 2
    assert message in capsys.readouterr().err


def test_check_exactness_refuses_checks_that_cannot_fail():
    from multidraft.proofs import check_exactness

    with pytest.raises(ValueError, match="max_k must be an int >= 1"):
        check_exactness(md.get_verifier("rrs"), max_k=0)
    with pytest.raises(ValueError, match="samples must be an int >= 1000 per chi-square test, got 10"):
        check_exactness(md.get_verifier("rrs"), samples=10)


def test_verify_exactness_on_a_user_verifier(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        code = main(["verify-exactness", "coin-flip-rrs", "--import", "custom_verifier",
                     "--max-k", "2", "--samples", "20000", "--family-alpha", str(chisquare.reserve(3))])
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
                     "--pairs", "128", "--ks", "1,2", "--temperatures", "1.0", "--tree-shapes", "2x2,2-1",
                     "--no-costs", "--quiet", "--out", str(out)]) == 0
        data = json.loads((out / "report.json").read_text())
        mine = {r["k"]: r for r in data["rows"] if r["verifier"] == "coin-flip-rrs"}
        theirs = {r["k"]: r for r in data["rows"] if r["verifier"] == "rrs"}
        for k in (1, 2):  # the same scheme as rrs: its sampled estimate covers rrs's exact value
            assert not mine[k]["exact_per_pair"] and theirs[k]["exact_per_pair"]
            # Paired: both are scored on the same pairs, so they differ by the draft tuples' noise
            # alone (sampling_se), not by the spread between pairs (ci95, ~8x wider here).
            assert abs(mine[k]["acceptance"] - theirs[k]["acceptance"]) < 4 * mine[k]["sampling_se"] + 1e-9, (mine[k], theirs[k])
        engine = [r for r in data["engine"] if r["verifier"] == "coin-flip-rrs"]
        assert engine and engine[0]["block_efficiency"] >= 1
        capsys.readouterr()
        assert main(["generate", "--import", "custom_verifier", "--verifier", "coin-flip-rrs", "-n", "6", "--device", "cpu"]) == 0
        assert "verifier coin-flip-rrs" in capsys.readouterr().out
    finally:
        base._REGISTRY.pop("coin-flip-rrs", None)
        sys.modules.pop("custom_verifier", None)


def _compare(tmp_path, *options):
    out = tmp_path / "report"
    code = main(["compare", "--verifiers", "rrs", "--ks", "2", "--temperatures", "1.0", "--no-costs", "--quiet",
                 "--out", str(out), *options])
    return code, out


def test_compare_refuses_bad_counts_by_name(tmp_path, capsys):
    for option, value in (("--pairs", "0"), ("--pairs", "-5"), ("--vocab", "0"), ("--context-length", "0"), ("--ks", "0")):
        code, _ = _compare(tmp_path, "--no-pair", "--families", "dirichlet", option, value)
        err = capsys.readouterr().err
        assert code == 2 and f"{option} (" in err and ">= 1" in err and f"got {value}" in err, (option, value, err)


def test_compare_with_one_pair_reports_no_interval(tmp_path, capsys):
    code, out = _compare(tmp_path, "--no-pair", "--families", "dirichlet", "--pairs", "1", "--vocab", "20")
    assert code == 0
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["ci95"] is None and "(no interval)" in (out / "report.md").read_text()


def test_compare_prompts_file_uses_and_reports_the_counts_it_used(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    lines = ["def foo(x):", "    return x + 1", "import os", "class A:", "    pass  # a line longer than the context"]
    prompts.write_text("\n".join(lines) + "\n")
    # --pairs 3 takes the first three lines; the engine's 16 requests get all five (ragged, whole).
    code, out = _compare(tmp_path, "--prompts-file", str(prompts), "--pairs", "3", "--families", "", "--tree-shapes", "2x1",
                         "--context-length", "16")
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    assert data["pairs"] == {"shipped-pair": 3} and data["engine_requests"] == 5
    text = (out / "report.md").read_text()
    assert "3 (p, q) pairs per source" in text and "5 requests of 48 new tokens" in text
    assert "has 5 non-empty lines, so 5 were used, not the 16 asked for" in text
    assert "1 of the 5 prompt lines used were longer than 16 tokens" in text
    code, out = _compare(tmp_path, "--prompts-file", str(prompts), "--pairs", "100", "--families", "", "--no-engine")
    text = (out / "report.md").read_text()
    assert code == 0 and "5 (p, q) pairs per source" in text and "so 5 were used, not the 100 asked for" in text


def _benchmark(name):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _refused(entry, argv, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_benchmark_command_lines_refuse_what_they_would_drop(capsys):
    engine = _benchmark("engine")
    assert "unknown verifier 'typo'" in _refused(engine.parse_args, ["--verifiers", "rrs", "typo"], capsys)
    assert "'optimal' has no engine config" in _refused(engine.parse_args, ["--verifiers", "optimal"], capsys)
    assert "--repeats must be >= 1, got 0" in _refused(engine.parse_args, ["--repeats", "0"], capsys)
    quick = engine.parse_args(["--quick", "--batches", "2", "--repeats", "3"])  # explicit options win over --quick
    assert (quick.batches, quick.repeats) == ([2], 3)
    assert (engine.parse_args(["--quick"]).batches, engine.parse_args([]).repeats) == ([1, 16], 3)
    verifiers = _benchmark("verifiers")
    for argv, message in ((["--threads", "0"], "--threads must be >= 1, got 0"), (["--B", "0"], "--B must be >= 1, got 0"),
                          (["--max-call-s", "-1"], "--max-call-s must be >= 0 seconds, got -1.0")):
        assert message in _refused(verifiers.main, argv, capsys), argv
