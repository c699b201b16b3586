"""Which per-token acceptance would a target speedup need, at which exit? The analytic bound turned around.

For every exit layer E and draft length d, the three step costs of the analytic bound (`measure_step_costs`: a
plain step, a draft step through the model's draft head, a verification of d drafts) are timed on one prompt, and
the acceptance α solving

    τ(α, d) = target · (d · c_draft + c_verify) / c_full,       τ(α, d) = (1 − α^(d+1)) / (1 − α)

is reported ("> 1" where even α = 1 falls short), beside the agreement the exit reaches (from a `train-draft`
report, if given).

    python benchmarks/required_acceptance.py --model CHECKPOINT --exit-layers 6 8 10 12 14 \
        --num-speculations 1 2 3 --target 1.25 --report docs/default_model/train_draft_report.json
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import fit_acceptance, load_humaneval, measure_step_costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[6, 8, 10, 12, 14])
    parser.add_argument("--num-speculations", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--target", type=float, default=1.25, help="speedup to reach")
    parser.add_argument("--problem", type=int, default=124, help="HumanEval problem whose prompt is the context")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--report", default=None, help="a train-draft report.json, for the agreement reached")
    parser.add_argument("--output", default=None, help="JSON file for the table")
    options = parser.parse_args()
    if options.model is None:
        from hf_layerskip.defaults import default_checkpoint

        options.model = str(default_checkpoint())
    model = LayerSkipLlamaForCausalLM.from_pretrained(options.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    (example,) = load_humaneval([options.problem])
    input_ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
    reached = {}
    if options.report:
        exits = json.loads(Path(options.report).read_text())["exits"]
        reached = {int(layer): rows["with_adapter"]["top1_agreement"] for layer, rows in exits.items()}

    rows = []
    print(f"| E | d | c_draft/c_full | c_verify/c_full | α needed for {options.target}× | agreement reached |")
    print("|---|---|---|---|---|---|")
    for exit_layer in options.exit_layers:
        for speculations in options.num_speculations:
            costs = measure_step_costs(model, input_ids, exit_layer, speculations, options.repeats)
            tokens_needed = options.target * (speculations * costs.draft + costs.verify) / costs.full
            needed = fit_acceptance(tokens_needed - 1, speculations) if tokens_needed - 1 <= speculations else None
            row = dict(
                exit_layer=exit_layer,
                num_speculations=speculations,
                draft_cost_ratio=costs.draft / costs.full,
                verify_cost_ratio=costs.verify / costs.full,
                acceptance_needed=needed,
                agreement_reached=reached.get(exit_layer),
            )
            rows.append(row)
            shown = f"{needed:.3f}" if needed is not None else "> 1"
            agreement = f"{row['agreement_reached']:.3f}" if row["agreement_reached"] is not None else "–"
            print(
                f"| {exit_layer} | {speculations} | {row['draft_cost_ratio']:.3f} | {row['verify_cost_ratio']:.3f} "
                f"| {shown} | {agreement} |",
                flush=True,
            )
    if options.output:
        table = {"model": options.model, "target": options.target, "rows": rows}
        Path(options.output).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
