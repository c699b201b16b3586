"""Decoding strategies, prompt sources and measurements around `generate`.

The self-speculative decoder itself lives in `hf_layerskip.modeling.self_speculative`, because everything
`generate()` needs travels with saved checkpoints as remote code.
"""

from .benchmark import BenchmarkResult, run_benchmark
from .builtin import plain_llama_view
from .correctness import CorrectnessCheck, check_correctness
from .data import (
    PromptExample,
    encode_prompt,
    load_humaneval,
    load_jsonl_prompts,
    load_prompts,
    load_summarization,
    load_texts,
    stdlib_sources,
)
from .layer_quality import LayerQuality, layer_quality, tokenize_texts
from .metrics import PeakMemory, StrategySummary, first_mismatch, markdown_table, rouge_l
from .speedup_bound import StepCosts, expected_tokens_per_round, fit_acceptance, measure_step_costs, speedup_bound
from .strategies import GenerationRecord, Strategy, StrategyRunner
from .sweep import SweepCell, SweepResult, run_sweep

__all__ = [
    "BenchmarkResult",
    "CorrectnessCheck",
    "GenerationRecord",
    "LayerQuality",
    "PeakMemory",
    "PromptExample",
    "StepCosts",
    "Strategy",
    "StrategyRunner",
    "StrategySummary",
    "SweepCell",
    "SweepResult",
    "check_correctness",
    "encode_prompt",
    "expected_tokens_per_round",
    "first_mismatch",
    "fit_acceptance",
    "layer_quality",
    "load_humaneval",
    "load_jsonl_prompts",
    "load_prompts",
    "load_summarization",
    "load_texts",
    "markdown_table",
    "measure_step_costs",
    "plain_llama_view",
    "rouge_l",
    "run_benchmark",
    "run_sweep",
    "speedup_bound",
    "stdlib_sources",
    "tokenize_texts",
]
