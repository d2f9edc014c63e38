"""The comparison report end to end on small settings: the shipped model pair as a source, the
engine's block efficiency, the cost section, the plots; and the pieces it is built from."""

from __future__ import annotations

import io
import json

import pytest
import torch

from multidraft.engine.pretrained import held_out_windows, load_pair, training_record
from multidraft.reports import CompareConfig, run_report, write_report
from multidraft.reports.progress import Progress
from multidraft.reports.sources import next_token_logits


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    config = CompareConfig(
        verifiers=["rrs", "rrs-wor", "spechub", "importance", "otm"], families=["dirichlet"], ks=[1, 2],
        temperatures=[0.6, 1.0], vocab=30, pairs=48, tree_shapes=[(2, 1), (2, 3)], tree_widths=[(2, 2)], engine_prompts=3,
        engine_new_tokens=8, cost_vocab=[600], cost_ks=[2], out_dir=str(out),
    )
    result = run_report(config, show_progress=False)
    write_report(config, result)
    return config, result, out


def test_sources_include_the_shipped_pair(report):
    _, result, _ = report
    assert list(result.sources) == ["shipped-pair", "dirichlet"]
    assert "held-out Python standard-library source" in result.sources["shipped-pair"]


def test_acceptance_rows_respect_the_optimum(report):
    _, result, _ = report
    rows = [r for r in result.acceptance if r.acceptance is not None]
    assert {r.family for r in rows} == {"shipped-pair", "dirichlet"}
    for r in rows:
        if r.verifier in ("rrs", "importance", "otm"):  # i.i.d. drafts: bounded by the optimum
            assert r.acceptance <= r.optimal_iid + 3 * r.ci95 + 1e-9, r
        if r.k == 1:
            assert r.acceptance == pytest.approx(r.optimal_iid, abs=1e-9) or not r.exact_per_pair
    importance = {(r.family, r.temperature): r for r in rows if r.verifier == "importance" and r.k == 2}
    rrs = {(r.family, r.temperature): r for r in rows if r.verifier == "rrs" and r.k == 2}
    assert all(importance[key].acceptance >= rrs[key].acceptance - 1e-9 for key in importance)
    # otm's full-support LP at V = 256 is above the report's size limit: a clear n/a, not a hang.
    otm = [r for r in result.acceptance if r.verifier == "otm" and r.family == "shipped-pair" and r.k == 2]
    assert otm and all(r.acceptance is None and "max_variables" in r.note for r in otm)


def test_engine_rows(report):
    _, result, _ = report
    by_key = {(r.temperature, r.verifier, r.shape): r for r in result.engine}
    for r in by_key.values():
        if r.block_efficiency is not None:
            assert 1.0 <= r.block_efficiency <= r.depth + 1
            assert len(r.acceptance_by_depth) == r.depth
    assert by_key[(1.0, "spechub", "2x3")].block_efficiency is None  # drafted sequences: depth 1 only
    assert "depth = 1" in by_key[(1.0, "spechub", "2x3")].note
    assert by_key[(1.0, "spechub", "2-2")].block_efficiency > 1.5  # a binary tree runs it at every depth
    assert by_key[(1.0, "rrs-wor", "2x3")].block_efficiency > 1.5  # a trained pair accepts


def test_report_files(report):
    config, result, out = report
    data = json.loads((out / "report.json").read_text())
    assert set(data) == {"config", "sources", "rows", "engine", "costs"}
    text = (out / "report.md").read_text()
    for heading in ("## Acceptance", "## Block efficiency", "## Cost of verify per node"):
        assert heading in text
    pytest.importorskip("matplotlib")
    for name in ("acceptance-vs-k.png", "acceptance-vs-temperature.png", "gap-to-optimum.png", "block-efficiency.png", "cost-per-node.png"):
        assert (out / name).stat().st_size > 1000


def test_shipped_pair_target_is_stronger_and_draft_cheaper():
    record = training_record()
    assert record["target"]["held_out_loss_nats_per_byte"] < record["draft"]["held_out_loss_nats_per_byte"] - 0.1
    assert record["draft"]["parameters"] * 5 < record["target"]["parameters"]
    target, draft = load_pair()
    windows = held_out_windows(32, 65, seed=3)
    for model, expected in ((target, "target"), (draft, "draft")):
        logits = next_token_logits(model, windows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits, windows[:, -1])
        assert float(loss) < 3.0, expected  # far below a uniform byte (5.5 nats)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="window length must be in 1.."):
        held_out_windows(2, 0)
    with pytest.raises(ValueError, match="no model weights at"):
        load_pair(weights_dir=tmp_path)
    with pytest.raises(ValueError, match="pair = 'hf' needs both hf_target and hf_draft"):
        run_report(CompareConfig(pair="hf", families=[]), show_progress=False)
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        run_report(CompareConfig(verifiers=["nope"]), show_progress=False)


def test_progress_bar_writes_a_few_lines_to_a_file():
    stream = io.StringIO()
    bar = Progress(50, "acceptance", stream=stream)
    for i in range(50):
        bar.step(f"cell {i}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("acceptance") and "50/50" in lines[-1]
