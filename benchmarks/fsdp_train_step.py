"""Training-step time of the same random model under a plain `Trainer` and under `LayerSkipTrainer`, with and without
layer dropout: what the LayerSkip loss costs and what layer dropout saves. Run by `device_check.py`.

On GPUs under the FSDP2 recipe (the Trainer shards through accelerate):

    accelerate launch --config_file hf_layerskip/recipes/accelerate_fsdp2.yaml --num_processes 1 \\
        benchmarks/fsdp_train_step.py OUT.json --shape llama-3.2-1b

and with the same command on the CPU (`--shape tiny-1b-like`), where accelerate, which enables FSDP only on
accelerators, runs DDP instead (each record names the sharding it got). Each setting
builds the model afresh (same seed), runs `--steps` optimizer steps on random tokens and times the steps after the
first two (synchronised with the device), with the peak memory the device allocated. Writes one JSON list.
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_layerskip import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM
from hf_layerskip.trainer import LayerSkipTrainer, LayerSkipTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_check import model_config  # noqa: E402

WARMUP_STEPS = 2
SETTINGS = {  # name -> (trainer class, LayerSkip arguments or None for a plain Trainer)
    "plain Trainer": (Trainer, None),
    "LayerSkip, no layer dropout": (LayerSkipTrainer, dict(layer_dropout_max=0.0)),
    "LayerSkip, layer dropout p_max 0.5": (
        LayerSkipTrainer,
        dict(layer_dropout_max=0.5, layer_dropout_scale="exponential"),
    ),
}


class StepTimer(TrainerCallback):
    def __init__(self, device: torch.device):
        self.device, self.durations, self._start = device, [], None

    def _synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._synchronize()
        self.durations.append(time.perf_counter() - self._start)


def random_tokens(num_rows: int, seq_len: int, vocab_size: int) -> list[dict]:
    ids = torch.randint(0, vocab_size, (num_rows, seq_len), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def time_setting(name: str, options, device: torch.device) -> dict:
    trainer_class, layerskip = SETTINGS[name]
    config = LayerSkipLlamaConfig(**model_config(options.shape), layer_dropout_max=0.0)  # plain: no dropout at all
    torch.manual_seed(0)
    with device:  # initialised where it trains: a 1B model's random init takes seconds on the CPU
        model = LayerSkipLlamaForCausalLM(config).train()
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="fsdp_train_step_"),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=1e-5,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=0,
    )
    if layerskip is None:
        args = TrainingArguments(**common)
    else:
        args = LayerSkipTrainingArguments(**common, **layerskip)
    timer = StepTimer(device)
    dataset = random_tokens(options.steps * options.batch_size, options.seq_len, config.vocab_size)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    timed = timer.durations[WARMUP_STEPS:] or timer.durations
    record = {
        "setting": name,
        "sharding": type(trainer.model_wrapped).__name__ + f" ({trainer.accelerator.distributed_type})",
        "processes": trainer.accelerator.num_processes,
        "median_step_s": statistics.median(timed),
        "step_s": timer.durations,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "mean_dropout_rate": statistics.fmean(trainer.layerskip_recipe.layer_dropout.rates(0, options.steps))
        if layerskip is not None
        else 0.0,
    }
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--shape", default="llama-3.2-1b", help="a shape of device_check.py's model_config")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    options = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = [time_setting(name, options, device) for name in SETTINGS]
    if records and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    options.output.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
