"""Compare the runs of one or more sweeps: ranked table with the differences that are within noise
marked, statistics over seeds, JSON, plots and the exp10 results/ view.

    python scripts/report.py outputs/ablation/multiruns/2026-11-26_10-00-00
    python scripts/report.py sweepA sweepB --reference mha --out reports/combined --wandb
"""

import argparse
import logging

from attnlab.report import PRIMARY, mark, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="sweep or run directories (searched recursively for jobs)")
    parser.add_argument("--out", help="where to write the report (default: the first source)")
    parser.add_argument("--reference", default=None,
                        help="configuration (or attention preset) the others are compared with "
                             "(default: the runs' report.reference, else mha)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and figures to W&B (offline without an API key)")
    parser.add_argument("--wandb-project", default="attnlab")
    parser.add_argument("--wandb-group", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wandb = {"project": args.wandb_project, "group": args.wandb_group} if args.wandb else None
    report = write_report(args.sources, args.out, reference=args.reference, wandb=wandb)
    reference = report.summary["reference"]
    for rank, label in enumerate(report.summary["ranking"], 1):
        g = report.configurations[label]
        loss = g["statistics"][PRIMARY]
        spread = f" ± {loss['std']:.4f}" if loss["std"] is not None else ""
        print(f"{rank:2d}. {label:40s} val loss {loss['mean']:.4f}{spread}  (n={g['n']})  "
              f"{mark(label, g, PRIMARY, reference)}")
    for diverged in report.summary["diverged"]:
        print(f"    DIVERGED {diverged['label']} seed {diverged['seed']} at step {diverged['diverged_at_step']}")
    for failed in report.summary["failed"]:
        error = (failed["error"] or "unknown error").splitlines()[0]
        print(f"    FAILED {failed['label']} seed {failed['seed']}: {error}")
    print(f"report: {report.out_dir / 'results.md'}")


if __name__ == "__main__":
    main()
