"""What a forward step costs on the machine at hand, by dtype: the numbers that decide whether drafts can pay.

For each dtype, after a context of `--context` tokens (HumanEval problem 124's prompt, repeated to length): the time
of one forward of 1, 2, 4, 7 and 8 new positions through every layer and the LM head (what verification of d = n - 1
drafts costs), and of one draft step at each exit (layers 0..E-1 and the model's draft head: `draft_step`). Medians
of `--repeats` timings; the cache is cropped back after each, so every step sees the same context.

    python benchmarks/step_costs.py --dtypes float32 bfloat16 --output docs/default_model/step_costs.json
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.cache_utils import DynamicCache

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval
from hf_layerskip.generation.hardware import native_bfloat16
from hf_layerskip.generation.metrics import machine_description
from hf_layerskip.generation.speedup_bound import _median_seconds
from hf_layerskip.modeling.self_speculative import SelfSpeculativeDecoder, crop_cache


@torch.inference_mode()
def step_costs(model, context: torch.LongTensor, positions: list[int], exits: list[int], repeats: int) -> dict:
    """Milliseconds of a forward of each count of new `positions`, and of a draft step at each of `exits`."""
    cache = DynamicCache(config=model.config)
    model(input_ids=context, cache=cache, use_cache=True)
    length = context.shape[1]
    forward = {}
    for count in positions:
        new = context[:, :count]

        def step():
            model(input_ids=new, cache=cache, use_cache=True)
            crop_cache(cache, length)

        forward[count] = 1000 * _median_seconds(step, repeats, context.device)
    draft = {}
    for exit_layer in exits:
        config = GenerationConfig(
            assistant_early_exit=exit_layer, num_assistant_tokens=1, do_sample=False, max_length=length + 2
        )
        decoder = SelfSpeculativeDecoder(model, config, None, context, DynamicCache(config=model.config), None)
        decoder.prefill()
        decoder.open_slots(1)

        def step():
            decoder.draft_step(context[:, -1])
            decoder.rewind()

        draft[exit_layer] = 1000 * _median_seconds(step, repeats, context.device)
    return {"forward_ms": forward, "draft_step_ms": draft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--positions", type=int, nargs="+", default=[1, 2, 4, 7, 8])
    parser.add_argument("--exit-layers", type=int, nargs="+", default=None, help="default: the draft head's exits")
    parser.add_argument("--context", type=int, default=200, help="tokens already in the cache")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default=None, help="JSON file for the table")
    options = parser.parse_args()
    if options.model is None:
        from hf_layerskip.defaults import default_checkpoint

        options.model = str(default_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    (example,) = load_humaneval([124])
    ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
    context = ids.repeat(1, -(-options.context // ids.shape[1]))[:, : options.context]

    results = {}
    for name in options.dtypes:
        model = LayerSkipLlamaForCausalLM.from_pretrained(options.model, dtype=getattr(torch, name)).eval()
        exits = options.exit_layers or model.config.exit_adapter_layers or [model.config.exit_layer]
        results[name] = step_costs(model, context, options.positions, exits, options.repeats)

    header = [f"{n} new position(s)" for n in options.positions] + [f"draft step, E={e}" for e in exits]
    print(f"| dtype | {' | '.join(header)} |")
    print("|---" * (1 + len(options.positions) + len(exits)) + "|")
    for name, costs in results.items():
        one = costs["forward_ms"][options.positions[0]]
        cells = [f"{ms:.1f} ms ({ms / one:.2f}×)" for ms in costs["forward_ms"].values()]
        cells += [f"{ms:.1f} ms ({ms / one:.2f}×)" for ms in costs["draft_step_ms"].values()]
        print(f"| {name} | {' | '.join(cells)} |")
    cpu = torch.device("cpu")
    summary = {
        "machine": machine_description(cpu),
        "native_bfloat16": native_bfloat16(cpu),
        "context": options.context,
        "repeats": options.repeats,
        "costs": results,
    }
    if options.output:
        Path(options.output).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
