"""Which longest n-gram lookup drafting should match: the default model's self-speculative decoding at each
`max_matching_ngram_size`, against plain greedy, one row at a time.

For each HumanEval prompt, plain greedy then self-speculative decoding at each n-gram size (the model's other shipped
settings), interleaved per prompt; greedy outputs are checked against plain's (float32: identical; half precision:
counted). Reports, per size, the summed seconds, plain's summed seconds over them (the aggregate speedup) and the
median per-prompt speedup. Choose on problems 0-123; 124-163 are the held-out test.

    python benchmarks/lookup_ngram_size.py --dtype bfloat16 --first-prompt 100 --num-prompts 24 --output docs/default_model/lookup_ngram_size_bfloat16.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_layerskip.cli.measure_options import load_model
from hf_layerskip.generation import load_humaneval
from hf_layerskip.generation.metrics import machine_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--ngram-sizes", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--first-prompt", type=int, default=100)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", default=None, help="JSON file for the per-prompt seconds and the summary")
    options = parser.parse_args()
    model, tokenizer = load_model(options.model, options.dtype, "cpu", "lookup_ngram_size.py")
    problems = load_humaneval(list(range(options.first_prompt, options.first_prompt + options.num_prompts)))
    generate = dict(do_sample=False, max_new_tokens=options.max_new_tokens)
    seconds = {"plain": [], **{size: [] for size in options.ngram_sizes}}
    differing = dict.fromkeys(options.ngram_sizes, 0)
    with torch.inference_mode():
        model.generate(tokenizer(problems[0].prompt, return_tensors="pt")["input_ids"], max_new_tokens=8)  # warm-up
        for problem in tqdm(problems, desc="prompts"):
            input_ids = tokenizer(problem.prompt, return_tensors="pt")["input_ids"]
            start = time.perf_counter()
            plain = model.generate(input_ids, **generate)
            seconds["plain"].append(time.perf_counter() - start)
            for size in options.ngram_sizes:
                start = time.perf_counter()
                output = model.generate(
                    input_ids, assistant_early_exit=model.config.exit_layer, max_matching_ngram_size=size, **generate
                )
                seconds[size].append(time.perf_counter() - start)
                differing[size] += not torch.equal(output, plain)
    summary = {
        size: {
            "seconds": sum(seconds[size]),
            "aggregate_speedup": sum(seconds["plain"]) / sum(seconds[size]),
            "median_speedup": statistics.median(p / s for p, s in zip(seconds["plain"], seconds[size])),
            "outputs_differing_from_plain": differing[size],
        }
        for size in options.ngram_sizes
    }
    print(f"{options.dtype}, HumanEval {options.first_prompt}-{options.first_prompt + options.num_prompts - 1}, "
          f"{options.max_new_tokens} new tokens; plain {sum(seconds['plain']):.2f} s")
    for size, row in summary.items():
        print(
            f"max_matching_ngram_size={size}: {row['seconds']:.2f} s, aggregate {row['aggregate_speedup']:.3f}x, "
            f"median {row['median_speedup']:.3f}x, {row['outputs_differing_from_plain']} outputs differ from plain"
        )
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": machine_description(model.device),
            "settings": {**vars(options), "dtype": options.dtype},
            "seconds": {str(key): value for key, value in seconds.items()},
            "summary": {str(key): value for key, value in summary.items()},
        }
        Path(options.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
