"""Compare the runs of one or more sweeps: ranked table, JSON and plots.

    python scripts/report.py outputs/ablation/multiruns/2026-11-26_10-00-00
    python scripts/report.py sweepA sweepB --out reports/combined --wandb
"""

import argparse
import logging

from attnlab.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="sweep or run directories (searched recursively for jobs)")
    parser.add_argument("--out", help="where to write the report (default: the first source)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plot to W&B (offline without an API key)")
    parser.add_argument("--wandb-project", default="attnlab")
    parser.add_argument("--wandb-group", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wandb = {"project": args.wandb_project, "group": args.wandb_group} if args.wandb else None
    result = write_report(args.sources, args.out, wandb=wandb)
    for rank, label in enumerate(result["ranking"], 1):
        g = result["groups"][label]
        print(f"{rank:2d}. {label:40s} val loss {g['final_val_loss']['mean']:.4f}  (n={g['n']})")
    for failed in result["failed"]:
        print(f"    FAILED {failed['label']} seed {failed['seed']}: {(failed['error'] or '').splitlines()[0]}")


if __name__ == "__main__":
    main()
