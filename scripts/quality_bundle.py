"""Bundle the run reports of a `bahe compare --seeds` folder for the trip back from the GPU machine:
<out>/runs.json (every `<kind>-seed<s>.json`, without the repeated config and environment, which are kept
once) and <out>/curves.png (validation AUC and training loss per epoch, one panel per model kind, a line per
seed). Usage: python scripts/quality_bundle.py COMPARE_FOLDER OUT_FOLDER"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def main(folder: Path, out: Path) -> None:
    reports = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*-seed*.json"))}
    if not reports:
        raise SystemExit(f"no <kind>-seed<s>.json reports in {folder}")
    first = next(iter(reports.values()))
    bundle = {"config": first["config"], "environment": first["environment"],
              "runs": {name: {k: v for k, v in r.items() if k not in ("config", "environment")}
                       for name, r in reports.items()}}
    (out / "runs.json").write_text(json.dumps(bundle, indent=1) + "\n")
    kinds = sorted({r["model_kind"] for r in reports.values()})
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.2 * len(kinds), 6), squeeze=False, sharey="row")
    for column, kind in enumerate(kinds):
        for name, report in reports.items():
            if report["model_kind"] != kind:
                continue
            epochs = [e["epoch"] for e in report["epochs"]]
            seed = name.rsplit("-seed", 1)[1]
            axes[0, column].plot(epochs, [e["val_auc"] for e in report["epochs"]], marker="o", label=f"seed {seed}")
            axes[1, column].plot(epochs, [e["train_loss"] for e in report["epochs"]], marker="o", label=f"seed {seed}")
        axes[0, column].set_title(kind)
        axes[1, column].set_xlabel("epoch")
        for axis in axes[:, column]:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, column].legend(fontsize=7)
    axes[0, 0].set_ylabel("validation AUC")
    axes[1, 0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    print(f"bundled {len(reports)} runs of {kinds}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
