"""What a distillation epoch costs with augmentation: from the teacher-view table against a cross-entropy
epoch with the same augmentation, and against the teacher run online, in turns (issue 22's cost check).

The recipe gives the teacher, the student, the data, the augmentation and ``distill.teacher_cache.views``.
The models are fresh (the cost of an epoch does not depend on what the weights hold). Each round trains
three copies of the student for one more epoch each, the order turning every round: (ce) cross-entropy with
the recipe's random augmentation, (views) KD from the table, (online) KD with the teacher on every batch.
Epoch times are fit's own ``train_seconds`` (the training pass, without evaluation). Ratios are medians of
per-round ratios. Building the table (K teacher passes) is timed once and reported apart. Example::

    python scripts/bench_views.py recipes/fashion-mnist-consistent.yaml --rounds 3 --json bench-views.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from kdcompress.data import load_data
from kdcompress.distill import kd_loss
from kdcompress.models import build_model, model_spec
from kdcompress.recipe import load_recipe
from kdcompress.train import Runtime, fit
from kdcompress.views import ViewAugment, ViewTable, augment_of, draw_views, teacher_view_logits

QUIET = Console(stderr=True, quiet=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (a quick look)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    augment, d = augment_of(recipe), recipe.distill
    if augment is None or d.teacher_cache.views == 0:
        sys.exit(f"{args.recipe}: needs data augmentation and distill.teacher_cache.views")
    data = load_data(recipe.data, seed=recipe.run.seed)
    if args.limit:
        data.train = data.train.subset(torch.arange(min(args.limit, len(data.train))))

    def model(which: str) -> torch.nn.Module:
        section = getattr(recipe, which)
        torch.manual_seed(0)
        return build_model(model_spec(section.model, section.args, data.num_classes, data.input_shape))

    teacher = model("teacher").eval()
    k, n = d.teacher_cache.views, len(data.train)
    started = time.perf_counter()
    views, start = draw_views(augment, n, k, seed=0)
    logits = torch.stack(
        [
            teacher_view_logits(teacher, data.train, augment, views[:, v], 1000, torch.device("cpu"))[0]
            for v in range(k)
        ],
        dim=1,
    )
    table_seconds = time.perf_counter() - started
    shown = ViewAugment(augment, ViewTable(views, start, logits.to(torch.float16)))
    temperature, alpha = d.temperature, d.alpha

    def online(s, y, idx, x):
        with torch.inference_mode():
            target = teacher(x).float()
        return kd_loss(s, target.clone(), y, temperature, alpha)

    runs = {
        "ce": (lambda s, y, idx, x: F.cross_entropy(s, y), augment),
        "views": (lambda s, y, idx, x: kd_loss(s, shown.targets(idx), y, temperature, alpha), shown),
        "online": (online, augment),
    }
    students = {name: model("student") for name in runs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    with tempfile.TemporaryDirectory(prefix="kdc-bench-views-") as work:
        for r in range(args.rounds):
            settings = dataclasses.replace(d, epochs=r + 1)
            for name in order[r % 3 :] + order[: r % 3]:
                loss, aug = runs[name]
                history = fit(
                    students[name], loss, data, settings, batch_size=recipe.data.batch_size, console=QUIET,
                    state_path=Path(work) / f"{name}.pt", state_tag=name, runtime=Runtime(augment=aug),
                )  # fmt: skip
                seconds[name].append(history[-1]["train_seconds"])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{x} {seconds[x][-1]:.1f} s" for x in runs))

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    result = {
        "recipe": str(args.recipe),
        "train_images": n,
        "views": k,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in students["ce"].parameters()),
        "table_seconds": table_seconds,
        "epoch_seconds": seconds,
        "epoch_seconds_median": {x: statistics.median(v) for x, v in seconds.items()},
        "views_over_ce": paired("views", "ce"),
        "online_over_views": paired("online", "views"),
    }
    print(
        f"{n} images, K={k}: table built in {table_seconds:.1f} s; distillation from the table "
        f"{result['views_over_ce']:.2f}x a cross-entropy epoch with the same augmentation (at most 1.3x asked), "
        f"the online teacher {result['online_over_views']:.2f}x the table's epoch (at least 5x asked); "
        f"medians of {args.rounds} paired rounds"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
