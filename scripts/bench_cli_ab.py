"""Did `kdc distill`'s epoch get slower between two versions? Their whole-process marginal epochs, interleaved.

For each version (a source tree holding ``kdcompress/``), a run directory of the shipped MLP recipe is prepared
once with that version (``kdc train-teacher`` with a 2-epoch teacher, then a 1-epoch ``kdc distill`` that builds
the logit cache, whose distilled stage is removed). Then, round after round, each version runs ``kdc distill``
for 2 and for 12 epochs in fresh copies of its directory; the marginal epoch is the difference over 10. The
versions take turns and the order turns each round, so a machine whose speed wanders slows both alike.
``scripts/bench.py`` gives the absolute figure; this script answers "is it the code or the machine", with
bench.py's own CLI runner (``Cli``, ``cli_round``), each version's environment set to its tree. Each
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
import tempfile
from pathlib import Path

import yaml
from bench import (
    RUN_NAME,
    SHORT_EPOCHS,
    Cli,
    cli_env,
    cli_round,
)  # scripts/bench.py: this script's folder is on sys.path

LONG = 12


def _cli(tree: Path, extra: str | None, work: Path) -> Cli:
    """bench.py's runner with ``tree`` (then ``extra``) on PYTHONPATH instead of this kdcompress, and a cache of
    its own."""
    cli = Cli(work, ["run.device=cpu"])
    cli.env = {**cli_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), extra])), "KDC_CACHE": str(work)}
    return cli


def _prepare(tree: Path, cli: Cli, base: Path) -> None:
    """bench.py's cached run directory, from the version's own MLP recipe (an older kdc may not read today's)."""
    recipe = yaml.safe_load((tree / "recipes" / "fashion-mnist-mlp.yaml").read_text(encoding="utf-8"))
    recipe["teacher"]["epochs"] = 2
    recipe["run"]["name"] = RUN_NAME
    base.mkdir(parents=True)
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    cli.run(base, "train-teacher")
    cli.run(base, "distill", "--set", "distill.epochs=1")  # builds the logit cache
    shutil.rmtree(base / "runs" / RUN_NAME / "distilled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the first version's source tree")
    parser.add_argument("new", type=Path, help="the second version's source tree")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pythonpath-extra", help="a folder put on PYTHONPATH after each tree")
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    with tempfile.TemporaryDirectory(prefix="kdc-ab-") as tmp:
        clis = {}
        for name, tree in trees.items():
            (Path(tmp) / name).mkdir()
            clis[name] = _cli(tree, args.pythonpath_extra, Path(tmp) / name)
            _prepare(tree, clis[name], Path(tmp) / name / "base")
            print(f"prepared {name} ({tree})", flush=True)
        marginal: dict[str, list[float]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name in list(trees) if r % 2 == 0 else list(reversed(trees)):
                short, long = cli_round(clis[name], Path(tmp) / name / "base", LONG, r % 2 == 1)
                marginal[name].append((long - short) / (LONG - SHORT_EPOCHS))
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
