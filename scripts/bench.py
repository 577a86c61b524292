"""Benchmark attention mechanisms: ``python scripts/bench.py bench.attention=[mha,gqa_2]``.

Thin Hydra entry point; the work happens in :func:`attnlab.bench.run`. ``--help`` lists the
options, ``--cfg job`` prints the composed config.
"""

import hydra
from omegaconf import DictConfig

from attnlab import resolvers

resolvers.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    from attnlab.bench import run

    run(cfg)


if __name__ == "__main__":
    main()
