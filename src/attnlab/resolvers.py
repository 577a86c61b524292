"""OmegaConf resolvers used by the configs (registered by :mod:`attnlab.cli` before Hydra composes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def run_group(task_name: str) -> str:
    """W&B group of a run: ``<task>-<sweep dir name>`` for the jobs of one multirun, so a sweep's
    runs land together; the task name for single runs."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return f"{task_name}-{Path(hydra_cfg.sweep.dir).name}"
    except ValueError:  # HydraConfig not set (e.g. the compose API)
        pass
    return task_name


def register() -> None:
    OmegaConf.register_new_resolver("attnlab.run_group", run_group, replace=True)
