"""Compare the runs of one or more sweeps: ``python scripts/report.py <sweep dir> [...] [--reference mha]``.

The checkout's name for ``attnlab-report`` (:func:`attnlab.cli.report`); ``--help`` lists the options.
"""

from attnlab.cli import report

if __name__ == "__main__":
    report()
