"""Benchmark attention mechanisms: ``python scripts/bench.py bench.attention=[mha,gqa_2]``.

The checkout's name for ``attnlab-bench`` (:func:`attnlab.cli.bench`; the work happens in
:func:`attnlab.bench.run`): ``--help`` lists the options, ``--cfg job`` prints the composed config.
"""

from attnlab.cli import bench

if __name__ == "__main__":
    bench()
