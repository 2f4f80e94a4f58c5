"""An ensemble of seeds against its members, on the BreastMNIST test split (issue 8).

Members are runs of the shipped recipe (`data_specs/breastmnist.yaml`) with different seeds; the
ensembles combine them (`mean`, `weighted` by validation AUROC above chance, `vote`). Every model
is evaluated with the clinical report (AUROC with DeLong and bootstrap intervals), and each
ensemble is compared with each member by a paired DeLong test on the same 156 test images.

    python benchmarks/ensemble_breastmnist.py --out OUT [--runs RUN_0 RUN_1 RUN_2]

Without ``--runs`` it first trains the three seeds (about 5 CPU-minutes each here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medtransfer.evaluation.compare import compare_reports
from medtransfer.evaluation.report import evaluate
from medtransfer.spec import load_spec
from medtransfer.training.ensemble import create_ensemble
from medtransfer.training.seeds import train_seeds

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="*", type=Path, help="member runs (default: train 3 seeds)")
    args = parser.parse_args()
    spec = load_spec(REPO / "data_specs" / "breastmnist.yaml")
    runs = args.runs or [run.path for run in train_seeds(spec, args.out / "seeds", [0, 1, 2]).runs]
    reports = {}
    for run in runs:
        reports[f"member {run.name}"] = evaluate(run, spec, out_dir=args.out / "eval" / run.name)
    ensembles = {}
    for method in ("mean", "weighted", "vote"):
        path = create_ensemble(runs, args.out / f"ensemble_{method}", method=method, overwrite=True)
        ensembles[method] = path
        reports[f"ensemble {method}"] = evaluate(path, spec, out_dir=args.out / "eval" / method)

    print("| model | test AUROC (95% CI DeLong) | bootstrap 95% CI | accuracy |")
    print("| --- | --- | --- | --- |")
    for name, report in reports.items():
        d = report.metrics["discrimination"]["malignant"]
        (lo, hi), (blo, bhi) = d["auroc_ci_delong"], d["auroc_ci_bootstrap"]
        print(
            f"| {name} | {d['auroc']:.3f} ({lo:.3f}-{hi:.3f}) | {blo:.3f}-{bhi:.3f} "
            f"| {report.metrics['accuracy']:.3f} |"
        )
    print("\n| ensemble vs member | AUROC difference (95% CI) | paired DeLong p |")
    print("| --- | --- | --- |")
    for method in ensembles:
        for run in runs:
            result = compare_reports(
                reports[f"ensemble {method}"].out_dir, reports[f"member {run.name}"].out_dir
            )["classes"]["malignant"]
            lo, hi = result["difference_ci"]
            print(
                f"| {method} vs {run.name} | {result['difference']:+.3f} ({lo:+.3f} to "
                f"{hi:+.3f}) | {result['p_value']:.3f} |"
            )


if __name__ == "__main__":
    main()
