"""Is a change to the self-speculative decoder free at batch size 1? Times two versions of
`hf_layerskip/modeling/self_speculative.py` on the same model in one process, interleaved per prompt.

The decoder module imports only torch and transformers (it travels with checkpoints as remote code), so an earlier
version loads beside the installed one from a file, e.g. one written by `git show REV:PATH`:

    git show HEAD~1:hf_layerskip/modeling/self_speculative.py > /tmp/self_speculative_before.py
    python benchmarks/decoder_before_after.py --before /tmp/self_speculative_before.py \
        --prompts 10 --first-prompt 124 --max-new-tokens 128

The model (default: the default model) decodes each HumanEval prompt greedily with its shipped settings (or
`--exit-layer`/`--num-speculations`/`--confidence-threshold`), once per version, the version that goes first
alternating from prompt to prompt, after one untimed warm-up call each. Both outputs must equal each other. Prints
tokens/s per version and the after/before ratio of the summed times, and writes them as JSON.
"""

import argparse
import importlib.util
import json
import time

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval
from hf_layerskip.generation.metrics import machine_description
from hf_layerskip.modeling import self_speculative


def load_module(path: str):
    # Named inside the installed package, so that the file's relative imports (`.dynamic_drafting`, ...) resolve.
    spec = importlib.util.spec_from_file_location("hf_layerskip.modeling.self_speculative_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(model, decoder_module, input_ids, settings) -> tuple[torch.LongTensor, float]:
    """One greedy `generate` call decoded by `decoder_module`'s loop: its sequences `(1, length)` and seconds."""

    def assisted(input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        return decoder_module.self_speculative_decoding(
            model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs
        )

    model._assisted_decoding = assisted  # instance attribute: this call's decoder
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            sequences = model.generate(input_ids, do_sample=False, **settings)
        return sequences, time.perf_counter() - start
    finally:
        del model._assisted_decoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the earlier self_speculative.py")
    parser.add_argument("--model", default=None, help="LayerSkip checkpoint (default: the default model)")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--first-prompt", type=int, default=124)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--exit-layer", type=int, default=None, help="E (default: the checkpoint's)")
    parser.add_argument("--num-speculations", type=int, default=None, help="d (default: the checkpoint's)")
    parser.add_argument("--confidence-threshold", type=float, default=None, help="(default: the checkpoint's)")
    parser.add_argument("--output", default="decoder_before_after.json")
    args = parser.parse_args()

    if args.model is None:
        from hf_layerskip.defaults import default_checkpoint

        args.model = default_checkpoint()
    model = LayerSkipLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        assistant_early_exit=args.exit_layer or model.config.exit_layer,
        num_assistant_tokens=args.num_speculations or model.generation_config.num_assistant_tokens,
    )
    if args.confidence_threshold is not None:
        settings["assistant_confidence_threshold"] = args.confidence_threshold
    versions = {"before": load_module(args.before), "after": self_speculative}
    examples = load_humaneval(range(args.first_prompt, args.first_prompt + args.prompts))
    encoded = [tokenizer(example.prompt, return_tensors="pt").input_ids for example in examples]

    for module in versions.values():
        timed(model, module, encoded[0], settings)  # warm-up
    seconds, new_tokens = dict.fromkeys(versions, 0.0), 0
    for index, input_ids in enumerate(tqdm(encoded, desc="prompts")):
        order = list(versions) if index % 2 == 0 else list(reversed(versions))
        outputs = {}
        for name in order:
            outputs[name], elapsed = timed(model, versions[name], input_ids, settings)
            seconds[name] += elapsed
        if not torch.equal(outputs["before"], outputs["after"]):
            raise SystemExit(f"prompt {examples[index].id}: the two versions decode differently")
        new_tokens += outputs["after"].shape[1] - input_ids.shape[1]

    result = {
        "machine": machine_description(model.device),
        "settings": {**settings, "model": str(args.model), "prompts": [e.id for e in examples]},
        "tokens_per_second": {name: new_tokens / seconds[name] for name in versions},
        "after_over_before_time": seconds["after"] / seconds["before"],
    }
    print(json.dumps(result, indent=2))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
