"""Is a LayerSkip training step faster with layer dropout? Times one optimizer step (LayerSkipTrainer.compute_loss,
backward, AdamW) of the same model on the same batch at layer-dropout rate 0 and at p_max = 0.5, interleaved in
one run so that machine load hits every setting alike; reports medians and their ratio to rate 0.

    python benchmarks/layer_dropout_step.py --repeats 15

A dropped layer skips its rows of the batch, so the saving grows with the mean rate: the paper's exponential
schedule at p_max 0.5 drops about 22% of layer-rows, a uniform 0.5 about half.
"""

import argparse
import statistics
import tempfile
import time

import torch

from hf_layerskip import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM
from hf_layerskip.trainer import LayerSkipTrainer, LayerSkipTrainingArguments

SETTINGS = {
    "rate 0": dict(layer_dropout_max=0.0),
    "exponential, p_max 0.5": dict(layer_dropout_max=0.5, layer_dropout_scale="exponential"),
    "uniform 0.5": dict(layer_dropout_max=0.5, layer_dropout_scale="uniform"),
}


def build_model(options) -> LayerSkipLlamaForCausalLM:
    config = LayerSkipLlamaConfig(
        vocab_size=options.vocab_size,
        hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_layers,
        num_attention_heads=options.num_heads,
        num_key_value_heads=options.num_heads,
        max_position_embeddings=options.seq_len,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    return LayerSkipLlamaForCausalLM(config).to(options.device).train()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=768)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per setting (after 2 warm-up rounds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(argv)

    model = build_model(options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, options.vocab_size, (options.batch_size, options.seq_len), generator=generator)
    batch = {"input_ids": input_ids.to(options.device), "labels": input_ids.to(options.device)}

    with tempfile.TemporaryDirectory() as scratch:
        trainers = {
            name: LayerSkipTrainer(
                model,
                LayerSkipTrainingArguments(
                    output_dir=scratch, report_to="none", use_cpu=options.device == "cpu", **settings
                ),
            )
            for name, settings in SETTINGS.items()
        }
    for trainer in trainers.values():
        trainer.state.max_steps = 10**6

    def step(trainer, step_index):
        trainer.state.global_step = step_index  # a new curriculum position and new masks each step
        start = time.perf_counter()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if options.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in trainers}
    for round_index in range(options.repeats + 2):
        for name, trainer in trainers.items():
            elapsed = step(trainer, round_index)
            if round_index >= 2:
                times[name].append(elapsed)

    baseline = statistics.median(times["rate 0"])
    print(
        f"model: {options.num_layers} layers, hidden {options.hidden_size}, vocab {options.vocab_size}; batch "
        f"{options.batch_size}×{options.seq_len} tokens; device {options.device}, torch threads "
        f"{torch.get_num_threads()}; {options.repeats} interleaved steps per setting"
    )
    print("| layer dropout | mean rate over layers | median step (ms) | step time / rate 0 |")
    print("|---|---|---|---|")
    for name, trainer in trainers.items():
        rates = trainer.layerskip_recipe.layer_dropout.rates(0, 1)
        median = statistics.median(times[name])
        print(f"| {name} | {sum(rates) / len(rates):.3f} | {1000 * median:.0f} | {median / baseline:.3f} |")


if __name__ == "__main__":
    main()
