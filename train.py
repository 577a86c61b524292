"""Train one configuration: ``python train.py attention=gqa_2 model=exp10``.

Thin Hydra entry point; the work happens in :func:`attnlab.train.run`. ``--help`` lists the
config groups, ``--cfg job`` prints the composed config, ``-m`` runs a sweep.
"""

import hydra
from omegaconf import DictConfig

from attnlab import resolvers

resolvers.register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from attnlab.train import run_job

    # the value Hydra sweepers (e.g. Optuna) minimise
    return run_job(cfg)


if __name__ == "__main__":
    main()
