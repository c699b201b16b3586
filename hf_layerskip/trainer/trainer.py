"""`LayerSkipTrainer`: a `Trainer` whose training loss is the LayerSkip recipe (arXiv 2404.16710, section 4).

Only the loss changes: layer dropout drawn from a generator seeded by `(args.seed, step, micro-batch)`, and the
early-exit loss over the exits the curriculum selects, optionally distilled from the model with its adapters
disabled (`distillation_weight`). Evaluation keeps the plain last-layer loss. Per-exit losses,
the number of active exits and the mean dropout rate go out through the Trainer's normal logging.
"""

from collections import defaultdict

import torch
from transformers import Trainer

from .early_exit_loss import early_exit_loss_sums
from .layer_dropout_schedule import layer_dropout_generator
from .training_args import LayerSkipTrainingArguments, resolve_layerskip_recipe


def layerskip_base_model(model):
    """The LayerSkip causal LM inside `model` (itself, or the model a `PeftModel` wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "exit_logits"):
        raise TypeError(
            f"LayerSkipTrainer needs a model with `exit_logits` (a LayerSkip causal LM), got {type(base).__name__}."
        )
    return base


class LayerSkipTrainer(Trainer):
    """A `Trainer` that trains with layer dropout and the early-exit loss.

    `args` may be a [`LayerSkipTrainingArguments`] (a plain `TrainingArguments` means "all settings from the model
    config"). When layer dropout is on and `ddp_find_unused_parameters` is unset, it is set to `True`: a layer that
    every sample of a batch skips has no gradient in that step.
    """

    def __init__(self, model=None, args: LayerSkipTrainingArguments | None = None, *positional, **kwargs):
        if model is None:
            raise ValueError("LayerSkipTrainer needs `model` (a LayerSkip causal LM, or a PeftModel of one).")
        args = args if args is not None else LayerSkipTrainingArguments(output_dir="trainer_output")
        self.layerskip_recipe = resolve_layerskip_recipe(args, layerskip_base_model(model).config)
        if self.layerskip_recipe.distillation_weight > 0 and not hasattr(model, "disable_adapter"):
            raise ValueError(
                f"`distillation_weight` = {self.layerskip_recipe.distillation_weight} distils from the model with its "
                f"adapters disabled, so it needs a PeftModel (e.g. a LoRA adapter); got {type(model).__name__}. "
                "Use distillation_weight=0 to train all weights."
            )
        if self.layerskip_recipe.layer_dropout.enabled and args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True
        super().__init__(model, args, *positional, **kwargs)
        self._layerskip_metrics = defaultdict(list)
        self._dropout_draw = (-1, 0)  # (optimizer step, micro-batches drawn in it)

    # Override: the LayerSkip loss in training; the plain last-layer loss in evaluation.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        recipe, step, max_steps = self.layerskip_recipe, self.state.global_step, self.state.max_steps
        exits, weights = recipe.exits(step, max_steps)  # (K,) layer indices, (K,) weights
        dropout_rates = recipe.layer_dropout.rates(step, max_steps)

        inputs = dict(inputs)
        labels = inputs.pop("labels")  # (batch_size, seq_len)
        outputs = model(
            **inputs,
            use_cache=False,
            logits_to_keep=1,  # the last layer's loss comes from its hidden states, in chunks
            output_layer_hidden_states=True,
            layer_dropout_rates=dropout_rates,
            layer_dropout_generator=self._next_dropout_generator(step),
        )
        unwrapped = self.accelerator.unwrap_model(model)
        exit_logits = layerskip_base_model(unwrapped).exit_logits
        teacher_hidden, teacher_exit_logits = None, None
        if recipe.distillation_weight > 0:
            teacher_hidden = self._teacher_hidden_states(unwrapped, inputs)  # (batch_size, seq_len, hidden)

            def teacher_exit_logits(hidden_rows):
                with unwrapped.disable_adapter():
                    return exit_logits(hidden_rows)

        with self.accelerator.autocast():
            loss_sums, num_targets = early_exit_loss_sums(
                exit_logits,
                [outputs.layer_hidden_states[layer] for layer in exits],
                labels,
                inputs.get("attention_mask"),
                recipe.loss_chunk_size,
                teacher_hidden,
                teacher_exit_logits,
                recipe.distillation_weight,
            )  # (K,), ()
        # Normalised over the whole accumulated batch when the Trainer counted it, else over this micro-batch.
        denominator = num_items_in_batch if num_items_in_batch is not None else num_targets.clamp(min=1)
        loss = (weights.to(loss_sums) * loss_sums).sum() / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes

        self._record_metrics(exits, loss_sums.detach() / num_targets.clamp(min=1), dropout_rates)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _teacher_hidden_states(peft_model, inputs) -> torch.Tensor:
        """The last layer's outputs `(batch_size, seq_len, hidden_size)` of the model without its adapters (or
        their dropout) and without layer dropout; outside DDP, which has no gradients to synchronise here."""
        no_dropout = [0.0] * layerskip_base_model(peft_model).config.num_hidden_layers  # else the config's in training
        with torch.no_grad(), peft_model.disable_adapter():
            outputs = peft_model(
                **inputs,
                use_cache=False,
                logits_to_keep=1,
                output_layer_hidden_states=True,
                layer_dropout_rates=no_dropout,
            )
        return outputs.layer_hidden_states[-1]

    def _next_dropout_generator(self, step: int) -> torch.Generator:
        last_step, draws = self._dropout_draw
        draw = draws if step == last_step else 0
        self._dropout_draw = (step, draw + 1)
        return layer_dropout_generator(self.args.seed, step, draw)

    def _record_metrics(self, exits, exit_losses, dropout_rates):
        for layer, exit_loss in zip(exits, exit_losses):
            self._layerskip_metrics[f"early_exit_loss/layer_{layer}"].append(exit_loss)
        self._layerskip_metrics["early_exit/active_exits"].append(torch.tensor(float(len(exits))))
        self._layerskip_metrics["layer_dropout/mean_rate"].append(torch.tensor(sum(dropout_rates) / len(dropout_rates)))

    # Override: add the LayerSkip metrics, averaged since the last training log and over processes.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._layerskip_metrics:
            names = sorted(self._layerskip_metrics, key=_metric_order)
            means = torch.stack([torch.stack(self._layerskip_metrics[name]).float().mean().cpu() for name in names])
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means.to(self.accelerator.device), reduction="mean").cpu()
            logs.update({name: round(value, 6) for name, value in zip(names, means.tolist())})
            self._layerskip_metrics.clear()
        super().log(logs, start_time)


def _metric_order(name: str):
    prefix, _, suffix = name.rpartition("_")
    return (prefix, int(suffix)) if suffix.isdigit() else (name, -1)
