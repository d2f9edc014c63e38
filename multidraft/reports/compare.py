"""Acceptance-rate comparison of verifiers against the optimal bound.

For every family, verifier and draft count k the acceptance (probability that the emitted
token is a draft) is estimated without the noise of the accept/reject coin: for each sampled
pair (p, q) and each tuple drawn by the verifier's own scheme, the kernel's exact mass on the
drafted tokens is averaged (a Rao-Blackwellized estimate).  The optimal bound for k i.i.d.
drafts is computed exactly for every sampled pair.  Estimates carry 95% confidence intervals.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import proofs
from ..verifiers import available_verifiers, get_verifier
from .families import FAMILIES


@dataclass
class CompareConfig:
    verifiers: list[str] = field(default_factory=available_verifiers)
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    vocab: int = 1000
    pairs: int = 2000  # sampled (p, q) pairs per family
    tuples_per_pair: int = 4  # draft tuples per pair
    seed: int = 0
    out_dir: str = "multidraft-report"


@dataclass
class Row:
    family: str
    verifier: str
    k: int
    acceptance: float | None  # estimate; None when the verifier does not support this case
    ci95: float | None  # half-width of the 95% interval
    optimal_iid: float  # exact mean over the sampled pairs of the optimum for k i.i.d. drafts
    note: str = ""


def acceptance_estimate(verifier, p, q, k, tuples_per_pair, generator) -> tuple[float, float]:
    """Mean and 95% half-width of the kernel mass on the drafts, over pairs and draft tuples."""
    p_rep = p.repeat(tuples_per_pair, 1)  # [R*B, V]
    q_rep = q.repeat(tuples_per_pair, 1)
    drafts = verifier.draft(q_rep, k, generator=generator)  # [R*B, k]
    kernel = verifier.kernel(p_rep, q_rep, drafts)  # [R*B, V]
    on_draft = torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, drafts, True)
    per_tuple = (kernel * on_draft).sum(-1).view(tuples_per_pair, -1).mean(0)  # [B], independent pairs
    mean = float(per_tuple.mean())
    half = 1.96 * float(per_tuple.std()) / math.sqrt(per_tuple.numel())
    return mean, half


def run_compare(config: CompareConfig, progress=print) -> list[Row]:
    rows: list[Row] = []
    for family_name in config.families:
        if family_name not in FAMILIES:
            raise ValueError(f"unknown family {family_name!r}; known families: {', '.join(FAMILIES)}")
        g = torch.Generator().manual_seed(config.seed)
        p, q = FAMILIES[family_name].sample(config.pairs, config.vocab, g)
        for k in config.ks:
            optimal = float(proofs.optimal_acceptance(p, q, k).mean())
            for name in config.verifiers:
                verifier = get_verifier(name)
                start = time.perf_counter()
                try:
                    verifier.check_num_drafts(k, q)
                    mean, half = acceptance_estimate(verifier, p, q, k, config.tuples_per_pair, g)
                    rows.append(Row(family_name, name, k, mean, half, optimal))
                except ValueError as err:  # e.g. a verifier limited to some k, or an LP too large
                    rows.append(Row(family_name, name, k, None, None, optimal, note=str(err)))
                progress(f"  {family_name:<20} k={k} {name:<10} {time.perf_counter() - start:6.2f}s")
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| family | k | verifier | acceptance (95% CI) | optimum (i.i.d., exact) | share of optimum |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.acceptance is None:
            lines.append(f"| {r.family} | {r.k} | {r.verifier} | n/a | {r.optimal_iid:.4f} | {r.note.split(';')[0]} |")
        else:
            share = r.acceptance / r.optimal_iid if r.optimal_iid > 0 else float("nan")
            lines.append(
                f"| {r.family} | {r.k} | {r.verifier} | {r.acceptance:.4f} ± {r.ci95:.4f} | "
                f"{r.optimal_iid:.4f} | {share:.3f} |"
            )
    return "\n".join(lines)


def write_report(config: CompareConfig, rows: list[Row]) -> Path:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps({"config": asdict(config), "rows": [asdict(r) for r in rows]}, indent=2)
    )
    families = "\n".join(f"- `{n}`: {FAMILIES[n].description}" for n in config.families)
    (out / "report.md").write_text(
        "# multidraft acceptance comparison\n\n"
        f"V = {config.vocab}, {config.pairs} sampled (p, q) pairs per family, "
        f"{config.tuples_per_pair} draft tuples per pair, seed {config.seed}.\n\n"
        f"Families:\n{families}\n\n"
        "Acceptance is estimated (mean of the kernel's exact mass on the drafted tokens, 95% CI "
        "over pairs); the optimum is exact for each sampled pair (k i.i.d. drafts; schemes that "
        "draw distinct drafts may exceed it).\n\n" + markdown_table(rows) + "\n"
    )
    plot_acceptance(rows, out)
    return out


def plot_acceptance(rows: list[Row], out: Path) -> None:
    """acceptance-vs-k.png: one panel per family, the i.i.d. optimum drawn as the ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are an optional extra
        return
    families = list(dict.fromkeys(r.family for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families):
        mine = [r for r in rows if r.family == family]
        ks = sorted({r.k for r in mine})
        optimum = [next(r.optimal_iid for r in mine if r.k == k) for k in ks]
        ax.plot(ks, optimum, "k--", label="optimal (i.i.d.)")
        for name in dict.fromkeys(r.verifier for r in mine):
            pts = [(r.k, r.acceptance, r.ci95) for r in mine if r.verifier == name and r.acceptance is not None]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        ax.set_title(family)
        ax.set_xlabel("drafts k")
        ax.set_ylabel("acceptance rate")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "acceptance-vs-k.png", dpi=110)
    plt.close(fig)
