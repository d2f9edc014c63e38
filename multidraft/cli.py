"""Command line: `multidraft compare` (the default job), `verify-exactness`, `verifiers`, `generate`."""

from __future__ import annotations

import argparse
import ast
import sys

from .verifiers import available_verifiers


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def prompt_bytes(text: str) -> bytes:
    """--prompt-text as bytes for the byte-level pair: the text in UTF-8, with backslash
    escapes (\\n, \\t, \\xNN for a raw byte) resolved."""
    # unicode_escape reads its input as Latin-1, so the UTF-8 bytes of non-ASCII characters
    # pass through it one code point per byte, and encoding back to Latin-1 restores them
    return text.encode("utf-8").decode("unicode_escape").encode("latin-1")


def _tree_shapes(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, ...]]]:
    """"2x4,2-2-2" -> ([(2, 4)], [(2, 2, 2)]): k draft sequences x depth D, or a branching tree's
    children per node at each depth."""
    shapes, widths = [], []
    for item in text.split(","):
        k, sep, depth = item.lower().partition("x")
        parts = item.split("-")
        if sep and k.strip().isdigit() and depth.strip().isdigit():
            shapes.append((int(k), int(depth)))
        elif not sep and all(part.strip().isdigit() for part in parts):
            widths.append(tuple(int(part) for part in parts))
        else:
            raise argparse.ArgumentTypeError(
                f"tree shapes are KxD (k sequences of depth D) or W1-W2-... (a branching tree), got {item!r}")
    return shapes, widths


def _widths(text: str) -> list[int]:
    """"4,2,1" -> [4, 2, 1]: children per node at each depth of a branching tree."""
    items = text.split(",")
    if not all(item.strip().isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"widths are comma-separated ints (children per node at each depth), got {text!r}")
    return [int(item) for item in items]


def _import_plugins(modules) -> None:
    """Import a user's modules first: registering a verifier is a side effect of importing."""
    import importlib

    for module in modules or []:
        importlib.import_module(module)


def cmd_compare(args) -> int:
    from .reports import CompareConfig, run_report, write_report
    from .reports.compare import check_config

    _import_plugins(args.imports)
    config = CompareConfig(out_dir=args.out)
    for key in ("verifiers", "families", "ks", "temperatures", "vocab", "pairs", "seed",
                "prompts_file", "hf_target", "hf_draft", "context_length"):
        value = getattr(args, key)
        if value is not None:
            setattr(config, key, value)
    if args.tree_shapes is not None:
        config.tree_shapes, config.tree_widths = args.tree_shapes
    if args.hf_target or args.hf_draft:
        config.pair = "hf"
    if args.no_pair:
        config.pair = None
    config.engine = not args.no_engine
    config.costs = not args.no_costs
    check_config(config)  # bad counts first, by name
    if args.no_pair:
        dropped = [flag for flag, value in (("--hf-target", args.hf_target), ("--hf-draft", args.hf_draft),
                                            ("--prompts-file", args.prompts_file), ("--context-length", args.context_length),
                                            ("--tree-shapes", args.tree_shapes)) if value is not None]
        if dropped:
            raise ValueError(f"--no-pair leaves out the model pair and the engine, so {', '.join(dropped)} would do nothing; drop one or the other")
    if args.no_engine and args.tree_shapes is not None:
        raise ValueError("--no-engine skips the engine section, so --tree-shapes would do nothing; drop one or the other")
    what = ", ".join(([config.pair + " pair"] if config.pair else []) + config.families)
    print(f"comparing {', '.join(config.verifiers)} on {what}", file=sys.stderr)
    report = run_report(config, show_progress=not args.quiet)
    out = write_report(config, report)
    print((out / "report.md").read_text())
    plots = ", ".join(sorted(p.name for p in out.glob("*.png")))
    print(f"report written to {out}/ (report.md, report.json{', ' + plots if plots else ''})")
    return 0


def cmd_verifiers(args) -> int:
    from .verifiers import get_verifier

    for name in available_verifiers():
        v = get_verifier(name)
        limit = "any" if v.max_drafts is None else str(v.max_drafts)
        print(f"{name:<10} k in {v.min_drafts}..{limit:<4} distinct={v.distinct_drafts!s:<5} iid={v.iid_drafts!s:<5} {type(v).__doc__.strip().splitlines()[0]}")
    return 0


def cmd_verify_exactness(args) -> int:
    from .proofs import check_exactness
    from .proofs.checks import MIN_SAMPLES
    from .verifiers import get_verifier

    if not 0 < args.family_alpha < 1:
        raise ValueError(f"--family-alpha must be in (0, 1), got {args.family_alpha}")
    if args.max_k < 1:
        raise ValueError(f"--max-k must be >= 1 (the largest draft count to check), got {args.max_k}")
    if args.samples < MIN_SAMPLES:
        raise ValueError(f"--samples must be >= {MIN_SAMPLES} per chi-square test, got {args.samples}")
    _import_plugins(args.imports)
    verifier = get_verifier(args.name)
    report = check_exactness(verifier, max_k=args.max_k, samples=args.samples, family_alpha=args.family_alpha, seed=args.seed)
    for r in report.results:
        print(f"{'ok  ' if r.passed else 'FAIL'} {r.kind:<11} {r.case:<20} k={r.k}  {r.detail}")
    failed = [r for r in report.results if not r.passed]
    if not report.results:  # e.g. a verifier that takes no draft count up to --max-k
        print(f"\n{report.verifier}: NOTHING CHECKED (no corner case takes its draft counts up to k = {args.max_k})")
        return 1
    if failed:
        print(f"\n{report.verifier}: NOT EXACT ({len(failed)} of {len(report.results)} checks failed)")
        return 1
    print(f"\n{report.verifier}: exact on all {len(report.results)} checks "
          f"(enumeration to 1e-12; chi-square family-wise false-failure rate <= {args.family_alpha:g})")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .engine import Engine, HFModel, autoregressive_generate, demo_pair

    _import_plugins(args.imports)
    if (args.target is None) != (args.draft is None):
        raise ValueError("give both --target and --draft (local Hugging Face model directories), or neither for the built-in pair")
    check_device(args.device)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1 (copies of the prompt decoded together), got {args.batch}")
    demo = args.target is None and args.pair == "demo"
    if args.model_seed is not None and not demo:
        raise ValueError("--model-seed initialises the untrained demo pair (--pair demo); the shipped pair and --target models are loaded, not initialised")
    if args.prompt_text is not None and (args.target is not None or demo):
        raise ValueError("--prompt-text is for the shipped byte-level pair (one token per byte); with --target or --pair demo give token ids with --prompt")
    if args.prompt_text is not None and args.prompt is not None:
        raise ValueError("give --prompt (token ids) or --prompt-text, not both")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    decode = None
    attention = args.attn_implementation
    if args.target is not None:
        target, draft = HFModel.from_pretrained(args.target, attention), HFModel.from_pretrained(args.draft, attention)
        pair = f"target {args.target}, draft {args.draft}"
    elif demo:
        seed = args.model_seed or 0
        target, draft = demo_pair(seed=seed)
        pair = f"built-in GPT pair (seed {seed}, untrained): target 8 layers x 256, draft = its first layer (early exit)"
    else:
        from .engine.pretrained import decode, load_pair

        target, draft = load_pair()
        pair = "shipped byte-level pair (target 4 layers x 128, draft 1 layer x 64, trained on Python source)"
        if args.prompt is None:
            args.prompt = list(prompt_bytes("def " if args.prompt_text is None else args.prompt_text))
    options = {}
    for item in args.verifier_option or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--verifier-option takes KEY=VALUE, got {item!r}")
        try:  # numbers, True/False/None as Python literals; anything else stays a string
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    draft2 = None
    if args.draft2 == "bigram":
        from .engine.pretrained import load_ngram

        draft2 = load_ngram(2)  # the Engine refuses it, naming both vocabularies, beside a draft of another V
    elif args.draft2 is not None:
        draft2 = HFModel.from_pretrained(args.draft2, attention)
    prompt = args.prompt if args.prompt is not None else [1]  # an empty --prompt "" is the engine's error
    prompts = [prompt] * args.batch
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.adaptive:
        engine = adaptive_engine(args, target, draft, prompt, options, draft2, sampling)
    else:
        engine = Engine(target, draft, verifier=args.verifier, num_drafts=args.num_drafts, depth=args.depth, device=args.device,
                        widths=args.widths, draft2=draft2, **options)
    out = engine.generate(prompts, max_new_tokens=args.max_new_tokens, eos_token_id=args.eos, **sampling)
    s = out.stats
    print(f"{pair}; {engine!r}", file=sys.stderr)
    for b in range(out.tokens.shape[0]):
        ids = out.tokens[b, : int(out.lengths[b])].tolist()
        print(repr(decode(ids)) if decode is not None else " ".join(str(t) for t in ids))
    if args.adaptive:
        c = engine.last_choice
        how = "measured in a trial race" if c.measured_tokens_per_second is not None else "predicted"
        shape = f"adaptive: k={c.num_drafts}  depth={c.depth}" if c.depth else f"adaptive: plain decoding (speculation {how} to lose)"
    else:
        shape = f"widths={','.join(map(str, engine.widths))}" if engine.widths else f"k={engine.num_drafts}  depth={engine.depth}"
    print(f"\nverifier {args.verifier}  {shape}  batch={args.batch}  T={args.temperature}")
    staged = f"   draft2 passes {s.draft2_passes}" if draft2 is not None else ""
    print(f"block efficiency {s.block_efficiency:.3f} tokens/pass   target passes {s.target_passes}   draft passes {s.draft_passes}{staged}")
    if args.adaptive:  # the shape follows the batch as requests finish
        used = ", ".join(f"{'plain' if d == 0 else f'k={k} depth={d}'}: {r}" for (k, d), r in sorted(s.rounds_by_shape.items()))
        print(f"rounds by shape  {used}")
    if any(reached for reached in s.reached_by_depth):  # plain decoding (an adaptive choice) has no depths
        print("acceptance by depth " + " ".join(f"{a:.3f}" for a in s.acceptance_by_depth))
    print(f"{s.new_tokens} tokens in {s.seconds:.3f} s = {s.tokens_per_second:.1f} tokens/s")
    if args.compare:
        base = autoregressive_generate(target, prompts, args.max_new_tokens, eos_token_id=args.eos, device=engine.device, **sampling)
        b = base.stats
        print(f"target alone: {b.new_tokens} tokens in {b.seconds:.3f} s = {b.tokens_per_second:.1f} tokens/s "
              f"(speedup {b.seconds / s.seconds * s.new_tokens / max(b.new_tokens, 1):.2f}x)")
    return 0


ADAPTIVE_CALIBRATION_PROMPTS = 16  # acceptance is calibrated on at least this many prompts
ADAPTIVE_CALIBRATION_TOKENS = 32  # ... of this many new tokens each, whatever -n asks for


def check_device(device) -> None:
    """Raise a ValueError for a device name torch does not know or a CUDA device it cannot use
    (instead of a traceback from deep inside the first tensor moved there)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device torch knows ({err}); use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this torch build sees no CUDA device; use cpu")


def adaptive_engine(args, target, draft, prompt, options, draft2, sampling):
    """``--adaptive``: calibrate a ShapePolicy at the requested batch size, on held-out text for
    the shipped pair and on copies of the prompt otherwise, and decode with the shape it picks."""
    from .engine import AdaptiveEngine, ShapePolicy

    if args.num_drafts is not None or args.depth is not None or args.widths is not None or draft2 is not None:
        raise ValueError("--adaptive chooses num_drafts and depth itself; drop -k/--num-drafts, -d/--depth, --widths and --draft2")
    if options:
        raise ValueError("--adaptive runs the verifier with its default options; drop --verifier-option")
    count = max(args.batch, ADAPTIVE_CALIBRATION_PROMPTS)
    if args.target is None and args.pair == "shipped":
        from .engine.pretrained import held_out_windows

        calibration = held_out_windows(count, 16, seed=1)
    else:
        calibration = [prompt] * count
    print(f"calibrating the shape policy at batch {args.batch} ...", file=sys.stderr)
    policy = ShapePolicy.calibrate(target, draft, args.verifier, calibration, batch_sizes=[args.batch],
                                   max_new_tokens=ADAPTIVE_CALIBRATION_TOKENS, device=args.device, **sampling)
    return AdaptiveEngine(target, draft, policy, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multidraft", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    compare = sub.add_parser("compare", help="acceptance of every verifier against the optimum (default)")
    compare.add_argument("--verifiers", type=_csv(str), help="comma-separated names (default: all but gls, whose quadrature is slow)")
    compare.add_argument("--families", type=_csv(str), help="comma-separated synthetic families (default: all; '' for none)")
    compare.add_argument("--ks", type=_csv(int), help="comma-separated draft counts (default 1,2,3,4,6,8)")
    compare.add_argument("--temperatures", type=_csv(float), help="comma-separated sampling temperatures (default 0.3,0.6,1.0)")
    compare.add_argument("--vocab", type=int, help="vocabulary size V of the synthetic families (default 1000)")
    compare.add_argument("--pairs", type=int, help="(p, q) pairs per source and temperature (default 1000)")
    compare.add_argument("--tree-shapes", type=_tree_shapes, help="engine tree shapes, comma-separated: KxD (k sequences of depth D) or W1-W2-... "
                              "(a branching tree; default 1x4,2x1,2x4,4x4,2-2-2)")
    compare.add_argument("--prompts-file", help="text file, one prompt per line: the model pair's contexts (default: held-out text)")
    compare.add_argument("--context-length", type=int, help="tokens of context per position (default 64)")
    compare.add_argument("--hf-target", help="local transformers model directory: the target of the model pair")
    compare.add_argument("--hf-draft", help="local transformers model directory: the draft of the model pair")
    compare.add_argument("--no-pair", action="store_true", help="synthetic families only (no model pair, no engine section)")
    compare.add_argument("--no-engine", action="store_true", help="skip the engine's block-efficiency section")
    compare.add_argument("--no-costs", action="store_true", help="skip the verify-cost section")
    compare.add_argument("--quiet", action="store_true", help="no progress bar")
    compare.add_argument("--seed", type=int)
    compare.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import this module first (it registers your verifier); repeatable")
    compare.add_argument("--out", default="multidraft-report", help="report directory")
    compare.set_defaults(run=cmd_compare)
    exact = sub.add_parser("verify-exactness", help="enumeration and chi-square exactness checks for one verifier")
    exact.add_argument("name", help="registered verifier name")
    exact.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import this module first (it registers your verifier); repeatable")
    exact.add_argument("--max-k", type=int, default=3, help="largest draft count to check (default 3)")
    exact.add_argument("--samples", type=int, default=200_000, help="samples per chi-square test")
    exact.add_argument("--seed", type=int, default=0)
    exact.add_argument("--family-alpha", type=float, default=1e-6,
                       help="chance that an exact verifier fails any chi-square check (default 1e-6)")
    exact.set_defaults(run=cmd_verify_exactness)
    listing = sub.add_parser("verifiers", help="list the registered verifiers and their capabilities")
    listing.set_defaults(run=cmd_verifiers)
    gen = sub.add_parser("generate", help="speculative decoding with a verifier on a model pair; prints tokens and stats")
    gen.add_argument("--verifier", default="rrs", help="registered verifier name (default rrs)")
    gen.add_argument("--verifier-option", action="append", metavar="KEY=VALUE", help="extra verifier constructor option (a Python literal, else a string); repeatable")
    gen.add_argument("--num-drafts", "-k", type=int, default=None, help="draft sequences per round (default 2)")
    gen.add_argument("--depth", "-d", type=int, default=None, help="draft tokens per sequence (default 3)")
    gen.add_argument("--draft2", metavar="bigram|DIR",
                     help="staged drafting: a second draft that speculates for the draft; 'bigram' (the shipped pair's byte "
                          "bigram) or a local Hugging Face model directory")
    gen.add_argument("--widths", type=_widths, default=None, metavar="W1,W2,...",
                     help="a branching tree instead of sequences: W1 children at the root, W2 under each of them, ...")
    gen.add_argument("--adaptive", action="store_true",
                     help="choose num_drafts and depth for the batch size from measured costs and acceptance (calibrates first)")
    gen.add_argument("--max-new-tokens", "-n", type=int, default=32)
    gen.add_argument("--temperature", "-t", type=float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--pair", choices=["shipped", "demo"], default="shipped",
                     help="built-in model pair: the shipped trained pair (default) or the untrained demo pair")
    gen.add_argument("--prompt", type=_csv(int), help="comma-separated token ids (default: 1, or --prompt-text for the shipped pair)")
    gen.add_argument("--prompt-text", help="prompt text for the shipped byte-level pair; \\n escapes allowed (default 'def ')")
    gen.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together (default 1)")
    gen.add_argument("--eos", type=int, help="stop a request at this token id")
    gen.add_argument("--target", help="local Hugging Face causal-LM directory for the target")
    gen.add_argument("--draft", help="local Hugging Face causal-LM directory for the draft")
    gen.add_argument("--model-seed", type=int, help="initialisation seed of the untrained demo pair, --pair demo (default 0)")
    gen.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa",
                     help="attention backend for --target/--draft/--draft2 directories (default sdpa; some architectures need eager)")
    gen.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    gen.add_argument("--threads", type=int, help="torch.set_num_threads")
    gen.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import this module first (it registers your verifier); repeatable")
    gen.add_argument("--compare", action="store_true", help="also time target-only decoding with the same settings")
    gen.set_defaults(run=cmd_generate)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]  # the main job, on its embedded default or with compare's options
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad names, sizes or options: say what, not a traceback
        print(f"multidraft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
