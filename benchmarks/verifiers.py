"""Time ``verify`` for every registered verifier against one softmax over the same logits.

For each vocabulary size V, batch B (tree nodes verified at once) and number of drafts k the
script builds realistic rows -- p = softmax(target logits), q = softmax(target logits + noise)
-- draws the drafts with each verifier's own ``draft`` (not timed) and times ``verify``.
The reference is one ``torch.softmax`` over the same [B, V] float32 logits: a single
memory-bound pass that every decoding step pays anyway, so "verify costs r softmaxes" is a
measure that carries across machines.  The softmax is timed alternately with each verifier,
so every ratio compares the two under the same conditions, in the same run.

Verifiers are built with ``validate_args=False`` (validation reads values back to the host,
and is switched off in serving).  A verifier that refuses a size (``ValueError``: spechub is
k = 2 only, otm has an exponential-size limit) is reported as ``n/a (reason)``; one slower
than ``--max-call-s`` per call is not timed at larger B (``skipped (...)``).  Timing on a
shared machine, and glibc's page faults on large tensors: see benchmarks/README.md.

    python benchmarks/verifiers.py                     # full grid, CPU (+ CUDA if present)
    python benchmarks/verifiers.py --quick             # smaller grid
    python benchmarks/verifiers.py --verifiers rrs rrs-wor --device cpu --json out.json
    python benchmarks/verifiers.py --verifiers optimal optimal:fused=False   # the two plan paths
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

import multidraft as md

FULL_GRID = {"V": [32000, 50257], "B": [1, 64, 256], "k": [2, 4, 8]}
QUICK_GRID = {"V": [32000], "B": [1, 256], "k": [2, 8]}

TARGET_SCALE = 3.0  # std of the target logits: peaked rows, like a language model's
DRAFT_NOISE = 1.0  # std of the noise added to the target logits to get the draft's
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
SLOW_CALL_S = 0.5  # calls slower than this get 3 runs (the warm-up one of them) instead of --min-repeats


@dataclass
class Row:
    device: str
    verifier: str
    V: int
    B: int
    k: int
    ms_per_call: float | None  # median over the repeats
    us_per_node: float | None  # ms_per_call / B, in microseconds
    softmax_ms: float  # median time of one softmax over the same [B, V] logits, timed alternately
    ratio: float | None  # ms_per_call / softmax_ms
    repeats: int
    note: str = ""  # "n/a (reason)" when the verifier refuses the size, "skipped (...)" when too slow


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall time (seconds) of one ``fn()``, bracketed by device synchronization so that
    asynchronous CUDA work is counted in full."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median_times(fn, reference, device: torch.device, min_repeats: int, max_repeats: int, budget_s: float):
    """Median wall times (seconds) of ``fn()`` and of ``reference()``, and the number of runs.

    The two are timed alternately, one of each per round, so that the ratio of the medians
    compares them under the same conditions even on a machine whose load drifts.  After
    warm-up, runs at least ``min_repeats`` rounds (3 when ``fn`` is slower than
    ``SLOW_CALL_S``, the warm-up counting as one, to keep the whole grid within minutes) and
    at most ``max_repeats``, stopping once ``budget_s`` seconds have been spent in ``fn``.
    """
    warm_up = timed(fn, device)  # allocator, kernel caches, lazy init
    times: list[float] = []
    ref_times: list[float] = [timed(reference, device)]
    if warm_up < 0.05:  # cheap call: a few more warm-ups are free
        for _ in range(3):
            timed(fn, device)
    elif warm_up > SLOW_CALL_S:
        # One-off costs are negligible next to such a call: the warm-up counts as a run.
        min_repeats = min(min_repeats, 3)
        times.append(warm_up)
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s):
        ref_times.append(timed(reference, device))
        times.append(timed(fn, device))
    return statistics.median(times), statistics.median(ref_times), len(times)


def make_rows(V: int, B: int, device: torch.device, seed: int = 0):
    """Target logits [B, V], and p, q: softmax of correlated logits (float32)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    target = TARGET_SCALE * torch.randn(B, V, generator=gen)
    draft = target + DRAFT_NOISE * torch.randn(B, V, generator=gen)
    target, draft = target.to(device), draft.to(device)
    return target, torch.softmax(target, dim=-1), torch.softmax(draft, dim=-1)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:option=value,...`` (values as Python literals) -> (name, options)."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"verifier option {item!r} in {spec!r} is not key=value")
        options[key] = ast.literal_eval(value)
    return name, options


def warmed_up(spec: str, device: torch.device):
    """The verifier of ``spec``, after one call on a tiny problem, so that one-off costs
    (numba compiling or loading its cache, lazy imports) stay out of every timed cell."""
    name, options = parse_spec(spec)
    verifier = md.get_verifier(name, validate_args=False, **options)
    _, p, q = make_rows(16, 2, device)
    gen = torch.Generator(device=device).manual_seed(0)
    for k in (1, 2):
        if k >= verifier.min_drafts and (verifier.max_drafts is None or k <= verifier.max_drafts):
            verifier.verify(p, q, verifier.draft(q, k, generator=gen), generator=gen)
    return verifier


def bench_device(device, grid, names, min_repeats, max_repeats, budget_s, max_call_s, log=print) -> list[Row]:
    rows: list[Row] = []
    verifiers = {spec: warmed_up(spec, device) for spec in names}
    too_slow: dict[tuple[str, int, int], str] = {}  # (verifier, V, k) -> why larger B are skipped
    for V in grid["V"]:
        for B in sorted(grid["B"]):
            logits, p, q = make_rows(V, B, device)
            softmax = functools.partial(torch.softmax, logits, dim=-1)
            # Softmax alone, for the log line and for the sizes a verifier refuses; the rows
            # below time it again, alternating with each verifier.
            _, softmax_s, _ = median_times(softmax, softmax, device, min_repeats, max_repeats, budget_s)
            log(f"# {device.type} V={V} B={B}: softmax {1e3 * softmax_s:.3f} ms")
            for k in grid["k"]:
                for name, verifier in verifiers.items():
                    row = Row(device.type, name, V, B, k, None, None, 1e3 * softmax_s, None, 0)
                    gen = torch.Generator(device=device).manual_seed(1)
                    try:
                        if (name, V, k) in too_slow:
                            row.note = f"skipped ({too_slow[name, V, k]})"
                            raise LookupError
                        # validate_args=False skips the size checks; ask for them explicitly.
                        verifier.check_num_drafts(k, q)
                        drafts = verifier.draft(q, k, generator=gen)
                        verify = functools.partial(verifier.verify, p, q, drafts, generator=gen)
                        secs, ref_s, n = median_times(verify, softmax, device, min_repeats, max_repeats, budget_s)
                    except ValueError as err:
                        reason = str(err).splitlines()[0]
                        row.note = "n/a (" + (reason if len(reason) <= 100 else reason[:99] + "…") + ")"
                    except LookupError:
                        pass
                    else:
                        row.ms_per_call, row.softmax_ms = 1e3 * secs, 1e3 * ref_s
                        row.us_per_node, row.ratio = 1e3 * row.ms_per_call / B, secs / ref_s
                        row.repeats = n
                        if secs > max_call_s:
                            too_slow[name, V, k] = f"{secs:.1f} s per call at B = {B}; see --max-call-s"
                    rows.append(row)
                    log(format_row(row))
    return rows


HEADER = (f"{'device':<6} {'verifier':<20} {'V':>6} {'B':>4} {'k':>2} {'ms/call':>9} {'us/node':>9} "
          f"{'softmax ms':>10} {'x softmax':>9}")


def format_row(r: Row) -> str:
    head = f"{r.device:<6} {r.verifier:<20} {r.V:>6} {r.B:>4} {r.k:>2}"
    if r.ms_per_call is None:
        return f"{head} {r.note}"
    return f"{head} {r.ms_per_call:>9.3f} {r.us_per_node:>9.2f} {r.softmax_ms:>10.3f} {r.ratio:>9.2f}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| device | verifier | V | B | k | ms / call | µs / node | softmax ms | × softmax |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.ms_per_call is None:
            lines.append(f"| {r.device} | {r.verifier} | {r.V} | {r.B} | {r.k} | {r.note} | | | |")
        else:
            lines.append(f"| {r.device} | {r.verifier} | {r.V} | {r.B} | {r.k} | {r.ms_per_call:.3f} "
                         f"| {r.us_per_node:.2f} | {r.softmax_ms:.3f} | {r.ratio:.2f} |")
    return "\n".join(lines)


def check_args(parser, args) -> None:
    """Range checks, before anything is timed: --B 0 divides by zero, --threads 0 was silently
    ignored, and a negative --max-call-s skipped every larger B as "too slow"."""
    for option, values, limit in (("--V", args.V, 1), ("--B", args.B, 1), ("--k", args.k, 1),
                                  ("--threads", [args.threads] if args.threads is not None else [], 1),
                                  ("--min-repeats", [args.min_repeats], 1), ("--max-repeats", [args.max_repeats], 1)):
        for value in values or []:
            if value < limit:
                parser.error(f"{option} must be >= {limit}, got {value}")
    if args.max_repeats < args.min_repeats:
        parser.error(f"--max-repeats ({args.max_repeats}) must be >= --min-repeats ({args.min_repeats})")
    for option, value in (("--budget", args.budget), ("--max-call-s", args.max_call_s)):
        if not value >= 0:  # also refuses nan
            parser.error(f"{option} must be >= 0 seconds, got {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller grid: {QUICK_GRID}")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="device to time on (repeatable); default: cpu, and cuda if available")
    parser.add_argument("--verifiers", nargs="+", metavar="NAME",
                        help="verifiers to time (default: all of md.available_verifiers()); "
                             "NAME:option=value,... passes constructor options, e.g. optimal:fused=False")
    parser.add_argument("--V", type=int, nargs="+", help="override the vocabulary sizes")
    parser.add_argument("--B", type=int, nargs="+", help="override the batch sizes")
    parser.add_argument("--k", type=int, nargs="+", help="override the numbers of drafts")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=50)
    parser.add_argument("--budget", type=float, default=0.25,
                        help="seconds of timed runs per cell before stopping (after --min-repeats)")
    parser.add_argument("--max-call-s", type=float, default=1.5,
                        help="a verifier slower than this per call is not timed at larger B "
                             "(same V and k), to bound the run time; 0 times everything")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results and the machine to PATH")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    args = parser.parse_args(argv)
    check_args(parser, args)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for key in ("V", "B", "k"):
        if getattr(args, key):
            grid[key] = getattr(args, key)

    known = md.available_verifiers()
    names = args.verifiers or known
    unknown = [n for n in names if parse_spec(n)[0] not in known]
    if unknown:
        parser.error(f"unknown verifier(s) {', '.join(unknown)}; known: {', '.join(known)}")

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")

    machine = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_start": os.getloadavg()[0],  # other processes skew wall-clock timings
        # glibc page-faults every fresh tensor above 32 MiB unless these are raised (README)
        "malloc_env": {key: os.environ[key] for key in MALLOC_ENV if key in os.environ},
        "grid": grid,
        "verifiers": names,
    }
    print("# " + ", ".join(f"{key}={value}" for key, value in machine.items()))
    print(HEADER)

    rows: list[Row] = []
    started = time.perf_counter()
    for device in devices:
        rows += bench_device(torch.device(device), grid, names, args.min_repeats, args.max_repeats,
                             args.budget, args.max_call_s or float("inf"))
    machine["elapsed_s"] = round(time.perf_counter() - started, 1)
    machine["load_average_end"] = os.getloadavg()[0]
    print(f"# done in {machine['elapsed_s']} s; load average {machine['load_average_start']:.2f} "
          f"at the start, {machine['load_average_end']:.2f} at the end (above ~0.5 the machine was shared)")

    if args.markdown:
        print()
        print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
