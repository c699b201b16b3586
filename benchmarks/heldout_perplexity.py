"""Does LayerSkip training cost the last layer quality? Perplexity of each model's last layer on the canonical
solutions of held-out HumanEval problems, each solution conditioned on its problem (fp32).

    python benchmarks/heldout_perplexity.py --models BASE_DIR TRAINED_DIR --problems 124-163 \
        --output docs/lora_adapter/perplexity.json

With no --models: the converted base SmolLM2 and the default model (base + shipped draft head, whose weights are the
base's: the ratio is 1 by construction; pass a LoRA-merged checkpoint of `hf-layerskip train-lora` to measure one).
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval
from hf_layerskip.generation.metrics import reference_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="checkpoint directories (default: base, default)")
    parser.add_argument("--problems", default="124-163", help="HumanEval problem range START-STOP, inclusive")
    parser.add_argument("--output", default=None, help="JSON file for the figures (default: print only)")
    options = parser.parse_args()
    if options.models is None:
        from hf_layerskip.defaults import base_checkpoint, default_checkpoint

        options.models = [str(base_checkpoint()), str(default_checkpoint())]
    start, stop = (int(bound) for bound in options.problems.split("-"))
    examples = load_humaneval(range(start, stop + 1))

    results = {}
    for path in options.models:
        model = LayerSkipLlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[path] = reference_perplexity(model, AutoTokenizer.from_pretrained(path), examples)
    first = options.models[0]
    print(f"Perplexity on the canonical solutions of HumanEval {start}..{stop} (last layer, fp32)")
    print("| model | perplexity | ratio to the first |\n|---|---|---|")
    for path, perplexity in results.items():
        print(f"| {Path(path).name} | {perplexity:.3f} | {perplexity / results[first]:.3f} |")
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        payload = {"problems": [start, stop], "perplexity": results}
        Path(options.output).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
