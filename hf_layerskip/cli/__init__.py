"""`hf-layerskip`: one console script; each subcommand is a module here with `add_parser(subparsers)`."""

import argparse
import importlib

SUBCOMMANDS = ("convert", "generate", "demo", "train", "train-default", "benchmark", "sweep", "layers", "correctness")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-layerskip", description="LayerSkip early-exit training and self-speculative decoding."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0
