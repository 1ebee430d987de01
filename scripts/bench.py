"""Benchmark: `kdc distill`'s epoch, whole process, against the seed document's loop; and where the time goes.

What is measured, in one run
----------------------------
CLI -- what users run. The marginal epoch of a whole ``kdc distill``
process on the full Fashion-MNIST MLP recipe (``recipes/fashion-mnist-mlp.yaml``:
teacher MLP 784-1200-1200-10, student 784-100-10, batch 128)::

    marginal epoch = (wall time of `kdc distill` with N epochs - wall time with 2 epochs) / (N - 2)

so process start, imports, data loading, the final evaluation and the
checkpoint cancel out and what is left is what each epoch costs a user: the
training pass, the epoch's evaluation, its metrics line, its progress line and
the resume state (saved by time). Each run is a fresh process
(``python -m kdcompress distill``, the ``kdc`` console script's entry point)
in a fresh copy of one run directory, in the caller's environment less
``OMP_WAIT_POLICY`` (kdc's default environment), its output going to a log
file (not a terminal). The teacher is trained once (``kdc train-teacher``,
``teacher.epochs`` from ``--teacher-epochs``) and its logit cache built once
(a 1-epoch ``kdc distill`` whose distilled stage is then removed) before the
copies are made, so every timed run starts from the same files. The 2- and
N-epoch runs of a round run back to back (their order alternating by round);
the figure is the median over rounds of each round's marginal epoch.

CLI with augmentation -- the same with ``data.hflip=true`` and
``data.crop_padding=2``: with augmentation ``kdcompress.run.losses`` runs the
teacher online on every (augmented) batch instead of reading the logit cache
(``distill_loss`` checks ``data.hflip``/``data.crop_padding``). Its run
directory takes the trained teacher as ``teacher.checkpoint`` (the data
section is a teacher input, so the teacher stage only evaluates the supplied
one); the 2- and ``--augment-epochs``-epoch runs give its marginal epoch. This
row is the baseline for consistent distillation (a later issue).

In process -- the breakdown. Three ways of training the same student (MLP
784-100-10, identical initial weights in all three) on the same data, batch
size, epochs and optimiser (SGD, lr 0.05, momentum 0.9, constant learning
rate), with the teacher the CLI trained:

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
(b) kdc    -- kdc's training pass for distillation: the dataset held in
    memory as uint8 tensors (``kdcompress.data.load_data``), the teacher's
    logits computed once (``kdcompress.distill.teacher_logits``, timed apart as
    "cache build") and turned into log-probabilities at T once
    (``teacher_log_probs``), looked up by batch indices in
    ``kdcompress.distill.kd_loss_from_log_probs``, trained by
    ``kdcompress.train.fit``.
(c) ce     -- the student alone with ``F.cross_entropy``, kdc's data path and
    ``fit``: the floor that (b) is compared with.

For (b) and (c) an epoch is the ``train_seconds`` that ``fit`` records (the
training pass alone, no evaluation); for (a) the same span timed around the
loop. The three take turns epoch by epoch (a, b, c, a, b, c, ...), and the CLI
runs of a round follow its three epochs, so a slow or fast spell of a shared
machine (timings here drift by 30 % within minutes) falls on all of them
alike; (b) and (c) go on from ``fit``'s resume state between their turns.

Reported
--------
Every ratio is the median of paired ratios: each pair measured side by side
in one round (an epoch of one loop against the next epoch of the other, or a
round's naive epoch against that round's CLI marginal epoch), so a slow or fast
spell of the machine cancels within the pair, as the report does for latencies
(issue 18). The ratio of the two medians, measured minutes apart, is kept
beside it (``*_of_medians``).
``ratio_naive_cli``: the naive epoch over the CLI's marginal epoch,
how many times faster a user's ``kdc distill`` epoch is than the seed's loop
(target >= 15 on full Fashion-MNIST); ``ratio_b_c``: kdc's distillation
training pass over the cross-entropy one (target <= 1.25); ``ratio_a_b``: the
naive epoch over kdc's training pass; ``ratio_cli_b``: what the CLI's epoch
costs beyond the training pass; ``ratio_augment_cli``: the augmented
(online-teacher) epoch over the cached one; the cache build; test accuracies;
peak RSS; thread count; load averages; the commit, date and CPU. A table goes
to stdout and, last, one JSON line; ``--json PATH`` also writes it to a file
and ``--history PATH`` adds a row to a Markdown table of results by commit.
A full run writes ``docs/bench/<date>-<commit>.json`` and a row in
``docs/bench.md`` unless told otherwise (``--json``, ``--history``,
``--no-record``).

Run
---
::

    python scripts/bench.py                  # full Fashion-MNIST; about 3 minutes on this project's 2-core CPU
    python scripts/bench.py --threads 2      # in-process torch threads and the CLI's run.threads
    python scripts/bench.py --quick --json /tmp/bench.json    # fashion-mnist-mini, small: about 30 s (CI, tests)
    python scripts/bench.py --device cuda

Timings are wall-clock and move with whatever else runs on the machine:
compare figures measured in one run (the ratios), and quote the load averages
beside them. ``--limit`` and ``--compile`` apply to the in-process loops only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.table import Table
from torch import nn

import kdcompress
from kdcompress.checkpoint import load_checkpoint
from kdcompress.data import DATASETS, IDX_FILES, DataSplits, default_data_roots, load_data
from kdcompress.distill import kd_loss_from_log_probs, teacher_log_probs, teacher_logits
from kdcompress.models import MLP, build_from_checkpoint
from kdcompress.recipe import DataSection, TrainSettings
from kdcompress.train import Runtime, evaluate, fit, resolve_device

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "fashion-mnist-mlp.yaml"
RUN_NAME = "bench"
STUDENT_HIDDEN = (100,)
TEMPERATURE = 4.0  # the recipe's distill.temperature and alpha, so (b) trains what the CLI trains
ALPHA = 0.5
LR = 0.05
MOMENTUM = 0.9
EVAL_BATCH = 1000  # kdc's default data.eval_batch_size; also used for the teacher-logit pass
SHORT_EPOCHS = 2  # the CLI run every longer one is compared with
AUGMENT = {"hflip": True, "crop_padding": 2}
TARGET_NAIVE_CLI = 15.0
TARGET_A_B = 15.0
TARGET_B_C = 1.25
FULL = {
    "dataset": "fashion-mnist",
    "epochs": 5,
    "teacher_epochs": 2,
    "cli_epochs": 12,
    "augment_epochs": 4,
    "cli_rounds": 3,
}
QUICK = {
    "dataset": "fashion-mnist-mini",
    "epochs": 1,
    "teacher_epochs": 1,
    "cli_epochs": 3,
    "augment_epochs": 3,
    "cli_rounds": 1,
}

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


# ---------------------------------------------------------------- the CLI, whole process


def cli_env() -> dict[str, str]:
    """The caller's environment less OMP_WAIT_POLICY (kdc's default), with this kdcompress first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    here = str(Path(kdcompress.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


class Cli:
    """Runs ``kdc`` commands as fresh processes in copies of prepared run directories, and times them."""

    def __init__(self, work: Path, sets: list[str]):
        self.work, self.sets, self.env = work, sets, cli_env()
        self.runs = 0

    def run(self, folder: Path, *args: str) -> float:
        """Wall seconds of ``kdc ARGS recipe.yaml --set ...`` in ``folder``; exit with its log if it fails."""
        self.runs += 1
        log = self.work / f"{self.runs:02d}-{args[0]}.log"
        command = [
            sys.executable,
            "-m",
            "kdcompress",
            args[0],
            "recipe.yaml",
            *args[1:],
            *(item for s in self.sets for item in ("--set", s)),
        ]
        with open(log, "wb") as out:
            started = time.perf_counter()
            code = subprocess.run(command, cwd=folder, env=self.env, stdout=out, stderr=subprocess.STDOUT).returncode
            seconds = time.perf_counter() - started
        if code != 0:
            raise SystemExit(
                f"bench: `kdc {' '.join(args)}` failed (exit {code}) in {folder}:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        return seconds

    def timed_copy(self, base: Path, epochs: int, *args: str) -> float:
        """Wall seconds of ``kdc distill`` for ``epochs`` epochs in a fresh copy of ``base``."""
        folder = self.work / f"run-{self.runs + 1:02d}"
        shutil.copytree(base, folder)
        try:
            return self.run(folder, "distill", "--set", f"distill.epochs={epochs}", *args)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def write_recipe(folder: Path, dataset: str, teacher_epochs: int, changes: dict | None = None) -> None:
    """The shipped MLP recipe, with the bench's run name, dataset and teacher epochs, as ``folder/recipe.yaml``."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    recipe["run"]["name"] = RUN_NAME
    recipe["data"]["dataset"] = dataset
    recipe["teacher"]["epochs"] = teacher_epochs
    for section, values in (changes or {}).items():
        recipe.setdefault(section, {}).update(values)
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def prepare_cli(cli: Cli, dataset: str, teacher_epochs: int) -> dict:
    """Two run directories every timed run copies: ``cached`` (teacher trained, logit cache built) and
    ``augment`` (the same teacher supplied, data augmented). Returns their paths and what preparing took."""
    cached, augment = cli.work / "cached", cli.work / "augment"
    write_recipe(cached, dataset, teacher_epochs)
    teacher_seconds = cli.run(cached, "train-teacher")
    warmup_seconds = cli.run(cached, "distill", "--set", "distill.epochs=1")  # builds the logit cache
    shutil.rmtree(cached / "runs" / RUN_NAME / "distilled")
    teacher = cached / "runs" / RUN_NAME / "teacher" / "model.pt"
    write_recipe(augment, dataset, teacher_epochs, {"data": AUGMENT, "teacher": {"checkpoint": str(teacher)}})
    cli.run(augment, "train-teacher")  # evaluates the supplied teacher and saves it as the run's
    history = [json.loads(line) for line in (teacher.parent / "metrics.jsonl").read_text().splitlines()]
    return {
        "cached": cached,
        "augment": augment,
        "teacher": teacher,
        "teacher_seconds": teacher_seconds,
        "warmup_seconds": warmup_seconds,
        "teacher_epoch_seconds": [h["train_seconds"] for h in history],
        "teacher_accuracy": load_checkpoint(teacher)["metrics"]["test_accuracy"],
    }


def cli_round(cli: Cli, base: Path, epochs: int, reverse: bool, *args: str) -> tuple[float, float]:
    """(seconds with SHORT_EPOCHS, seconds with ``epochs``), run back to back; ``reverse``: the long one first."""
    order = [epochs, SHORT_EPOCHS] if reverse else [SHORT_EPOCHS, epochs]
    seconds = {n: cli.timed_copy(base, n, *args) for n in order}
    return seconds[SHORT_EPOCHS], seconds[epochs]


def marginal(short: list[float], long: list[float], epochs: int) -> list[float]:
    """Each round's marginal epoch: (long - short) / (epochs - SHORT_EPOCHS)."""
    return [(b - a) / (epochs - SHORT_EPOCHS) for a, b in zip(short, long)]


# ---------------------------------------------------------------- where the results go


def git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The commit (and whether the tree differs from it, results files aside), the date and the CPU."""
    commit = git("rev-parse", "--short=10", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/bench.md", ":!docs/bench")
    return {
        "commit": commit,
        "commit_dirty": bool(changes) if changes is not None else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
    }


HISTORY_HEADER = """# Benchmark history

Rows added by `python scripts/bench.py` (a full run; see its docstring for what each figure means). Seconds
are median epochs; "CLI" is the marginal epoch of a whole `kdc distill` process (N vs 2 epochs, default
environment), "naive" the seed document's loop, "kdc" and "CE" kdc's in-process training passes for
distillation and cross-entropy, "augmented" the CLI's marginal epoch with data augmentation (teacher online).
Targets: naive/CLI >= 15, kdc/CE <= 1.25. "load" is the 1-minute load average at the start and the end (the
bench itself adds about 1-2); `+` after a commit: the tree differed from it. The JSON file holds every figure.

| date | commit | dataset | CPU | threads | load | naive s | kdc s | CE s | CLI s | naive/CLI | naive/kdc | kdc/CE | augmented s | JSON |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def history_row(r: dict, json_path: Path | None, history: Path) -> str:
    """The history table's row for result ``r`` (``+`` after the commit: the tree differed from it)."""
    commit = (r["commit"] or "?") + ("+" if r["commit_dirty"] else "")
    link = ""
    if json_path is not None:
        link = f"[{json_path.name}]({os.path.relpath(json_path.resolve(), history.resolve().parent)})"
    cells = [
        r["date"][:16].replace("T", " "),
        f"`{commit}`",
        r["dataset"],
        f"{r['cpu_model']} ({r['cpu_count']} cores)",
        str(r["torch_threads"]),
        f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}",
        f"{r['naive_median_epoch_seconds']:.2f}",
        f"{r['kdc_distill_median_epoch_seconds']:.3f}",
        f"{r['ce_median_epoch_seconds']:.3f}",
        f"{r['cli_marginal_epoch_seconds']:.3f}",
        f"{r['ratio_naive_cli']:.1f}",
        f"{r['ratio_a_b']:.1f}",
        f"{r['ratio_b_c']:.2f}",
        f"{r['augment_marginal_epoch_seconds']:.2f}",
        link,
    ]
    return "| " + " | ".join(cells) + " |\n"


def add_history_row(path: Path, row: str) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else HISTORY_HEADER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + row, encoding="utf-8")


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fashion-mnist-mini, 1 teacher epoch, 1 in-process epoch, one CLI round of 2 vs 3 epochs "
        "(CI and tests: seconds, not a figure to quote)",
    )
    p.add_argument("--dataset", choices=list(DATASETS), help="default: fashion-mnist (--quick: fashion-mnist-mini)")
    p.add_argument(
        "--data-root",
        default=None,
        help="data root, in process and for the CLI (data.root) (default: $KDC_DATA, else kdc's cache dir)",
    )
    p.add_argument("--epochs", type=int, help="in-process epochs (rounds) of (a), (b), (c) (default 5)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs, trained once by `kdc train-teacher` (default 2)")
    p.add_argument("--cli-epochs", type=int, help=f"N, the longer `kdc distill` run (default 12; vs {SHORT_EPOCHS})")
    p.add_argument(
        "--augment-epochs", type=int, help=f"N for the augmented `kdc distill` (default 4; vs {SHORT_EPOCHS})"
    )
    p.add_argument("--cli-rounds", type=int, help="rounds of CLI runs, one pair of each kind per round (default 3)")
    p.add_argument("--batch-size", type=int, default=128, help="in-process batch size (the recipe's: 128)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads in process and run.threads for the CLI (default: torch's default)",
    )
    p.add_argument("--limit", type=int, default=None, help="in-process loops on the first N training samples only")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        "--json-out",
        dest="json",
        default=None,
        help="write the JSON result here (a full run's default: docs/bench/<date>-<commit>.json)",
    )
    p.add_argument(
        "--history", default=None, help="add a row to this Markdown table (a full run's default: docs/bench.md)"
    )
    p.add_argument("--no-record", action="store_true", help="a full run writes nothing under docs/")
    p.add_argument(
        "--compile",
        action="store_true",
        help="(b) and (c) with run.compile (torch.compile); the first epoch then includes compiling",
    )
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.epochs, args.teacher_epochs, args.batch_size, args.cli_rounds) < 1:
        p.error("--epochs, --teacher-epochs, --batch-size and --cli-rounds must be >= 1")
    if min(args.cli_epochs, args.augment_epochs) <= SHORT_EPOCHS:
        p.error(f"--cli-epochs and --augment-epochs must be > {SHORT_EPOCHS}")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    record = not args.quick and not args.no_record
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
    if args.json is None and record:
        args.json = str(ROOT / "docs" / "bench" / f"{stamp}-{git('rev-parse', '--short=10', 'HEAD') or 'nogit'}.json")
    if args.history is None and record:
        args.history = str(ROOT / "docs" / "bench.md")
    return args


def paired(first: list[float], second: list[float]) -> float:
    """The median of ``first[i] / second[i]``: ratios of figures measured side by side, in the same round."""
    return statistics.median(a / b for a, b in zip(first, second))


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall_started = time.perf_counter()
    load_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    section = DataSection(dataset=args.dataset, root=args.data_root, batch_size=args.batch_size)
    rss: dict[str, float] = {}
    sets = [
        f"run.device={device}",
        *([f"run.threads={args.threads}"] if args.threads else []),
        *([f"data.root={args.data_root}"] if args.data_root else []),
    ]
    # (a)'s data is written here (the mini set) and the CLI's run directories are copied here
    work = Path(tempfile.mkdtemp(prefix="kdc-bench-"))
    try:
        cli = Cli(work, sets)
        err.print(
            f"[bold]bench[/]: training the teacher ({args.teacher_epochs} epochs) with `kdc train-teacher`, "
            f"building its logit cache with `kdc distill` (work folder {work})"
        )
        prepared = prepare_cli(cli, args.dataset, args.teacher_epochs)

        # kdc's data path: the whole split in memory as uint8 tensors
        t0 = time.perf_counter()
        splits = limit_splits(load_data(section, seed=args.seed), args.limit)
        kdc_data_seconds = time.perf_counter() - t0
        rss["after_load_data"] = peak_rss_mb()
        err.print(
            f"[bold]bench[/]: {splits.name}, {len(splits.train)} train / {len(splits.test)} test, batch "
            f"{args.batch_size}, {args.epochs} in-process epochs, {args.cli_rounds} CLI rounds, device {device}, "
            f"{torch.get_num_threads()} torch threads"
        )
        teacher = (
            build_from_checkpoint(load_checkpoint(prepared["teacher"]), where="the bench's teacher", expected="mlp")
            .to(device)
            .eval()
        )
        rss["after_teacher"] = peak_rss_mb()

        settings = TrainSettings(epochs=args.epochs, optimizer="sgd", lr=LR, momentum=MOMENTUM, schedule="constant")
        init = copy.deepcopy(build_student(splits.input_shape, splits.num_classes, args.seed).state_dict())

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

        def distill_loss(logits, y, idx, *_):  # as kdcompress.run.losses.distill_loss (no augmentation)
            return kd_loss_from_log_probs(logits, cached.index_select(0, idx.to(cached.device)), y, TEMPERATURE, ALPHA)

        naive_seconds: list[float] = []
        cli_short: list[float] = []
        cli_long: list[float] = []
        aug_short: list[float] = []
        aug_long: list[float] = []
        quiet = Console(stderr=True, quiet=True)
        student_a, student_b, student_c = fresh_student(), fresh_student(), fresh_student()
        root = torchvision_root(section, work)
        t0 = time.perf_counter()
        tv_train, tv_test = naive_datasets(section, root, args.limit)
        naive_data_seconds = time.perf_counter() - t0
        torch.manual_seed(args.seed)  # the DataLoader's shuffle draws from the global generator
        naive = naive_epochs(student_a, teacher, tv_train, args.epochs, args.batch_size, device)
        common = dict(
            batch_size=args.batch_size,
            eval_batch_size=EVAL_BATCH,
            device=device,
            seed=args.seed,
            console=quiet,
            runtime=Runtime(compile=args.compile),
        )
        augment_args = [item for key, value in AUGMENT.items() for item in ("--set", f"data.{key}={value}".lower())]
        rounds = max(args.epochs, args.cli_rounds)
        for r in range(rounds):
            line = []
            if r < args.epochs:
                # (a), (b), (c) take turns; (b) and (c) go on from fit's resume state, which continues a run
                # exactly as if it had not stopped (tests/run/test_resume.py); saving it is outside the timed pass
                naive_seconds.append(next(naive))
                upto = dataclasses.replace(settings, epochs=r + 1)
                hist_b = fit(
                    student_b,
                    distill_loss,
                    splits,
                    upto,
                    stage="distilled",
                    state_path=work / "b.pt",
                    state_tag="b",
                    **common,
                )
                hist_c = fit(
                    student_c, ce_loss, splits, upto, stage="student", state_path=work / "c.pt", state_tag="c", **common
                )
                line.append(
                    f"(a) naive {naive_seconds[-1]:.2f} s  (b) kdc {hist_b[-1]['train_seconds']:.3f} s  "
                    f"(c) CE {hist_c[-1]['train_seconds']:.3f} s"
                )
            if r < args.cli_rounds:
                short, long = cli_round(cli, prepared["cached"], args.cli_epochs, r % 2 == 1)
                cli_short.append(short)
                cli_long.append(long)
                short, long = cli_round(cli, prepared["augment"], args.augment_epochs, r % 2 == 1, *augment_args)
                aug_short.append(short)
                aug_long.append(long)
                line.append(
                    f"kdc distill {SHORT_EPOCHS} / {args.cli_epochs} epochs {cli_short[-1]:.1f} / "
                    f"{cli_long[-1]:.1f} s, augmented {SHORT_EPOCHS} / {args.augment_epochs} epochs "
                    f"{aug_short[-1]:.1f} / {aug_long[-1]:.1f} s"
                )
            err.print(f"round {r + 1}/{rounds}: " + "; ".join(line))
        acc_a = evaluate_naive(student_a, tv_test, device)
        n_test_naive = len(tv_test)
        cli_runs = cli.runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    acc_b = evaluate(student_b, splits.test, EVAL_BATCH, device)["accuracy"]
    acc_c = evaluate(student_c, splits.test, EVAL_BATCH, device)["accuracy"]
    rss["after_students"] = peak_rss_mb()

    epochs_b = [h["train_seconds"] for h in hist_b]
    epochs_c = [h["train_seconds"] for h in hist_c]
    med_a, med_b, med_c = (statistics.median(s) for s in (naive_seconds, epochs_b, epochs_c))
    med_b_amortised = med_b + cache_seconds / args.epochs
    cli_rounds = marginal(cli_short, cli_long, args.cli_epochs)
    aug_rounds = marginal(aug_short, aug_long, args.augment_epochs)
    med_cli, med_aug = statistics.median(cli_rounds), statistics.median(aug_rounds)
    result = {
        **machine(),
        "quick": args.quick,
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
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student_b.parameters()),
        "teacher_accuracy": prepared["teacher_accuracy"],
        # `kdc train-teacher`, whole process, and fit's training pass per epoch within it
        "teacher_train_seconds": prepared["teacher_seconds"],
        "teacher_epoch_seconds": prepared["teacher_epoch_seconds"],
        # --- the CLI, whole process
        "cli_command": "python -m kdcompress distill recipe.yaml --set distill.epochs=N "
        + " ".join(f"--set {s}" for s in sets),
        "cli_recipe": str(RECIPE.relative_to(ROOT)),
        "cli_env_omp_wait_policy": None,
        "cli_run_threads": args.threads,
        "cli_short_epochs": SHORT_EPOCHS,
        "cli_epochs": args.cli_epochs,
        "cli_rounds": args.cli_rounds,
        "cli_runs": cli_runs,
        "cli_warmup_seconds": prepared["warmup_seconds"],
        "cli_short_seconds": cli_short,
        "cli_long_seconds": cli_long,
        "cli_marginal_epoch_seconds_per_round": cli_rounds,
        "cli_marginal_epoch_seconds": med_cli,
        "ratio_naive_cli": paired(naive_seconds, cli_rounds),
        "ratio_naive_cli_of_medians": med_a / med_cli,
        "ratio_naive_cli_per_round": [a / c for a, c in zip(naive_seconds, cli_rounds)],
        "target_naive_cli": TARGET_NAIVE_CLI,
        "meets_naive_cli": paired(naive_seconds, cli_rounds) >= TARGET_NAIVE_CLI,
        "ratio_cli_b": med_cli / med_b,
        "augment": AUGMENT,
        "augment_epochs": args.augment_epochs,
        "augment_short_seconds": aug_short,
        "augment_long_seconds": aug_long,
        "augment_marginal_epoch_seconds_per_round": aug_rounds,
        "augment_marginal_epoch_seconds": med_aug,
        "ratio_augment_cli": med_aug / med_cli,
        # --- in process
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
        "ratio_a_b": paired(naive_seconds, epochs_b),
        "ratio_a_b_of_medians": med_a / med_b,
        "ratio_a_b_amortised": med_a / med_b_amortised,
        "ratio_b_c": paired(epochs_b, epochs_c),
        "ratio_b_c_of_medians": med_b / med_c,
        "target_a_b": TARGET_A_B,
        "target_b_c": TARGET_B_C,
        "meets_a_b": paired(naive_seconds, epochs_b) >= TARGET_A_B,
        "meets_b_c": paired(epochs_b, epochs_c) <= TARGET_B_C,
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
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(line + "\n", encoding="utf-8")
    if args.history:
        add_history_row(Path(args.history), history_row(result, json_path, Path(args.history)))
    print(line, flush=True)
    return result


def print_table(r: dict) -> None:
    out = Console(width=max(110, Console().width))

    def fmt(xs, digits: int = 2) -> str:
        return ", ".join(f"{x:.{digits}f}" for x in xs)

    def mark(ok: bool) -> str:
        return "[green]meets[/]" if ok else "[red]misses[/]"

    t = Table(
        title=f"kdc distillation benchmark: {r['dataset']} ({r['train_samples']} train, {r['test_samples']} "
        f"test), batch {r['batch_size']}, {r['device']}, {r['torch_threads']} threads"
        + (", (b) and (c) compiled" if r["compile"] else "")
    )
    for col, just in (("what", "left"), ("epoch s", "right"), ("each round s", "right"), ("test acc", "right")):
        t.add_column(col, justify=just)
    t.add_row(
        f"CLI: `kdc distill`, whole process, marginal epoch ({r['cli_epochs']} vs {r['cli_short_epochs']} epochs)",
        f"{r['cli_marginal_epoch_seconds']:.3f}",
        fmt(r["cli_marginal_epoch_seconds_per_round"], 3),
        "",
    )
    t.add_row(
        f"CLI: `kdc distill` with augmentation, teacher online ({r['augment_epochs']} vs {r['cli_short_epochs']})",
        f"{r['augment_marginal_epoch_seconds']:.3f}",
        fmt(r["augment_marginal_epoch_seconds_per_round"], 3),
        "",
    )
    t.add_row(
        "(a) naive: torchvision + DataLoader, teacher every batch",
        f"{r['naive_median_epoch_seconds']:.2f}",
        fmt(r["naive_epoch_seconds"]),
        f"{r['naive_accuracy']:.4f}",
    )
    t.add_row(
        "(b) kdc distill training pass: in-memory data, cached teacher logits",
        f"{r['kdc_distill_median_epoch_seconds']:.3f}",
        fmt(r["kdc_distill_epoch_seconds"], 3),
        f"{r['kdc_distill_accuracy']:.4f}",
    )
    t.add_row(
        "(c) cross-entropy training pass, kdc data path",
        f"{r['ce_median_epoch_seconds']:.3f}",
        fmt(r["ce_epoch_seconds"], 3),
        f"{r['ce_accuracy']:.4f}",
    )
    t.add_row("cache build: the teacher's logits, once", f"{r['teacher_cache_seconds']:.2f}", "", "")
    t.add_row(
        f"teacher MLP {r['teacher_params']:,} params (`kdc train-teacher`, {r['teacher_epochs']} epochs)",
        "",
        fmt(r["teacher_epoch_seconds"]),
        f"{r['teacher_accuracy']:.4f}",
    )
    out.print(t)
    s = Table(show_header=False, box=None)
    s.add_column(justify="left")
    s.add_column(justify="right")
    s.add_row(
        "naive / CLI marginal epoch (median of the rounds' ratios)",
        f"{r['ratio_naive_cli']:.2f}  {mark(r['meets_naive_cli'])} target >= {r['target_naive_cli']:g}",
    )
    s.add_row("naive / CLI in each round", fmt(r["ratio_naive_cli_per_round"]))
    s.add_row(
        "b/c (kdc distill / cross-entropy training pass; median of the epochs' ratios)",
        f"{r['ratio_b_c']:.2f}  {mark(r['meets_b_c'])} target <= {r['target_b_c']:g}",
    )
    s.add_row("a/b (naive / kdc distill training pass)", f"{r['ratio_a_b']:.2f}")
    s.add_row(
        "naive/CLI, b/c, a/b as ratios of the medians",
        f"{r['ratio_naive_cli_of_medians']:.2f}, {r['ratio_b_c_of_medians']:.2f}, {r['ratio_a_b_of_medians']:.2f}",
    )
    s.add_row("a/b with the cache build spread over the epochs", f"{r['ratio_a_b_amortised']:.2f}")
    s.add_row("a/b, b/c from the fastest epochs (less noise)", f"{r['ratio_a_b_min']:.2f}, {r['ratio_b_c_min']:.2f}")
    s.add_row("CLI marginal epoch / training pass (b)", f"{r['ratio_cli_b']:.2f}")
    s.add_row("augmented / cached CLI marginal epoch", f"{r['ratio_augment_cli']:.2f}")
    s.add_row(
        "data setup seconds: kdc load_data / torchvision datasets",
        f"{r['kdc_data_load_seconds']:.2f} / {r['naive_data_setup_seconds']:.2f}",
    )
    s.add_row("peak RSS MB (this process)", f"{r['peak_rss_mb']:.0f}")
    s.add_row("load average start / end (1 min)", f"{r['loadavg_start'][0]:.2f} / {r['loadavg_end'][0]:.2f}")
    s.add_row("commit, CPU", f"{r['commit']}{'+' if r['commit_dirty'] else ''}, {r['cpu_model']}")
    s.add_row("wall seconds", f"{r['wall_seconds']:.1f}")
    out.print(s)


if __name__ == "__main__":
    main()
