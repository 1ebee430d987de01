"""The report's numbers and sentences as text, shared by the terminal, Markdown and HTML renderings.

Sizes to three digits (25.4k, 207 kB), ratios, durations, latencies, accuracies with their error, a stage's
settings on one line, comparisons and the latency note.
"""

from __future__ import annotations

__all__ = [
    "SPARSE_MACS_NOTE",
    "STALE_NOTE",
    "accuracy_text",
    "bytes_text",
    "compact",
    "comparison_name",
    "comparison_text",
    "duration_text",
    "input_text",
    "is_seeded",
    "latency_note",
    "latency_text",
    "ms_text",
    "number_text",
    "points_text",
    "ratio_text",
    "seed_comparison_text",
    "seeds_note",
    "settings_text",
    "sparsity_text",
    "stage_name",
    "standard_errors",
]


def standard_errors(comp: dict, unit: str = "SE") -> str:
    """How many standard errors a comparison's difference is: '0.6 SE'; with an error of 0, '0.0 SE' for no
    difference and 'infinitely many SE' for any other. From ``difference`` and ``se``, so reports written
    before ``z`` was defined for an error of 0 read the same."""
    difference, se = abs(comp["difference"]), comp["se"]
    if se > 0:
        return f"{difference / se:.1f} {unit}"
    return f"0.0 {unit}" if difference == 0 else f"infinitely many {unit}"


def _three_digits(n: float, units: tuple[tuple[str, float], ...]) -> str:
    """``n`` in the largest unit it reaches, to three significant digits (999,999 -> 1M, not 1e+03k)."""
    for i, (unit, scale) in enumerate(units):
        if abs(n) >= scale:
            text = f"{n / scale:.3g}"
            if "e" in text:  # rounded up to 1000: the next unit up, or every digit in the largest
                text, unit = (f"{n / units[i - 1][1]:.3g}", units[i - 1][0]) if i else (f"{n / scale:,.0f}", unit)
            return text + unit
    return f"{n:,}"


def compact(n: int | None) -> str:
    """25,450 -> 25.4k; 11,689,512 -> 11.7M (the terminal table; md and json keep every digit)."""
    if n is None:
        return ""
    if abs(n) < 10_000:
        return f"{n:,}"
    return _three_digits(n, (("G", 1e9), ("M", 1e6), ("k", 1e3)))


def bytes_text(n: int) -> str:
    """207,325 -> 207 kB (decimal units, as disk sizes are sold)."""
    return _three_digits(n, ((" GB", 1e9), (" MB", 1e6), (" kB", 1e3))) if n >= 1000 else f"{n} B"


def ratio_text(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def latency_text(timing: dict | None) -> str:
    if not timing:
        return "-"
    median = timing["median_ms"]
    digits = 0 if median >= 100 else 1 if median >= 10 else 2 if median >= 1 else 3
    return f"{median:.{digits}f} ({timing['iqr_ms']:.{digits}f})"


def points_text(value: float | None) -> str:
    return "" if value is None else f"{value * 100:+.2f}"


def is_seeded(row: dict) -> bool:
    return len(row.get("seeds") or []) > 1


def accuracy_text(row: dict) -> str:
    if is_seeded(row):  # several seeds: mean ± sample std over them
        std = row.get("accuracy_std")
        return f"{row['accuracy_mean'] * 100:.2f} ±{(std or 0.0) * 100:.2f}"
    se = row.get("accuracy_se")
    return f"{row['accuracy'] * 100:.2f} ±{se * 100:.2f}" if se is not None else f"{row['accuracy'] * 100:.2f} ±?"


def _schedule_words(settings: dict) -> str:
    """'iterative, rate 0.3, steps spaced automatically' and the like, for a pruned stage's settings line."""
    schedule = settings.get("sparsity_schedule") or "iterative"
    every = settings.get("every")
    spacing = "steps spaced automatically" if every == "auto" else f"a step every {every} epochs"
    if schedule == "one-shot":
        return "one-shot"
    if schedule == "agp":
        return f"agp, {spacing}"
    return f"{schedule}, rate {settings.get('rate')}, {spacing}"


def settings_text(settings: dict) -> str:
    """A stage's settings on one line: model, loss, pruning, optimiser."""
    parts = []
    args = settings.get("args")
    model = settings.get("model") or "?"
    parts.append(model + ("" if not args else " " + " ".join(f"{k}={v}" for k, v in args.items())))
    if settings.get("supplied_from"):  # not trained: no loss or schedule to show
        return "; ".join(parts + [f"supplied: {settings['supplied_from']}"])
    if settings.get("method"):
        target = settings.get("target_sparsity")
        steps = settings.get("pruning_steps")
        parts.append(
            f"{settings['method']} ({settings.get('scope')}), {_schedule_words(settings)} to target {target * 100:g}%"
            if target is not None
            else f"{settings['method']} ({settings.get('scope')})"
        )
        if steps is not None:
            parts[-1] += f" in {steps} steps"
    if settings.get("loss") == "distillation" and settings.get("distill_loss", "kd") == "dkd":
        parts.append(
            f"DKD T={settings.get('temperature')} alpha={settings.get('dkd_alpha')} beta={settings.get('dkd_beta')}"
            + (f", warm-up {settings['dkd_warmup']} epochs" if settings.get("dkd_warmup") else "")
        )
    elif settings.get("loss") == "distillation" and settings.get("distill_loss", "kd") != "kd":
        args = settings.get("loss_args") or {}
        parts.append(f"distillation {settings['distill_loss']}" + (f" args {args}" if args else ""))
    elif settings.get("loss") == "distillation":
        parts.append(f"distillation T={settings.get('temperature')} alpha={settings.get('alpha')}")
    else:
        parts.append("cross-entropy")
    for term in settings.get("features") or []:
        parts.append(f"+ {term['loss']} {term['student']} <- teacher {term['teacher']} (weight {term['weight']:g})")
    parts.append(
        f"{settings.get('epochs')} epochs {settings.get('optimizer')} lr {settings.get('lr')} {settings.get('schedule')}, "
        f"batch {settings.get('batch_size')}"
    )
    if settings.get("pretrained_from"):
        parts.append(f"from pretrained weights {settings['pretrained_from']}")
    if settings.get("bn_recalibrate_batches"):
        parts.append(f"BatchNorm recalibrated on {settings['bn_recalibrate_batches']} batches")
    return "; ".join(parts)


def comparison_text(comp: dict) -> str:
    """'+0.70 points ± 1.18 (SE): 0.6 SE, within noise (<= 2 SE); latency distilled/pruned 2.61x at batch 64' for
    one comparison."""
    head = f"{comp['difference'] * 100:+.2f} points"
    if comp["se"] is None:
        return head + " (noise unknown: the checkpoints predate the recorded test-set size)" + _latency_ratio_text(comp)
    verdict = "within noise (<=" if comp["within_noise"] else "beyond noise (>"
    return (
        f"{head} ± {comp['se'] * 100:.2f} (SE): {standard_errors(comp)}, {verdict} {comp['noise_z']:g} SE)"
        + _latency_ratio_text(comp)
    )


def _latency_ratio_text(comp: dict) -> str:
    """'; latency distilled/pruned 2.11x at batch 1, 2.61x at batch 64', or "" without latency."""
    ratios = comp.get("latency_ratio") or {}
    if not ratios:
        return ""
    parts = [
        f"{r:.2f}x at batch {b}" if r is not None else f"not compared at batch {b} (timed in different rounds)"
        for b, r in ratios.items()
    ]
    return f"; latency {comp['against']}/{comp['stage']} {', '.join(parts)}"


def seed_comparison_text(seeded: dict) -> str:
    """'mean -0.37 points ± 0.09 (SE over 3 seeds, std 0.15): a loss beyond 2 SE; per seed 0: -0.46, 1: ...'.

    The verdict is one of: a gain above ``noise_z`` SE, a loss beyond it, within it (or not judged without an SE).
    """
    se, std, z = seeded.get("se"), seeded.get("std"), seeded["noise_z"]
    if seeded.get("mean_above_2se"):
        verdict = f"above {z:g} SE"
    elif se and seeded["mean"] < -z * se:
        verdict = f"a loss beyond {z:g} SE"
    elif se:
        verdict = f"within {z:g} SE (seed noise)"
    else:
        verdict = f"not above {z:g} SE"
    per_seed = ", ".join(f"{d['seed']}: {d['difference'] * 100:+.2f}" for d in seeded["differences"])
    return (
        f"mean {seeded['mean'] * 100:+.2f} points ± {(se or 0.0) * 100:.2f} (SE over {seeded['n']} seeds, std "
        f"{(std or 0.0) * 100:.2f}): {verdict}; per seed {per_seed}"
    )


def seeds_note(rows: list[dict]) -> str:
    seeds = sorted({e["seed"] for r in rows for e in r.get("seeds") or []})
    once = [r["stage"] for r in rows if r.get("trained_once")]
    return (
        f"test acc and vs teacher: mean ± sample std (n-1) over seeds {', '.join(map(str, seeds))}; the other "
        f"columns are the first seed's" + (f"; trained once, shared by every seed: {', '.join(once)}" if once else "")
    )


def comparison_name(comp: dict) -> str:
    return f"{comp['stage']} - {comp['against']}"


def _round_sets(report: dict) -> dict[str, int]:
    """Per batch size measured, how many sets of rounds its stage and artifact figures come from."""
    sets: dict[str, set] = {}
    for row in [*report.get("stages", []), *report.get("artifacts", [])]:
        for batch, timing in (row.get("latency") or {}).items():
            sets.setdefault(str(batch), set()).add((timing or {}).get("round_set"))
    return {batch: len(found) for batch, found in sets.items()}


def latency_note(report: dict) -> str:
    if not report.get("latency_batches"):
        return "latency not measured (report.latency: false)"
    threads, asked = report.get("threads"), report.get("threads_asked")
    fewer = f" ({asked} asked; the machine has {threads} cores)" if asked and asked != threads else ""
    sizes = " and ".join(str(b) for b in report["latency_batches"])
    rounds = report.get("latency_rounds")
    turns = f" over {rounds} rounds in which every model ran in turn, so that ratios hold as the load changes"
    turns = turns if rounds else ""  # a report.json from before the rounds
    mixed = [f"batch {b}: {n} sets" for b, n in _round_sets(report).items() if n > 1]
    mixed_note = (
        f". Some figures were timed in earlier rounds ({', '.join(mixed)}; a rerun stage is timed anew, the cached "
        f"ones are not), so a ratio across sets compares different moments: delete cache/latency.json to time all "
        f"together"
        if mixed
        else ""
    )
    return (
        f"latency: CPU forward pass of a batch of {sizes}, {threads} thread{'' if threads == 1 else 's'}{fewer}, "
        f"median (interquartile range) in ms{turns}, timed in a separate process with OMP_WAIT_POLICY="
        f"{report.get('omp_wait_policy') or 'unset'}: waiting threads sleep there, where spinning ones take the cores "
        f"the work needs on a busy machine (resnet18 at batch 1 with 2 spinning threads under load took 440 ms "
        f"instead of 4 ms){mixed_note}"
    )


SPARSE_MACS_NOTE = (
    "MACs if sparse: only the non-zero weights' multiply-accumulates, what sparse kernels could reach at best; "
    "dense kernels, as timed here, pay the full MACs"
)
STALE_NOTE = "*: stale, the checkpoint is not what the run's recipe.yaml now describes (see the warnings)"


def stage_name(row: dict) -> str:
    return row["stage"] + ("*" if row.get("stale") else "")


def ms_text(median: float) -> str:
    digits = 0 if median >= 100 else 1 if median >= 10 else 2 if median >= 1 else 3
    return f"{median:.{digits}f}"


def sparsity_text(r: dict) -> str:
    """Weight sparsity, or for a structurally pruned stage the share of channels removed ("ch")."""
    if r.get("channel_sparsity") is not None:
        return f"{r['channel_sparsity']:.1%} ch"
    return f"{r['sparsity']:.1%}"


def number_text(value) -> str:
    """Every digit, with thousands separators; "" for None (a cell with nothing recorded)."""
    return "" if value is None else f"{value:,}"


NORMALIZE_WORDS = {
    "measured": "mean and std measured from the training split",
    "imagenet": "ImageNet's mean and std",
    "none": "no mean or std (x / 255 only)",
    "given": "the mean and std data.normalize gives",
    "dataset": "the dataset's fixed mean and std",
}


def input_text(report: dict) -> str | None:
    """How the images became the models' input, one sentence: 'Input: 1x28x28 (grey, L: why), normalised ...;
    resize: ...'; None when the report has no ``input`` (an older report, or a dataset of your own)."""
    info = report.get("input")
    if not isinstance(info, dict):
        return None
    shape = info.get("input_shape")
    shape_words = "x".join(str(d) for d in shape) if shape else "shape not recorded"
    channels = {"L": "grey (L)", "RGB": "colour (RGB)"}.get(info.get("channels"), str(info.get("channels")))
    why = f": {info['channels_why']}" if info.get("channels_why") else ""

    def values(key):
        return "[" + ", ".join(f"{v:.4f}" for v in info[key]) + "]" if info.get(key) else "not recorded"

    normalize = NORMALIZE_WORDS.get(info.get("normalize"), str(info.get("normalize")))
    resize = info.get("resize")
    if isinstance(resize, dict) and resize.get("size"):
        resize_words = f"to {'x'.join(str(d) for d in resize['size'])} by {resize.get('method')}"
    else:
        resize_words = "none (every image had the input's size)"
    return (
        f"Input: {shape_words} (channels x height x width), {channels}{why}; normalised as (x / 255 - mean) / std "
        f"with {normalize}: mean {values('mean')}, std {values('std')}; resize: {resize_words}."
    )
