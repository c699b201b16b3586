"""`hf-layerskip train-default`: rebuild the default model's draft head from the base GGUF, offline, resumably.

It runs `hf-layerskip train-draft` with that command's defaults on SmolLM2-135M-Instruct as it is, for the exit
layers, adapter rank and draft vocabulary size of the shipped draft head (hf_layerskip/default_draft_head), and
exports the new head with the shipped decoding settings (the exit layer, draft length and confidence threshold a
sweep on HumanEval problems 100..107 chose). Rerun with the same --work-dir to resume.
"""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from .measure_options import ProgressArguments
from .parsing import KeepParagraphsHelpFormatter, add_dataclass_command, dataclasses_from


@dataclass
class TrainDefaultArguments:
    work_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the data, adapters and checkpoint go; rerun with the same directory to resume (unset: the "
            "cache directory's train-default/)."
        },
    )
    export_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where to export the draft head (unset: WORK_DIR/draft_head); hf_layerskip/default_draft_head is "
            "the shipped one."
        },
    )


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "train-default",
        [TrainDefaultArguments, ProgressArguments],
        help="rebuild the default model's draft head (exit adapter, draft vocabulary) from the base GGUF",
        description=__doc__,
        formatter_class=KeepParagraphsHelpFormatter,
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options, progress = dataclasses_from(args, [TrainDefaultArguments, ProgressArguments])
    print(train_default(options, progress=not progress.no_progress), flush=True)
    return 0


def train_default(options: TrainDefaultArguments, progress: bool = True) -> Path:
    """Trains and exports the draft head; returns the export directory."""
    from ..defaults import DECODING_SETTINGS, DEFAULT_DRAFT_HEAD_DIR, SETTINGS_FILE_NAME, cache_dir
    from ..trainer.exit_adapters import ExitAdapterTrainingArguments
    from .train_draft import TrainDraftArguments, train_draft

    shipped = json.loads((DEFAULT_DRAFT_HEAD_DIR / SETTINGS_FILE_NAME).read_text())
    work_dir = Path(options.work_dir) if options.work_dir else cache_dir() / "train-default"
    export_dir = Path(options.export_dir) if options.export_dir else work_dir / "draft_head"
    draft_options = TrainDraftArguments(
        output_dir=str(work_dir / "model"),
        work_dir=str(work_dir),
        export_dir=str(export_dir),
        exit_layers=shipped["exit_adapter_layers"],
        draft_vocab_size=shipped["draft_vocab_size"],
        **{name: shipped[name] for name in DECODING_SETTINGS if name in shipped},
    )
    adapter_args = ExitAdapterTrainingArguments(exit_adapter_rank=shipped["exit_adapter_rank"])
    train_draft(draft_options, adapter_args, progress=progress)
    return export_dir
