"""`hf-layerskip generate PROMPT`: stream a completion with the full model, an early exit, or self-speculation."""

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

from .convert import DTYPES
from .parsing import add_dataclass_command, dataclasses_from


@dataclass
class GenerateArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "LayerSkip checkpoint directory (unset: the default model, SmolLM2-135M-Instruct with the "
            "shipped draft head, built on first use)."
        },
    )
    early_exit: int | None = field(
        default=None, metadata={"help": "Decode with the first E layers only (lossy, fastest).", "metavar": "E"}
    )
    assistant_early_exit: int | None = field(
        default=None,
        metadata={
            "help": "Self-speculative decoding: draft with the first E layers, verify with the rest (lossless).",
            "metavar": "E",
        },
    )
    num_speculations: int | None = field(
        default=None,
        metadata={
            "help": "Draft tokens per self-speculative round (unset: the checkpoint's num_speculations).",
            "metavar": "D",
        },
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate.", "metavar": "N"})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature (with --do-sample).", "metavar": "T"}
    )
    top_p: float | None = field(
        default=None, metadata={"help": "Nucleus sampling mass (with --do-sample).", "metavar": "P"}
    )
    seed: int | None = field(default=None, metadata={"help": "Random seed for sampling.", "metavar": "S"})
    no_chat_template: bool = field(
        default=False, metadata={"help": "Feed PROMPT as plain text even when the tokenizer has a chat template."}
    )
    dtype: str = field(default="float32", metadata={"help": "Compute dtype.", "choices": list(DTYPES)})
    device: str | None = field(
        default=None,
        metadata={"help": "Torch device, e.g. cpu or cuda:0 (unset: cuda when available, else cpu)."},
    )


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "generate",
        [GenerateArguments],
        help="generate text from a prompt (full model, early exit, or self-speculative decoding)",
        description=(
            "Stream a completion of PROMPT to stdout, then print the speed (tokens/s) and, for self-speculative "
            "decoding, the draft statistics to stderr. Decodes with the full model unless --early-exit or "
            "--assistant-early-exit is given."
        ),
    )
    # Positional, so not a dataclass field.
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    parser.set_defaults(run=run)


def _check_arguments(options: GenerateArguments) -> None:
    if options.early_exit is not None and options.assistant_early_exit is not None:
        raise SystemExit("hf-layerskip generate: --early-exit and --assistant-early-exit exclude each other")
    if options.num_speculations is not None and options.assistant_early_exit is None:
        raise SystemExit("hf-layerskip generate: --num-speculations needs --assistant-early-exit")
    if not options.do_sample and any(value is not None for value in (options.temperature, options.top_p, options.seed)):
        raise SystemExit("hf-layerskip generate: --temperature, --top-p and --seed need --do-sample")


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool) -> dict:
    """`input_ids` and `attention_mask` `(1, prompt_length)`; a single user turn when a chat template is used."""
    if use_chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    return tokenizer(prompt, return_tensors="pt")


def load_checkpoint(model_path, dtype: torch.dtype, device: str):
    """`(model, tokenizer)` through the Auto classes, which `import hf_layerskip` taught the LayerSkip model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..modeling import LayerSkipLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    if not isinstance(model, LayerSkipLlamaForCausalLM):
        raise SystemExit(
            f"hf-layerskip generate: {model_path} holds a {type(model).__name__}, not a LayerSkip checkpoint; "
            f"convert it first: hf-layerskip convert {model_path} OUT"
        )
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    (options,) = dataclasses_from(args, [GenerateArguments])
    _check_arguments(options)
    if options.model is None:
        from ..defaults import default_checkpoint

        options.model = default_checkpoint()
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint(options.model, DTYPES[options.dtype], device)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    inputs = encode_prompt(tokenizer, prompt, use_chat_template=not options.no_chat_template).to(device)

    generate_kwargs = dict(max_new_tokens=options.max_new_tokens, do_sample=options.do_sample)
    if options.do_sample:
        generate_kwargs.update(
            {name: getattr(options, name) for name in ("temperature", "top_p") if getattr(options, name) is not None}
        )
        if options.seed is not None:
            torch.manual_seed(options.seed)
    if options.early_exit is not None:
        generate_kwargs["early_exit"] = options.early_exit
    if options.assistant_early_exit is not None:
        generate_kwargs["assistant_early_exit"] = options.assistant_early_exit
        if options.num_speculations is not None:
            generate_kwargs["num_assistant_tokens"] = options.num_speculations
    if tokenizer.pad_token_id is None and model.generation_config.pad_token_id is None:
        generate_kwargs["pad_token_id"] = tokenizer.eos_token_id

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(**inputs, streamer=streamer, **generate_kwargs)
    seconds = time.perf_counter() - start
    sys.stdout.flush()

    new_tokens = sequences.shape[1] - inputs["input_ids"].shape[1]
    print(_describe_mode(options, model), file=sys.stderr)
    print(f"{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s", file=sys.stderr)
    if options.assistant_early_exit is not None:
        stats = model.speculation_stats
        print(
            f"drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens}, rounds {stats.rounds}, "
            f"acceptance rate {stats.acceptance_rate:.2f}",
            file=sys.stderr,
        )
    return 0


def _describe_mode(options: GenerateArguments, model) -> str:
    num_layers = model.config.num_hidden_layers
    if options.early_exit is not None:
        return f"early exit: layers 1-{options.early_exit} of {num_layers}"
    if options.assistant_early_exit is not None:
        drafts = options.num_speculations or model.generation_config.num_assistant_tokens
        return f"self-speculative: draft with layers 1-{options.assistant_early_exit} of {num_layers}, {drafts} per round"
    return f"full model: {num_layers} layers"
