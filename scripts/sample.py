"""Sample from a trained run: ``python scripts/sample.py ckpt_path=<run>/checkpoints/last.ckpt prompt="..."``.

Thin Hydra entry point; the work happens in :func:`attnlab.sample.run`. Bad input ends with one
``error: ...`` line on stderr and exit status 2.
"""

import sys

import hydra
from omegaconf import DictConfig

from attnlab import resolvers

resolvers.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from attnlab.sample import cli

    status = cli(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
