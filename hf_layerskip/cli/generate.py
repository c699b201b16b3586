"""`hf-layerskip generate PROMPT`: stream a completion with the full model, an early exit, or self-speculation."""

import argparse
import sys
import time

import torch

from .convert import DTYPES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a prompt (full model, early exit, or self-speculative decoding)",
        description=(
            "Stream a completion of PROMPT to stdout, then print the speed (tokens/s) and, for self-speculative "
            "decoding, the draft statistics to stderr. Decodes with the full model unless --early-exit or "
            "--assistant-early-exit is given."
        ),
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    parser.add_argument(
        "--model",
        default=None,
        help="LayerSkip checkpoint directory (default: the default model, SmolLM2-135M-Instruct with the shipped "
        "LayerSkip adapter, built on first use)",
    )
    exits = parser.add_mutually_exclusive_group()
    exits.add_argument(
        "--early-exit", type=int, metavar="E", help="decode with the first E layers only (lossy, fastest)"
    )
    exits.add_argument(
        "--assistant-early-exit",
        type=int,
        metavar="E",
        help="self-speculative decoding: draft with the first E layers, verify with the rest (lossless)",
    )
    parser.add_argument(
        "--num-speculations",
        type=int,
        metavar="D",
        help="draft tokens per self-speculative round (default: the checkpoint's num_speculations)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed for sampling")
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed PROMPT as plain text even when the tokenizer has a chat template",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)"
    )
    parser.set_defaults(run=run)


def _check_arguments(args: argparse.Namespace) -> None:
    if args.num_speculations is not None and args.assistant_early_exit is None:
        raise SystemExit("hf-layerskip generate: --num-speculations needs --assistant-early-exit")
    if not args.do_sample and any(getattr(args, name) is not None for name in ("temperature", "top_p", "seed")):
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

    _check_arguments(args)
    if args.model is None:
        from ..defaults import default_checkpoint

        args.model = default_checkpoint()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint(args.model, DTYPES[args.dtype], device)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    inputs = encode_prompt(tokenizer, prompt, use_chat_template=not args.no_chat_template).to(device)

    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)
    if args.do_sample:
        generate_kwargs.update(
            {name: getattr(args, name) for name in ("temperature", "top_p") if getattr(args, name) is not None}
        )
        if args.seed is not None:
            torch.manual_seed(args.seed)
    if args.early_exit is not None:
        generate_kwargs["early_exit"] = args.early_exit
    if args.assistant_early_exit is not None:
        generate_kwargs["assistant_early_exit"] = args.assistant_early_exit
        if args.num_speculations is not None:
            generate_kwargs["num_assistant_tokens"] = args.num_speculations
    if tokenizer.pad_token_id is None and model.generation_config.pad_token_id is None:
        generate_kwargs["pad_token_id"] = tokenizer.eos_token_id

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(**inputs, streamer=streamer, **generate_kwargs)
    seconds = time.perf_counter() - start
    sys.stdout.flush()

    new_tokens = sequences.shape[1] - inputs["input_ids"].shape[1]
    print(_describe_mode(args, model), file=sys.stderr)
    print(f"{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s", file=sys.stderr)
    if args.assistant_early_exit is not None:
        stats = model.speculation_stats
        print(
            f"drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens}, rounds {stats.rounds}, "
            f"acceptance rate {stats.acceptance_rate:.2f}",
            file=sys.stderr,
        )
    return 0


def _describe_mode(args: argparse.Namespace, model) -> str:
    num_layers = model.config.num_hidden_layers
    if args.early_exit is not None:
        return f"early exit: layers 1-{args.early_exit} of {num_layers}"
    if args.assistant_early_exit is not None:
        drafts = args.num_speculations or model.generation_config.num_assistant_tokens
        return f"self-speculative: draft with layers 1-{args.assistant_early_exit} of {num_layers}, {drafts} per round"
    return f"full model: {num_layers} layers"
