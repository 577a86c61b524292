"""Train one configuration: ``python train.py attention=gqa_2 model=exp10``.

The checkout's name for ``attnlab-train`` (:func:`attnlab.cli.train`): ``--help`` lists the config
groups, ``--cfg job`` prints the composed config, ``-m`` runs a sweep.
"""

from attnlab.cli import train

if __name__ == "__main__":
    train()
