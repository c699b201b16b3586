"""How close bfloat16 decoding stays to float32 greedy decoding, plain and self-speculative.

For each held-out HumanEval prompt: float32 plain greedy (the reference), bfloat16 plain greedy and bfloat16
self-speculative decoding at the model's shipped settings. Reports how many outputs equal the float32 reference and
how many new tokens agree with it before the first difference, for both bfloat16 runs; and where the two bfloat16
runs part, plain bfloat16's logit gap there between the two tokens, and whether it is within bfloat16's rounding at
that magnitude (`tie_tolerance_for`: two units in the last place).

    python benchmarks/bfloat16_agreement.py --first-prompt 124 --num-prompts 40 --output docs/default_model/bfloat16_agreement.json
"""

import argparse
import copy
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_layerskip.cli.measure_options import load_model
from hf_layerskip.generation import load_humaneval
from hf_layerskip.generation.correctness import find_mismatch
from hf_layerskip.generation.metrics import first_mismatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--first-prompt", type=int, default=124)
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", default=None, help="JSON file for the per-prompt results and totals")
    options = parser.parse_args()
    model32, tokenizer = load_model(options.model, "float32", "cpu", "bfloat16_agreement.py")
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    greedy = dict(max_new_tokens=options.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    rows = []
    examples = load_humaneval(range(options.first_prompt, options.first_prompt + options.num_prompts))
    for example in tqdm(examples, desc="prompts"):
        input_ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
        start = input_ids.shape[1]
        with torch.inference_mode():
            new = {
                "float32": model32.generate(input_ids, **greedy)[0, start:],
                "plain": model16.generate(input_ids, **greedy)[0, start:],
                "self_speculative": model16.generate(
                    input_ids, assistant_early_exit=model16.config.exit_layer, **greedy
                )[0, start:],
            }
        row = {"prompt_id": example.id}
        for name in ("plain", "self_speculative"):
            position = first_mismatch(new["float32"], new[name])
            row[f"{name}_identical_to_float32"] = position is None
            row[f"{name}_agreeing_tokens"] = len(new["float32"]) if position is None else position
        mismatch = find_mismatch(model16, input_ids, new["plain"], new["self_speculative"])
        row["bfloat16_runs_part_at"] = None if mismatch is None else mismatch.position
        row["logit_gap"] = None if mismatch is None else mismatch.logit_gap
        row["is_tie"] = None if mismatch is None else mismatch.is_tie
        rows.append(row)
    parted = [r for r in rows if r["bfloat16_runs_part_at"] is not None]
    totals = {
        "prompts": len(rows),
        **{
            f"{name}_identical_to_float32": sum(r[f"{name}_identical_to_float32"] for r in rows)
            for name in ("plain", "self_speculative")
        },
        **{
            f"{name}_agreeing_tokens": sum(r[f"{name}_agreeing_tokens"] for r in rows)
            for name in ("plain", "self_speculative")
        },
        "bfloat16_runs_part": len(parted),
        "parted_at_a_tie": sum(bool(r["is_tie"]) for r in parted),
        "logit_gaps": sorted(abs(r["logit_gap"]) for r in parted if r["logit_gap"] is not None),
    }
    print(json.dumps(totals, indent=2))
    if options.output:
        Path(options.output).write_text(json.dumps({"totals": totals, "per_prompt": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
