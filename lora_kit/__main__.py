"""Command line: `python -m lora_kit <command>`; every command calls the same library functions as the notebooks."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import LoraKitError


def cmd_targets(args) -> int:
    from .targeting import targets_report

    print(targets_report(args.model, args.llm_last, args.vit_last, rank=args.rank, regex=args.regex,
                         fmt="json" if args.json else args.format,
                         trust_remote_code=args.trust_remote_code))
    return 0


def cmd_toy_build(args) -> int:
    from .toy import build_toy

    report = build_toy(progress=True)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_kit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("targets", help="which modules a variant instruments, as a table, JSON or ms-swift arguments")
    p.add_argument("--model", default="toy", help="checkpoint folder (config.json alone is enough), or 'toy'")
    p.add_argument("--llm-last", type=int, default=0, help="LoRA on the last N decoder layers")
    p.add_argument("--vit-last", type=int, default=0, help="LoRA on the last M vision blocks")
    p.add_argument("--regex", default=None, help="a target regex to check instead of --llm-last/--vit-last")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for the parameter count")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--format", choices=["table", "json", "swift"], default="table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("toy", help="the embedded toy world and base model")
    toy_sub = p.add_subparsers(dest="toy_command", required=True)
    b = toy_sub.add_parser("build", help="build the toy data and pretrained base once (cached under outputs/toy)")
    b.set_defaults(func=cmd_toy_build)

    p = sub.add_parser("demo", help="what `make demo` runs")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoraKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
