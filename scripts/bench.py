"""Benchmark: the seed document's naive distillation loop against kdc's, and against plain training.

What is measured
----------------
Three ways of training the same student (MLP 784-100-10, identical initial
weights in all three) on the same data, batch size, epochs and optimiser
(SGD, lr 0.05, momentum 0.9, constant learning rate):

(a) naive  -- a faithful rendering of the loop in the project's seed design
    document (``shared/seed/knowledge-distillation-and-model-compression.zh.md``,
    section 4.1): a ``torchvision.datasets`` dataset with a per-sample
    ``Compose([ToTensor(), Normalize(mean, std)])`` transform, a
    ``DataLoader(batch_size, shuffle=True)`` with the default
    ``num_workers=0``, the teacher (eval mode) run under ``torch.no_grad()``
    on every batch of every epoch, and the soft loss computed as
    ``KLDivLoss(reduction="batchmean")(softmax(s/T).log(), softmax(t/T))``.
    The seed used ``CrossEntropyLoss`` on those probabilities with T=2 and no
    hard-label term; here the soft term is the KL divergence scaled by
    ``T*T*alpha`` plus ``(1-alpha) * CE(student, y)`` so that the loss is the
    same objective as kdc's and the accuracies are comparable. What is kept
    from the seed is what costs time: the PIL/transform data path and the
    teacher forward on every batch (and the softmax-then-log).
(b) kdc    -- what ``kdc distill`` does: the dataset held in memory as uint8
    tensors (``kdcompress.data.load_data``), the teacher's logits computed
    once (``kdcompress.distill.teacher_logits``), turned into
    log-probabilities at T once (``teacher_log_probs``) and looked up by batch
    indices in ``kdcompress.distill.kd_loss_from_log_probs`` (one autograd
    node with a closed-form gradient), trained by
    ``kdcompress.train.fit``. The one-off teacher pass is timed separately
    ("teacher cache seconds") and also shown amortised over the epochs (the
    pipeline also stores these logits on disk for later runs; that save and
    load are not timed here). ``fit``'s per-batch bookkeeping (running loss
    and accuracy, progress bar) is counted in (b) and (c); the naive loop has
    none, so it is not favoured.
(c) ce     -- the student alone with ``F.cross_entropy``, kdc's data path and
    ``fit``: the floor that (b) is compared with.

Per-epoch time is the training pass only (data loading, forward, loss,
backward, step), without evaluation: for (b) and (c) the ``train_seconds``
that ``fit`` records, for (a) the same span timed around the loop. The
teacher (MLP 784-1200-1200-10) is trained once at the start with ``fit`` and
cross-entropy, and shared by (a) and (b). The three runs take turns epoch by
epoch (a, b, c, a, b, c, ...), so a slow or fast spell of a shared machine
(timings here were seen to drift by 30 % within minutes) falls on all three
alike; (b) and (c) continue from ``fit``'s resume state between their turns.

Reported: the median epoch seconds of (a), (b), (c); ``a/b`` (how many times
faster kdc's distillation epoch is than the naive one; the issue's target is
a/b >= 15 on full Fashion-MNIST at batch 128) and ``b/c`` (what distillation
costs on top of plain training once the teacher's logits are cached; target
b/c <= 1.25); the teacher cache seconds, raw and amortised; test accuracy of
the teacher and of the three students on the full test split; peak RSS of the
process; the torch thread count; load averages before and after. The numbers
are wall-clock times and move with whatever else runs on the machine; the
ratios of the fastest epochs (``ratio_a_b_min``, ``ratio_b_c_min``) and of
each round (``ratio_a_b_per_epoch``, ``ratio_b_c_per_epoch``) are shown
beside the medians.

Run
---
::

    python scripts/bench.py                                  # full Fashion-MNIST, 5 epochs, CPU
    python scripts/bench.py --threads 1 --json-out bench.json
    python scripts/bench.py --dataset fashion-mnist-mini --epochs 1 --limit 2000   # seconds
    python scripts/bench.py --device cuda
    python scripts/bench.py --compile                        # (b), (c) with run.compile

A table goes to stdout, progress to stderr, and the last line of stdout is
one JSON object (``json.loads`` of the last line).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kdcompress.data import DATASETS, IDX_FILES, DataSplits, default_data_roots, load_data
from kdcompress.distill import kd_loss_from_log_probs, teacher_log_probs, teacher_logits
from kdcompress.models import MLP
from kdcompress.recipe import DataSection, TrainSettings
from kdcompress.train import Runtime, evaluate, fit, resolve_device

TEACHER_HIDDEN = (1200, 1200)
STUDENT_HIDDEN = (100,)
TEMPERATURE = 4.0
ALPHA = 0.5
LR = 0.05
MOMENTUM = 0.9
EVAL_BATCH = 1000  # kdc's default data.eval_batch_size; also used for the teacher-logit pass
TARGET_A_B = 15.0
TARGET_B_C = 1.25

err = Console(stderr=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ce_loss(logits, y, idx, *_):
    """fit's loss signature is (logits, labels, indices[, inputs]); the inputs are not needed here."""
    return F.cross_entropy(logits, y)


def build_student(input_shape, num_classes, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights for (a), (b) and (c)
    return MLP(input_shape=input_shape, num_classes=num_classes, hidden=STUDENT_HIDDEN)


# ---------------------------------------------------------------- data


def limit_splits(splits: DataSplits, limit: int | None) -> DataSplits:
    if not limit or limit >= len(splits.train):
        return splits
    return dataclasses.replace(splits, train=splits.train.subset(torch.arange(limit)))


def torchvision_root(section: DataSection, tmp: Path) -> Path:
    """A folder that ``torchvision.datasets.<cls>(root, download=False)`` reads.

    The full sets: the data root ``load_data`` used (it has unpacked Debian's
    Fashion-MNIST there). The shipped mini set: its idx files are decompressed
    into ``tmp`` so that the naive loop reads it through torchvision too.
    """
    cls_name = DATASETS[section.dataset][0]
    if section.dataset == "fashion-mnist-mini":
        raw = tmp / cls_name / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        src = resources.files("kdcompress") / "embedded" / "fashion-mnist-mini"
        for name in IDX_FILES:
            with (src / f"{name}.gz").open("rb") as fh, gzip.open(fh) as gz, open(raw / name, "wb") as out:
                shutil.copyfileobj(gz, out)
        return tmp
    for root in default_data_roots(section):
        if all((root / cls_name / "raw" / name).is_file() for name in IDX_FILES):
            return root
    raise SystemExit(f"no {cls_name} idx files found under {default_data_roots(section)} after load_data")


def naive_datasets(section: DataSection, root: Path, limit: int | None):
    """The seed's data path: torchvision datasets with a per-sample PIL -> tensor -> normalise transform."""
    from torchvision import datasets, transforms

    cls_name, mean, std = DATASETS[section.dataset][:3]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    cls = getattr(datasets, cls_name)
    train = cls(str(root), train=True, download=False, transform=transform)
    test = cls(str(root), train=False, download=False, transform=transform)
    if limit and limit < len(train):
        # truncate the dataset itself (no Subset wrapper) so the loop is the unmodified seed loop
        train.data, train.targets = train.data[:limit], train.targets[:limit]
    return train, test


# ---------------------------------------------------------------- (a) the naive loop


def naive_epochs(student, teacher, train_set, epochs, batch_size, device):
    """The seed's loop, with kdc's objective (see the module docstring); yields the seconds of each epoch."""
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)  # num_workers=0, as the seed
    criterion = nn.KLDivLoss(reduction="batchmean")
    hard = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM)
    softmax = nn.Softmax(dim=1)
    T = TEMPERATURE
    student.to(device).train()
    teacher.to(device).eval()
    for _ in range(epochs):
        sync(device)
        started = time.perf_counter()
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.no_grad():
                outputs_teacher = teacher(inputs)
                probs_teacher = softmax(outputs_teacher / T)
            outputs_student = student(inputs)
            probs_student = softmax(outputs_student / T)
            loss = criterion(probs_student.log(), probs_teacher) * (T * T) * ALPHA + (1 - ALPHA) * hard(
                outputs_student, targets
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync(device)
        yield time.perf_counter() - started


@torch.no_grad()
def evaluate_naive(model, test_set, device) -> float:
    loader = torch.utils.data.DataLoader(test_set, batch_size=EVAL_BATCH, shuffle=False)
    model.eval()
    correct = n = 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        correct += int((model(inputs).argmax(1) == targets).sum())
        n += len(targets)
    return correct / max(1, n)


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=list(DATASETS), help="default: fashion-mnist")
    p.add_argument("--data-root", default=None, help="data root (default: $KDC_DATA, else kdc's cache dir)")
    p.add_argument("--epochs", type=int, default=5, help="student epochs for (a), (b), (c) (default 5)")
    p.add_argument("--teacher-epochs", type=int, default=2, help="teacher epochs, trained once with fit (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training samples (smoke tests)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON result line to this file")
    p.add_argument("--compile", action="store_true",
                   help="(b) and (c) with run.compile (torch.compile); the first epoch then includes compiling")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.teacher_epochs < 1 or args.batch_size < 1:
        p.error("--epochs, --teacher-epochs and --batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall_started = time.perf_counter()
    load_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    section = DataSection(dataset=args.dataset, root=args.data_root, batch_size=args.batch_size)
    rss: dict[str, float] = {}

    # kdc's data path: the whole split in memory as uint8 tensors
    t0 = time.perf_counter()
    splits = limit_splits(load_data(section, seed=args.seed), args.limit)
    kdc_data_seconds = time.perf_counter() - t0
    rss["after_load_data"] = peak_rss_mb()
    err.print(
        f"[bold]bench[/]: {splits.name}, {len(splits.train)} train / {len(splits.test)} test, batch {args.batch_size}, "
        f"{args.epochs} epochs, device {device}, {torch.get_num_threads()} torch threads"
    )

    # the teacher, trained once and shared by (a) and (b)
    settings = TrainSettings(epochs=args.teacher_epochs, optimizer="sgd", lr=LR, momentum=MOMENTUM, schedule="constant")
    torch.manual_seed(args.seed)
    teacher = MLP(input_shape=splits.input_shape, num_classes=splits.num_classes, hidden=TEACHER_HIDDEN)
    t0 = time.perf_counter()
    teacher_hist = fit(teacher, ce_loss, splits, settings,
                       batch_size=args.batch_size, eval_batch_size=EVAL_BATCH, device=device, seed=args.seed,
                       stage="teacher", console=err)
    teacher_seconds = time.perf_counter() - t0
    teacher_acc = evaluate(teacher, splits.test, EVAL_BATCH, device)["accuracy"]
    rss["after_teacher"] = peak_rss_mb()

    student_settings = dataclasses.replace(settings, epochs=args.epochs)
    init = build_student(splits.input_shape, splits.num_classes, args.seed).state_dict()
    init = copy.deepcopy(init)

    def fresh_student() -> nn.Module:
        model = build_student(splits.input_shape, splits.num_classes, args.seed)
        assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items()), "student init differs"
        return model

    # (b) needs the teacher's log-probabilities once, before its first epoch
    sync(device)
    t0 = time.perf_counter()
    cached = teacher_log_probs(teacher_logits(teacher, splits.train, EVAL_BATCH, device), TEMPERATURE)
    sync(device)
    cache_seconds = time.perf_counter() - t0

    def distill_loss(logits, y, idx, *_):  # as kdcompress.pipeline._distill_loss (no augmentation)
        return kd_loss_from_log_probs(logits, cached.index_select(0, idx.to(cached.device)), y, TEMPERATURE, ALPHA)

    # (a), (b) and (c) take turns, one epoch each, so that a slow or fast spell of a shared machine falls on
    # all three alike. (b) and (c) go on from fit's resume state, which continues a run exactly as if it had
    # not stopped (tests/test_resume.py); saving and loading it is outside the timed training pass.
    naive_seconds: list[float] = []
    quiet = Console(stderr=True, quiet=True)
    student_a, student_b, student_c = fresh_student(), fresh_student(), fresh_student()
    with tempfile.TemporaryDirectory(prefix="kdc-bench-") as tmp:
        root = torchvision_root(section, Path(tmp))
        t0 = time.perf_counter()
        tv_train, tv_test = naive_datasets(section, root, args.limit)
        naive_data_seconds = time.perf_counter() - t0
        torch.manual_seed(args.seed)  # the DataLoader's shuffle draws from the global generator
        naive = naive_epochs(student_a, teacher, tv_train, args.epochs, args.batch_size, device)
        common = dict(batch_size=args.batch_size, eval_batch_size=EVAL_BATCH, device=device, seed=args.seed,
                      console=quiet, runtime=Runtime(compile=args.compile))
        for epoch in range(1, args.epochs + 1):
            naive_seconds.append(next(naive))
            upto = dataclasses.replace(student_settings, epochs=epoch)
            hist_b = fit(student_b, distill_loss, splits, upto, stage="distilled", state_path=Path(tmp) / "b.pt",
                         state_tag="b", **common)
            hist_c = fit(student_c, ce_loss, splits, upto, stage="student", state_path=Path(tmp) / "c.pt",
                         state_tag="c", **common)
            err.print(f"epoch {epoch}/{args.epochs}: (a) naive {naive_seconds[-1]:.2f} s  "
                      f"(b) kdc distill {hist_b[-1]['train_seconds']:.2f} s  (c) cross-entropy "
                      f"{hist_c[-1]['train_seconds']:.2f} s")
        acc_a = evaluate_naive(student_a, tv_test, device)
        n_test_naive = len(tv_test)
    acc_b = evaluate(student_b, splits.test, EVAL_BATCH, device)["accuracy"]
    acc_c = evaluate(student_c, splits.test, EVAL_BATCH, device)["accuracy"]
    rss["after_students"] = peak_rss_mb()

    epochs_b = [h["train_seconds"] for h in hist_b]
    epochs_c = [h["train_seconds"] for h in hist_c]
    med_a, med_b, med_c = (statistics.median(s) for s in (naive_seconds, epochs_b, epochs_c))
    med_b_amortised = med_b + cache_seconds / args.epochs
    result = {
        "dataset": splits.name,
        "train_samples": len(splits.train),
        "test_samples": len(splits.test),
        "epochs": args.epochs,
        "teacher_epochs": args.teacher_epochs,
        "batch_size": args.batch_size,
        "temperature": TEMPERATURE,
        "alpha": ALPHA,
        "lr": LR,
        "momentum": MOMENTUM,
        "seed": args.seed,
        "device": str(device),
        "compile": args.compile,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student_b.parameters()),
        "teacher_accuracy": teacher_acc,
        "teacher_train_seconds": teacher_seconds,
        "teacher_epoch_seconds": [h["train_seconds"] for h in teacher_hist],
        "kdc_data_load_seconds": kdc_data_seconds,
        "naive_data_setup_seconds": naive_data_seconds,
        "naive_epoch_seconds": naive_seconds,
        "kdc_distill_epoch_seconds": epochs_b,
        "ce_epoch_seconds": epochs_c,
        "naive_median_epoch_seconds": med_a,
        "kdc_distill_median_epoch_seconds": med_b,
        "ce_median_epoch_seconds": med_c,
        "naive_min_epoch_seconds": min(naive_seconds),
        "kdc_distill_min_epoch_seconds": min(epochs_b),
        "ce_min_epoch_seconds": min(epochs_c),
        "ratio_a_b_min": min(naive_seconds) / min(epochs_b),
        "ratio_a_b_per_epoch": [a / b for a, b in zip(naive_seconds, epochs_b)],
        "ratio_b_c_per_epoch": [b / c for b, c in zip(epochs_b, epochs_c)],
        "ratio_b_c_min": min(epochs_b) / min(epochs_c),
        "teacher_cache_seconds": cache_seconds,
        "kdc_distill_median_epoch_seconds_amortised": med_b_amortised,
        "ratio_a_b": med_a / med_b,
        "ratio_a_b_amortised": med_a / med_b_amortised,
        "ratio_b_c": med_b / med_c,
        "target_a_b": TARGET_A_B,
        "target_b_c": TARGET_B_C,
        "meets_a_b": med_a / med_b >= TARGET_A_B,
        "meets_b_c": med_b / med_c <= TARGET_B_C,
        "naive_accuracy": acc_a,
        "kdc_distill_accuracy": acc_b,
        "ce_accuracy": acc_c,
        "naive_test_samples": n_test_naive,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after": rss,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - wall_started,
    }
    print_table(result)
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)
    return result


def print_table(r: dict) -> None:
    out = Console(width=max(100, Console().width))
    def fmt(xs) -> str:
        return ", ".join(f"{x:.2f}" for x in xs)

    t = Table(title=f"kdc distillation benchmark: {r['dataset']} ({r['train_samples']} train, {r['test_samples']} test), "
              f"batch {r['batch_size']}, {r['epochs']} epochs, {r['device']}, {r['torch_threads']} threads"
              + (", (b) and (c) compiled" if r["compile"] else ""))
    for col, just in (("run", "left"), ("median epoch s", "right"), ("epochs s", "right"), ("test acc", "right")):
        t.add_column(col, justify=just)
    t.add_row("(a) naive: torchvision + DataLoader, teacher every batch", f"{r['naive_median_epoch_seconds']:.2f}",
              fmt(r["naive_epoch_seconds"]), f"{r['naive_accuracy']:.4f}")
    t.add_row("(b) kdc distill: in-memory data, cached teacher logits", f"{r['kdc_distill_median_epoch_seconds']:.2f}",
              fmt(r["kdc_distill_epoch_seconds"]), f"{r['kdc_distill_accuracy']:.4f}")
    t.add_row("    (b) + teacher cache amortised over the epochs",
              f"{r['kdc_distill_median_epoch_seconds_amortised']:.2f}", "", "")
    t.add_row("(c) cross-entropy only, kdc data path", f"{r['ce_median_epoch_seconds']:.2f}",
              fmt(r["ce_epoch_seconds"]), f"{r['ce_accuracy']:.4f}")
    t.add_row(f"teacher MLP {r['teacher_params']:,} params ({r['teacher_epochs']} epochs)", "",
              fmt(r["teacher_epoch_seconds"]), f"{r['teacher_accuracy']:.4f}")
    out.print(t)
    s = Table(show_header=False, box=None)
    s.add_column(justify="left")
    s.add_column(justify="right")
    def mark(ok: bool) -> str:
        return "[green]meets[/]" if ok else "[red]misses[/]"

    s.add_row("a/b (naive / kdc distill epoch)", f"{r['ratio_a_b']:.2f}  {mark(r['meets_a_b'])} target >= {r['target_a_b']:g}")
    s.add_row("a/b with teacher cache amortised", f"{r['ratio_a_b_amortised']:.2f}")
    s.add_row("a/b, b/c from the fastest epochs (less noise)", f"{r['ratio_a_b_min']:.2f}, {r['ratio_b_c_min']:.2f}")
    s.add_row("a/b in each epoch round", fmt(r["ratio_a_b_per_epoch"]))
    s.add_row("b/c in each epoch round", fmt(r["ratio_b_c_per_epoch"]))
    s.add_row("b/c (kdc distill / cross-entropy epoch)", f"{r['ratio_b_c']:.2f}  {mark(r['meets_b_c'])} target <= {r['target_b_c']:g}")
    s.add_row("teacher cache seconds (one pass, once)", f"{r['teacher_cache_seconds']:.2f}")
    s.add_row("data setup seconds: kdc load_data / torchvision datasets",
              f"{r['kdc_data_load_seconds']:.2f} / {r['naive_data_setup_seconds']:.2f}")
    s.add_row("peak RSS MB", f"{r['peak_rss_mb']:.0f}")
    s.add_row("load average start / end (1 min)", f"{r['loadavg_start'][0]:.2f} / {r['loadavg_end'][0]:.2f}")
    s.add_row("wall seconds", f"{r['wall_seconds']:.1f}")
    out.print(s)


if __name__ == "__main__":
    main()
