"""Offline prompt and text sources."""

import json
import sysconfig
from pathlib import Path

import pytest
from measure_helpers import tiny_tokenizer, write_prompts

from hf_layerskip.generation.data import (
    SUMMARIZATION_TEMPLATE,
    encode_prompt,
    load_humaneval,
    load_jsonl_prompts,
    load_prompts,
    load_summarization,
    load_texts,
    stdlib_sources,
)


def test_jsonl_prompts_use_the_named_fields(tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl", count=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    examples = load_jsonl_prompts(path, prompt_field="question", reference_field="answer", id_field="name")
    assert [(e.id, e.prompt, e.reference) for e in examples] == [
        (r["name"], r["question"], r["answer"]) for r in records
    ]
    without_reference = load_jsonl_prompts(path, prompt_field="question")
    assert [e.id for e in without_reference] == ["0", "1", "2"]
    assert all(e.reference is None for e in without_reference)


def test_jsonl_errors_name_the_problem(tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl")
    with pytest.raises(KeyError, match="no field 'prompt'.*question"):
        load_jsonl_prompts(path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_jsonl_prompts(broken)


def test_summarization_prompts_fill_the_template_and_cut_the_article(tmp_path):
    path = tmp_path / "news.jsonl"
    articles = ["word " * 100, "short story"]
    path.write_text(
        "".join(json.dumps({"article": a, "highlights": f"sum {i}"}) + "\n" for i, a in enumerate(articles))
    )
    examples = load_summarization(path, reference_field="highlights", max_article_chars=50)
    assert examples[0].prompt == SUMMARIZATION_TEMPLATE.format(article=articles[0][:50])
    assert examples[1].prompt == SUMMARIZATION_TEMPLATE.format(article="short story")
    assert [e.reference for e in examples] == ["sum 0", "sum 1"]
    with pytest.raises(ValueError, match="article"):
        load_summarization(path, template="no placeholder")


def test_humaneval_texts_are_prompt_plus_solution():
    examples = load_humaneval(range(3))
    assert load_texts("humaneval", limit=3) == [e.prompt + e.reference for e in examples]
    held_out = load_humaneval(range(124, 164))
    assert load_texts("humaneval", limit=100, first=124) == [e.prompt + e.reference for e in held_out]
    assert load_texts("stdlib", limit=2, first=1) == load_texts("stdlib", limit=3)[1:]
    assert [e.id for e in load_prompts("humaneval", limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_stdlib_sources_are_standard_library_files():
    texts = stdlib_sources(limit=3)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = {p.read_text(encoding="utf-8", errors="replace") for p in root.glob("*.py")}
    assert len(texts) == 3 and all(t in files and len(t) >= 2000 for t in texts)


def test_text_files_and_unknown_sources(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("some words")
    assert load_texts(str(plain)) == ["some words"]
    with pytest.raises(FileNotFoundError, match="humaneval"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="needs a file path"):
        load_prompts("jsonl")
    with pytest.raises(ValueError, match="Unknown prompt source"):
        load_prompts("squad")


def test_encode_prompt_without_and_with_chat_template():
    tokenizer = tiny_tokenizer()
    ids = encode_prompt(tokenizer, "w1 w2 w3")
    assert ids.tolist() == [[3, 4, 5]]
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(tokenizer, "w1", chat_template=True)
    tokenizer.chat_template = (
        "{% for m in messages %}w0 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w9{% endif %}"
    )
    assert encode_prompt(tokenizer, "w1 w2", chat_template=True).tolist() == [[2, 3, 4, 11]]
