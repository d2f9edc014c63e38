"""Command line: `multidraft compare` (the default job), `verify-exactness`, `verifiers`."""

from __future__ import annotations

import argparse
import sys

from .verifiers import available_verifiers


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def cmd_compare(args) -> int:
    from .reports import CompareConfig, markdown_table, run_compare, write_report

    config = CompareConfig(out_dir=args.out)
    for key in ("verifiers", "families", "ks", "temperatures", "vocab", "pairs", "seed"):
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


def cmd_verify_exactness(args) -> int:
    import importlib

    from .proofs import check_exactness
    from .verifiers import get_verifier

    for module in args.imports or []:
        importlib.import_module(module)  # a user's module that registers its verifier
    verifier = get_verifier(args.name)
    report = check_exactness(verifier, max_k=args.max_k, samples=args.samples, seed=args.seed)
    for r in report.results:
        print(f"{'ok  ' if r.passed else 'FAIL'} {r.kind:<11} {r.case:<20} k={r.k}  {r.detail}")
    failed = [r for r in report.results if not r.passed]
    if failed:
        print(f"\n{report.verifier}: NOT EXACT ({len(failed)} of {len(report.results)} checks failed)")
        return 1
    print(f"\n{report.verifier}: exact on all {len(report.results)} checks "
          "(enumeration to 1e-12; chi-square family-wise false-failure rate <= 1e-6)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multidraft", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    compare = sub.add_parser("compare", help="acceptance of every verifier against the optimum (default)")
    compare.add_argument("--verifiers", type=_csv(str), help="comma-separated names (default: all)")
    compare.add_argument("--families", type=_csv(str), help="comma-separated synthetic families")
    compare.add_argument("--ks", type=_csv(int), help="comma-separated draft counts (default 1,2,3,4,6,8)")
    compare.add_argument("--temperatures", type=_csv(float), help="comma-separated sampling temperatures (default 0.6,1.0)")
    compare.add_argument("--vocab", type=int, help="vocabulary size V (default 1000)")
    compare.add_argument("--pairs", type=int, help="(p, q) pairs per family and temperature (default 1000)")
    compare.add_argument("--seed", type=int)
    compare.add_argument("--out", default="multidraft-report", help="report directory")
    compare.set_defaults(run=cmd_compare)
    exact = sub.add_parser("verify-exactness", help="enumeration and chi-square exactness checks for one verifier")
    exact.add_argument("name", help="registered verifier name")
    exact.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import this module first (it registers your verifier); repeatable")
    exact.add_argument("--max-k", type=int, default=3, help="largest draft count to check (default 3)")
    exact.add_argument("--samples", type=int, default=200_000, help="samples per chi-square test")
    exact.add_argument("--seed", type=int, default=0)
    exact.set_defaults(run=cmd_verify_exactness)
    listing = sub.add_parser("verifiers", help="list the registered verifiers and their capabilities")
    listing.set_defaults(run=cmd_verifiers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the main job runs on its embedded default
        args = parser.parse_args(["compare", *(argv or [])])
    try:
        return args.run(args)
    except ValueError as err:  # bad names, sizes or options: say what, not a traceback
        print(f"multidraft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
