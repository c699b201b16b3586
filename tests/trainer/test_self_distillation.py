"""Self-distillation data: standard-library coding prompts and the model's own batched greedy continuations."""

import ast
import json
import re

import pytest
from trainer_helpers import char_tokenizer, tiny_checkpoint

from hf_layerskip.generation import load_humaneval
from hf_layerskip.modeling import LayerSkipLlamaForCausalLM
from hf_layerskip.trainer import self_distillation
from hf_layerskip.trainer.self_distillation import greedy_continuations, stdlib_function_prompts, write_self_distillation_data

PROMPTS = ["def add(a, b):", "x = 1", "class Point:\n    def norm(self):"]


@pytest.fixture(scope="module")
def prompts():
    return stdlib_function_prompts()


def test_prompts_are_signature_and_docstring_with_imports(prompts):
    # A few functions are defined word for word in two modules; they appear twice.
    assert len(prompts) > 500 and len(set(prompts)) > 0.99 * len(prompts)
    for prompt in prompts[:200]:
        tree = ast.parse(prompt + "    pass\n")  # a complete function once given a body
        (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        assert ast.get_docstring(function) is not None
        assert all(isinstance(node, ast.Import | ast.ImportFrom) for node in tree.body if node is not function)


def test_no_humaneval_problem_leaks_into_the_prompts(prompts):
    docstrings = [re.search(r"(\"\"\"|''')(.*?)\1", e.prompt, re.DOTALL)[2].strip()[:60] for e in load_humaneval()]
    assert len(docstrings) == 164 and all(docstrings)
    assert not [d for d in docstrings if any(d in prompt for prompt in prompts)]


def test_shuffle_depends_on_the_seed_only(prompts):
    assert stdlib_function_prompts(seed=0) == prompts
    assert sorted(stdlib_function_prompts(seed=1)) == sorted(prompts) != stdlib_function_prompts(seed=1)


@pytest.fixture
def tiny(tmp_path, one_thread):
    tiny_checkpoint(tmp_path / "tiny")
    return LayerSkipLlamaForCausalLM.from_pretrained(tmp_path / "tiny").eval(), char_tokenizer()


def test_batched_continuations_equal_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    batched = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    tokenizer.padding_side = "right"
    for prompt, continuation in zip(PROMPTS, batched):
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        alone = model.generate(input_ids, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        assert continuation == tokenizer.decode(alone[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_shards_on_disk_are_kept_and_the_rest_written(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    output = tmp_path / "data"
    shards = write_self_distillation_data(model, tokenizer, PROMPTS, output, max_new_tokens=4, shard_size=2)
    assert [shard.name for shard in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    rows = [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]
    assert [row["text"][: len(prompt)] for row, prompt in zip(rows, PROMPTS)] == PROMPTS

    shards[1].unlink()
    generated = []
    real = self_distillation.greedy_continuations
    monkeypatch.setattr(
        self_distillation, "greedy_continuations", lambda m, t, chunk, *a, **k: generated.append(chunk) or real(m, t, chunk, *a, **k)
    )
    write_self_distillation_data(model, tokenizer, PROMPTS, output, max_new_tokens=4, shard_size=2)
    assert generated == [PROMPTS[2:]]
    assert [json.loads(line)["text"] for line in shards[1].read_text().splitlines()] == [r["text"] for r in rows[2:]]
    assert not list(output.glob("*.partial"))
