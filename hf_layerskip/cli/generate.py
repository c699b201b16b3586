"""`hf-layerskip generate PROMPT [PROMPT ...]`: stream a completion with the full model, an early exit, or
self-speculation; several prompts decode as one left-padded batch."""

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

from .measure_options import DTYPE_HELP, DTYPES, resolve_dtype
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
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": ["auto", *DTYPES]})
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
            "--assistant-early-exit is given. Several prompts decode together as one left-padded batch; their "
            "completions are printed in order once all are done, and the speed counts every row's new tokens."
        ),
    )
    # Positional, so not a dataclass field.
    parser.add_argument(
        "prompt", metavar="PROMPT", nargs="+", help="the prompt, or several for one batch; '-' reads one from stdin"
    )
    parser.set_defaults(run=run)


def _check_arguments(options: GenerateArguments) -> None:
    if options.early_exit is not None and options.assistant_early_exit is not None:
        raise SystemExit("hf-layerskip generate: --early-exit and --assistant-early-exit exclude each other")
    if options.num_speculations is not None and options.assistant_early_exit is None:
        raise SystemExit("hf-layerskip generate: --num-speculations needs --assistant-early-exit")
    if not options.do_sample and any(value is not None for value in (options.temperature, options.top_p, options.seed)):
        raise SystemExit("hf-layerskip generate: --temperature, --top-p and --seed need --do-sample")


def encode_prompts(tokenizer, prompts: list[str], use_chat_template: bool) -> dict:
    """`input_ids` and `attention_mask` `(len(prompts), prompt_length)`, left-padded; each prompt a single user turn
    when a chat template is used."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if use_chat_template and tokenizer.chat_template:
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        return tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, return_dict=True, return_tensors="pt", padding=True
        )
    return tokenizer(prompts, return_tensors="pt", padding=True)


def load_checkpoint(model_path, dtype: torch.dtype, device: str):
    """`(model, tokenizer)` through the Auto classes, which `import hf_layerskip` taught the LayerSkip model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..modeling import LayerSkipForCausalLMMixin

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    if not isinstance(model, LayerSkipForCausalLMMixin):
        raise SystemExit(
            f"hf-layerskip generate: {model_path} holds a {type(model).__name__}, not a LayerSkip checkpoint; "
            f"convert it first: hf-layerskip convert {model_path} OUT"
        )
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from ..generation.throughput import cut_at_eos, eos_token_ids

    (options,) = dataclasses_from(args, [GenerateArguments])
    _check_arguments(options)
    if options.model is None:
        from ..defaults import default_checkpoint

        options.model = default_checkpoint()
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint(options.model, resolve_dtype(options.dtype, torch.device(device)), device)
    prompts = [sys.stdin.read() if prompt == "-" else prompt for prompt in args.prompt]
    inputs = encode_prompts(tokenizer, prompts, use_chat_template=not options.no_chat_template).to(device)

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
    if model.generation_config.pad_token_id is None:
        generate_kwargs["pad_token_id"] = tokenizer.pad_token_id

    # transformers' text streamers take one sequence: a batch is printed once it is done.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if len(prompts) == 1 else None
    start = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(**inputs, streamer=streamer, **generate_kwargs)
    seconds = time.perf_counter() - start
    eos_ids = eos_token_ids(model.generation_config)
    completions = [cut_at_eos(row, eos_ids) for row in sequences[:, inputs["input_ids"].shape[1] :].cpu()]
    if streamer is None:
        for number, completion in enumerate(completions, 1):
            print(f"=== completion {number} of {len(prompts)} ===")
            print(tokenizer.decode(completion, skip_special_tokens=True))
    sys.stdout.flush()

    new_tokens = sum(len(completion) for completion in completions)
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
