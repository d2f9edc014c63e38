"""Speculative decoding vs plain autoregressive decoding of the same target: tokens/s and block
efficiency, per verifier, batch size and temperature.

    .venv/bin/python benchmarks/engine.py                      # full grid, 1 thread, CPU
    .venv/bin/python benchmarks/engine.py --quick              # batch 1 and 16, one repeat
    .venv/bin/python benchmarks/engine.py --quick --batches 4  # --quick's other defaults, batch 4
    .venv/bin/python benchmarks/engine.py --json out.json --markdown

Models (``--pair``): ``shipped`` (default), the trained byte-level pair shipped in
``multidraft.engine.pretrained`` (docs/model-pair.md), prompted with held-out standard-library
source; or ``demo``, the untrained built-in pair (``multidraft.engine.demo_pair``: an 8-layer
random GPT and its first-layer early exit, random-token prompts), whose acceptance says nothing
about real drafts but whose draft is ~8x cheaper than its target.

Baseline: ``autoregressive_generate``, one target forward per token through the same KVCache,
masks and sampling code.  Both decode the same prompts with the same settings; each cell times
the baseline and the speculative run alternately (``--repeats`` times each, median), so the
ratio compares them under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

from multidraft.engine import Engine, autoregressive_generate, demo_pair
from multidraft.engine.pretrained import held_out_windows, load_ngram, load_pair
from multidraft.engine.shape import ShapePolicy, forward_ms, time_shapes

# (verifier, engine shape): drafted sequences (num_drafts, depth), branching trees (widths: children per
# node by depth; spechub's binary tree), and staged drafting (draft2: the shipped pair's byte bigram).
CONFIGS = [("single", dict(num_drafts=1, depth=4)), ("rrs", dict(num_drafts=2, depth=4)), ("rrs-wor", dict(num_drafts=2, depth=4)),
           ("kseq", dict(num_drafts=2, depth=4)), ("importance", dict(num_drafts=2, depth=4)), ("spechub", dict(num_drafts=2, depth=1)),
           ("rrs-wor", dict(num_drafts=4, depth=3)), ("spechub", dict(widths=(2, 2, 2))), ("rrs-wor", dict(widths=(4, 2, 1, 1))),
           ("rrs", dict(num_drafts=2, depth=4, draft2="bigram")), ("single", dict(num_drafts=1, depth=6, draft2="bigram")),
           ("rrs-wor", dict(widths=(4, 2, 1, 1), draft2="bigram"))]


# The adaptive run compares its choice with these fixed (k, D), all timed alternately in the same run.
FIXED_SHAPES = [(1, 4), (2, 2), (2, 4), (4, 3), (2, 6)]
CALIBRATION_PROMPTS = 16
EVALUATION_REQUESTS = 8
CHOICE_MARGIN = 0.05  # speculate only where it is predicted to beat plain decoding by 5 %

# Defaults, and --quick's: an option given explicitly wins over both.
DEFAULTS = {"batches": [1, 4, 16, 64], "repeats": 3}
QUICK = {"batches": [1, 16], "repeats": 1}


def shape_label(shape: dict) -> str:
    """"k2 D4", "widths 2-2-2", "k2 D4 +bigram": a config's shape in a table cell."""
    label = "widths " + "-".join(map(str, shape["widths"])) if "widths" in shape else f"k{shape['num_drafts']} D{shape['depth']}"
    return label + (" +" + shape["draft2"] if "draft2" in shape else "")


def models(pair: str):
    """(target, draft, prompts_for(batch, length, seed))."""
    if pair == "demo":
        target, draft = demo_pair(seed=0)

        def random_prompts(batch: int, length: int, seed: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            return torch.randint(0, target.vocab_size, (batch, length), generator=g)

        return target, draft, random_prompts
    target, draft = load_pair()
    return target, draft, lambda batch, length, seed: held_out_windows(batch, length, seed)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    target, draft, prompts_for = models(args.pair)
    draft2 = {"bigram": load_ngram(2)} if args.pair == "shipped" else {}
    machine = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "load_start": os.getloadavg()[0],
    }
    costs = {b: {"target_1": forward_ms(target, b, 1, device="cpu"), "target_9": forward_ms(target, b, 9, device="cpu"),
                 "draft_1": forward_ms(draft, b, 1, device="cpu"), "draft_2": forward_ms(draft, b, 2, device="cpu")} for b in args.batches}
    rows = []
    for batch in args.batches:
        prompts = prompts_for(batch, args.prompt_len, seed=batch)
        for temperature in args.temperatures:
            settings = dict(temperature=temperature, seed=0)
            autoregressive_generate(target, prompts, 4, device="cpu", **settings)  # warm-up
            for name, shape in CONFIGS:
                if (args.verifiers and name not in args.verifiers) or (name == "spechub" and temperature == 0):
                    continue
                if "draft2" in shape and shape["draft2"] not in draft2:
                    continue
                options = {**shape, "draft2": draft2[shape["draft2"]]} if "draft2" in shape else shape
                engine = Engine(target, draft, verifier=name, device="cpu", **options)
                engine.generate(prompts, 4, **settings)  # warm-up
                base_t, spec_t, stats, same = [], [], None, []
                for _ in range(args.repeats):
                    base = autoregressive_generate(target, prompts, args.new_tokens, device="cpu", **settings)
                    spec = engine.generate(prompts, args.new_tokens, **settings)
                    base_t.append(base.stats.tokens_per_second)
                    spec_t.append(spec.stats.tokens_per_second)
                    stats = spec.stats
                    # Greedy speculation is exact token for token up to float32 rounding: the tree pass sums
                    # in another order, so a near-tie of the top two logits (~1e-7 relative) can flip.
                    if temperature == 0:
                        same.append(float((base.tokens == spec.tokens).all(dim=1).float().mean()))
                row = {
                    "batch": batch, "temperature": temperature, "verifier": name, "shape": shape_label(shape),
                    "block_efficiency": stats.block_efficiency,
                    "draft_passes_per_round": stats.draft_passes / stats.rounds, "draft2_passes_per_round": stats.draft2_passes / stats.rounds,
                    "acceptance_by_depth": stats.acceptance_by_depth,
                    "rows_equal_to_baseline": min(same) if same else None,
                    "ar_tokens_per_s": statistics.median(base_t), "spec_tokens_per_s": statistics.median(spec_t),
                }
                row["speedup"] = row["spec_tokens_per_s"] / row["ar_tokens_per_s"]
                rows.append(row)
                print(f"B={batch:<3} T={temperature:<3} {name:<8} {row['shape']:<16} block eff {row['block_efficiency']:.2f}  "
                      f"AR {row['ar_tokens_per_s']:8.1f} tok/s  spec {row['spec_tokens_per_s']:8.1f} tok/s  "
                      f"x{row['speedup']:.2f}" + (f"  rows equal to AR {min(same):.2f}" if same else ""), file=sys.stderr, flush=True)
    machine["load_end"] = os.getloadavg()[0]
    return {"machine": machine, "pair": args.pair, "forward_ms": costs, "rows": rows,
            "settings": {"new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats}}


def run_adaptive(args) -> dict:
    """Per batch size and temperature: ``ShapePolicy.calibrate`` measures forward costs and the
    engine's overhead (per round and per depth, on one calibration batch) and per-depth
    acceptance (k in 1, 2, 4 at depth 6, on CALIBRATION_PROMPTS or more prompts: acceptance does
    not depend on the batch size, and one prompt is a noisy estimate); the policy picks (k, D) or
    plain decoding, and that choice, plain decoding and every fixed shape of FIXED_SHAPES are
    timed on *other* prompts."""
    torch.set_num_threads(args.threads)
    target, draft, prompts_for = models(args.pair)
    rows = []
    for batch in args.batches:
        calib = prompts_for(max(batch, CALIBRATION_PROMPTS), args.prompt_len, seed=1000 + batch)
        # Timed on at least EVALUATION_REQUESTS requests (several batches at small batch sizes):
        # one prompt of 48 tokens says little about a shape's speed on others.
        batches = [prompts_for(batch, args.prompt_len, seed=batch + 100 * i) for i in range(max(1, EVALUATION_REQUESTS // batch))]
        for temperature in args.temperatures:
            settings = dict(temperature=temperature, seed=0)
            policy = ShapePolicy.calibrate(target, draft, args.adaptive_verifier, calib, batch_sizes=[batch], ks=(1, 2, 4),
                                           max_depth=6, max_new_tokens=args.new_tokens, margin=CHOICE_MARGIN, device="cpu",
                                           **settings)
            choice, overhead = policy.choose(batch), policy.overhead[batch]
            shapes = {"adaptive": (choice.num_drafts, choice.depth), **{f"k{k} D{d}": (k, d) for k, d in FIXED_SHAPES}}
            # every shape and plain decoding over all evaluation batches, alternately (time_shapes);
            # a shape listed twice (the choice is also a fixed shape) is timed once
            measured = time_shapes(target, draft, args.adaptive_verifier, batches, [(0, 0), *shapes.values()],
                                   args.new_tokens, args.repeats, device="cpu", **settings)
            rate = {name: measured[shape] for name, shape in shapes.items()}  # best of the repeats
            best_fixed = max((name for name in shapes if name != "adaptive"), key=rate.get)
            base = measured[0, 0]
            row = {"batch": batch, "temperature": temperature, "k": choice.num_drafts, "depth": choice.depth,
                   "predicted_block_efficiency": choice.block_efficiency, "predicted_tokens_per_s": choice.tokens_per_second,
                   "overhead_per_round_ms": overhead.per_round_ms, "overhead_per_depth_ms": overhead.per_depth_ms,
                   "overhead_plain_ms": overhead.plain_ms,
                   "trial_tokens_per_s": {f"{k},{d}": rate for (k, d), rate in policy.trials.get(batch, {}).items()},
                   "ar_tokens_per_s": base, "spec_tokens_per_s": rate["adaptive"], "speedup": rate["adaptive"] / base,
                   "best_fixed": best_fixed, "best_fixed_tokens_per_s": max(rate[best_fixed], base),
                   "fixed_tokens_per_s": {name: rate[name] for name in shapes if name != "adaptive"}}
            row["vs_best"] = rate["adaptive"] / row["best_fixed_tokens_per_s"]
            rows.append(row)
            print(f"adaptive B={batch:<3} T={temperature:<3} picks k={choice.num_drafts} D={choice.depth} (predicted {choice.tokens_per_second:.0f} tok/s, "
                  f"trial {row['trial_tokens_per_s']}, "
                  f"overhead {overhead.per_round_ms:.1f} + {overhead.per_depth_ms:.1f}/depth ms, plain {overhead.plain_ms:.1f} ms)  AR {base:.1f}  adaptive {rate['adaptive']:.1f}  "
                  f"best fixed {best_fixed} {rate[best_fixed]:.1f}  adaptive/best {row['vs_best']:.2f}", file=sys.stderr, flush=True)
    return {"adaptive_rows": rows, "verifier": args.adaptive_verifier}


def markdown(result: dict) -> str:
    if "adaptive_rows" in result:
        lines = ["| batch | T | chosen k, D | predicted tok/s | trial tok/s: chosen; plain | overhead ms (round + per depth; plain step) | "
                 "AR tok/s | adaptive tok/s | best fixed (or AR) | its tok/s | adaptive / best |",
                 "|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in result["adaptive_rows"]:
            chosen = f"{r['k']}, {r['depth']}" if r["depth"] else "plain decoding"
            best = r["best_fixed"] if r["best_fixed_tokens_per_s"] > r["ar_tokens_per_s"] else "plain decoding"
            trial = r.get("trial_tokens_per_s") or {}
            chosen_rate, plain_rate = trial.get(f"{r['k']},{r['depth']}", float("nan")), trial.get("0,0", float("nan"))
            raced = f"{chosen_rate:.0f}; {plain_rate:.0f}" if trial else "—"
            lines.append(f"| {r['batch']} | {r['temperature']:g} | {chosen} | {r['predicted_tokens_per_s']:.0f} | {raced} | "
                         f"{r['overhead_per_round_ms']:.1f} + {r['overhead_per_depth_ms']:.1f}; {r['overhead_plain_ms']:.1f} | {r['ar_tokens_per_s']:.0f} | "
                         f"{r['spec_tokens_per_s']:.0f} | {best} | {r['best_fixed_tokens_per_s']:.0f} | {r['vs_best']:.2f} |")
        return "\n".join(lines)
    lines = ["| batch | T | verifier | shape | block eff. | draft fwd/round | AR tok/s | spec tok/s | speedup |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        passes = f"{r['draft_passes_per_round']:.1f}" + (f" + {r['draft2_passes_per_round']:.1f}" if r["draft2_passes_per_round"] else "")
        lines.append(f"| {r['batch']} | {r['temperature']:g} | {r['verifier']} | {r['shape']} | "
                     f"{r['block_efficiency']:.2f} | {passes} | {r['ar_tokens_per_s']:.0f} | {r['spec_tokens_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x |")
    lines += ["", "| batch | target fwd, 1 tok | target fwd, 9 tok | draft fwd, 1 tok | draft fwd, 2 tok | target/draft (1 tok) |",
              "|---:|---:|---:|---:|---:|---:|"]
    for b, c in result["forward_ms"].items():
        lines.append(f"| {b} | {c['target_1']:.2f} ms | {c['target_9']:.2f} ms | {c['draft_1']:.2f} ms | "
                     f"{c['draft_2']:.2f} ms | {c['target_1'] / c['draft_1']:.1f} |")
    return "\n".join(lines)


def check_verifiers(parser, names) -> None:
    """Every name is registered (else the registry's own error) and has a config here: a name
    without one would be dropped, leaving an empty table and exit status 0."""
    from multidraft.verifiers import get_verifier

    configured = sorted({c[0] for c in CONFIGS})
    for name in names or []:
        try:
            get_verifier(name)
        except ValueError as err:
            parser.error(f"--verifiers: {err}")
    for name in names or []:
        if name not in configured:
            parser.error(f"--verifiers: {name!r} has no engine config in this benchmark (CONFIGS); configured: {', '.join(configured)}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=["shipped", "demo"], default="shipped", help="model pair (default: the shipped trained pair)")
    parser.add_argument("--batches", type=int, nargs="+", help=f"batch sizes (default {DEFAULTS['batches']})")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--verifiers", nargs="+", help="subset of: " + ", ".join(sorted({c[0] for c in CONFIGS})))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, help=f"timed runs of each (median; the adaptive run: best; default {DEFAULTS['repeats']})")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: a shared machine)")
    parser.add_argument("--quick", action="store_true",
                        help=f"batches {QUICK['batches']}, {QUICK['repeats']} repeat, unless --batches or --repeats say otherwise")
    parser.add_argument("--adaptive", action="store_true", help="instead: pick (k, D) per batch size with multidraft.engine.shape")
    parser.add_argument("--adaptive-verifier", default="rrs")
    parser.add_argument("--json", help="write rows and machine info here")
    parser.add_argument("--markdown", action="store_true", help="print the markdown tables")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for option, values in (("--batches", args.batches), ("--repeats", [args.repeats]), ("--new-tokens", [args.new_tokens]),
                           ("--prompt-len", [args.prompt_len]), ("--threads", [args.threads])):
        for value in values:
            if value < 1:
                parser.error(f"{option} must be >= 1, got {value}")
    for t in args.temperatures:
        if t < 0:
            parser.error(f"--temperatures must be >= 0 (0 = greedy), got {t}")
    check_verifiers(parser, args.verifiers)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run_adaptive(args) if args.adaptive else run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
