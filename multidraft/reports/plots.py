"""The report's PNG plots (matplotlib, an optional extra: without it the report has tables only).

- acceptance-vs-k.png: a panel per source and temperature, the i.i.d. optimum as the ceiling;
- acceptance-vs-temperature.png: a panel per source and k, the optimum as the ceiling;
- gap-to-optimum.png: optimum minus acceptance against k, a panel per source and temperature;
- block-efficiency.png: tokens per target pass per verifier and tree shape, a panel per T;
- cost-per-node.png: verify time per node against V, a panel per k, the softmax for scale.

Each verifier has one colour in every panel of every figure, and each figure one legend that
lists every verifier in the report: a verifier missing from a panel (n/a at that k) must not
shift the others' colours.
"""

from __future__ import annotations

from pathlib import Path


def write_plots(report, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, draw in [
        ("acceptance-vs-k.png", _acceptance_vs_k),
        ("acceptance-vs-temperature.png", _acceptance_vs_temperature),
        ("gap-to-optimum.png", _gap_to_optimum),
        ("block-efficiency.png", _block_efficiency),
        ("cost-per-node.png", _cost_per_node),
    ]:
        fig = draw(plt, report)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append(out / name)
    return written


def _grid(plt, n_rows, n_cols):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.6 * n_rows), squeeze=False)
    return fig, axes


def _unique(values):
    return list(dict.fromkeys(values))


def verifier_colours(report) -> dict[str, str]:
    """{verifier: colour}, fixed for the whole report (every section's verifiers, in order of
    appearance): matplotlib's default cycle, then tab20b's for more than ten verifiers."""
    import matplotlib

    names = _unique([r.verifier for r in report.acceptance] + [r.verifier for r in report.engine]
                    + [r.verifier for r in report.costs])
    palette = [f"C{i}" for i in range(10)] + [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20b"].colors]
    return {name: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, name in enumerate(names)}


def _legend(ax, colours: dict[str, str], shown: set[str], reference: str | None = None) -> None:
    """One legend for the figure, on its first panel: every verifier in ``colours`` (marked
    n/a where it has no point in this figure) and the dashed reference line if any."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="k", ls="--", lw=2, label=reference)] if reference else []
    handles += [Line2D([], [], color=c, marker="o", ms=3, label=name if name in shown else f"{name} (n/a)")
                for name, c in colours.items()]
    ax.legend(handles=handles, fontsize=7)


def _error(half):
    return float("nan") if half is None else half  # no interval (one sample): no bar, not a zero one


def _acceptance_panels(plt, rows, row_key, x_key, y, err, optimum: bool, title, xlabel, ylabel, colours):
    """A grid of panels (rows of the grid: values of ``row_key``; columns: sources), one line
    per verifier of y(row) against ``x_key`` with 95% error bars of half-width err(row), the
    optimum dashed if asked."""
    grid_rows, sources = _unique(getattr(r, row_key) for r in rows), _unique(r.family for r in rows)
    fig, axes = _grid(plt, len(grid_rows), len(sources))
    shown = set()
    for (i, g), (j, s) in ((a, b) for a in enumerate(grid_rows) for b in enumerate(sources)):
        ax = axes[i][j]
        mine = sorted((r for r in rows if r.family == s and getattr(r, row_key) == g), key=lambda r: getattr(r, x_key))
        xs = sorted({getattr(r, x_key) for r in mine})
        if optimum:
            ax.plot(xs, [next(r.optimal_iid for r in mine if getattr(r, x_key) == x) for x in xs], "k--", lw=2, label="optimal (i.i.d.)")
        for name in _unique(r.verifier for r in mine):
            pts = [r for r in mine if r.verifier == name and r.acceptance is not None]
            if pts:
                shown.add(name)
                ax.errorbar([getattr(r, x_key) for r in pts], [y(r) for r in pts], yerr=[_error(err(r)) for r in pts],
                            marker="o", ms=3, capsize=2, label=name, color=colours[name])
        ax.set(title=title(s, g), xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    _legend(axes[0][0], colours, shown, "optimal (i.i.d.)" if optimum else None)
    return fig


def _acceptance_vs_k(plt, report):
    if not report.acceptance:
        return None
    return _acceptance_panels(plt, report.acceptance, "temperature", "k", lambda r: r.acceptance, lambda r: r.ci95, True,
                              lambda s, t: f"{s}, T = {t:g}", "drafts k", "acceptance", verifier_colours(report))


def _acceptance_vs_temperature(plt, report):
    rows = report.acceptance
    if len(_unique(r.temperature for r in rows)) < 2:
        return None
    ks = [k for k in (2, 4) if any(r.k == k for r in rows)] or [min(r.k for r in rows)]
    return _acceptance_panels(plt, [r for r in rows if r.k in ks], "k", "temperature", lambda r: r.acceptance, lambda r: r.ci95,
                              True, lambda s, k: f"{s}, k = {k}", "temperature", "acceptance", verifier_colours(report))


def _gap_to_optimum(plt, report):
    if not report.acceptance:
        return None
    # The gap's own interval, paired over the pairs (the acceptance's ci95 is 1-5x wider on the default families).
    fig = _acceptance_panels(plt, report.acceptance, "temperature", "k", lambda r: r.optimal_iid - r.acceptance,
                             lambda r: r.gap_ci95, False, lambda s, t: f"{s}, T = {t:g}", "drafts k", "optimum − acceptance",
                             verifier_colours(report))
    for ax in fig.axes:
        ax.axhline(0, color="k", lw=1)
    return fig


def _block_efficiency(plt, report):
    rows = [r for r in report.engine if r.block_efficiency is not None]
    if not rows:
        return None
    temps = _unique(r.temperature for r in rows)
    shapes = _unique(r.shape for r in report.engine)
    names = _unique(r.verifier for r in report.engine)
    colours = verifier_colours(report)
    fig, axes = _grid(plt, 1, len(temps))
    width = 0.8 / len(names)
    for j, t in enumerate(temps):
        ax = axes[0][j]
        for n, name in enumerate(names):
            pts = [(shapes.index(r.shape), r) for r in rows if r.temperature == t and r.verifier == name]
            if pts:
                ax.bar([x + n * width for x, _ in pts], [r.block_efficiency for _, r in pts], width,
                       yerr=[_error(r.ci95) for _, r in pts], capsize=2, label=name, color=colours[name])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set(title=f"block efficiency, T = {t:g}", ylabel="tokens per target pass")
        ax.grid(alpha=0.3, axis="y")
    _legend(axes[0][0], {n: colours[n] for n in names}, {r.verifier for r in rows})
    return fig


def _cost_per_node(plt, report):
    rows = report.costs
    if not rows:
        return None
    ks = _unique(r.k for r in rows)
    colours = verifier_colours(report)
    fig, axes = _grid(plt, 1, len(ks))
    for j, k in enumerate(ks):
        ax, mine = axes[0][j], [r for r in rows if r.k == k]
        vocab = sorted({r.vocab for r in mine})
        ax.plot(vocab, [next(r.softmax_us_per_node for r in mine if r.vocab == v) for v in vocab], "k--", lw=2, label="softmax")
        for name in _unique(r.verifier for r in mine):
            pts = [r for r in mine if r.verifier == name and r.us_per_node is not None]
            if pts:
                ax.plot([r.vocab for r in pts], [r.us_per_node for r in pts], marker="o", ms=3, label=name, color=colours[name])
        ax.set(title=f"verify cost per node, k = {k}", xlabel="vocabulary V", ylabel="µs per node", xscale="log", yscale="log")
        ax.grid(alpha=0.3, which="both")
    names = _unique(r.verifier for r in rows)
    _legend(axes[0][0], {n: colours[n] for n in names}, {r.verifier for r in rows if r.us_per_node is not None}, "softmax")
    return fig
