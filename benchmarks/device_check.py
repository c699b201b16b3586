"""The GPU check: decoding speed of plain greedy, ours and transformers' built-in `assistant_early_exit` on random
weights of Llama-3.2-1B's and Llama-3-8B's shapes in bf16, eager and compiled, at set acceptance rates; and a
LayerSkip training step under the FSDP2 recipe against a plain `Trainer` step. Writes `device_check.md` (one
table) and `device_check.json` into the folder named on the command line.

On a GPU machine with no network (Python 3.12, torch 2.11, transformers 5.17 there), from the repository root:

    # here, once, where pip can reach an index (wheels only; no model weights: the models are random):
    rm -rf .whl && mkdir .whl
    python3 -m pip wheel --no-deps -w .whl .
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl "transformers==5.24.0"
    # there (device_check.sh installs the wheels into /tmp/hf_layerskip_site, transformers only when the one
    # installed is outside this package's range):
    benchmarks/device_check.sh OUT_DIR

and on a CPU, with tiny shapes, as CI runs it: `python benchmarks/device_check.py OUT_DIR --device cpu --tiny`.

How acceptance is set. A random model's early exit agrees with its last layer by chance only. The check scales the
residual contributions of the layers after the exit E (their attention `o_proj` and MLP `down_proj` weights) by a
factor s: at s = 0 the last layer's state is the exit's, every draft is accepted; as s grows, the later layers turn
the state away and acceptance falls towards 1/vocabulary. For each target rate (0.5 and 0.8 by default) the factor
is found by bisection on log2(s), each probe a short batched self-speculative greedy run that measures the decoder's
own acceptance (accepted drafts / drafted tokens) on the prompt and length the cells of the largest batch use, so
that their eager cells measure the rate calibrated (greedy decoding is deterministic); the batch-1 cells run the
first row of that prompt alone and measure their own. Every timing cell reports the acceptance it measured.

Cells. At batch size 1: plain greedy, ours (`generate(assistant_early_exit=E, num_assistant_tokens=d)`) and the
built-in path (a stock `LlamaForCausalLM` sharing the weights); at batch size 8, plain and ours. Eager: the default
`DynamicCache`. Compiled: `cache_implementation="static"` with transformers' `compile_config` (the same call for
every strategy); a strategy that refuses it with a `ValueError` is recorded as not supported in this build. Each
cell runs once untimed (compiling, for compiled cells) and then `--repeats` timed runs; tokens/s counts the new
tokens of all rows. "same tokens" compares each strategy's greedy output with plain greedy's in the same mode; where
they differ, it says whether each differing row first differs at a near-tie of plain greedy (its top two scores
within two units of the last place of the dtype, in an extra untimed eager plain run with scores). In bf16 the
logits of a 128k vocabulary tie often (the 1B shape on the CPU tied exactly at its first token), and verification
scores d + 1 positions in one pass where plain decoding scores one, so either token may come out. Prompts are random
tokens; no eos, so every row generates `--max-new-tokens`. Rotary scaling and tokenizers are left out: they do not
change the work per token.

A time budget (`--budget-s`) bounds the whole run: cells left when it is spent are recorded as skipped.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    # CPU stand-ins, one tied and one not, as the real shapes.
    "tiny-1b-like": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    "tiny-8b-like": dict(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=False,
    ),
}
NOT_SUPPORTED = "not supported in this build"
SKIPPED = "skipped: time budget spent"


def model_config(shape: str) -> dict:
    """`LayerSkipLlamaConfig` keyword arguments for one of `SHAPES` (no special tokens: nothing stops early)."""
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; choose from {', '.join(SHAPES)}.")
    return dict(SHAPES[shape], max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExitScaler:
    """Scales the residual contributions (`o_proj`, `down_proj`) of the layers after `exit_layer` by a factor."""

    def __init__(self, model, exit_layer: int):
        layers = model.model.layers[exit_layer:]
        self.weights = [w for layer in layers for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
        self.originals = [weight.detach().clone() for weight in self.weights]

    @torch.no_grad()
    def set(self, factor: float):
        for weight, original in zip(self.weights, self.originals):
            weight.copy_(original * factor)


class DeviceCheck:
    def __init__(self, options):
        self.options = options
        self.device = torch.device(options.device)
        self.dtype = getattr(torch, options.dtype)
        self.start = time.perf_counter()
        self.rows, self.calibration, self.training = [], [], []

    def budget_left(self) -> bool:
        return time.perf_counter() - self.start < self.options.budget_s

    def compile_config(self):
        from transformers import CompileConfig

        config = CompileConfig(backend=self.options.compile_backend)
        if self.device.type == "cpu":  # transformers compiles on the CPU only when asked to ("often not optimal")
            config.mode = "default"  # "reduce-overhead" means CUDA graphs
            config._compile_all_devices = True
        return config

    def prompt(self, batch_size: int, vocab_size: int) -> dict:
        """The first `batch_size` rows of one random prompt of `max(--batch-sizes)` rows."""
        rows = max(self.options.batch_sizes)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (rows, self.options.prompt_length), generator=generator)[:batch_size]
        return {"input_ids": ids.to(self.device), "attention_mask": torch.ones_like(ids, device=self.device)}

    def generate(self, model, inputs: dict, mode: str, max_new_tokens: int, **kwargs):
        settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        if mode == "compiled":
            settings.update(cache_implementation="static", compile_config=self.compile_config())
        synchronize(self.device)
        started = time.perf_counter()
        output = model.generate(**inputs, **settings, **kwargs)
        synchronize(self.device)
        return output, time.perf_counter() - started

    # Acceptance ------------------------------------------------------------------------------------------------

    def acceptance(self, model, exit_layer: int) -> float:
        """Ours' acceptance over the largest batch's prompt, as the eager cell of that batch will measure it."""
        inputs = self.prompt(max(self.options.batch_sizes), model.config.vocab_size)
        output, _ = self.generate(
            model, inputs, "eager", self.options.max_new_tokens,
            assistant_early_exit=exit_layer, num_assistant_tokens=self.options.num_speculations,
        )  # fmt: skip
        return float(output.accepted_tokens.sum() / output.drafted_tokens.sum().clamp(min=1))

    def calibrate(self, shape: str, model, scaler: ExitScaler, exit_layer: int, target: float) -> float:
        """The factor whose measured acceptance is nearest `target` among the bisection's probes."""
        low, high = -16.0, 6.0  # log2 of the factor: acceptance falls as it grows
        probes = []
        for _ in range(self.options.calibration_probes):
            log_factor = (low + high) / 2
            scaler.set(2.0**log_factor)
            rate = self.acceptance(model, exit_layer)
            probes.append((log_factor, rate))
            low, high = (log_factor, high) if rate > target else (low, log_factor)
        log_factor, rate = min(probes, key=lambda probe: abs(probe[1] - target))
        self.calibration.append(
            {"model": shape, "target": target, "factor": 2.0**log_factor, "measured": rate,
             "probes": [{"factor": 2.0**f, "acceptance": r} for f, r in probes]}
        )  # fmt: skip
        return 2.0**log_factor

    # Decoding --------------------------------------------------------------------------------------------------

    def run_cell(self, model, inputs: dict, mode: str, **kwargs) -> dict:
        """One untimed run (compiles when compiled), then the timed repeats; the outputs of the last."""
        if not self.budget_left():
            return {"status": SKIPPED}
        try:
            self.generate(model, inputs, mode, self.options.max_new_tokens, **kwargs)
            durations = []
            for _ in range(self.options.repeats):
                output, duration = self.generate(model, inputs, mode, self.options.max_new_tokens, **kwargs)
                durations.append(duration)
        except ValueError as error:  # a setting the strategy refuses, by its own check
            if mode != "compiled":
                return {"status": "failed", "error": f"ValueError: {error}"}
            return {"status": NOT_SUPPORTED, "error": str(error)}
        except Exception as error:  # noqa: BLE001 - recorded, and the check goes on to the next cell
            return {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
        new_tokens = (output.sequences.shape[1] - inputs["input_ids"].shape[1]) * output.sequences.shape[0]
        acceptance = None
        if getattr(output, "drafted_tokens", None) is not None:
            acceptance = float(output.accepted_tokens.sum() / output.drafted_tokens.sum().clamp(min=1))
        return {
            "status": "ok",
            "seconds": min(durations),
            "tokens_per_s": new_tokens / min(durations),
            "acceptance": acceptance,
            "sequences": output.sequences,
        }

    def decode(self, shape: str):
        from hf_layerskip import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM
        from hf_layerskip.generation import plain_llama_view

        options = self.options
        config = LayerSkipLlamaConfig(**model_config(shape))
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # initialised in place, in its dtype: no float32 copy of 8B weights
        try:
            with self.device:
                model = LayerSkipLlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        exit_layer = max(1, config.num_hidden_layers // 4)
        stock = plain_llama_view(model)  # shares the weights, so the scaling below applies to it too
        stock.generation_config.num_assistant_tokens = options.num_speculations
        scaler = ExitScaler(model, exit_layer)
        factors = {}
        for target in options.acceptance:
            if self.budget_left():
                factors[target] = self.calibrate(shape, model, scaler, exit_layer, target)
            else:
                self.calibration.append({"model": shape, "target": target, "status": SKIPPED})
                factors[target] = None
        ties = {}  # (target, batch size) -> (batch_size, new_tokens) bool: plain greedy's near-ties
        for mode in ("eager", "compiled"):  # every eager cell first: compiling may spend the budget
            for target, factor in factors.items():
                if factor is not None:
                    scaler.set(factor)
                for batch_size in options.batch_sizes:
                    inputs = self.prompt(batch_size, config.vocab_size)
                    if mode == "eager" and factor is not None and self.budget_left():
                        ties[target, batch_size] = self.near_ties(model, inputs)
                    ours = dict(assistant_early_exit=exit_layer, num_assistant_tokens=options.num_speculations)
                    cells = {"plain": (model, {}), "ours": (model, ours)}
                    if batch_size == 1:
                        cells["built-in"] = (stock, dict(assistant_early_exit=exit_layer))
                    results = {}
                    for strategy, (runner, kwargs) in cells.items():
                        if factor is None:
                            results[strategy] = {"status": SKIPPED}
                        else:
                            results[strategy] = self.run_cell(runner, inputs, mode, **kwargs)
                    near_ties = ties.get((target, batch_size))
                    self.record(shape, exit_layer, target, factor, batch_size, mode, results, near_ties)
        del model, stock, scaler
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def near_ties(self, model, inputs: dict) -> torch.BoolTensor:
        """`(batch_size, new_tokens)`: where plain greedy's top two scores are within two units of the last place
        of the model's dtype (1e-4 at least), so that a different order of the same sums may pick either."""
        output, _ = self.generate(model, inputs, "eager", self.options.max_new_tokens, output_scores=True)
        top2 = torch.stack(output.scores, dim=1).float().topk(2, dim=-1).values  # (batch, new_tokens, 2)
        tolerance = (2 * torch.finfo(self.dtype).eps * top2[..., 0].abs()).clamp(min=1e-4)
        return (top2[..., 0] - top2[..., 1] <= tolerance).cpu()

    def record(self, shape, exit_layer, target, factor, batch_size, mode, results, near_ties=None):
        plain = results["plain"]
        for strategy, result in results.items():
            row = {
                "model": shape, "exit_layer": exit_layer, "num_speculations": self.options.num_speculations,
                "target_acceptance": target, "scale_factor": factor, "batch_size": batch_size, "mode": mode,
                "strategy": strategy, **{k: v for k, v in result.items() if k != "sequences"},
            }  # fmt: skip
            if result["status"] == "ok" and plain["status"] == "ok":
                row["speedup_over_plain"] = result["tokens_per_s"] / plain["tokens_per_s"]
                same = torch.equal(result["sequences"], plain["sequences"])
                row["same_tokens_as_plain"] = same
                if not same and near_ties is not None:
                    row["differs_only_at_ties"] = differs_only_at_ties(
                        result["sequences"], plain["sequences"], near_ties, self.options.prompt_length
                    )
            self.rows.append(row)
        self.write()  # after every cell: a run stopped from outside still leaves what it measured

    # Training --------------------------------------------------------------------------------------------------

    def train(self):
        if not self.budget_left():
            self.training.append({"status": SKIPPED})
            return
        options = self.options
        script = Path(__file__).resolve().with_name("fsdp_train_step.py")
        output = options.output_dir / "training.json"
        arguments = [
            str(script), str(output), "--shape", options.train_shape, "--steps", str(options.train_steps),
            "--batch-size", str(options.train_batch_size), "--seq-len", str(options.train_seq_len),
        ]  # fmt: skip
        # The FSDP2 recipe, one process per GPU (on the CPU, one process: accelerate enables FSDP only on
        # accelerators, and falls back to DDP; the sharding each run got is recorded).
        processes = torch.cuda.device_count() if self.device.type == "cuda" else 1
        recipe = Path(__file__).resolve().parents[1] / "hf_layerskip" / "recipes" / "accelerate_fsdp2.yaml"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe),
                  "--num_processes", str(processes)]  # fmt: skip
        recipe_name = f"accelerate launch, FSDP2 recipe, {processes} process{'es' if processes > 1 else ''}"
        try:
            result = subprocess.run([*launch, *arguments], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as error:
            self.training.append({"status": "failed", "error": f"no result in {error.timeout} s"})
            return
        if result.returncode != 0:
            self.training.append({"status": "failed", "error": (result.stdout + result.stderr)[-3000:]})
            return
        for record in json.loads(output.read_text()):
            self.training.append({"status": "ok", "recipe": recipe_name, **record})
        self.write()

    # Report ----------------------------------------------------------------------------------------------------

    def environment(self) -> dict:
        import accelerate
        import transformers

        import hf_layerskip

        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()
        return {
            "device": device_name or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "hf_layerskip": f"{hf_layerskip.__version__} ({Path(hf_layerskip.__file__).parent})",
            "dtype": self.options.dtype,
            "compile_backend": self.options.compile_backend,
            "threads": torch.get_num_threads(),
        }

    def write(self):
        options = self.options
        report = {
            "environment": self.environment(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()},
            "seconds": time.perf_counter() - self.start,
            "calibration": self.calibration,
            "decoding": self.rows,
            "training": self.training,
        }
        (options.output_dir / "device_check.json").write_text(json.dumps(report, indent=1))
        (options.output_dir / "device_check.md").write_text(markdown(report))
        return report


def differs_only_at_ties(sequences, plain_sequences, near_ties, prompt_length: int) -> bool:
    """Whether every row that differs from plain greedy's first differs where plain greedy had a near-tie."""
    for row, (actual, expected) in enumerate(zip(sequences.cpu(), plain_sequences.cpu())):
        differing = (actual != expected).nonzero()
        if len(differing) and not near_ties[row, int(differing[0]) - prompt_length]:
            return False
    return True


def markdown(report: dict) -> str:
    """One table: every decoding cell, then every training setting."""
    environment = report["environment"]
    lines = [
        f"Device: {environment['device']}; torch {environment['torch']}, transformers {environment['transformers']}, "
        f"accelerate {environment['accelerate']}; {environment['dtype']}; compile backend "
        f"{environment['compile_backend']}; {report['seconds']:.0f} s in all.",
        "",
        "| model | target acceptance (scale) | B | mode | strategy | speed | × plain | acceptance "
        "| same tokens as plain | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def same_tokens(row):
        if "same_tokens_as_plain" not in row:
            return "–"
        if row["same_tokens_as_plain"]:
            return "yes"
        return {True: "no: first at a tie", False: "no"}.get(row.get("differs_only_at_ties"), "no")

    def number(value, form):
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, form)

    for row in report["decoding"]:
        ok = row["status"] == "ok"
        scale = f"{row['target_acceptance']} ({number(row['scale_factor'], '.3g')})"
        lines.append(
            f"| {row['model']} (E={row['exit_layer']}, d={row['num_speculations']}) | {scale} | {row['batch_size']} "
            f"| {row['mode']} | {row['strategy']} | {number(row.get('tokens_per_s'), '.1f')}{' tok/s' if ok else ''} "
            f"| {number(row.get('speedup_over_plain'), '.2f')} | {number(row.get('acceptance'), '.3f')} "
            f"| {same_tokens(row)} "
            f"| {'' if ok else row['status']} |"
        )
    plain_step = next((t["median_step_s"] for t in report["training"] if t.get("setting") == "plain Trainer"), None)
    for record in report["training"]:
        if record["status"] != "ok":
            lines.append(f"| training | – | – | – | – | – | – | – | – | {record['status']} |")
            continue
        ratio = plain_step / record["median_step_s"] if plain_step else None
        memory = record["peak_memory_gib"]
        note = f"{record['recipe']}: {record['sharding']}; mean dropout rate {record['mean_dropout_rate']:.3f}"
        note += f"; peak {memory:.1f} GiB" if memory is not None else ""
        lines.append(
            f"| {report['settings']['train_shape']} | – | {report['settings']['train_batch_size']}×"
            f"{report['settings']['train_seq_len']} | train step | {record['setting']} "
            f"| {1000 * record['median_step_s']:.0f} ms/step | {number(ratio, '.2f')} | – | – | {note} |"
        )
    return "\n".join(lines) + "\n"


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="folder for device_check.md and device_check.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and short runs (the CPU form CI runs)")
    parser.add_argument("--models", nargs="+", help="shapes to decode with (default: the two Llama shapes)")
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.5, 0.8], help="target acceptance rates")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-speculations", type=int, default=4, help="d, drafts per round")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell (after one untimed)")
    parser.add_argument("--calibration-probes", type=int, default=8)
    parser.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--compile-backend", help="torch.compile backend; default inductor, eager with --tiny")
    parser.add_argument("--train-shape", help="default: llama-3.2-1b (tiny-1b-like with --tiny)")
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=1024)
    parser.add_argument(
        "--budget-s", type=float, default=360.0,
        help="start no cell after this many seconds (a compiling cell started just before can take a minute more)",
    )  # fmt: skip
    options = parser.parse_args(argv)
    if options.tiny:
        options.models = options.models or ["tiny-1b-like", "tiny-8b-like"]
        options.train_shape = options.train_shape or "tiny-1b-like"
        options.compile_backend = options.compile_backend or "eager"  # inductor takes ~20 s per graph on the CPU
        options.max_new_tokens, options.prompt_length, options.repeats = 16, 8, 1
        options.calibration_probes = 6
        options.train_steps, options.train_batch_size, options.train_seq_len = 3, 2, 32
    options.models = options.models or ["llama-3.2-1b", "llama-3-8b"]
    options.train_shape = options.train_shape or "llama-3.2-1b"
    options.compile_backend = options.compile_backend or "inductor"
    options.dtype = options.dtype or ("bfloat16" if options.device.startswith("cuda") else "float32")
    for shape in [*options.models, options.train_shape]:
        model_config(shape)  # an unknown shape stops here
    return options


def main(argv=None) -> int:
    options = parse_options(argv)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check = DeviceCheck(options)
    try:
        check.decode(options.models[0])
        check.train()
        for shape in options.models[1:]:
            check.decode(shape)
    finally:
        report = check.write()
    print(markdown(report))
    failed = [row for row in report["decoding"] + report["training"] if row["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
