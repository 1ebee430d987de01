"""Several seeds: one run of a recipe per seed, the teacher trained once.

``kdc run RECIPE --seeds 3`` (or ``run.seeds: [0, 1, 2]``) runs the recipe once per seed. The first seed's
run is the ordinary run directory; seed ``s``'s is ``<run dir>/seeds/seed-<s>/``, itself an ordinary run
directory made with ``run.seed=s`` and ``teacher.seed`` pinned to the first seed. The teacher's fingerprint
then matches the first run's (see :func:`kdcompress.run.stages.teacher_inputs`), so, as in ``kdc sweep``, its
checkpoint is hard-linked into every seed's directory rather than trained again; so is any other stage whose
fingerprint matches. Running the same command again goes on where an interruption stopped it.

The rule for one stage by hand: ``kdc distill runs/NAME --set run.seed=1`` retrains the teacher (its seed
changed) unless ``--set teacher.seed=0`` pins it to the seed it was made with. Example::

    >>> from kdcompress.run.seeds import seed_list
    >>> seed_list(base=3, count=2)
    [3, 4]
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..recipe import load_recipe
from .layout import seed_dir
from .marker import lock_run_dir, mark_run_dir, write_resolved_recipe
from .pipeline import run_pipeline
from .share import expected_fingerprints, known_checkpoints, share_stages
from .stages import STAGES
from .state import Origin

__all__ = ["seed_list", "seed_run_dirs", "run_seeds"]


def seed_list(base: int, count: int) -> list[int]:
    """``count`` consecutive seeds from ``base``: what ``kdc run --seeds count`` runs."""
    return list(range(base, base + count))


def seed_run_dirs(run_dir: str | Path, seeds: list[int]) -> dict[int, Path]:
    """``{seed: run directory}``: the first seed's is ``run_dir`` itself, the others' ``run_dir/seeds/seed-<s>``."""
    run_dir = Path(run_dir)
    return {s: run_dir if i == 0 else seed_dir(run_dir, s) for i, s in enumerate(seeds)}


def run_seeds(
    recipe_path,
    overrides: list[str],
    seeds: list[int],
    force: bool = False,
    restart: bool = False,
    console=None,
    load=None,
    share_from: list[Path] | None = None,
):
    """Run the recipe once per seed (see the module docstring); return the first seed's recipe.

    ``load(recipe_path, overrides)`` loads a recipe as the CLI does (run directories included).
    ``share_from`` names other run directories (``kdc sweep``'s other points and their seeds) whose finished
    stages every seed, the first included, may take instead of training them again. The first seed's run
    directory is locked throughout (:func:`kdcompress.run.marker.lock_run_dir`), each seed's while it runs.
    The commands messages suggest name ``recipe_path`` and each seed's overrides (:class:`Origin`).
    """
    console = console or Console(stderr=True)
    load = load or (lambda path, items: load_recipe(path, items))
    overrides = list(overrides) + [f"run.seeds=[{', '.join(str(s) for s in seeds)}]"]
    first_overrides = overrides + [f"run.seed={seeds[0]}"]
    first = load(recipe_path, first_overrides)
    # the teacher keeps a seed the user gave it; else every seed shares the first seed's teacher
    teacher_seed = first.teacher.seed if first.teacher.seed is not None else seeds[0]
    dirs = seed_run_dirs(first.run_dir, seeds)
    recipes = {seeds[0]: first}
    origins = {seeds[0]: Origin(str(recipe_path) if recipe_path else "", tuple(first_overrides))}
    for s in seeds[1:]:  # every seed's recipe is checked before anything trains
        items = overrides + [
            f"run.seed={s}",
            f"teacher.seed={teacher_seed}",
            "run.seeds=[]",
            f"run.out_dir={dirs[s].parent}",
            f"run.name={dirs[s].name}",
        ]
        recipes[s] = load(recipe_path, items)
        origins[s] = Origin(str(recipe_path) if recipe_path else "", tuple(items))
    with lock_run_dir(first.run_dir):
        for i, s in enumerate(seeds, 1):
            with lock_run_dir(dirs[s]):  # shared checkpoints are linked in before its stages run
                recipe = recipes[s]
                console.print(f"[bold]seeds[/]: seed {s} ({i}/{len(seeds)}) -> {dirs[s]}")
                stages = None
                if i > 1 or share_from:
                    dirs[s].mkdir(parents=True, exist_ok=True)
                    mark_run_dir(dirs[s])
                    pool = known_checkpoints([dirs[x] for x in seeds[: i - 1]] + list(share_from or []))
                    expected = expected_fingerprints(recipe)
                    shared = share_stages(pool, expected, dirs[s])
                    if shared:
                        where = "an earlier seed or sweep point" if share_from else "an earlier seed"
                        console.print(f"seeds: {', '.join(shared)} shared with {where} (same fingerprint)")
                    if force:  # what an earlier seed made (the teacher) was just made again: --force trains it once
                        earlier = {stage for stage, fp in expected.items() if fp in pool}
                        stages = [st.name for st in STAGES if st.name not in earlier]
                run_pipeline(recipe, force=force, restart=restart, console=console, stages=stages, origin=origins[s])
        # the report reads run.seeds from here; a run whose stages were all up to date did not write it
        write_resolved_recipe(first)
    return first
