"""Does an image folder train like the built-in set it was written from? Issue 20's "same numbers" check.

Runs one recipe twice with the same seed, once on the built-in ``fashion-mnist`` and once on the same images
written as a PNG folder (``imagefolder:DIR``; write one with
``python scripts/bench_imagefolder.py --make-fashion-pngs DIR``), and prints each stage's test accuracy side
by side with the difference. The two runs are not expected to be identical: the folder's normalisation is
measured from its PNGs (the built-in set uses fixed constants) and its images are read from kdc's image cache
in their own order, so the batches differ. The target is each stage within 0.5 point. Latency and export are
switched off (they do not change accuracies). Example::

    python scripts/imagefolder_same_numbers.py /tmp/fmnist-png --workdir /tmp/same-numbers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.5  # points


def run(recipe: dict, name: str, dataset: str, work: Path) -> dict:
    doc = json.loads(json.dumps(recipe))  # a deep copy
    doc.setdefault("run", {})["name"] = name
    doc.setdefault("data", {})["dataset"] = dataset
    doc.setdefault("report", {})["latency"] = False
    doc.pop("export", None)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdcompress", "run", str(path), "--quiet"], cwd=work, check=True)
    report = json.loads((work / "runs" / name / "report.json").read_text())
    return {"seconds": time.perf_counter() - started, "report": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Fashion-MNIST written as a PNG folder (train/, test/)")
    parser.add_argument("--workdir", type=Path, default=Path("same-numbers"))
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fashion-mnist-mlp.yaml")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(args.recipe.read_text())
    builtin = run(recipe, "builtin", "fashion-mnist", work)
    folder = run(recipe, "folder", f"imagefolder:{args.folder.resolve()}", work)
    rows = []
    for stage in builtin["report"]["stages"]:
        other = next(s for s in folder["report"]["stages"] if s["stage"] == stage["stage"])
        a, b = 100 * stage["accuracy"], 100 * other["accuracy"]
        rows.append({"stage": stage["stage"], "builtin": round(a, 2), "folder": round(b, 2), "diff": round(b - a, 2)})
        print(f"{stage['stage']:10s} built-in {a:6.2f} %   folder {b:6.2f} %   difference {b - a:+.2f} point")
    worst = max(abs(r["diff"]) for r in rows)
    print(
        f"largest difference {worst:.2f} point (target <= {TARGET}); run times {builtin['seconds']:.0f} s and "
        f"{folder['seconds']:.0f} s; folder input {folder['report'].get('input')}"
    )
    print(
        json.dumps(
            {
                "recipe": str(args.recipe),
                "rows": rows,
                "largest_difference": worst,
                "target": TARGET,
                "seconds": [round(builtin["seconds"]), round(folder["seconds"])],
            }
        )
    )
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
