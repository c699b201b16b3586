"""Compiled decoding with a static cache: plain greedy decoding against self-speculative decoding, on the CPU.

    python benchmarks/compiled_static_cache.py --prompts 10 --first-prompt 124 --max-new-tokens 128 --threads 1

Both decode each held-out HumanEval prompt greedily with `cache_implementation="static"` and a `CompileConfig` that
compiles on every device, as `generate` compiles plain decoding on an accelerator: plain decoding's forward, and
self-speculative decoding's draft and verification steps (the model's shipped settings, or `--exit-layer`,
`--num-speculations`, `--confidence-threshold`). Every static cache has one size (`max_cache_len`, from the longest
prompt), so that no call compiles again. One untimed warm-up call each compiles; then the two alternate which goes
first from prompt to prompt. Prints tokens/s of each, ours over plain, and how many outputs are identical (compiled
kernels may round differently from each other), and writes them as JSON. `--eager` times the same without compiling.
"""

import argparse
import json
import time

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, CompileConfig

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval
from hf_layerskip.generation.metrics import machine_description


def timed(model, input_ids, settings) -> tuple[torch.LongTensor, float]:
    """One greedy `generate` call: its sequences `(1, length)` and seconds."""
    start = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(input_ids, do_sample=False, **settings)
    return sequences, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="LayerSkip checkpoint (default: the default model)")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--first-prompt", type=int, default=124, help="HumanEval index; 124+ are held out")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--exit-layer", type=int, default=None, help="E (default: the checkpoint's)")
    parser.add_argument("--num-speculations", type=int, default=None, help="d (default: the checkpoint's)")
    parser.add_argument("--confidence-threshold", type=float, default=None, help="(default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--eager", action="store_true", help="static caches without compiling")
    parser.add_argument("--output", default="compiled_static_cache.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from hf_layerskip.defaults import default_checkpoint

        args.model = default_checkpoint()
    model = LayerSkipLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = load_humaneval(range(args.first_prompt, args.first_prompt + args.prompts))
    encoded = [tokenizer(example.prompt, return_tensors="pt").input_ids for example in examples]

    speculative = dict(
        assistant_early_exit=args.exit_layer or model.config.exit_layer,
        num_assistant_tokens=args.num_speculations or model.generation_config.num_assistant_tokens,
    )
    if args.confidence_threshold is not None:
        speculative["assistant_confidence_threshold"] = args.confidence_threshold
    longest = max(input_ids.shape[1] for input_ids in encoded)
    common = dict(
        max_new_tokens=args.max_new_tokens,
        cache_implementation="static",
        # Room for the longest call and for padded verification (d more positions): one cache shape throughout.
        max_cache_len=longest + args.max_new_tokens + speculative["num_assistant_tokens"],
    )
    if not args.eager:
        compile_config = CompileConfig(mode="default")  # "reduce-overhead" is CUDA graphs
        compile_config._compile_all_devices = True  # what makes `generate` compile on a CPU
        common["compile_config"] = compile_config
    modes = {"plain": common, "self_speculative": {**common, **speculative}}

    warm_up = {}
    for name, settings in modes.items():
        _, warm_up[name] = timed(model, encoded[0], settings)
    seconds, new_tokens, identical = dict.fromkeys(modes, 0.0), 0, 0
    for index, input_ids in enumerate(tqdm(encoded, desc="prompts")):
        order = list(modes) if index % 2 == 0 else list(reversed(modes))
        outputs = {}
        for name in order:
            outputs[name], elapsed = timed(model, input_ids, modes[name])
            seconds[name] += elapsed
        identical += torch.equal(outputs["plain"], outputs["self_speculative"])
        new_tokens += outputs["plain"].shape[1] - input_ids.shape[1]

    tokens_per_second = {name: new_tokens / seconds[name] for name in modes}
    result = {
        "machine": machine_description(model.device),
        "threads": torch.get_num_threads(),
        "compiled": not args.eager,
        "settings": {
            **speculative,
            "max_new_tokens": args.max_new_tokens,
            "model": str(args.model),
            "prompts": [example.id for example in examples],
        },
        "warm_up_seconds": warm_up,
        "tokens_per_second": tokens_per_second,
        "self_speculative_over_plain": tokens_per_second["self_speculative"] / tokens_per_second["plain"],
        "identical_outputs": f"{identical}/{len(encoded)}",
    }
    print(json.dumps(result, indent=2))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
