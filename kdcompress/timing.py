"""The report's latency: a run's files timed in turns, in a child process whose OpenMP threads sleep when idle.

OpenMP reads its wait policy once, when torch loads. Its default lets a waiting thread spin for a while: training
small models (many short parallel regions) needs that, since a sleeping thread pays a wake-up on each region
(kdc's forced ``OMP_WAIT_POLICY=PASSIVE`` made an MLP's training epoch 2.6x slower). Timing needs the opposite on
a busy machine: a spinning thread holds a core that the work could use (with one of two cores busy, a small CNN
at batch 64 took 86 ms with the default policy, 24 ms with PASSIVE, 12 to 14 ms on the quiet machine:
``scripts/bench_latency_policy.py``). So the process that trains keeps the default, and
:func:`time_in_child` times models in a fresh Python process started with ``OMP_WAIT_POLICY=PASSIVE``, where
:func:`kdcompress.measure.interleaved_latencies` times them in turns.

What crosses to the child is plain JSON: each file's path, the SHA-256 the parent checked, the model name the
parent's recipe gives it and the folders its import paths search. The child loads each file as the parent did
(checked against its manifest; a checkpoint through ``weights_only``, an artifact without unpickling), refuses one
whose SHA-256 is not the parent's, and builds only the model name it was given, so it imports no code the parent
did not. Its ``sys.path`` is the parent's but for relative entries, set before anything else is imported
(``python -I``: no current directory, no ``PYTHON*`` variables).

Example::

    >>> files = {"pruned": ModelFile("checkpoint", "runs/quickstart/pruned/model.pt", sha, "mlp", "pruned checkpoint")}
    >>> timed, policy = time_in_child(files, [(64, ["pruned"])], threads=2)  # doctest: +SKIP
    >>> timed[0]["pruned"]["median_ms"], policy  # doctest: +SKIP
    (0.41, 'PASSIVE')
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

import torch

from .checkpoint import load_checkpoint, read_manifest
from .errors import KdcError
from .export import load_artifact
from .measure import LATENCY_ROUNDS, interleaved_latencies
from .models import build_from_checkpoint
from .names import add_import_dir, import_dirs

__all__ = [
    "MALLOC_SETTINGS",
    "ModelFile",
    "time_in_child",
    "child_env",
    "restart_in_timing_env",
    "WAIT_POLICY",
    "KINDS",
]

WAIT_POLICY = "PASSIVE"  # the OpenMP wait policy the timing process starts with
KINDS = ("checkpoint", "artifact")
# the child: the parent's sys.path first (json and sys are the standard library's: -I puts no folder before them)
_CHILD = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from kdcompress.timing import child_main; sys.exit(child_main())"
)


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A file to time: a stage checkpoint or an exported artifact, as the parent checked it.

    ``sha256`` is the file's as the parent read it (a checkpoint's or artifact's manifest); ``expected`` the model
    name the parent's recipe gives it (None: built-in models only); ``where`` names it in messages.
    """

    kind: str
    path: str
    sha256: str
    expected: str | None
    where: str


# glibc's allocator hands a large block (an activation of a CNN at batch 64: megabytes) out of a fresh mmap, whose
# pages fault in on first touch, unless an earlier free of a larger block raised its threshold; and it gives memory
# back when the top of the heap grows past a trim threshold. So one model's time depended on which models the same
# process had run before: a CNN at batch 64 took 15.5 ms timed beside its pruned copy, 10.5 ms beside a larger
# teacher (2 threads, quiet machine). Fixed thresholds keep every block on the heap once touched: 10.4-10.8 ms in
# both, the steady state a serving process reaches. Set by the user, they are left alone.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}


def child_env() -> dict[str, str]:
    """The timing process's environment: this one's with ``OMP_WAIT_POLICY=PASSIVE``, fixed glibc allocator
    thresholds (:data:`MALLOC_SETTINGS`, unless set), and without the ``GOMP_SPINCOUNT`` that training may run with
    (:func:`kdcompress.cli.entry`), which would override PASSIVE's 0."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    return {**MALLOC_SETTINGS, **env, "OMP_WAIT_POLICY": WAIT_POLICY}


def restart_in_timing_env() -> None:
    """Restart this Python program with :func:`child_env` unless it already runs with it: OpenMP and glibc read
    those settings once, at start, so a benchmark script that times as the report does calls this first."""
    env = child_env()
    if any(os.environ.get(key) != env[key] for key in ("OMP_WAIT_POLICY", *MALLOC_SETTINGS)):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def time_in_child(
    files: Mapping[str, ModelFile],
    sets: Sequence[tuple[int, Sequence[str]]],
    threads: int,
    rounds: int = LATENCY_ROUNDS,
    min_run_time: float = 0.5,
) -> tuple[list[dict[str, dict]], str | None]:
    """Time ``files`` in a child process started with ``OMP_WAIT_POLICY=PASSIVE``.

    ``sets`` lists (batch size, keys of ``files``): the models of one set are timed together, in turns
    (:func:`kdcompress.measure.interleaved_latencies`, ``rounds`` rounds, ``min_run_time`` seconds per model), so
    the ratio of two of them comes from the same rounds. Returns the timing of each set, key -> what
    :func:`kdcompress.measure.interleaved_latencies` returns, and the wait policy the child ran with. A file that
    changed since the parent checked it, or a child that fails, raises KdcError.
    """
    request = {
        "files": {key: dataclasses.asdict(f) | {"path": os.path.abspath(f.path)} for key, f in files.items()},
        "sets": [[int(batch), list(keys)] for batch, keys in sets],
        "threads": int(threads),
        "rounds": int(rounds),
        "min_run_time": float(min_run_time),
        "import_dirs": import_dirs(),
    }
    env = child_env()
    done = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, json.dumps(_import_path())],
        input=json.dumps(request),
        env=env,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict):
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise KdcError(
            f"latency could not be timed: the timing process ({sys.executable}) failed with exit code "
            f"{done.returncode}: {last}. With report.latency: false in the run's recipe.yaml the report is made without "
            f"latency"
        )
    if "error" in answer:
        raise KdcError(f"latency could not be timed: {answer['error']}")
    return answer["sets"], answer.get("omp_wait_policy")


def _import_path() -> list[str]:
    """This process's ``sys.path`` without its relative entries: "" (the current directory, as ``python -c`` and
    notebooks have it) would find modules there that this process never imported from there; the folders of
    import paths are found through :func:`kdcompress.names.import_dirs` as here."""
    return [entry for entry in sys.path if entry and os.path.isabs(entry)]


def _load(file: ModelFile, threads: int):
    """The model in ``file`` and its input shape, checked as the parent checked it, and against its SHA-256."""
    if file.kind == "checkpoint":
        ckpt = load_checkpoint(file.path)
        sha = read_manifest(file.path)["sha256"]
        model = build_from_checkpoint(ckpt, where=file.where, expected=file.expected)
        shape = tuple(ckpt["arch"]["input_shape"])
    elif file.kind == "artifact":
        model = load_artifact(file.path, expected=file.expected)
        sha = model.artifact["sha256"]
        if hasattr(model, "set_threads"):  # an onnxruntime session fixes its threads when it is made
            model.set_threads(threads)
        shape = tuple(model.preprocess.input_shape)
    else:
        raise KdcError(f"{file.where}: unknown kind {file.kind!r} (one of {', '.join(KINDS)})")
    if sha != file.sha256:
        raise KdcError(f"{file.where} changed while the report was being made; run `kdc report` again")
    torch.manual_seed(0)  # the inputs: the same random batch every time
    return model.eval(), shape


def child_main() -> int:
    """The timing process: a request (JSON) on stdin, one line of JSON on stdout: the sets' timing or an error."""
    request = json.loads(sys.stdin.read())
    try:
        for folder in reversed(request["import_dirs"]):  # add_import_dir puts the newest first
            add_import_dir(folder)
        threads = int(request["threads"])
        needed = list(dict.fromkeys(key for _, keys in request["sets"] for key in keys))
        models = {key: _load(ModelFile(**request["files"][key]), threads) for key in needed}
        sets = [
            interleaved_latencies(
                {key: models[key] for key in keys},
                batch=batch,
                threads=threads,
                rounds=int(request["rounds"]),
                min_run_time=request["min_run_time"],
            )
            for batch, keys in request["sets"]
        ]
        answer = {"sets": sets, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    except KdcError as exc:
        answer = {"error": str(exc)}
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    return 0
