"""Self-distillation data: the model's own greedy continuations of coding prompts.

An early exit trained on these learns exactly what self-speculative verification accepts: the full model's greedy
next token. The prompts are standard-library functions cut after their docstring (signature plus docstring, the
shape of a HumanEval problem), so no benchmark problem enters the training set.
"""

import ast
import json
import os
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

SKIPPED_STDLIB_FOLDERS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "ensurepip")


def stdlib_function_prompts(min_chars: int = 80, max_chars: int = 1200, seed: int = 0) -> list[str]:
    """Every documented top-level function of the standard library as `signature + docstring`, shuffled by `seed`.

    Each prompt keeps the module's `import` lines above the function, as a HumanEval problem keeps its imports.
    """
    prompts = list(_all_function_prompts(min_chars, max_chars))
    random.Random(seed).shuffle(prompts)
    return prompts


@lru_cache(maxsize=4)
def _all_function_prompts(min_chars: int, max_chars: int) -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_STDLIB_FOLDERS)
        paths.extend(Path(folder) / name for name in sorted(files) if name.endswith(".py"))
    return tuple(prompt for path in sorted(paths) for prompt in _module_function_prompts(path, min_chars, max_chars))


def _module_function_prompts(path: Path, min_chars: int, max_chars: int) -> list[str]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    imports = "".join(
        ast.get_source_segment(source, node) + "\n"
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom) and node.col_offset == 0 and node.end_lineno == node.lineno
    )
    prompts = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        docstring = node.body[0]
        head = "".join(lines[node.lineno - 1 : docstring.end_lineno])
        prompt = (imports + "\n\n" if imports else "") + head
        if min_chars <= len(prompt) <= max_chars:
            prompts.append(prompt)
    return prompts


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """The greedy continuation of each prompt, decoded, generated in left-padded batches of `batch_size`."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    continuations = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        output = model.generate(
            **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )  # (batch, prompt_length + new)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        continuations.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return continuations


def write_self_distillation_data(
    model,
    tokenizer,
    prompts: list[str],
    output_dir: str | Path,
    max_new_tokens: int = 128,
    shard_size: int = 64,
    batch_size: int = 16,
) -> list[Path]:
    """Writes `{"text": prompt + greedy continuation}` JSON lines in shards of `shard_size` prompts.

    A shard already on disk is kept, so an interrupted run resumes where it stopped. Returns the shard paths.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_paths(output_dir, len(prompts), shard_size)
    starts = range(0, len(prompts), shard_size)
    for shard, start in zip(tqdm(shards, desc="self-distillation shards", unit="shard"), starts):
        if shard.is_file():
            continue
        chunk = prompts[start : start + shard_size]
        continuations = greedy_continuations(model, tokenizer, chunk, max_new_tokens, batch_size)
        partial = shard.with_suffix(".partial")
        with open(partial, "w", encoding="utf-8") as out:
            for prompt, continuation in zip(chunk, continuations):
                out.write(json.dumps({"text": prompt + continuation}) + "\n")
        partial.replace(shard)
    return shards


def shard_paths(output_dir: str | Path, num_prompts: int, shard_size: int = 64) -> list[Path]:
    """The shard files `write_self_distillation_data` writes for `num_prompts` prompts."""
    return [Path(output_dir) / f"shard-{number:05d}.jsonl" for number in range(-(-num_prompts // shard_size))]
