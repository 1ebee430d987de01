"""Did `kdc distill`'s epoch get slower between two versions? Their whole-process marginal epochs, interleaved.

For each version (a source tree holding ``kdcompress/``), a run directory of the shipped MLP recipe is prepared
once with that version (``kdc train-teacher`` with a 2-epoch teacher, then a 1-epoch ``kdc distill`` that builds
the logit cache, whose distilled stage is removed). Then, round after round, each version runs ``kdc distill``
for 2 and for 12 epochs in fresh copies of its directory; the marginal epoch is the difference over 10. The
versions take turns and the order turns each round, so a machine whose speed wanders slows both alike.
``scripts/bench.py`` gives the absolute figure; this script answers "is it the code or the machine". Each
version runs with its tree first on ``PYTHONPATH``; an editable install of kdcompress in the environment would
win over it, so run this from an environment without one, or with ``--pythonpath-extra`` naming a folder
whose ``sitecustomize.py`` removes it. Example::

    git worktree add /tmp/old 0c55feb
    python scripts/bench_cli_ab.py /tmp/old . --rounds 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SHORT, LONG = 2, 12


def _env(tree: Path, extra: str | None, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), extra]))
    env["KDC_CACHE"] = str(cache)
    return env


def _kdc(env: dict, folder: Path, *args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kdcompress", *args], cwd=folder, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"`kdc {' '.join(args)}` failed in {folder}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def _prepare(tree: Path, env: dict, base: Path) -> None:
    recipe = yaml.safe_load((tree / "recipes" / "fashion-mnist-mlp.yaml").read_text(encoding="utf-8"))
    recipe["teacher"]["epochs"] = 2
    recipe["run"]["name"] = "ab"
    base.mkdir(parents=True)
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    _kdc(env, base, "train-teacher", "recipe.yaml")
    _kdc(env, base, "distill", "recipe.yaml", "--set", "distill.epochs=1")
    shutil.rmtree(base / "runs" / "ab" / "distilled")


def _marginal(env: dict, base: Path, work: Path, reverse: bool) -> float:
    seconds = {}
    for epochs in (LONG, SHORT) if reverse else (SHORT, LONG):
        folder = work / f"copy-{epochs}"
        shutil.copytree(base, folder)
        try:
            seconds[epochs] = _kdc(
                env, folder, "distill", "recipe.yaml", "--set", f"distill.epochs={epochs}", "--set", "run.device=cpu"
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return (seconds[LONG] - seconds[SHORT]) / (LONG - SHORT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the first version's source tree")
    parser.add_argument("new", type=Path, help="the second version's source tree")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pythonpath-extra", help="a folder put on PYTHONPATH after each tree")
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    with tempfile.TemporaryDirectory(prefix="kdc-ab-") as tmp:
        work = Path(tmp)
        envs = {name: _env(tree, args.pythonpath_extra, work / f"cache-{name}") for name, tree in trees.items()}
        for name, tree in trees.items():
            _prepare(tree, envs[name], work / f"base-{name}")
            print(f"prepared {name} ({tree})", flush=True)
        marginal: dict[str, list[float]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name in list(trees) if r % 2 == 0 else list(reversed(trees)):
                marginal[name].append(_marginal(envs[name], work / f"base-{name}", work, reverse=r % 2 == 1))
                print(f"round {r + 1} {name}: marginal epoch {marginal[name][-1]:.3f} s", flush=True)
    for name, values in marginal.items():
        print(
            f"{name}: median marginal epoch {statistics.median(values):.3f} s ({', '.join(f'{v:.2f}' for v in values)})"
        )
    ratios = [n / o for o, n in zip(marginal["old"], marginal["new"])]
    print(
        f"new / old, paired by round: median {statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})"
    )


if __name__ == "__main__":
    main()
