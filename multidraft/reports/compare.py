"""The comparison report: which verifier accepts most, how close to the optimum, at what cost.

Three sections, each a list of rows in report.json and a table in report.md, with plots:

1. Acceptance (probability that the emitted token is a draft) for every source of (p, q) pairs
   — the real model pair on held-out text and the synthetic families — temperature, verifier
   and draft count k, averaged over the pairs.  Verifiers with a closed form
   (``exact_acceptance``) are evaluated exactly per pair; the others without the noise of the
   accept/reject coin: for each pair and each tuple drawn by the verifier's own scheme, the
   kernel's exact mass on the drafted tokens is averaged (a Rao-Blackwellized estimate).  The
   optimum for k i.i.d. drafts is exact per pair.  Every figure carries a 95% Student-t
   interval over the pairs (none below two pairs) and says whether it is exact per pair; each
   row also has the paired interval of its gap to the optimum and, where sampled, the standard
   error of the draft tuples alone.
2. Block efficiency (tokens per target pass) of the engine on the model pair, per verifier and
   tree shape (k draft sequences of depth D), with a 95% interval over requests.
3. Cost of one ``verify`` call per node against V and k, next to one softmax over the same
   logits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import proofs
from ..verifiers import available_verifiers, get_verifier
from .families import FAMILIES
from .progress import Progress
from .sources import ModelPair, PromptContexts, contexts_from_prompts, hf_pair, pair_logits, shipped_pair


def default_verifiers() -> list[str]:
    """Every registered verifier but gls: its exact acceptance is a quadrature over ~290 nodes
    per pair (~17 ms per pair at V = 1000, one thread), which would add ~15 minutes to the
    default report; name it in ``verifiers`` (``--verifiers``) to include it."""
    return [name for name in available_verifiers() if name != "gls"]


@dataclass
class CompareConfig:
    verifiers: list[str] = field(default_factory=default_verifiers)
    families: list[str] = field(default_factory=lambda: list(FAMILIES))  # synthetic sources
    pair: str | None = "shipped"  # the model pair: "shipped", "hf" (hf_target, hf_draft) or None
    hf_target: str | None = None  # local transformers model directories, with pair = "hf"
    hf_draft: str | None = None
    prompts_file: str | None = None  # the pair's contexts, one per line (default: held-out text)
    ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    temperatures: list[float] = field(default_factory=lambda: [0.3, 0.6, 1.0])
    vocab: int = 1000  # V of the synthetic families (the model pair has its own)
    pairs: int = 1000  # (p, q) pairs per source: synthetic draws, or the pair's contexts
    context_length: int = 64  # tokens of held-out text before each of the pair's positions
    tuples_per_pair: int = 16  # draft tuples per pair, for verifiers without a closed form
    tree_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 4), (2, 1), (2, 4), (4, 4)])  # (k, D)
    # Branching trees: children per node at each depth (SpecHub's binary tree is (2, 2, 2)).
    tree_widths: list[tuple[int, ...]] = field(default_factory=lambda: [(2, 2, 2)])
    engine_prompts: int = 16  # requests per engine run (one batch)
    engine_new_tokens: int = 48
    cost_vocab: list[int] = field(default_factory=lambda: [1000, 8000, 32000])
    cost_ks: list[int] = field(default_factory=lambda: [2, 4, 8])
    cost_batch: int = 64  # nodes per verify call in the cost section
    # Constructor options per verifier.  otm's LP over a full V = 256 support at k = 2 has 65,536
    # variables and takes about a second per row (optimal-wor's, over k-subsets, 65,280): too
    # slow for a thousand rows, so the default report leaves them out where they are that large
    # (raise the limit to include them).
    verifier_options: dict[str, dict] = field(default_factory=lambda: {"otm": {"max_variables": 20_000},
                                                                       "optimal-wor": {"max_variables": 20_000}})
    engine: bool = True  # run section 2 (needs a model pair)
    costs: bool = True  # run section 3
    seed: int = 0
    out_dir: str = "multidraft-report"


@dataclass
class Row:
    family: str  # the source of (p, q): a synthetic family or the model pair
    temperature: float
    verifier: str
    k: int
    acceptance: float | None  # mean over pairs; None when the verifier does not support this case
    ci95: float | None  # half-width of the 95% interval over pairs; None below 2 pairs
    exact_per_pair: bool  # True: no sampling of drafts, only of the (p, q) pairs
    optimal_iid: float  # mean over the pairs of the exact optimum for k i.i.d. drafts
    # Half-width of the 95% interval of optimal_iid - acceptance, paired over the same pairs
    # (1-5x narrower than ci95 on the default report's families, where the optimum shares
    # most of the spread between pairs; not always); None below 2 pairs.
    gap_ci95: float | None = None
    # Standard error of ``acceptance`` from the draft tuples alone, the pairs held fixed: 0 when
    # exact per pair, None with one tuple per pair.  Two verifiers scored on the same pairs
    # differ by this noise, not by ci95.
    sampling_se: float | None = None
    note: str = ""


@dataclass
class EngineRow:
    temperature: float
    verifier: str
    k: int
    depth: int
    block_efficiency: float | None  # tokens per request per target pass
    ci95: float | None  # over requests; None below 2 requests
    acceptance_by_depth: list[float] = field(default_factory=list)
    note: str = ""
    widths: list[int] | None = None  # a branching tree (k = widths[0], D = len(widths)); None: k sequences

    @property
    def shape(self) -> str:
        """"2x4" (k sequences of depth D) or "2-2-2" (children per node at each depth)."""
        return "-".join(map(str, self.widths)) if self.widths else f"{self.k}x{self.depth}"


@dataclass
class CostRow:
    verifier: str
    vocab: int
    k: int
    us_per_node: float | None  # median of the timed calls
    softmax_us_per_node: float
    spread: float | None = None  # half the range (max - min) of the timed calls, µs per node
    note: str = ""


@dataclass
class Report:
    sources: dict[str, str]  # name -> description
    acceptance: list[Row]
    engine: list[EngineRow]
    costs: list[CostRow]
    pairs: dict[str, int] = field(default_factory=dict)  # source -> (p, q) pairs actually used
    engine_requests: int = 0  # requests actually decoded per engine run
    notes: list[str] = field(default_factory=list)  # where the run used less than was asked for


@functools.lru_cache(maxsize=None)
def t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with n - 1 degrees of freedom: 1.96 is 8% too
    narrow at 16 requests and 30% at 5."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_and_ci(values: torch.Tensor) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval; no interval (None) below 2 values,
    where nothing says how far the mean is from its expectation."""
    values = values.double()
    n = values.numel()
    if n < 2:
        return float(values.mean()), None
    return float(values.mean()), t_quantile(n) * float(values.std()) / math.sqrt(n)


def cell_generator(seed: int, *key) -> torch.Generator:
    """A generator for one cell (seed, source, T, k, verifier): its draws do not depend on
    which other verifiers, sources or temperatures ran before it.  sha256, not hash(): Python
    salts str hashes per process."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def acceptance_per_pair(verifier, p, q, k, tuples_per_pair, generator) -> tuple[torch.Tensor, bool, float | None]:
    """(acceptance [B] of each pair, exact, sampling_se): exact when the verifier has a closed
    form, else the mean over ``tuples_per_pair`` drafted tuples of the kernel's mass on the
    drafts, with the standard error of its mean over pairs from the tuples alone."""
    if verifier.exact_acceptance:
        return verifier.expected_acceptance(p, q, k), True, 0.0
    p_rep = p.repeat(tuples_per_pair, 1)  # [R*B, V]
    q_rep = q.repeat(tuples_per_pair, 1)
    drafts = verifier.draft(q_rep, k, generator=generator)  # [R*B, k]
    kernel = verifier.kernel(p_rep, q_rep, drafts)  # [R*B, V]
    on_draft = torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, drafts, True)
    per_tuple = (kernel * on_draft).sum(-1).view(tuples_per_pair, -1).double()  # [R, B]
    return per_tuple.mean(0), False, sampling_se(per_tuple)


def sampling_se(per_tuple: torch.Tensor) -> float | None:
    """Standard error of the mean over pairs of per_tuple [R, B].mean(0), the pairs held
    fixed: sqrt(sum of the within-pair variances / R) / B.  None when R < 2."""
    tuples, pairs = per_tuple.shape
    if tuples < 2:
        return None
    return math.sqrt(float(per_tuple.var(0).sum()) / tuples) / pairs


# CompareConfig fields the compare CLI sets, by option: errors name both.
_OPTIONS = {"ks": "--ks", "pairs": "--pairs", "vocab": "--vocab", "context_length": "--context-length"}

# (field, smallest value, what it counts) for every count in CompareConfig.
_COUNTS = [("ks", 1, "drafts per position"), ("pairs", 1, "(p, q) pairs per source"),
           ("vocab", 1, "tokens in the synthetic families' vocabulary"),
           ("context_length", 1, "tokens of context per position"),
           ("tuples_per_pair", 1, "draft tuples per pair"), ("engine_prompts", 1, "requests per engine run"),
           ("engine_new_tokens", 1, "new tokens per request"), ("cost_vocab", 1, "vocabulary sizes of the cost section"),
           ("cost_ks", 1, "draft counts of the cost section"), ("cost_batch", 1, "nodes per verify call")]


def _check_counts(config: CompareConfig) -> None:
    """Every count is an int at or above its limit: below it, torch fails deep inside with
    a message that names neither the option nor the value (or a slice silently keeps all)."""
    for name, limit, what in _COUNTS:
        value = getattr(config, name)
        label = f"{_OPTIONS[name]} ({name})" if name in _OPTIONS else name
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or not isinstance(v, int) or v < limit:
                raise ValueError(f"{label} must be an int >= {limit} ({what}), got {v!r}")


def check_config(config: CompareConfig) -> None:
    _check_counts(config)
    for family_name in config.families:
        if family_name not in FAMILIES:
            raise ValueError(f"unknown family {family_name!r}; known families: {', '.join(FAMILIES)}")
    for temperature in config.temperatures:
        if not temperature > 0:
            raise ValueError(f"temperatures must be > 0 (greedy decoding has nothing to verify), got {temperature}")
    if config.pair not in ("shipped", "hf", None):
        raise ValueError(f"pair must be 'shipped', 'hf' or None, got {config.pair!r}")
    if config.pair == "hf" and not (config.hf_target and config.hf_draft):
        raise ValueError("pair = 'hf' needs both hf_target and hf_draft (local model directories)")
    for k, depth in config.tree_shapes:
        if k < 1 or depth < 1:
            raise ValueError(f"tree shapes are (k >= 1, depth >= 1), got ({k}, {depth})")
    for widths in config.tree_widths:
        if not widths or min(widths) < 1:
            raise ValueError(f"tree widths are children per node at each depth, each >= 1, got {tuple(widths)}")
    for name in config.verifiers:
        make_verifier(config, name)  # the registry's error for unknown names or bad options


def make_verifier(config: CompareConfig, name: str, **extra):
    return get_verifier(name, **{**config.verifier_options.get(name, {}), **extra})


def load_model_pair(config: CompareConfig) -> ModelPair | None:
    if config.pair is None:
        return None
    return hf_pair(config.hf_target, config.hf_draft) if config.pair == "hf" else shipped_pair()


def model_pair_contexts(config: CompareConfig, pair: ModelPair, count: int, seed: int, notes: list[str], what: str):
    """``count`` contexts for the pair (fewer where a prompts file has fewer lines); what the
    run had to change about them is added to ``notes``, for the report to say."""
    if config.prompts_file:
        got = contexts_from_prompts(config.prompts_file, pair.encode, config.context_length, count)
        notes += prompts_notes(config, got, count, what)
        return got.contexts
    if pair.name == "shipped-pair":
        from ..engine.pretrained import held_out_windows

        return held_out_windows(count, config.context_length, seed)
    raise ValueError("a transformers pair needs prompts: pass prompts_file (one prompt per line)")


def prompts_notes(config: CompareConfig, got: PromptContexts, asked: int, what: str) -> list[str]:
    """What the report must say about the prompts it used: fewer than asked, or cut lines."""
    notes = []
    if len(got.contexts) < asked:
        notes.append(f"{what}: the prompts file {config.prompts_file} has {got.lines} non-empty lines, so "
                     f"{len(got.contexts)} were used, not the {asked} asked for.")
    if got.cut:
        notes.append(f"{what}: {got.cut} of the {len(got.contexts)} prompt lines used were longer than "
                     f"{config.context_length} tokens and kept only their last {config.context_length} (--context-length).")
    return notes


def run_acceptance(config: CompareConfig, sources: dict[str, tuple[torch.Tensor, torch.Tensor]], progress: Progress) -> list[Row]:
    rows: list[Row] = []
    verifiers = {name: make_verifier(config, name) for name in config.verifiers}
    for source, (target_logits, draft_logits) in sources.items():
        for temperature in config.temperatures:
            p = (target_logits / temperature).softmax(-1)
            q = (draft_logits / temperature).softmax(-1)
            for k in config.ks:
                optimal_per_pair = proofs.optimal_acceptance(p, q, k).double()
                optimal = float(optimal_per_pair.mean())
                for name, verifier in verifiers.items():
                    try:
                        verifier.check_num_drafts(k, q)
                        g = cell_generator(config.seed, source, temperature, k, name)
                        per_pair, exact, se = acceptance_per_pair(verifier, p, q, k, config.tuples_per_pair, g)
                        mean, half = mean_and_ci(per_pair)
                        gap_half = mean_and_ci(optimal_per_pair - per_pair.double())[1]
                        rows.append(Row(source, temperature, name, k, mean, half, exact, optimal, gap_half, se))
                    except ValueError as err:  # a verifier limited to some k, or an LP too large
                        rows.append(Row(source, temperature, name, k, None, None, False, optimal, note=str(err)))
                    progress.step(f"{source} T={temperature:g} k={k} {name}")
    return rows


def run_engine(config: CompareConfig, pair: ModelPair, prompts: list[list[int]], progress: Progress) -> list[EngineRow]:
    """Block efficiency per temperature, verifier and tree shape on ``prompts`` (ragged lines
    stay whole: the engine pads them itself)."""
    from ..engine import Engine

    shapes = [(dict(num_drafts=k, depth=depth), k, depth, None) for k, depth in config.tree_shapes]
    shapes += [(dict(widths=tuple(w)), w[0], len(w), list(w)) for w in config.tree_widths]
    rows = []
    for temperature in config.temperatures:
        for name in config.verifiers:
            for shape, k, depth, widths in shapes:
                try:
                    verifier = make_verifier(config, name)
                    engine = Engine(pair.target, pair.draft, verifier=verifier, device="cpu", **shape)
                    out = engine.generate(prompts, config.engine_new_tokens, temperature=temperature, seed=config.seed)
                    mean, half = mean_and_ci(torch.tensor(out.stats.block_efficiency_per_request))
                    rows.append(EngineRow(temperature, name, k, depth, mean, half, out.stats.acceptance_by_depth, widths=widths))
                except ValueError as err:  # a verifier limited to some k or to depth 1
                    rows.append(EngineRow(temperature, name, k, depth, None, None, note=str(err), widths=widths))
                progress.step(f"T={temperature:g} {name} {rows[-1].shape}")
    return rows


def _timed_seconds(fn, repeats: int = 5) -> tuple[float, float]:
    """(median, half the range) of ``repeats`` calls after a warm-up, in seconds.  Timings are
    not independent draws, so the spread is what was seen, not a confidence interval."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], (times[-1] - times[0]) / 2


def _warm_up(verifier, k: int) -> None:
    """One verify call on a tiny float32 problem (as benchmarks/verifiers.py's warmed_up), so
    that numba compiling or loading its kernels is not taken for the verifier's own speed by
    the too-slow probe: a fresh process's first rrs call takes ~0.8 s, later ones 0.5 ms."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, generator=g)
    p, q = logits.softmax(-1), (logits + torch.randn(2, 16, generator=g)).softmax(-1)
    try:
        verifier.verify(p, q, verifier.draft(q, k, generator=g), generator=g)
    except ValueError:  # a k or size it refuses: the real call says so
        pass


def run_costs(config: CompareConfig, progress: Progress, max_call_seconds: float = 2.0) -> list[CostRow]:
    rows = []
    batch = config.cost_batch
    for vocab in config.cost_vocab:
        g = torch.Generator().manual_seed(config.seed)
        logits = 3 * torch.randn(batch, vocab, generator=g)
        p = logits.softmax(-1)
        q = (logits + torch.randn(batch, vocab, generator=g)).softmax(-1)
        softmax_us = _timed_seconds(lambda: logits.softmax(-1))[0] / batch * 1e6
        for k in config.cost_ks:
            for name in config.verifiers:
                verifier = make_verifier(config, name, validate_args=False)
                try:
                    verifier.check_num_drafts(k, q)
                    _warm_up(verifier, k)
                    drafts = verifier.draft(q, k, generator=g)
                    start = time.perf_counter()
                    verifier.verify(p, q, drafts, generator=g)
                    if time.perf_counter() - start > max_call_seconds:
                        raise ValueError(f"one call took over {max_call_seconds:g} s; not timed further")
                    seconds, spread = _timed_seconds(lambda: verifier.verify(p, q, drafts, generator=g))
                    rows.append(CostRow(name, vocab, k, seconds / batch * 1e6, softmax_us, spread / batch * 1e6))
                except ValueError as err:
                    rows.append(CostRow(name, vocab, k, None, softmax_us, note=str(err)))
                progress.step(f"V={vocab} k={k} {name}")
    return rows


def run_report(config: CompareConfig, show_progress: bool = True) -> Report:
    """Every section the config asks for."""
    check_config(config)
    pair = load_model_pair(config)
    sources: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    descriptions: dict[str, str] = {}
    notes: list[str] = []
    if pair is not None:
        contexts = model_pair_contexts(config, pair, config.pairs, config.seed, notes, "acceptance pairs (--pairs)")
        sources[pair.name] = pair_logits(pair, contexts)
        descriptions[pair.name] = pair.description
    for name in config.families:
        g = torch.Generator().manual_seed(config.seed)
        sources[name] = FAMILIES[name].sample(config.pairs, config.vocab, g)
        descriptions[name] = f"{FAMILIES[name].description} (V = {config.vocab})"

    cells = len(sources) * len(config.temperatures) * len(config.ks) * len(config.verifiers)
    progress = Progress(cells, "acceptance", enabled=show_progress)
    acceptance = run_acceptance(config, sources, progress)
    progress.close()
    engine_rows: list[EngineRow] = []
    prompts: list[list[int]] = []
    if config.engine and pair is not None:
        contexts = model_pair_contexts(config, pair, config.engine_prompts, config.seed + 1, notes, "engine requests (engine_prompts)")
        prompts = [c.tolist() for c in contexts]
        progress = Progress(len(config.temperatures) * len(config.verifiers) * (len(config.tree_shapes) + len(config.tree_widths)),
                        "engine", enabled=show_progress)
        engine_rows = run_engine(config, pair, prompts, progress)
        progress.close()
    cost_rows: list[CostRow] = []
    if config.costs:
        progress = Progress(len(config.cost_vocab) * len(config.cost_ks) * len(config.verifiers), "cost", enabled=show_progress)
        cost_rows = run_costs(config, progress)
        progress.close()
    pairs = {name: int(target.shape[0]) for name, (target, _) in sources.items()}
    return Report(descriptions, acceptance, engine_rows, cost_rows, pairs, len(prompts), notes)


# ---- tables --------------------------------------------------------------------------------


def _table(header: list[str], rows, cells) -> str:
    """A markdown table: ``cells(row)`` gives each row's cells after the header."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _with_interval(value: float, half: float | None, digits: int) -> str:
    """"0.7682 ± 0.0123", or "0.7682 (no interval)" from a single sample: not ± 0."""
    return f"{value:.{digits}f} ± {half:.{digits}f}" if half is not None else f"{value:.{digits}f} (no interval)"


def markdown_table(rows: list[Row]) -> str:
    def cells(r):
        head = [r.family, f"{r.temperature:g}", str(r.k), r.verifier]
        if r.acceptance is None:
            return head + ["n/a", "", f"{r.optimal_iid:.4f}", r.note.split(";")[0]]
        share = r.acceptance / r.optimal_iid if r.optimal_iid > 0 else float("nan")
        return head + [_with_interval(r.acceptance, r.ci95, 4), "yes" if r.exact_per_pair else "sampled", f"{r.optimal_iid:.4f}", f"{share:.3f}"]

    return _table(["source", "T", "k", "verifier", "acceptance (95% CI over pairs)", "exact per pair", "optimum (i.i.d.)",
                   "share of optimum"], rows, cells)


def engine_table(rows: list[EngineRow]) -> str:
    def cells(r):
        head = [f"{r.temperature:g}", r.verifier, r.shape]
        if r.block_efficiency is None:
            return head + ["n/a", r.note.split(";")[0].split(":")[0]]
        return head + [_with_interval(r.block_efficiency, r.ci95, 3), " ".join(f"{a:.2f}" for a in r.acceptance_by_depth)]

    return _table(["T", "verifier", "tree", "block efficiency (95% CI over requests)", "acceptance by depth"], rows, cells)


def cost_table(rows: list[CostRow]) -> str:
    def cells(r):
        head = [str(r.vocab), str(r.k), r.verifier]
        if r.us_per_node is None:
            return head + ["n/a", f"{r.softmax_us_per_node:.2f}", r.note.split(";")[0]]
        return head + [f"{r.us_per_node:.1f} ± {r.spread:.1f}", f"{r.softmax_us_per_node:.2f}", f"{r.us_per_node / r.softmax_us_per_node:.1f}"]

    return _table(["V", "k", "verifier", "µs per node (median ± half range)", "softmax µs per node", "× softmax"], rows, cells)


def _pair_counts(report: Report) -> str:
    """"1000 (p, q) pairs per source", or each source's count where they differ (a prompts
    file with fewer lines than asked for): the counts used, not the ones asked for."""
    counts = set(report.pairs.values())
    if len(counts) <= 1:
        return f"{counts.pop() if counts else 0} (p, q) pairs per source"
    return "(p, q) pairs per source: " + ", ".join(f"{n} for {name}" for name, n in report.pairs.items())


def write_report(config: CompareConfig, report: Report) -> Path:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({
        "config": asdict(config),
        "sources": report.sources,
        "rows": [asdict(r) for r in report.acceptance],
        "engine": [asdict(r) for r in report.engine],
        "costs": [asdict(r) for r in report.costs],
        "pairs": report.pairs,
        "engine_requests": report.engine_requests,
        "notes": report.notes,
    }, indent=2))
    sources = "\n".join(f"- `{n}`: {d}" for n, d in report.sources.items())
    notes = "".join(f"Note: {n}\n\n" for n in report.notes)
    text = (
        "# multidraft acceptance comparison\n\n"
        f"{_pair_counts(report)}, the same pairs at every temperature; {config.tuples_per_pair} draft "
        f"tuples per pair where sampled; seed {config.seed}.\n\nSources:\n{sources}\n\n{notes}"
        "## Acceptance\n\n"
        "Acceptance is exact per pair for verifiers with a closed form, otherwise the mean of the "
        "kernel's exact mass on drafted tuples; the interval is a 95% Student-t interval over the "
        "sampled pairs. report.json adds each row's paired interval of the gap to the optimum "
        "(gap_ci95) and the standard error of the draft tuples alone (sampling_se). The "
        "optimum is exact per pair for k i.i.d. drafts; schemes that draw distinct or "
        "deterministic drafts (rrs-wor, greedy, spechub) use another draft law and may exceed "
        "it.\n\n" + markdown_table(report.acceptance) + "\n"
    )
    if report.engine:
        text += (
            "\n## Block efficiency (engine, model pair)\n\n"
            f"{report.engine_requests} requests of {config.engine_new_tokens} new tokens each, one batch; "
            "tree kxD: k draft sequences of depth D per round; tree a-b-c: a branching tree with a "
            "children at the root, b under each of them, and so on (every node drafts by the verifier's "
            "own scheme); tokens per request per target pass, with a "
            "95% Student-t interval over requests.\n\n" + engine_table(report.engine) + "\n"
        )
    if report.costs:
        text += (
            "\n## Cost of verify per node\n\n"
            f"CPU, float32, {config.cost_batch} nodes per call, validation off, median of 5 calls ± half "
            "their range (timings are not independent draws: the range is what was seen); a softmax "
            "over the same logits for scale. Machine-dependent: benchmarks/verifiers.py has the "
            "careful version.\n\n" + cost_table(report.costs) + "\n"
        )
    (out / "report.md").write_text(text)
    from .plots import write_plots

    write_plots(report, out)
    return out
