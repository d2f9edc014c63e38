"""The comparison report end to end on small settings: the shipped model pair as a source, the
engine's block efficiency, the cost section, the plots; and the pieces it is built from."""

from __future__ import annotations

import io
import json
import math
import time

import pytest
import torch

from multidraft.engine.pretrained import held_out_windows, load_pair, training_record
from multidraft.reports import (
    CompareConfig,
    CostRow,
    EngineRow,
    Report,
    Row,
    compare,
    run_report,
    write_report,
)
from multidraft.reports.families import FAMILIES
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
        if r.verifier in ("rrs", "importance", "otm"):  # i.i.d. drafts: bounded by the optimum, pair by pair
            # exact per pair: to rounding; sampled: up to the draft tuples' noise (the pairs are the optimum's)
            slack = 0.0 if r.exact_per_pair else 4 * r.sampling_se
            assert r.acceptance <= r.optimal_iid + slack + 1e-9, r
        if r.k == 1:
            assert r.acceptance == pytest.approx(r.optimal_iid, abs=1e-9) or not r.exact_per_pair
    importance = {(r.family, r.temperature): r for r in rows if r.verifier == "importance" and r.k == 2}
    rrs = {(r.family, r.temperature): r for r in rows if r.verifier == "rrs" and r.k == 2}
    # importance is optimal at k = 2, so at least rrs (exact per pair), up to its tuples' noise
    assert all(importance[key].acceptance >= rrs[key].acceptance - 4 * importance[key].sampling_se - 1e-9
               for key in importance)
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
    assert set(data) == {"config", "sources", "rows", "engine", "costs", "pairs", "engine_requests", "notes"}
    assert data["pairs"] == {"shipped-pair": 48, "dirichlet": 48} and data["engine_requests"] == 3 and data["notes"] == []
    text = (out / "report.md").read_text()
    for heading in ("## Acceptance", "## Block efficiency", "## Cost of verify per node"):
        assert heading in text
    assert "48 (p, q) pairs per source" in text and "3 requests of 8 new tokens" in text
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


def test_intervals_use_student_t_and_none_from_one_sample():
    values = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.7])
    mean, half = compare.mean_and_ci(values)
    assert mean == pytest.approx(0.54)
    assert half == pytest.approx(2.7764451 * float(values.double().std()) / math.sqrt(5), rel=1e-6)  # t(4), not 1.96
    assert compare.mean_and_ci(torch.tensor([0.7]))[1] is None
    one = Row("dirichlet", 1.0, "rrs", 2, 0.7682, None, True, 0.8, None, 0.0)
    assert "0.7682 (no interval)" in compare.markdown_table([one]) and "±" not in compare.markdown_table([one])


def _rrs_wor_rows(verifiers, families):
    config = CompareConfig(verifiers=verifiers, families=families, ks=[2], temperatures=[1.0], vocab=50, pairs=32, pair=None)
    sources = {f: FAMILIES[f].sample(32, 50, torch.Generator().manual_seed(0)) for f in families}
    rows = compare.run_acceptance(config, sources, Progress(1, "", enabled=False))
    return {r.family: (r.acceptance, r.ci95, r.sampling_se) for r in rows if r.verifier == "rrs-wor"}


def test_a_sampled_cell_does_not_depend_on_the_other_cells():
    alone = _rrs_wor_rows(["rrs-wor"], ["dirichlet"])
    assert _rrs_wor_rows(["importance", "rrs-wor"], ["dirichlet"]) == alone  # another sampled verifier first
    assert _rrs_wor_rows(["rrs-wor"], ["zipf-perturbed", "dirichlet"])["dirichlet"] == alone["dirichlet"]  # another source first


def test_sampling_se_is_the_noise_of_the_draft_tuples_alone():
    # Two pairs, tuple values with known within-pair variances: se = sqrt((v1 + v2) / R) / B.
    per_tuple = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert compare.sampling_se(per_tuple) == pytest.approx(math.sqrt((1 / 3 + 0) / 4) / 2)
    assert compare.sampling_se(per_tuple[:1]) is None


def test_the_cost_probe_does_not_count_one_off_first_call_costs(monkeypatch):
    # A verifier whose first call pays a one-off cost (as numba's compilation in a fresh
    # process): the "too slow" probe must not hold it against the verifier.
    class FirstCallSlow:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def verify(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.3)
            return self.inner.verify(*args, **kwargs)

    make = compare.make_verifier
    monkeypatch.setattr(compare, "make_verifier", lambda *a, **kw: FirstCallSlow(make(*a, **kw)))
    config = CompareConfig(verifiers=["rrs"], cost_vocab=[50], cost_ks=[2], cost_batch=4)
    rows = compare.run_costs(config, Progress(1, "", enabled=False), max_call_seconds=0.2)
    assert rows[0].us_per_node is not None, rows[0].note


def _synthetic_report():
    # rrs-wor has no value on the first panel (shipped-pair) nor at k = 8 of the costs: under a
    # per-panel colour cycle the others' colours shift there.
    rows = []
    for family in ("shipped-pair", "dirichlet"):
        for t in (0.6, 1.0):
            for k in (1, 2):
                for n, name in enumerate(("otm", "rrs", "rrs-wor")):
                    value = None if name == "otm" and family == "shipped-pair" else 0.5 + 0.1 * n
                    rows.append(Row(family, t, name, k, value, 0.01 if value else None, True, 0.9, 0.002 * (n + 1) if value else None, 0.0))
    engine = [EngineRow(1.0, name, 2, 1, None if name == "otm" else 1.5, 0.05) for name in ("otm", "rrs", "rrs-wor")]
    costs = [CostRow(name, v, k, None if name == "otm" and k == 2 else 1.0 + v / 1000, 0.5, 0.1)
             for v in (1000, 8000) for k in (2, 8) for name in ("otm", "rrs", "rrs-wor")]
    return Report({}, rows, engine, costs)


def _drawn_colours(ax):
    """{label: colour} of every verifier drawn on the axes: error-bar lines, bars, plain lines."""
    from matplotlib.colors import to_hex

    drawn = {}
    for c in ax.containers:
        patches = getattr(c, "patches", None)
        if patches:  # bars
            drawn[c.get_label()] = to_hex(patches[0].get_facecolor())
        elif c.lines[0] is not None:  # error bars on a line (a bar's own error bars have none)
            drawn[c.get_label()] = to_hex(c.lines[0].get_color())
    for line in ax.lines:
        if not line.get_label().startswith("_"):
            drawn.setdefault(line.get_label(), to_hex(line.get_color()))
    return drawn


def test_plots_give_each_verifier_one_colour_in_every_panel_and_legend():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from multidraft.reports import plots

    report = _synthetic_report()
    for draw in (plots._acceptance_vs_k, plots._acceptance_vs_temperature, plots._gap_to_optimum,
                 plots._block_efficiency, plots._cost_per_node):
        fig = draw(plt, report)
        try:
            legend = fig.axes[0].get_legend()
            listed = {t.get_text().removesuffix(" (n/a)"): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
            verifiers = {n: c for n, c in listed.items() if n in ("otm", "rrs", "rrs-wor")}
            assert len(verifiers) == 3 and len(set(verifiers.values())) == 3, (draw.__name__, listed)  # all, distinct
            for ax in fig.axes:  # each panel draws each verifier in its legend colour
                for label, colour in _drawn_colours(ax).items():
                    assert colour == listed[label], (draw.__name__, ax.get_title(), label)
        finally:
            plt.close(fig)


def test_gap_error_bars_are_the_gap_interval():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from multidraft.reports import plots

    report = _synthetic_report()
    fig = plots._gap_to_optimum(plt, report)
    try:
        ax = fig.axes[1]  # dirichlet, T = 0.6
        for c in ax.containers:
            expected = next(r.gap_ci95 for r in report.acceptance if r.family == "dirichlet" and r.verifier == c.get_label())
            for segment in c.lines[2][0].get_segments():
                assert (segment[1][1] - segment[0][1]) / 2 == pytest.approx(expected), c.get_label()
    finally:
        plt.close(fig)


def test_gap_ci95_is_the_paired_interval():
    logits = FAMILIES["dirichlet"].sample(40, 30, torch.Generator().manual_seed(0))
    config = CompareConfig(verifiers=["rrs"], families=["dirichlet"], ks=[2], temperatures=[1.0], pair=None)
    row = compare.run_acceptance(config, {"dirichlet": logits}, Progress(1, "", enabled=False))[0]
    target, draft = logits[0].softmax(-1), logits[1].softmax(-1)
    from multidraft import proofs
    from multidraft.verifiers import get_verifier

    gap = proofs.optimal_acceptance(target, draft, 2).double() - get_verifier("rrs").expected_acceptance(target, draft, 2).double()
    assert row.gap_ci95 == pytest.approx(compare.mean_and_ci(gap)[1], rel=1e-9)


def test_bad_counts_name_the_option_value_and_limit():
    for kwargs, message in [(dict(pairs=0), r"--pairs \(pairs\) must be an int >= 1 .*got 0"),
                            (dict(pairs=-5), r"--pairs \(pairs\) must be an int >= 1 .*got -5"),
                            (dict(vocab=0), r"--vocab \(vocab\) must be an int >= 1 .*got 0"),
                            (dict(context_length=0), r"--context-length \(context_length\) must be an int >= 1 .*got 0"),
                            (dict(ks=[2, 0]), r"--ks \(ks\) must be an int >= 1 .*got 0"),
                            (dict(tuples_per_pair=0), r"tuples_per_pair must be an int >= 1 .*got 0"),
                            (dict(cost_batch=0), r"cost_batch must be an int >= 1 .*got 0")]:
        with pytest.raises(ValueError, match=message):
            compare.check_config(CompareConfig(**kwargs))
