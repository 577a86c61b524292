"""Sample from a trained run: ``python scripts/sample.py ckpt_path=<run>/checkpoints/last.ckpt prompt="..."``.

The checkout's name for ``attnlab-sample`` (:func:`attnlab.cli.sample`; the work happens in
:func:`attnlab.sample.run`): ``--help`` lists the options. Bad input ends with one ``error: ...``
line on stderr and exit status 2.
"""

from attnlab.cli import sample

if __name__ == "__main__":
    sample()
