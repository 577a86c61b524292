"""The training run behind ``train.py``: validate, load data, fit, test, evaluate at other lengths,
write the run's results.

A run whose training loss becomes non-finite stops within a few steps and is a result, not a
crash: ``metrics.json`` says ``status: diverged`` and ``diverged_at_step``, the last finite
checkpoints stay, and the test split is evaluated on the best finite checkpoint (or skipped).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from attnlab.config import (
    MATMUL_PRECISIONS,
    PRECISIONS,
    ConfigError,
    EvalConfig,
    OptimConfig,
    from_dict,
    import_modules,
    require,
    to_container,
)
from attnlab.errors import InputError
from attnlab.evaluation import perplexity
from attnlab.io import read_json, write_json
from attnlab.recipe import ModelRecipe, model_recipe

log = logging.getLogger("attnlab")



@dataclass
class RunSetup:
    """Everything validated at start-up, before any data is loaded."""

    model: ModelRecipe
    optim: OptimConfig
    evaluation: EvalConfig
    datamodule: Any
    output_dir: Path


def validate(cfg: DictConfig) -> RunSetup:
    """Check the whole composed config; raise :class:`ConfigError` naming the first bad field."""
    from attnlab.checkpoint import checkpoint_problem
    from attnlab.data.datamodule import check_block_size

    import_modules(to_container(cfg.get("imports")))  # the user's mechanisms register themselves first
    require(isinstance(cfg.get("seed"), int), "seed", cfg.get("seed"), "an integer")
    require(cfg.get("matmul_precision") in MATMUL_PRECISIONS, "matmul_precision", cfg.get("matmul_precision"),
            " | ".join(MATMUL_PRECISIONS))
    require(isinstance(cfg.get("compile"), bool), "compile", cfg.get("compile"), "true | false")
    precision = cfg.get("precision")
    require(precision is None or str(precision) in PRECISIONS, "precision", precision,
            "null (the trainer's default) | " + " | ".join(PRECISIONS))
    require(str(cfg.trainer.get("precision")) in PRECISIONS, "trainer.precision", cfg.trainer.get("precision"),
            " | ".join(PRECISIONS))
    max_steps = cfg.trainer.get("max_steps", -1)
    require(isinstance(max_steps, int) and (max_steps >= 1 or max_steps == -1), "trainer.max_steps", max_steps,
            "an integer >= 1 (or -1 for one pass over the training split)")
    model = model_recipe(to_container(cfg.model), to_container(cfg.attention))
    optim = from_dict(OptimConfig, to_container(cfg.optim), "optim")
    evaluation = from_dict(EvalConfig, to_container(cfg.get("eval") or {}), "eval")
    datamodule = instantiate_node(cfg.data)
    check_block_size(datamodule.block_size, model.model.max_seq_len)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        problem = checkpoint_problem(ckpt_path)
        require(problem is None, "ckpt_path", ckpt_path,
                "null or a checkpoint written by train.py, e.g. <run dir>/checkpoints/last.ckpt", reason=problem)
    return RunSetup(model, optim, evaluation, datamodule, Path(cfg.paths.output_dir))


def instantiate_node(node: DictConfig) -> Any:
    """``hydra.utils.instantiate`` that lets bad input through as itself: Hydra wraps what a
    target raises in an ``InstantiationException``, which would turn a one-line
    :class:`~attnlab.errors.InputError` (a data option, say) into a traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, InputError):
            raise error.__cause__ from None
        raise


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate_node(node) for node in group.values() if node is not None and "_target_" in node]


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, validate, test and evaluate at ``eval.lengths`` one configuration; returns (and
    writes) its ``metrics.json``."""
    import lightning as L

    from attnlab.checkpoint import AtomicCheckpointIO
    from attnlab.lit_module import LitLM

    started = time.time()
    # Lightning prints through its own handler and, via propagation, through Hydra's: keep one.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    setup = validate(cfg)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = setup.datamodule
    corpus = datamodule.prepare_corpus()
    recipe = setup.model
    if recipe.model.vocab_size is None:
        recipe = recipe.with_model(vocab_size=corpus.vocab_size)
    elif recipe.model.vocab_size < corpus.vocab_size:
        raise ConfigError("model.vocab_size", recipe.model.vocab_size,
                          f"null or >= the tokenizer's {corpus.vocab_size} ids")
    module = LitLM(recipe, optim=setup.optim, compile=cfg.compile)
    module.eval_max_batch_tokens = setup.evaluation.max_batch_tokens

    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger; logger=none should still train
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer_overrides: dict[str, Any] = {"use_distributed_sampler": False, "plugins": [AtomicCheckpointIO()]}
    if cfg.get("precision") is not None:
        trainer_overrides["precision"] = cfg.precision
    from hydra.utils import instantiate

    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_overrides)

    params = module.model.parameter_counts()
    resolved = to_container(cfg)
    if trainer.is_global_zero:
        setup.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(setup.output_dir / "config.json", resolved)
        log.info("parameters: %s", params)
    for logger in trainer.loggers:
        logger.log_hyperparams({**resolved, "params": params})

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.time() - started
    diverged_at = module.diverged_at_step
    last = module.last_validation
    if (diverged_at is None and trainer.limit_val_batches and not trainer.fast_dev_run
            and (last is None or last["step"] != trainer.global_step)):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    # curves and speed before test() possibly reloads the best checkpoint (and its older curves)
    val_curve, train_curve = list(module.val_curve), list(module.train_curve)
    final = module.last_validation if diverged_at is None else None
    tokens_per_second = module.tokens_per_second

    # The test split runs on the best checkpoint by validation loss, which is never a non-finite
    # one (attnlab.checkpoint); without checkpoints, on the final weights unless they diverged.
    best_path = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "best_model_path", "")), "")
    lengths = setup.evaluation.lengths
    test, test_checkpoint, test_skipped, final_weights = None, None, None, None
    if diverged_at is not None and not best_path:
        test_skipped = f"the run diverged at step {diverged_at} before a finite checkpoint was written"
    else:
        test_checkpoint = Path(best_path).name if best_path else "final weights"
        if best_path and lengths and diverged_at is None:  # eval.lengths evaluates the final weights
            final_weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        test = module.last_test
        if final_weights is not None:
            module.load_state_dict(final_weights)

    from attnlab.evaluation import evaluate_lengths

    not_applicable = None
    if diverged_at is not None:
        not_applicable = f"the run diverged at step {diverged_at}: the final weights are not finite"
    elif not trainer.limit_val_batches:
        not_applicable = "validation is disabled (trainer.limit_val_batches=0)"
    eval_lengths = evaluate_lengths(trainer, module, datamodule, lengths, datamodule.block_size, not_applicable)

    world = trainer.world_size
    final_loss = final["loss"] if final else None
    finite_curve = [p for p in val_curve if p["loss"] is not None and math.isfinite(p["loss"])]
    best_val = min((p["loss"] for p in finite_curve), default=None)
    best_acc = max((p["acc"] for p in val_curve if p.get("acc") is not None), default=None)
    metrics = {
        "status": "completed" if diverged_at is None else "diverged",
        "diverged_at_step": diverged_at,
        "attention": to_container(cfg.attention),
        "attention_preset": cfg.get("attention_preset"),
        "model": cfg.model.get("name"),
        "seed": cfg.seed,
        "overrides": overrides or [],
        "steps": trainer.global_step,
        "final_val_loss": final_loss,
        "final_val_ppl": perplexity(final_loss),
        "final_val_acc": final["acc"] if final else None,
        "best_val_loss": best_val,
        "best_val_acc": best_acc,
        "test_loss": test["loss"] if test else None,
        "test_ppl": perplexity(test["loss"]) if test else None,
        "test_acc": test["acc"] if test else None,
        "test_checkpoint": test_checkpoint,
        "test_skipped": test_skipped,
        "val_curve": val_curve,
        "train_curve": train_curve,
        "train_steps": [p["step"] for p in train_curve],
        "train_loss": [p["loss"] for p in train_curve],
        "val_loss_by_position": final["by_position"] if final else None,
        "test_loss_by_position": test["by_position"] if test else None,
        "eval_lengths": eval_lengths,
        "train_tokens_per_sec": tokens_per_second * world if tokens_per_second else None,
        "params": params,
        "param_matching": recipe.param_matching,
        "kv_cache_bytes_per_token": module.model.cache_bytes(1, module.model_cfg.max_seq_len, torch.float32)
        / module.model_cfg.max_seq_len,
        "wall_time_s": time.time() - started,
        "fit_time_s": fit_seconds,
        "world_size": world,
        "output_dir": str(setup.output_dir),
        **_peak_memory_mb(module.device),
    }
    if trainer.is_global_zero:
        write_json(setup.output_dir / "metrics.json", metrics)
        if diverged_at is not None:
            log.warning("training diverged: the loss was not finite at step %d; stopped at step %d; test: %s",
                        diverged_at, trainer.global_step, test_skipped or f"on {metrics['test_checkpoint']}")
        else:
            log.info("final validation loss %s, test loss %s, %s tokens/s", final_loss, metrics["test_loss"],
                     metrics["train_tokens_per_sec"])
    return metrics


def _set_flush_denormal(cfg: DictConfig) -> None:
    """``flush_denormal``: treat denormal floats as zero on CPU (x86 FTZ/DAZ; a no-op elsewhere).

    A confident softmax leaves probabilities and their gradients below float32's smallest normal
    number (1.2e-38), and every arithmetic operation on such a denormal takes microcode assists: a
    512 x 512 matmul of denormals took 1.6 s instead of 9 ms on one core here. Threads inherit the
    mode when they are created, so this runs before anything starts the intra-op thread pool."""
    flush = cfg.get("flush_denormal", True)
    require(isinstance(flush, bool), "flush_denormal", flush, "true | false")
    if flush and not torch.set_flush_denormal(True):
        log.info("flush_denormal: this CPU has no flush-to-zero mode; denormals stay")


def _set_threads(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Intra-op threads: ``threads`` when set; under the joblib launcher, the cores divided among the
    parallel jobs so they do not oversubscribe the CPU."""
    threads = cfg.get("threads")
    if threads is None and hydra_cfg is not None:
        launcher = hydra_cfg.get("launcher") or {}
        if "joblib" in str(launcher.get("_target_", "")).lower():
            n_jobs = launcher.get("n_jobs") or -1
            cores = os.cpu_count() or 1
            n_jobs = cores if n_jobs < 0 else n_jobs
            threads = max(1, cores // max(1, n_jobs))
    if threads:
        torch.set_num_threads(int(threads))
        log.info("using %d intra-op threads", threads)


def objective(metrics: dict[str, Any], cfg: DictConfig) -> float | None:
    """The value sweepers optimise: NaN for a diverged run (Optuna records it as a failed trial)."""
    if metrics.get("status") == "diverged":
        return float("nan")
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if value is not None else None


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job: :func:`run` with the bookkeeping a sweep needs.

    * A failure writes ``metrics.json`` with ``status: failed``, the error and its traceback. In a
      multirun the sweep goes on (the report lists the job as failed); a single run re-raises.
    * ``+resume_sweep=true`` skips a job whose ``metrics.json`` says completed or diverged (a
      result too) and resumes an unfinished one from its ``last.ckpt`` (re-run the sweep with the
      same ``hydra.sweep.dir``).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    output_dir = Path(cfg.paths.output_dir)
    is_rank_zero = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"

    if cfg.get("resume_sweep"):
        previous = _read_metrics(output_dir)
        if previous.get("status") in ("completed", "diverged"):
            log.info("resume_sweep: %s already %s, skipping", output_dir, previous["status"])
            return objective(previous, cfg)
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file() and cfg.get("ckpt_path") is None:
            log.info("resume_sweep: resuming %s from %s", output_dir, last)
            with open_dict(cfg):
                cfg.ckpt_path = str(last)
    _set_flush_denormal(cfg)
    _set_threads(cfg, hydra_cfg)
    try:
        metrics = run(cfg, overrides)
    except BaseException as error:
        if is_rank_zero:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            write_json(output_dir / "metrics.json", {
                "status": status, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(),
                "attention_preset": cfg.get("attention_preset"), "seed": cfg.get("seed"), "overrides": overrides,
                "output_dir": str(output_dir)})
        if multirun and isinstance(error, Exception):
            log.error("job failed (the sweep continues): %s: %s", type(error).__name__, error)
            return float("nan")
        raise
    return objective(metrics, cfg)


def _read_metrics(output_dir: Path) -> dict[str, Any]:
    return read_json(output_dir / "metrics.json") or {}
