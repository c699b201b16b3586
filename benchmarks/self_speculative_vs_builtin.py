"""Is our self-speculative decoder faster than transformers' built-in `assistant_early_exit` path?

Times plain greedy decoding, our `generate(assistant_early_exit=E, num_assistant_tokens=d)` and transformers'
built-in path on the same weights (`plain_llama_view`, which drafts with a second KV cache and verifies with all
layers), interleaved per prompt so that machine load hits every method alike. Plain greedy runs once per prompt;
each (E, d) then runs ours and the built-in path, alternating which goes first. One untimed warm-up call per
method precedes the timed ones. Every output is checked against plain greedy token for token.

    python benchmarks/self_speculative_vs_builtin.py --exit-layers 4 10 20 --num-speculations 2 4 6 \
        --prompts 20 --max-new-tokens 64 --output self_speculative_vs_builtin.json

Tokens/s is the total of new tokens over the total wall-clock time of a method at one (E, d); acceptance is the
fraction of drafted tokens the full model accepted (ours; the built-in path drafts and verifies the same tokens in
greedy mode). On a shared machine wall-clock time also counts waiting for a core, so the table adds the ours/built-in
ratio in CPU time of this process, which waiting does not inflate (with `--threads 1` it is the compute time).
"""

import argparse
import json
import time

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval, plain_llama_view
from hf_layerskip.modeling.self_speculative import acceptance_rate

METHODS = ("plain", "ours", "builtin")


def timed(generate, input_ids, attention_mask, **settings):
    """New tokens `(num_new,)`, and the wall-clock and CPU seconds one greedy `generate` call took."""
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        sequences = generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, **settings)
    return sequences[0, input_ids.shape[1] :], time.perf_counter() - start, time.process_time() - start_cpu


class Runner:
    """The three decoding methods over one set of weights."""

    def __init__(self, model: LayerSkipLlamaForCausalLM, max_new_tokens: int):
        self.model = model
        self.builtin = plain_llama_view(model)  # its own generation config, with a constant draft length
        self.max_new_tokens = max_new_tokens

    def run(self, method, input_ids, attention_mask, exit_layer=None, num_speculations=None, max_new_tokens=None):
        settings = dict(max_new_tokens=max_new_tokens or self.max_new_tokens)
        if method == "plain":
            return timed(self.model.generate, input_ids, attention_mask, **settings)
        settings.update(assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations)
        if method == "ours":
            return timed(self.model.generate, input_ids, attention_mask, **settings)
        # The built-in candidate generator reads the draft length from the view's generation config, not the call.
        self.builtin.generation_config.num_assistant_tokens = num_speculations
        return timed(self.builtin.generate, input_ids, attention_mask, **settings)


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| E | d | plain tok/s | ours tok/s | built-in tok/s | acceptance | ours/plain | ours/built-in | "
        "built-in/plain | ours/built-in, CPU time | mismatches (ours, built-in) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        lines.append(
            f"| {row['exit_layer']} | {row['num_speculations']} | {row['tokens_per_s']['plain']:.2f} | "
            f"{row['tokens_per_s']['ours']:.2f} | {row['tokens_per_s']['builtin']:.2f} | {row['acceptance']:.3f} | "
            f"{row['ours/plain']:.2f} | {row['ours/builtin']:.2f} | {row['builtin/plain']:.2f} | "
            f"{row['ours/builtin (cpu)']:.2f} | {row['mismatches']['ours']}, {row['mismatches']['builtin']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="converted LayerSkip checkpoint (default: SmolLM2 as converted, without the LayerSkip adapter)")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[4, 10, 20], help="E values")
    parser.add_argument("--num-speculations", type=int, nargs="+", default=[2, 4, 6], help="d values")
    parser.add_argument("--prompts", type=int, default=20, help="the first N HumanEval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", default=None, help="write the per-prompt records and the summary as JSON")
    options = parser.parse_args(argv)

    if options.threads:
        torch.set_num_threads(options.threads)
    if options.checkpoint is None:
        from hf_layerskip.defaults import base_checkpoint

        options.checkpoint = str(base_checkpoint())
    model = LayerSkipLlamaForCausalLM.from_pretrained(options.checkpoint, dtype=getattr(torch, options.dtype))
    model = model.to(options.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.checkpoint)
    runner = Runner(model, options.max_new_tokens)
    grid = [(e, d) for e in options.exit_layers for d in options.num_speculations]

    def encode(text):
        batch = tokenizer(text, return_tensors="pt").to(options.device)
        return batch.input_ids, batch.attention_mask

    # Warm-up (untimed): every method once.
    warm_ids, warm_mask = encode(load_humaneval([0])[0].prompt)
    for method in METHODS:
        runner.run(method, warm_ids, warm_mask, *grid[0], max_new_tokens=8)

    records = []
    for index, example in enumerate(tqdm(load_humaneval(range(options.prompts)), desc="prompts")):
        input_ids, attention_mask = encode(example.prompt)
        reference, plain_seconds, plain_cpu_seconds = runner.run("plain", input_ids, attention_mask)
        for config_index, (exit_layer, num_speculations) in enumerate(grid):
            order = ("ours", "builtin") if (index + config_index) % 2 == 0 else ("builtin", "ours")
            record = dict(prompt=example.id, exit_layer=exit_layer, num_speculations=num_speculations)
            record["plain"] = dict(seconds=plain_seconds, cpu_seconds=plain_cpu_seconds, new_tokens=len(reference))
            for method in order:
                tokens, seconds, cpu_seconds = runner.run(
                    method, input_ids, attention_mask, exit_layer, num_speculations
                )
                record[method] = dict(
                    seconds=seconds,
                    cpu_seconds=cpu_seconds,
                    new_tokens=len(tokens),
                    matches_plain=torch.equal(tokens, reference),
                )
                if method == "ours":
                    stats = model.speculation_stats
                    record[method].update(
                        drafted=stats.drafted_tokens, accepted=stats.accepted_tokens, rounds=stats.rounds
                    )
            records.append(record)

    summary = []
    for exit_layer, num_speculations in grid:
        chosen = [r for r in records if (r["exit_layer"], r["num_speculations"]) == (exit_layer, num_speculations)]
        speed, cpu_speed = (
            {
                method: sum(r[method]["new_tokens"] for r in chosen) / sum(r[method][clock] for r in chosen)
                for method in METHODS
            }
            for clock in ("seconds", "cpu_seconds")
        )
        drafted = sum(r["ours"]["drafted"] for r in chosen)
        summary.append(
            {
                "exit_layer": exit_layer,
                "num_speculations": num_speculations,
                "tokens_per_s": speed,
                "acceptance": acceptance_rate(sum(r["ours"]["accepted"] for r in chosen), drafted),
                "ours/plain": speed["ours"] / speed["plain"],
                "ours/builtin": speed["ours"] / speed["builtin"],
                "builtin/plain": speed["builtin"] / speed["plain"],
                "tokens_per_cpu_s": cpu_speed,
                "ours/builtin (cpu)": cpu_speed["ours"] / cpu_speed["builtin"],
                "mismatches": {m: sum(not r[m]["matches_plain"] for r in chosen) for m in ("ours", "builtin")},
            }
        )

    print(
        f"\n{options.prompts} HumanEval prompts, {options.max_new_tokens} new tokens, {options.dtype} on "
        f"{options.device}, {torch.get_num_threads()} threads\n"
    )
    print(markdown_table(summary))
    if options.output:
        with open(options.output, "w") as file:
            json.dump({"settings": vars(options), "summary": summary, "records": records}, file, indent=1)


if __name__ == "__main__":
    main()
