"""Command-line entry points: ``attnlab-train``, ``attnlab-bench``, ``attnlab-sample`` and
``attnlab-report`` ([project.scripts] in pyproject.toml), and behind them ``train.py``,
``scripts/bench.py``, ``scripts/sample.py`` and ``scripts/report.py`` in a checkout.

The Hydra commands compose the config tree shipped inside the package
(:data:`attnlab.paths.CONF_DIR`), so they behave the same from any working directory: runs go
under ``./outputs`` of the directory they are started in, ``--config-dir DIR`` adds a user's
config directory (``DIR/attention/*.yaml``, ``DIR/experiment/*.yaml``) to the packaged one, and
``imports=[my_project.my_attention]`` imports the modules that register the user's mechanisms.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from attnlab import resolvers
from attnlab.errors import one_line_errors
from attnlab.paths import CONF_DIR

resolvers.register()


def hydra_command(config_name: str, target: str) -> Callable[[], Any]:
    """A Hydra command over the packaged config ``config_name`` (``--help``, ``--cfg job``, ``-m``
    and every override) that calls ``target`` (``"module:function"``) with the composed config.

    The target is imported when a job starts, so ``--help`` does not import torch. Its return value
    is the job's return value: the number that sweepers such as Optuna minimise."""
    module_name, function_name = target.split(":")

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def command(cfg: DictConfig) -> Any:
        with one_line_errors():  # bad input: one line and exit status 2 (attnlab.errors)
            return getattr(importlib.import_module(module_name), function_name)(cfg)

    return command


#: ``attnlab-train``: one run or, with ``-m``, a sweep (see :func:`attnlab.train.run_job`).
train = hydra_command("train", "attnlab.train:run_job")
#: ``attnlab-bench``: the efficiency benchmark (see :func:`attnlab.bench.runner.run`).
bench = hydra_command("bench", "attnlab.bench:run")
#: ``attnlab-sample``: text from a run's checkpoint (see :func:`attnlab.sample.run`).
sample = hydra_command("sample", "attnlab.sample:run")


REPORT_DESCRIPTION = """\
Compare the runs of one or more sweeps: ranked table with the differences that are within noise
marked, statistics over seeds, JSON, plots and the exp10 results/ view.

    %(prog)s outputs/ablation/multiruns/2026-11-26_10-00-00
    %(prog)s sweepA sweepB --reference mha --out reports/combined --wandb
"""


def report(argv: list[str] | None = None) -> None:
    """``attnlab-report <sweep dirs> [--reference mha] [--out DIR] [--wandb]``: write the report of
    :func:`attnlab.report.write_report` and print the ranking."""
    from attnlab.report import PRIMARY, mark, write_report

    parser = argparse.ArgumentParser(description=REPORT_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="sweep or run directories (searched recursively for jobs)")
    parser.add_argument("--out", help="where to write the report (default: the first source)")
    parser.add_argument("--reference", default=None,
                        help="configuration (or attention preset) the others are compared with "
                             "(default: the runs' report.reference, else mha)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and figures to W&B (offline without an API key)")
    parser.add_argument("--wandb-project", default="attnlab")
    parser.add_argument("--wandb-group", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wandb = {"project": args.wandb_project, "group": args.wandb_group} if args.wandb else None
    with one_line_errors():
        result = write_report(args.sources, args.out, reference=args.reference, wandb=wandb)
    reference = result.summary["reference"]
    for rank, label in enumerate(result.summary["ranking"], 1):
        g = result.configurations[label]
        loss = g["statistics"][PRIMARY]
        spread = f" ± {loss['std']:.4f}" if loss["std"] is not None else ""
        print(f"{rank:2d}. {label:40s} val loss {loss['mean']:.4f}{spread}  (n={g['n']})  "
              f"{mark(label, g, PRIMARY, reference)}")
    for diverged in result.summary["diverged"]:
        print(f"    DIVERGED {diverged['label']} seed {diverged['seed']} at step {diverged['diverged_at_step']}")
    for failed in result.summary["failed"]:
        error = (failed["error"] or "unknown error").splitlines()[0]
        print(f"    FAILED {failed['label']} seed {failed['seed']}: {error}")
    print(f"report: {result.out_dir / 'results.md'}")
