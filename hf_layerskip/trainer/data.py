"""Training text for `hf-layerskip train`: check the files, load them with `datasets`, tokenise and pack.

Every check runs before the model is loaded, and every error names the file (and the line, where there is one).
Formats by suffix: `.jsonl`/`.json` (JSON lines, or one JSON array), `.parquet`, anything else plain text.
"""

import glob
import json
from pathlib import Path

import datasets
import numpy as np

SAMPLE_BY_CHOICES = ("document", "paragraph", "line")
DEFAULT_SAMPLE_BY = "document"
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def data_format(path: Path) -> str:
    """The `datasets` builder for `path`: `"json"`, `"parquet"` or `"text"`."""
    suffix = path.suffix.lower()
    return "json" if suffix in JSON_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def expand_data_files(patterns: list[str]) -> list[Path]:
    """Paths of `patterns` (files or glob patterns), in the order given, each glob sorted."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"No data file matches {pattern!r}.")
        paths.extend(Path(match) for match in matches)
    return paths


def check_data_files(paths: list[Path], text_column: str = "text") -> None:
    """Raises `FileNotFoundError` / `ValueError` naming the file (and line) for a missing or empty file, a
    malformed JSON line, or a record without `text_column`."""
    if not paths:
        raise ValueError("No training data: pass at least one data file.")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Data file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"Data file is empty: {path}")
        {"json": _check_json, "parquet": _check_parquet, "text": _check_text}[data_format(path)](path, text_column)


def _check_text(path: Path, text_column: str) -> None:
    with open(path, encoding="utf-8") as file:
        try:
            has_text = any(line.strip() for line in file)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error}).") from None
    if not has_text:
        raise ValueError(f"Data file is empty (whitespace only): {path}")


def _check_json(path: Path, text_column: str) -> None:
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: malformed JSON: {error.msg}.") from None
        numbered = [(None, record) for record in records]
    else:  # JSON lines
        numbered = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: malformed JSON line: {error.msg} (column {error.colno})."
                ) from None
    if not numbered:
        raise ValueError(f"Data file has no records: {path}")
    for index, (line_number, record) in enumerate(numbered):
        where = f"{path}:{line_number}" if line_number is not None else f"{path} (record {index})"
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: no {text_column!r} column (found {keys}); set --text_column.")
        if not isinstance(record[text_column], str):
            raise ValueError(f"{where}: {text_column!r} must be a string, got {type(record[text_column]).__name__}.")


def _check_parquet(path: Path, text_column: str) -> None:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
    except Exception as error:  # pyarrow raises its own error types for a corrupt file
        raise ValueError(f"{path}: not a readable parquet file ({error}).") from None
    columns = metadata.schema.to_arrow_schema().names
    if text_column not in columns:
        raise ValueError(f"{path}: no {text_column!r} column (found {columns}); set --text_column.")
    if metadata.num_rows == 0:
        raise ValueError(f"Data file has no rows: {path}")


def check_sequence_length(seq_length: int, config, model_path) -> None:
    """Raises `ValueError` naming the model's config file if `seq_length` exceeds its position range."""
    limit = getattr(config, "max_position_embeddings", None)
    if seq_length < 2:
        raise ValueError(f"`seq_length` must be >= 2 (one input and one target), got {seq_length!r}.")
    if limit is not None and seq_length > limit:
        raise ValueError(
            f"`seq_length`={seq_length} is longer than the model allows: max_position_embeddings={limit} in "
            f"{Path(model_path) / 'config.json'}."
        )


def load_text_dataset(
    paths: list[Path], text_column: str = "text", sample_by: str = DEFAULT_SAMPLE_BY
) -> datasets.Dataset:
    """One `text` column from every file: plain-text files first, then JSON, then parquet, each group in the
    order given. A plain-text file gives one row per `sample_by` unit
    (`"document"`: the whole file, `"paragraph"`, or `"line"`)."""
    parts = []
    for builder in ("text", "json", "parquet"):
        files = [str(path) for path in paths if data_format(path) == builder]
        if not files:
            continue
        options = {"sample_by": sample_by} if builder == "text" else {}
        part = datasets.load_dataset(builder, data_files=files, split="train", **options)
        column = "text" if builder == "text" else text_column
        part = part.select_columns([column])
        parts.append(part.rename_column(column, "text") if column != "text" else part)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def pack_token_ids(documents: list[list[int]], seq_length: int, separator: int | None) -> list[list[int]]:
    """Concatenates `documents` (each followed by `separator`, when given) and cuts the stream into
    `seq_length`-token blocks; the last partial block is dropped."""
    stream = [token for ids in documents for token in (ids + [separator] if separator is not None else ids)]
    num_blocks = len(stream) // seq_length
    return np.asarray(stream[: num_blocks * seq_length], dtype=np.int64).reshape(num_blocks, seq_length).tolist()


def tokenize_and_pack(
    dataset: datasets.Dataset, tokenizer, seq_length: int, num_proc: int | None = None, batch_size: int = 1000
) -> datasets.Dataset:
    """`input_ids` and `labels` blocks of `seq_length` tokens, documents separated by the tokenizer's EOS.

    Packing runs over batches of `batch_size` documents, so each batch drops fewer than `seq_length` tokens.
    """

    def tokenize(batch):
        return {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    def pack(batch):
        blocks = pack_token_ids(batch["ids"], seq_length, tokenizer.eos_token_id)
        return {"input_ids": blocks, "labels": blocks}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"], num_proc=num_proc, desc="Tokenising")
    packed = tokenized.map(
        pack, batched=True, batch_size=batch_size, remove_columns=["ids"], num_proc=num_proc, desc="Packing"
    )
    if len(packed) == 0:
        num_tokens = sum(len(ids) for ids in tokenized["ids"])
        raise ValueError(
            f"The data files hold {num_tokens} tokens, fewer than one sequence of seq_length={seq_length}."
        )
    return packed
