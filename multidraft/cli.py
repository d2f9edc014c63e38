"""Command line: `multidraft compare` (the default job) and `multidraft verifiers`."""

from __future__ import annotations

import argparse
import sys

from .verifiers import available_verifiers


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def cmd_compare(args) -> int:
    from .reports import CompareConfig, markdown_table, run_compare, write_report

    config = CompareConfig(out_dir=args.out)
    for key in ("verifiers", "families", "ks", "vocab", "pairs", "seed"):
        value = getattr(args, key)
        if value is not None:
            setattr(config, key, value)
    print(f"comparing {', '.join(config.verifiers)} on {', '.join(config.families)} (V = {config.vocab})", file=sys.stderr)
    rows = run_compare(config, progress=lambda line: print(line, file=sys.stderr))
    out = write_report(config, rows)
    print(markdown_table(rows))
    print(f"\nreport written to {out}/ (report.md, report.json, acceptance-vs-k.png)")
    return 0


def cmd_verifiers(args) -> int:
    from .verifiers import get_verifier

    for name in available_verifiers():
        v = get_verifier(name)
        limit = "any" if v.max_drafts is None else str(v.max_drafts)
        print(f"{name:<10} k in {v.min_drafts}..{limit:<4} distinct={v.distinct_drafts!s:<5} iid={v.iid_drafts!s:<5} {type(v).__doc__.strip().splitlines()[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multidraft", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    compare = sub.add_parser("compare", help="acceptance of every verifier against the optimum (default)")
    compare.add_argument("--verifiers", type=_csv(str), help="comma-separated names (default: all)")
    compare.add_argument("--families", type=_csv(str), help="comma-separated synthetic families")
    compare.add_argument("--ks", type=_csv(int), help="comma-separated draft counts (default 1,2,3,4)")
    compare.add_argument("--vocab", type=int, help="vocabulary size V (default 1000)")
    compare.add_argument("--pairs", type=int, help="(p, q) pairs per family (default 2000)")
    compare.add_argument("--seed", type=int)
    compare.add_argument("--out", default="multidraft-report", help="report directory")
    compare.set_defaults(run=cmd_compare)
    listing = sub.add_parser("verifiers", help="list the registered verifiers and their capabilities")
    listing.set_defaults(run=cmd_verifiers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the main job runs on its embedded default
        args = parser.parse_args(["compare", *(argv or [])])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
