"""Acceptance-rate comparison of verifiers against the optimal bound.

For every family, temperature, verifier and draft count k, the acceptance (probability that the
emitted token is a draft) is averaged over B sampled (p, q) pairs.  Verifiers with a closed form
(``exact_acceptance``) are evaluated exactly per pair; the others are estimated without the
noise of the accept/reject coin: for each pair and each tuple drawn by the verifier's own
scheme, the kernel's exact mass on the drafted tokens is averaged (a Rao-Blackwellized
estimate).  The optimal bound for k i.i.d. drafts is exact per pair.  Every figure carries a 95%
confidence interval over the sampled pairs, and says whether it is exact per pair.
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
    ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    temperatures: list[float] = field(default_factory=lambda: [0.6, 1.0])
    vocab: int = 1000
    pairs: int = 1000  # sampled (p, q) pairs per family
    tuples_per_pair: int = 16  # draft tuples per pair, for verifiers without a closed form
    seed: int = 0
    out_dir: str = "multidraft-report"


@dataclass
class Row:
    family: str
    temperature: float
    verifier: str
    k: int
    acceptance: float | None  # mean over pairs; None when the verifier does not support this case
    ci95: float | None  # half-width of the 95% interval over pairs
    exact_per_pair: bool  # True: no sampling of drafts, only of the (p, q) pairs
    optimal_iid: float  # mean over the pairs of the exact optimum for k i.i.d. drafts
    note: str = ""


def mean_and_ci(per_pair: torch.Tensor) -> tuple[float, float]:
    return float(per_pair.mean()), 1.96 * float(per_pair.std()) / math.sqrt(per_pair.numel())


def acceptance_per_pair(verifier, p, q, k, tuples_per_pair, generator) -> tuple[torch.Tensor, bool]:
    """Acceptance [B] of each pair: exact when the verifier has a closed form, else the mean
    over ``tuples_per_pair`` drafted tuples of the kernel's mass on the drafts."""
    if verifier.exact_acceptance:
        return verifier.expected_acceptance(p, q, k), True
    p_rep = p.repeat(tuples_per_pair, 1)  # [R*B, V]
    q_rep = q.repeat(tuples_per_pair, 1)
    drafts = verifier.draft(q_rep, k, generator=generator)  # [R*B, k]
    kernel = verifier.kernel(p_rep, q_rep, drafts)  # [R*B, V]
    on_draft = torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, drafts, True)
    return (kernel * on_draft).sum(-1).view(tuples_per_pair, -1).mean(0), False


def run_compare(config: CompareConfig, progress=print) -> list[Row]:
    rows: list[Row] = []
    for family_name in config.families:
        if family_name not in FAMILIES:
            raise ValueError(f"unknown family {family_name!r}; known families: {', '.join(FAMILIES)}")
    for temperature in config.temperatures:
        if not temperature > 0:
            raise ValueError(f"temperatures must be > 0 (greedy decoding has nothing to verify), got {temperature}")
    verifiers = {name: get_verifier(name) for name in config.verifiers}
    for family_name in config.families:
        g = torch.Generator().manual_seed(config.seed)
        target_logits, draft_logits = FAMILIES[family_name].sample(config.pairs, config.vocab, g)
        for temperature in config.temperatures:
            p = (target_logits / temperature).softmax(-1)
            q = (draft_logits / temperature).softmax(-1)
            for k in config.ks:
                optimal = float(proofs.optimal_acceptance(p, q, k).mean())
                for name, verifier in verifiers.items():
                    start = time.perf_counter()
                    try:
                        verifier.check_num_drafts(k, q)
                        per_pair, exact = acceptance_per_pair(verifier, p, q, k, config.tuples_per_pair, g)
                        mean, half = mean_and_ci(per_pair)
                        rows.append(Row(family_name, temperature, name, k, mean, half, exact, optimal))
                    except ValueError as err:  # a verifier limited to some k, or an LP too large
                        rows.append(Row(family_name, temperature, name, k, None, None, False, optimal, note=str(err)))
                    progress(f"{family_name:<20} T={temperature:<4} k={k} {name:<10} {time.perf_counter() - start:6.2f}s")
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| family | T | k | verifier | acceptance (95% CI over pairs) | exact per pair | optimum (i.i.d.) | share of optimum |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r.family} | {r.temperature:g} | {r.k} | {r.verifier} |"
        if r.acceptance is None:
            lines.append(f"{head} n/a | | {r.optimal_iid:.4f} | {r.note.split(';')[0]} |")
        else:
            share = r.acceptance / r.optimal_iid if r.optimal_iid > 0 else float("nan")
            lines.append(
                f"{head} {r.acceptance:.4f} ± {r.ci95:.4f} | {'yes' if r.exact_per_pair else 'sampled'} | "
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
        f"V = {config.vocab}, {config.pairs} sampled (p, q) pairs per family and temperature, "
        f"{config.tuples_per_pair} draft tuples per pair where sampled, seed {config.seed}.\n\n"
        f"Families:\n{families}\n\n"
        "Acceptance is exact per pair for verifiers with a closed form, otherwise the mean of the "
        "kernel's exact mass on drafted tuples; the interval is over the sampled pairs. The "
        "optimum is exact per pair for k i.i.d. drafts; schemes that draw distinct or "
        "deterministic drafts (rrs-wor, greedy, spechub) use another draft law and may exceed "
        "it.\n\n" + markdown_table(rows) + "\n"
    )
    plot_acceptance(rows, out)
    return out


def plot_acceptance(rows: list[Row], out: Path) -> None:
    """acceptance-vs-k.png: a panel per family and temperature, the i.i.d. optimum as ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are an optional extra
        return
    panels = list(dict.fromkeys((r.family, r.temperature) for r in rows))
    families = list(dict.fromkeys(f for f, _ in panels))
    temperatures = list(dict.fromkeys(t for _, t in panels))
    fig, axes = plt.subplots(len(temperatures), len(families), figsize=(5 * len(families), 3.8 * len(temperatures)), squeeze=False)
    for (family, temperature) in panels:
        ax = axes[temperatures.index(temperature)][families.index(family)]
        mine = [r for r in rows if r.family == family and r.temperature == temperature]
        ks = sorted({r.k for r in mine})
        optimum = [next(r.optimal_iid for r in mine if r.k == k) for k in ks]
        ax.plot(ks, optimum, "k--", lw=2, label="optimal (i.i.d. drafts)")
        for name in dict.fromkeys(r.verifier for r in mine):
            pts = [(r.k, r.acceptance, r.ci95) for r in mine if r.verifier == name and r.acceptance is not None]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, label=name)
        ax.set_title(f"{family}, T = {temperature:g}")
        ax.set_xlabel("drafts k")
        ax.set_ylabel("acceptance rate")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "acceptance-vs-k.png", dpi=100)
    plt.close(fig)
