"""Issue 17's acceptance figures, measured end to end on crafted inputs (the tests assert the same things).

    python scripts/trust_acceptance.py [--keep DIR]

Makes a tiny run (fashion-mnist-mini, seconds), then for each attack runs the real `kdc` command in a
child process and prints its exit code, its wall time and its peak resident memory:

- YAML alias bombs (478 and 368 bytes) given to `kdc validate`;
- a sparse artifact whose bitmask declares 134M weights, loaded by `load_artifact` and by `kdc report`;
- a stage checkpoint whose recipe and history are a pickle memo bomb, given to `kdc report`;
- a stage checkpoint naming a planted module (`evil_mod:build`), given to `kdc export RUN` and `kdc run RUN`
  (whether the module's marker file appeared);
- two `kdc run` on one run directory: how long the second took to be refused, and whether the first's
  metrics.jsonl files hold exactly one line per epoch.

Peak memory is read by a small wrapper process (``RUSAGE_CHILDREN``) so that this script's own memory is
not counted. Exits 1 if a figure misses the issue's bound (refused with exit 2, under 1 GB, no marker).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GB = 1 << 30
TINY = {
    "run": {"name": "tiny", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 128},
    "teacher": {"model": "mlp", "args": {"hidden": [64]}, "epochs": 2},
    "student": {"model": "mlp", "args": {"hidden": [32]}, "baseline": True},
    "distill": {"epochs": 2},
    "prune": {"rate": 0.5, "target_sparsity": 0.75, "every": 0.5, "epochs": 2},
    "report": {"latency": False},
}
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=900)
print(json.dumps({"rc": done.returncode, "seconds": time.perf_counter() - start,
                  "output": (done.stdout + done.stderr)[-400:],
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    "OMP_NUM_THREADS": "1",
}
results: list[tuple[str, bool, str]] = []


def measured(args: list[str], cwd: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def kdc(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcompress", *args]


def record(what: str, ok: bool, detail: str) -> None:
    results.append((what, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {what}: {detail}", flush=True)


def refused_under_1gb(what: str, result: dict, expect: str) -> None:
    ok = result["rc"] == 2 and result["peak"] < GB and expect in result["output"]
    record(
        what,
        ok,
        f"exit {result['rc']}, {result['seconds']:.1f} s, peak {result['peak'] / 2**20:,.0f} MiB"
        + ("" if ok else f"; output: {result['output']!r}"),
    )


def yaml_bombs(work: Path) -> None:
    levels = "abcdefghi"  # 9 levels of 9 aliases: 9**9 leaves once expanded

    def lines(indent: str, sep: str) -> list[str]:
        out = [f"{indent}a: &a [" + sep.join(["lol"] * 9) + "]"]
        out += [f"{indent}{b}: &{b} [" + sep.join([f"*{a}"] * 9) + "]" for a, b in zip(levels, levels[1:])]
        return out

    bombs = {
        "in-args": "\n".join(["run: {name: xy}", "teacher:", "  model: mlp", "  args:", *lines("    ", ", ")]) + "\n",
        "at-top": "# a billion laughs: 9 levels of 9 aliases.\n\n" + "\n".join(lines("", ",")) + "\n",
    }
    for name, text in bombs.items():
        path = work / f"bomb-{name}.yaml"
        path.write_text(text, encoding="utf-8")
        refused_under_1gb(
            f"YAML alias bomb ({len(text.encode())} bytes), kdc validate",
            measured(kdc("validate", path.name), work),
            "too big for a recipe",
        )


def bitmask_bomb(run: Path, work: Path) -> None:
    import torch

    from kdcompress.export.container import pack, unpack

    path = run / "export" / "pruned-sparse-fp16.kdca"
    tensors, meta = unpack(path.read_bytes())
    tensors = dict(tensors)
    name = next(n for n, entry in meta["layout"].items() if entry[0] == "s")
    count = 2**27
    meta["layout"][name] = ["s", "float32", [count]]
    tensors[f"{name}|m"] = torch.zeros(count // 8, dtype=torch.uint8)
    tensors[f"{name}|v"] = torch.zeros(0, dtype=torch.float16)
    path.write_bytes(pack(tensors, meta, "lzma"))
    rewrite_manifest(path)
    size = path.stat().st_size
    code = f"from kdcompress.export import load_artifact; load_artifact({str(path)!r})"
    result = measured([sys.executable, "-c", code], work)
    ok = result["rc"] != 0 and "layout declares" in result["output"] and result["peak"] < GB
    record(
        f"bitmask bomb ({size:,} bytes, 134M weights declared), load_artifact",
        ok,
        f"refused (ArtifactError), {result['seconds']:.1f} s, peak {result['peak'] / 2**20:,.0f} MiB",
    )
    result = measured(kdc("report", str(run.relative_to(work))), work)
    ok = result["rc"] == 0 and result["peak"] < GB  # the report shows the file as refused, as any replaced file
    record(
        "bitmask bomb, kdc report",
        ok,
        f"exit {result['rc']} (the artifact's row is refused), "
        f"{result['seconds']:.1f} s, peak {result['peak'] / 2**20:,.0f} MiB",
    )


def rewrite_manifest(path: Path) -> None:
    import hashlib

    from kdcompress.files import manifest_path

    blob = path.read_bytes()
    manifest = json.loads(manifest_path(path).read_text())
    manifest.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    manifest_path(path).write_text(json.dumps(manifest))


def memo_bomb(run: Path, work: Path) -> None:
    from kdcompress.checkpoint import load_checkpoint, save_checkpoint

    value = ["kdc"] * 10
    for _ in range(9):
        value = [value] * 10  # 10**10 strings once written out
    path = run / "teacher" / "model.pt"
    ckpt = load_checkpoint(path)
    ckpt["history"] = value
    ckpt["recipe"]["report"] = value
    save_checkpoint(path, ckpt)
    refused_under_1gb(
        "pickle memo bomb in a checkpoint (10**10 values once written out), kdc report",
        measured(kdc("report", str(run.relative_to(work))), work),
        "values once written out",
    )


def planted_module(run: Path, work: Path) -> None:
    from kdcompress.checkpoint import load_checkpoint, save_checkpoint

    marker = work / "pwned"
    for folder in (run, work):
        (folder / "evil_mod.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef build(**kw):\n    raise SystemExit\n",
            encoding="utf-8",
        )
    for stage, command in (("pruned", ["export", "--force"]), ("distilled", ["run"])):
        path = run / stage / "model.pt"
        ckpt = load_checkpoint(path)
        ckpt["arch"] = {**ckpt["arch"], "model": "evil_mod:build"}
        save_checkpoint(path, ckpt)  # kdc's own writer: the manifest matches
        result = measured(kdc(command[0], str(run.relative_to(work)), *command[1:]), work)
        ok = result["rc"] == 2 and not marker.exists() and "but the recipe says 'mlp'" in result["output"]
        record(
            f"planted evil_mod:build in {stage}/model.pt, kdc {command[0]} RUN",
            ok,
            f"exit {result['rc']}, marker file {'created' if marker.exists() else 'never created'}",
        )


def two_writers(work: Path) -> None:
    live = {
        **TINY,
        "run": {**TINY["run"], "name": "live"},
        "teacher": {**TINY["teacher"], "epochs": 8},
        "distill": {"epochs": 4, "temperature": 3},
    }
    (work / "live.yaml").write_text(yaml.safe_dump(live), encoding="utf-8")
    run_dir = work / "runs" / "live"
    with open(work / "first.log", "w") as log:
        first = subprocess.Popen(kdc("run", "live.yaml"), cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (run_dir / "teacher" / "state.pt").is_file() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never wrote a resume state"
            time.sleep(0.05)
        started = time.perf_counter()
        second = subprocess.run(
            kdc("run", "live.yaml", "--set", "distill.temperature=2"),
            cwd=work,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        took = time.perf_counter() - started
        first_rc = first.wait(timeout=900)
    ok = second.returncode == 2 and "is writing" in second.stderr and first_rc == 0
    record(
        "two kdc run on one run directory",
        ok,
        f"second exit {second.returncode} after {took:.1f} s ({second.stderr.strip().splitlines()[-1][:160]}); "
        f"first exit {first_rc}",
    )
    epochs = {"teacher": 8, "student": 4, "distilled": 4, "pruned": 2}
    counts = {s: len((run_dir / s / "metrics.jsonl").read_text().splitlines()) for s in epochs}
    record("the first run's metrics.jsonl, lines per stage", counts == epochs, f"{counts} for epochs {epochs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="kdc-trust-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (work / "recipe.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
        for command in (kdc("run", "recipe.yaml", "--quiet"), kdc("export", "runs/tiny", "--format", "sparse", "-q")):
            subprocess.run(command, cwd=work, env=ENV, check=True, capture_output=True)
        run = work / "runs" / "tiny"
        yaml_bombs(work)
        bitmask_bomb(run, work)  # before the stage checkpoints are planted: the report must get to the artifacts
        planted_module(run, work)
        memo_bomb(run, work)
        two_writers(work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [what for what, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks pass" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
