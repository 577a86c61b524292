"""The LightningModule: task loss + auxiliary losses, exact evaluation (loss, accuracy, both by
position), divergence detection, AdamW with cosine warmup."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.lr_scheduler import LambdaLR

from attnlab.attention import resolve_layer_attention
from attnlab.config import ModelConfig, OptimConfig, from_dict, require, to_container
from attnlab.evaluation import TokenMetrics, perplexity
from attnlab.loss import IGNORE_INDEX
from attnlab.recipe import ModelRecipe, build_optimizer, lr_schedule, training_loss

#: Optimizer steps between two reads of the divergence record. A read waits for the device, so it
#: is not done every step; it is also done before every validation and checkpoint.
DIVERGENCE_CHECK_EVERY = 8


def _rng_state() -> dict[str, Any]:
    """Global RNG states in checkpoint-safe types (tensors and ints load with ``weights_only``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LitLM(L.LightningModule):
    """A GPT trained on next-token prediction.

    Args:
        model: a validated :class:`~attnlab.recipe.ModelRecipe` (``attention`` then None), or the
            ``model`` config group (see :class:`attnlab.config.ModelConfig`), ``vocab_size`` set.
        attention: the ``attention`` config group (a mapping with ``name``, or a preset name).
        optim: an :class:`attnlab.config.OptimConfig` or the ``optim`` config group.
        compile: compile the model's forward with ``torch.compile``.

    The hyperparameters saved in checkpoints are the config groups (plain data), so
    ``LitLM.load_from_checkpoint`` rebuilds the same model without parameter matching again.

    Evaluation (validation, test, and validation at other window lengths while ``eval_length`` is
    set) sums each token's loss and correctness by position bucket (:class:`TokenMetrics`) and
    logs ``<split>/loss``, ``<split>/ppl`` and ``<split>/acc``. A non-finite training loss is
    recorded on the device and read every :data:`DIVERGENCE_CHECK_EVERY` steps and before each
    validation and checkpoint; once read, ``diverged_at_step`` is set, the trainer stops and
    evaluation while fitting becomes a no-op (nothing is computed on diverged weights).
    """

    def __init__(self, model: ModelRecipe | Mapping[str, Any], attention: Any = None,
                 optim: OptimConfig | Mapping[str, Any] | None = None, compile: bool = False):
        super().__init__()
        if isinstance(model, ModelRecipe):  # validated at start-up (train.py): nothing is parsed again
            require(attention is None, "attention", attention, "None when model is a ModelRecipe (it holds the attention)")
            recipe = model
        else:  # the config groups, as a checkpoint's hyperparameters give them (d_ff already matched)
            model_cfg = from_dict(ModelConfig, to_container(model), "model")
            recipe = ModelRecipe(model_cfg, resolve_layer_attention(to_container(attention), model_cfg))
        if not isinstance(optim, OptimConfig):
            optim = from_dict(OptimConfig, to_container(optim or {}), "optim")
        self.save_hyperparameters({"model": dataclasses.asdict(recipe.model), "attention": recipe.attention_config(),
                                   "optim": dataclasses.asdict(optim), "compile": compile})
        self.model_cfg = recipe.model
        self.optim_cfg = optim
        self.model = recipe.build()
        if compile:
            self.model.compile()
        self.val_metrics = TokenMetrics()
        self.test_metrics = TokenMetrics()
        #: At most this many tokens per evaluation forward (batches are split by rows); None: as loaded.
        self.eval_max_batch_tokens: int | None = None
        #: While set, validation runs at this window length and its results go to ``length_results``.
        self.eval_length: int | None = None
        self.length_results: dict[int, dict[str, Any]] = {}
        #: The latest validation (``step`` and :meth:`TokenMetrics.compute`'s result) and test.
        self.last_validation: dict[str, Any] | None = None
        self.last_test: dict[str, Any] | None = None
        #: First optimizer step whose training loss was not finite, once read (see check_divergence).
        self.diverged_at_step: int | None = None
        # the training losses of the steps since the last read, step s in slot (s - 1) % N (summed
        # over accumulated micro-batches: one in-place add per micro-batch, no synchronisation)
        self._recent_losses: torch.Tensor | None = None
        self._checked_at_step = 0
        #: Set by callbacks for the steps whose router/head statistics they want.
        self.record_stats = False
        self.last_stats: dict[str, torch.Tensor] | None = None
        self.val_curve: list[dict[str, float]] = []
        self.train_curve: list[dict[str, float]] = []
        self._rng_to_restore: Mapping[str, Any] | None = None
        self._last_batch_end: float | None = None
        self.timed_steps = 0
        self.timed_tokens = 0
        self.timed_seconds = 0.0

    # ------------------------------------------------------------------ steps
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, **kwargs):
        return self.model(idx, targets, **kwargs)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.model(x, y, record_stats=self.record_stats, step=self.global_step)
        loss = training_loss(out)
        if self._logging_step():
            self.log("train/loss", out.loss, prog_bar=True)
            if out.aux_losses:
                for name, value in out.aux_losses.items():
                    self.log(f"train/aux/{name}", value)
                self.log("train/total_loss", loss)
        self.last_stats = out.stats
        step = self.global_step + 1
        if self._recent_losses is None:
            self._recent_losses = torch.zeros(DIVERGENCE_CHECK_EVERY, device=loss.device)
        self._recent_losses[(step - 1) % DIVERGENCE_CHECK_EVERY] += loss.detach()
        if step % max(1, self.trainer.log_every_n_steps) == 0 or step == 1:
            self.train_curve.append({"step": step, "loss": float(out.loss.detach())})
        return loss

    def _logging_step(self) -> bool:
        """Whether the loggers write this training step's metrics. Per-step ``self.log`` calls
        are made only then: each costs Python time in Lightning's result collection (about
        0.5 ms on a CPU core, more than an exp10 step's kernel launches on a GPU take), and the
        values of the other steps would never be written."""
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is None:  # a stand-in trainer (tests): log every step
            return True
        return bool(self.trainer.fast_dev_run) or connector.should_update_logs

    # ------------------------------------------------------------------ evaluation
    def _skip_evaluation(self) -> bool:
        """Fitting after a divergence: Lightning still runs the validation that stopping triggers;
        it computes nothing on the diverged weights (a loaded checkpoint is evaluated normally)."""
        return self.diverged_at_step is not None and self.trainer.state.fn == TrainerFn.FITTING

    def _eval_step(self, batch, metric: TokenMetrics) -> None:
        if self._skip_evaluation():
            return
        x, y = batch
        rows = x.shape[0]
        if self.eval_max_batch_tokens is not None:
            rows = max(1, self.eval_max_batch_tokens // x.shape[1])
        for start in range(0, x.shape[0], rows):
            xs, ys = x[start:start + rows], y[start:start + rows]
            out = self.model(xs, ys, per_token=True)
            metric.update(out.token_loss, out.token_correct, ys != IGNORE_INDEX)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def _finish(self, metric: TokenMetrics, prefix: str) -> dict[str, Any] | None:
        """The split's results (logged under ``prefix``), or None after a divergence."""
        if self._skip_evaluation():
            metric.reset()
            return None
        result = metric.compute()
        metric.reset()
        if result["loss"] is not None:
            self.log(f"{prefix}/loss", result["loss"], prog_bar=prefix == "val")
            self.log(f"{prefix}/ppl", perplexity(result["loss"]))
        if result["acc"] is not None:
            self.log(f"{prefix}/acc", result["acc"])
        return result

    def on_validation_epoch_end(self) -> None:
        if self.eval_length is not None:
            result = self._finish(self.val_metrics, f"eval_length/{self.eval_length}")
            if result is not None:
                self.length_results[self.eval_length] = result
            return
        result = self._finish(self.val_metrics, "val")
        if result is not None and not self.trainer.sanity_checking:
            self.val_curve.append({"step": self.global_step, "loss": result["loss"], "acc": result["acc"]})
            self.last_validation = {"step": self.global_step, **result}

    def on_test_epoch_end(self) -> None:
        self.last_test = self._finish(self.test_metrics, "test")

    # ------------------------------------------------------------------ divergence
    def check_divergence(self) -> int | None:
        """The first optimizer step whose training loss was not finite, or None.

        Reads the device-side record (a synchronisation; under DDP every rank takes part, so all
        ranks stop at the same step) and, on a divergence, asks the trainer to stop."""
        if self.diverged_at_step is None and self._recent_losses is not None:
            losses = self._recent_losses.tolist()
            self._recent_losses.zero_()
            # at most DIVERGENCE_CHECK_EVERY steps since the last read, one slot each
            first_unread = max(self._checked_at_step, self.global_step - DIVERGENCE_CHECK_EVERY) + 1
            steps = range(first_unread, self.global_step + 1)
            self._checked_at_step = self.global_step
            never = self.global_step + 1
            first = next((s for s in steps if not math.isfinite(losses[(s - 1) % DIVERGENCE_CHECK_EVERY])), never)
            first = int(self.trainer.strategy.reduce(torch.tensor(first, device=self.device), reduce_op="min"))
            if first != never:
                self.diverged_at_step = first
                self.trainer.should_stop = True
        return self.diverged_at_step

    def weights_finite(self) -> bool:
        """Whether every parameter and buffer is finite (one synchronisation)."""
        from attnlab.checkpoint import nonfinite_entries

        return not nonfinite_entries(self.state_dict())

    # ------------------------------------------------------------------ throughput
    def on_train_start(self) -> None:
        self._checked_at_step = self.global_step  # a resumed run has read everything before

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Time from one batch's end to the next: the step, the data loading, logging and the
        progress bar - everything a training loop pays for - minus validation, which closes the
        window. No device synchronisation per step (it would stop the host from queueing the
        next step while the GPU works): the window is closed by one synchronisation, so its
        total time is exact even though single steps are timed as the host issued them."""
        timed = self._last_batch_end is not None and batch_idx >= 2
        if not timed and self.device.type == "cuda":
            torch.cuda.synchronize()  # this batch end may open a window: none of its work may leak in
        now = time.perf_counter()
        # the first steps pay for allocation and compilation; they are not timed
        if timed:
            self.timed_steps += 1
            self.timed_tokens += batch[0].numel()
            self.timed_seconds += now - self._last_batch_end
        self._last_batch_end = now
        if self.global_step - self._checked_at_step >= DIVERGENCE_CHECK_EVERY:
            self.check_divergence()

    def _close_timing_window(self) -> None:
        """Add the time the device still needed for the window's queued work."""
        if self._last_batch_end is not None and self.timed_steps > 0 and self.device.type == "cuda":
            torch.cuda.synchronize()
            self.timed_seconds += time.perf_counter() - self._last_batch_end
        self._last_batch_end = None

    def on_validation_start(self) -> None:
        self._close_timing_window()
        self.check_divergence()

    def on_train_end(self) -> None:
        self._close_timing_window()
        # a divergence in the last steps, or an update that made the weights non-finite although
        # its loss was finite (the next loss would not be)
        if self.check_divergence() is None and not self.weights_finite():
            self.diverged_at_step = self.global_step

    @property
    def tokens_per_second(self) -> float | None:
        """Training tokens per second on this process (world size times this across ranks)."""
        return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg, self.device)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        scheduler = LambdaLR(optimizer, lr_schedule(self.optim_cfg, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.optim_cfg.grad_clip is None and gradient_clip_val is None:
            return
        max_norm = gradient_clip_val or self.optim_cfg.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        if self._logging_step():
            self.log("train/grad_norm", norm)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["attnlab"] = {
            "rng": _rng_state(),
            "val_curve": self.val_curve,
            "train_curve": self.train_curve,
        }
        # the tokenizer, so that scripts/sample.py can turn ids into text from the checkpoint alone
        tokenizer_spec = getattr(getattr(self._trainer, "datamodule", None), "tokenizer_spec", None)
        if tokenizer_spec is not None:
            checkpoint["attnlab"]["tokenizer"] = tokenizer_spec()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("attnlab", {})
        self._rng_to_restore = extra.get("rng")
        self.val_curve = list(extra.get("val_curve", []))
        self.train_curve = list(extra.get("train_curve", []))

