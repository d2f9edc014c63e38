"""The report's PNG plots (matplotlib, an optional extra: without it the report has tables only).

- acceptance-vs-k.png: a panel per source and temperature, the i.i.d. optimum as the ceiling;
- acceptance-vs-temperature.png: a panel per source and k, the optimum as the ceiling;
- gap-to-optimum.png: optimum minus acceptance against k, a panel per source and temperature;
- block-efficiency.png: tokens per target pass per verifier and tree shape, a panel per T;
- cost-per-node.png: verify time per node against V, a panel per k, the softmax for scale.
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


def _acceptance_panels(plt, rows, row_key, x_key, y, optimum: bool, title, xlabel, ylabel):
    """A grid of panels (rows of the grid: values of ``row_key``; columns: sources), one line
    per verifier of y(row) against ``x_key`` with 95% error bars, the optimum dashed if asked."""
    grid_rows, sources = _unique(getattr(r, row_key) for r in rows), _unique(r.family for r in rows)
    fig, axes = _grid(plt, len(grid_rows), len(sources))
    for (i, g), (j, s) in ((a, b) for a in enumerate(grid_rows) for b in enumerate(sources)):
        ax = axes[i][j]
        mine = sorted((r for r in rows if r.family == s and getattr(r, row_key) == g), key=lambda r: getattr(r, x_key))
        xs = sorted({getattr(r, x_key) for r in mine})
        if optimum:
            ax.plot(xs, [next(r.optimal_iid for r in mine if getattr(r, x_key) == x) for x in xs], "k--", lw=2, label="optimal (i.i.d.)")
        for name in _unique(r.verifier for r in mine):
            pts = [r for r in mine if r.verifier == name and r.acceptance is not None]
            if pts:
                ax.errorbar([getattr(r, x_key) for r in pts], [y(r) for r in pts], yerr=[r.ci95 for r in pts],
                            marker="o", ms=3, capsize=2, label=name)
        ax.set(title=title(s, g), xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig


def _acceptance_vs_k(plt, report):
    if not report.acceptance:
        return None
    return _acceptance_panels(plt, report.acceptance, "temperature", "k", lambda r: r.acceptance, True,
                              lambda s, t: f"{s}, T = {t:g}", "drafts k", "acceptance")


def _acceptance_vs_temperature(plt, report):
    rows = report.acceptance
    if len(_unique(r.temperature for r in rows)) < 2:
        return None
    ks = [k for k in (2, 4) if any(r.k == k for r in rows)] or [min(r.k for r in rows)]
    return _acceptance_panels(plt, [r for r in rows if r.k in ks], "k", "temperature", lambda r: r.acceptance, True,
                              lambda s, k: f"{s}, k = {k}", "temperature", "acceptance")


def _gap_to_optimum(plt, report):
    if not report.acceptance:
        return None
    fig = _acceptance_panels(plt, report.acceptance, "temperature", "k", lambda r: r.optimal_iid - r.acceptance, False,
                             lambda s, t: f"{s}, T = {t:g}", "drafts k", "optimum − acceptance")
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
    fig, axes = _grid(plt, 1, len(temps))
    width = 0.8 / len(names)
    for j, t in enumerate(temps):
        ax = axes[0][j]
        for n, name in enumerate(names):
            pts = [(shapes.index(r.shape), r) for r in rows if r.temperature == t and r.verifier == name]
            if pts:
                ax.bar([x + n * width for x, _ in pts], [r.block_efficiency for _, r in pts], width,
                       yerr=[r.ci95 for _, r in pts], capsize=2, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set(title=f"block efficiency, T = {t:g}", ylabel="tokens per target pass")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    return fig


def _cost_per_node(plt, report):
    rows = report.costs
    if not rows:
        return None
    ks = _unique(r.k for r in rows)
    fig, axes = _grid(plt, 1, len(ks))
    for j, k in enumerate(ks):
        ax, mine = axes[0][j], [r for r in rows if r.k == k]
        vocab = sorted({r.vocab for r in mine})
        ax.plot(vocab, [next(r.softmax_us_per_node for r in mine if r.vocab == v) for v in vocab], "k--", lw=2, label="softmax")
        for name in _unique(r.verifier for r in mine):
            pts = [r for r in mine if r.verifier == name and r.us_per_node is not None]
            if pts:
                ax.plot([r.vocab for r in pts], [r.us_per_node for r in pts], marker="o", ms=3, label=name)
        ax.set(title=f"verify cost per node, k = {k}", xlabel="vocabulary V", ylabel="µs per node", xscale="log", yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    return fig
