"""Draft forms on held-out human-written code: how often each would propose the full model's own next token.

Teacher-forced over HumanEval problems (`--first-problem`, `--num-problems`; prompt plus canonical solution), at
every position, against the last layer's argmax:

- `exit E` (E = each exit of the draft head): the plain early exit, the model's final norm and LM head on layer E;
- `exit E + draft head`: through the exit's adapter, over the draft vocabulary (what the default model drafts);
- `lookup`: the token that followed the latest earlier occurrence of the last 1-2 tokens (`lookup_continuation`),
  where there is one; its coverage is the share of positions with a proposal;
- `lookup, else exit E + draft head`: what a round with both drafts first.

Also the time of one lookup against one draft step at each exit. Acceptance on greedy decoding comes from running
the forms (`hf-layerskip sweep --lookup-tokens ...`), not from here.

    python benchmarks/draft_forms.py --first-problem 124 --num-problems 40 --output docs/default_model/draft_forms.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval
from hf_layerskip.modeling.self_speculative import lookup_continuation


@torch.inference_mode()
def agreements(model, texts: list[torch.LongTensor], ngram_size: int) -> dict[str, dict]:
    exits = model.config.exit_adapter_layers or [model.config.exit_layer]
    hits, covered, total = {}, {}, 0
    for input_ids in texts:
        output = model(input_ids=input_ids, output_layer_hidden_states=True)
        target = output.logits[0].argmax(-1)  # (length,)
        length = len(target)
        total += length
        lookups = [lookup_continuation(input_ids[0, : t + 1], ngram_size, 1)[1] for t in range(length)]
        has_lookup = torch.tensor([len(c) > 0 for c in lookups])
        lookup_tokens = torch.tensor([int(c[0]) if len(c) else -1 for c in lookups])
        forms = {"lookup": (lookup_tokens, has_lookup)}
        for exit_layer in exits:
            states = output.layer_hidden_states[exit_layer - 1][0]  # (length, hidden)
            plain = model.exit_logits(states).argmax(-1)
            head = model.draft_exit(exit_layer)(states).argmax(-1)
            everywhere = torch.ones(length, dtype=torch.bool)
            forms[f"exit {exit_layer}"] = (plain, everywhere)
            forms[f"exit {exit_layer} + draft head"] = (head, everywhere)
            forms[f"lookup, else exit {exit_layer} + draft head"] = (torch.where(has_lookup, lookup_tokens, head), everywhere)
        for name, (proposals, proposed) in forms.items():
            hits[name] = hits.get(name, 0) + int(((proposals == target) & proposed).sum())
            covered[name] = covered.get(name, 0) + int(proposed.sum())
    return {name: {"agreement": hits[name] / total, "coverage": covered[name] / total} for name in hits}


@torch.inference_mode()
def costs_ms(context: torch.LongTensor, ngram_size: int, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of one lookup of up to 8 tokens over `context` `(1, length)` (the draft steps' costs are
    `benchmarks/step_costs.py`'s)."""
    def median(step):
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            timings.append(1000 * (time.perf_counter() - start))
        return sorted(timings)[len(timings) // 2]

    return {"lookup": median(lambda: lookup_continuation(context[0], ngram_size, 8))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--first-problem", type=int, default=124)
    parser.add_argument("--num-problems", type=int, default=40)
    parser.add_argument("--ngram-size", type=int, default=2)
    parser.add_argument("--output", default=None, help="JSON file for the table")
    options = parser.parse_args()
    if options.model is None:
        from hf_layerskip.defaults import default_checkpoint

        options.model = str(default_checkpoint())
    model = LayerSkipLlamaForCausalLM.from_pretrained(options.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    examples = load_humaneval(range(options.first_problem, options.first_problem + options.num_problems))
    texts = [tokenizer(e.prompt + e.reference, return_tensors="pt")["input_ids"] for e in examples]
    table = agreements(model, texts, options.ngram_size)
    cost = costs_ms(texts[0], options.ngram_size)
    print(f"{sum(t.shape[1] for t in texts)} tokens of HumanEval {examples[0].id}..{examples[-1].id}; "
          f"one lookup over {texts[0].shape[1]} tokens: {cost['lookup']:.2f} ms")
    print("| draft form | agreement with the last layer | positions with a proposal |")
    print("|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['agreement']:.3f} | {row['coverage']:.3f} |")
    if options.output:
        Path(options.output).write_text(json.dumps({"forms": table, "cost_ms": cost, "problems": [e.id for e in examples]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
