"""`hf-layerskip train-draft`: a draft vocabulary and exit adapters for a frozen model, offline, resumably.

Stages (the data and each finished adapter are kept in --work-dir, so a rerun skips them):
  1. data: the model's own greedy continuations of standard-library functions cut after their docstring, and of
     the first HumanEval prompts (never past problem 123: 124..163 are the held-out test);
  2. states: one forward pass over that text records each exit layer's output and the full model's prediction;
  3. the draft vocabulary: the --draft-vocab-size ids the full model predicts most often;
  4. one exit adapter per exit layer, trained on the states with the model frozen (saved as each finishes).
The output is a checkpoint: the model unchanged, plus its draft head (draft_head.* weights, config fields
exit_adapter_layers, exit_adapter_rank, draft_vocab_size). A report of draft-vocabulary coverage and exit agreement,
with and without the adapters, on the last texts (held out from training) is printed and written as report.json.
"""

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .measure_options import IntList, ProgressArguments
from .parsing import KeepParagraphsHelpFormatter, add_dataclass_command, dataclasses_from

HELD_OUT_HUMANEVAL_START = 124


@dataclass
class TrainDraftArguments:
    model: str | None = field(
        default=None,
        metadata={"help": "LayerSkip checkpoint to train a draft head for (unset: SmolLM2-135M-Instruct as it is)."},
    )
    output_dir: str = field(default="draft-model", metadata={"help": "Where the checkpoint with its draft head goes."})
    work_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the data and finished adapters go; rerun with the same directory to resume (unset: "
            "OUTPUT_DIR/work)."
        },
    )
    exit_layers: IntList = field(
        default_factory=lambda: IntList([6, 8, 10, 12, 14]),
        metadata={"help": "Exit layers E to train an adapter for, e.g. 6,8,10 or 4-12:2."},
    )
    draft_vocab_size: int | None = field(
        default=8192, metadata={"help": "K, the draft vocabulary's size; 0 keeps the full vocabulary."}
    )
    stdlib_prompts: int = field(
        default=512, metadata={"help": "Standard-library function prompts to continue greedily (shuffled by --seed)."}
    )
    humaneval_prompts: int = field(
        default=HELD_OUT_HUMANEVAL_START,
        metadata={"help": f"The first N HumanEval prompts to continue greedily, at most {HELD_OUT_HUMANEVAL_START}."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Greedy tokens per prompt."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per batched greedy generate call."})
    max_length: int = field(default=512, metadata={"help": "Tokens kept per text."})
    held_out_texts: int = field(
        default=24, metadata={"help": "The last N HumanEval texts are held out of training and scored in the report."}
    )
    export_dir: str | None = field(
        default=None,
        metadata={
            "help": "Also write the draft head alone here (draft_head.safetensors and layerskip_settings.json, a few "
            "MB), with the decoding settings below, as hf_layerskip/default_draft_head ships it (unset: no export)."
        },
    )
    exit_layer: int | None = field(
        default=None, metadata={"help": "Exit layer E to record as the checkpoint's default (unset: keep the model's)."}
    )
    num_speculations: int | None = field(
        default=None, metadata={"help": "Draft length d to record as the default (unset: keep the model's)."}
    )
    assistant_confidence_threshold: float | None = field(
        default=None,
        metadata={"help": "Confidence threshold t to record in the generation config (unset: keep the model's)."},
    )
    num_lookup_speculations: int | None = field(
        default=None, metadata={"help": "Lookup drafting length to record as the default (unset: keep the model's)."}
    )
    lookup_ngram_size: int | None = field(
        default=None, metadata={"help": "Longest n-gram lookup drafting matches (unset: keep the model's)."}
    )
    dynamic_exit: bool | None = field(
        default=None, metadata={"help": "Record dynamic exit choice as the default (unset: keep the model's)."}
    )
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda or cuda:N; auto picks cuda."})

    def __post_init__(self):
        if not 0 <= self.humaneval_prompts <= HELD_OUT_HUMANEVAL_START:
            raise ValueError(
                f"`humaneval_prompts` must be in [0, {HELD_OUT_HUMANEVAL_START}] (problems "
                f"{HELD_OUT_HUMANEVAL_START}..163 are the held-out test), got {self.humaneval_prompts!r}."
            )
        if not 0 <= self.held_out_texts < max(self.humaneval_prompts, 1):
            raise ValueError(
                f"`held_out_texts` must be in [0, humaneval_prompts), got {self.held_out_texts!r} of "
                f"{self.humaneval_prompts}."
            )


def add_parser(subparsers) -> None:
    from ..trainer.exit_adapters import ExitAdapterTrainingArguments

    parser = add_dataclass_command(
        subparsers,
        "train-draft",
        [TrainDraftArguments, ExitAdapterTrainingArguments, ProgressArguments],
        help="train a draft vocabulary and exit adapters for a frozen model (resumes where it stopped)",
        description=__doc__,
        formatter_class=KeepParagraphsHelpFormatter,
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..trainer.exit_adapters import ExitAdapterTrainingArguments

    try:
        options, adapter_args, progress = dataclasses_from(
            args, [TrainDraftArguments, ExitAdapterTrainingArguments, ProgressArguments]
        )
    except ValueError as error:
        raise SystemExit(f"hf-layerskip train-draft: {error}") from None
    report = train_draft(options, adapter_args, progress=not progress.no_progress)
    print(json.dumps(report, indent=2))
    print(options.output_dir, flush=True)
    return 0


def train_draft(options: TrainDraftArguments, adapter_args, progress: bool = True) -> dict:
    """Runs the stages above and saves the checkpoint; returns the report."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..defaults import DECODING_SETTINGS, apply_decoding_settings, base_checkpoint, export_draft_head
    from ..generation.layer_quality import tokenize_texts
    from ..modeling import LayerSkipForCausalLMMixin
    from ..modeling.draft_head import ExitAdapter
    from ..trainer.exit_adapters import (
        build_draft_vocab,
        collect_exit_states,
        draft_vocab_coverage,
        exit_agreement,
        train_exit_adapter,
    )
    from .measure_options import resolve_device

    source = options.model or base_checkpoint()
    output_dir = Path(options.output_dir)
    work_dir = Path(options.work_dir) if options.work_dir else output_dir / "work"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if not isinstance(model, LayerSkipForCausalLMMixin):
        raise SystemExit(
            f"hf-layerskip train-draft: {source} holds a {type(model).__name__}, not a LayerSkip checkpoint; "
            f"convert it first: hf-layerskip convert {source} OUT"
        )
    model = model.to(resolve_device(options.device)).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    train_texts, held_out_texts = draft_texts(model, tokenizer, options, work_dir / "data")

    def states_of(texts):
        sequences = tokenize_texts(tokenizer, texts, options.max_length)
        return collect_exit_states(model, sequences, options.exit_layers, progress)

    train_states, held_out = states_of(train_texts), states_of(held_out_texts)
    vocab_ids = None
    if options.draft_vocab_size:
        vocab_ids = build_draft_vocab(train_states.targets, model.config.vocab_size, options.draft_vocab_size)

    # A finished adapter is kept under a name that says how it was trained, so changed settings train anew.
    settings = json.dumps({**asdict(adapter_args), "draft_vocab_size": options.draft_vocab_size}, sort_keys=True)
    adapter_dir = work_dir / f"adapters-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "settings.json").write_text(settings)
    adapters = {}
    for layer in options.exit_layers:
        path = adapter_dir / f"exit-{layer}.safetensors"
        adapter = ExitAdapter(model.config.hidden_size, adapter_args.exit_adapter_rank)
        if path.is_file():
            adapter.load_state_dict(load_file(path))
        else:
            adapter = train_exit_adapter(model, train_states, layer, adapter_args, vocab_ids, progress)
            save_file(adapter.state_dict(), path)
        adapters[layer] = adapter.eval()

    report = {
        "training_tokens": len(train_states),
        "held_out_tokens": len(held_out),
        "draft_vocab_size": options.draft_vocab_size or model.config.vocab_size,
        "draft_vocab_coverage": draft_vocab_coverage(vocab_ids, held_out.targets) if vocab_ids is not None else 1.0,
        "exits": {
            layer: {
                kind: exit_agreement(model, held_out, layer, adapter, vocab_ids).to_dict()
                for kind, adapter in (("without_adapter", None), ("with_adapter", adapters[layer]))
            }
            for layer in options.exit_layers
        },
    }
    model.set_draft_head(adapters, vocab_ids)
    decoding = {
        name: getattr(options, name)
        for name in DECODING_SETTINGS
        if getattr(options, name) is not None
    }
    apply_decoding_settings(model, decoding)
    if options.export_dir:
        export_draft_head(model, options.export_dir, decoding)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def draft_texts(model, tokenizer, options: TrainDraftArguments, data_dir: Path) -> tuple[list[str], list[str]]:
    """`(training texts, held-out texts)`: each prompt followed by the model's greedy continuation, generated once
    and kept in `data_dir` (resumable shards); the held-out texts are the last HumanEval ones."""
    from ..generation.builtin import plain_llama_view
    from ..generation.data import load_humaneval, read_jsonl
    from ..trainer.self_distillation import shard_paths, stdlib_function_prompts, write_self_distillation_data

    sources = {
        # The order the LayerSkip recipe's self-distillation data uses.
        "stdlib": stdlib_function_prompts(seed=0)[: options.stdlib_prompts],
        "humaneval": [problem.prompt for problem in load_humaneval(range(options.humaneval_prompts))],
    }
    generator, texts = None, {}
    for name, prompts in sources.items():
        if generator is None and not all(path.is_file() for path in shard_paths(data_dir / name, len(prompts))):
            generator = plain_llama_view(model)  # transformers' batched greedy generate on the same weights
        shards = write_self_distillation_data(
            generator, tokenizer, prompts, data_dir / name, options.max_new_tokens,
            batch_size=options.generation_batch_size,
        )
        texts[name] = [record["text"] for shard in shards for record in read_jsonl(shard)]
    cut = len(texts["humaneval"]) - options.held_out_texts
    return texts["stdlib"] + texts["humaneval"][:cut], texts["humaneval"][cut:]
