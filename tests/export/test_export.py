"""`kdc export` and the recipe's export section: artifacts written beside a run, each loaded back through
load_artifact and measured, shown in the report; crafted files refused without running anything
(issue 10). The codecs themselves are tested in test_export_codecs.py and test_export_onnx.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from kdcompress.errors import ArtifactError
from kdcompress.export import load_artifact, verify_artifact
from kdcompress.files import manifest_path
from kdcompress.report import build_report, report_markdown, report_table
from kdcompress.report import latency as latency_mod
from kdcompress.run import read_artifacts

RUN = Path("runs") / "tiny"


@pytest.fixture(scope="module")
def exported(fresh_run, tiny_recipe_text):
    """The tiny run, then `kdc export --format sparse --format shared --bits 3 --format onnx` on its directory."""
    work, _ = fresh_run(tiny_recipe_text, "export", "run")
    from typer.testing import CliRunner

    from kdcompress.cli import app

    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(
            app, ["export", str(RUN), "--format", "sparse", "--format", "shared", "--bits", "3", "--format", "onnx"]
        )
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return work / RUN, result


@pytest.fixture
def run_copy(exported, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(exported[0], dest)
    return dest


def _render(renderable, width: int = 100) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_export_writes_each_artifact_with_its_manifest_and_a_measured_row(exported):
    run_dir, result = exported
    rows = {r["format"]: r for r in read_artifacts(run_dir)}
    assert set(rows) == {"sparse", "shared", "onnx"}
    assert rows["sparse"]["path"] == "export/pruned-sparse-fp16.kdca"
    assert rows["shared"]["path"] == "export/pruned-shared-3bit.kdca"
    assert rows["onnx"]["path"] == "export/pruned.onnx"
    for row in rows.values():
        path = run_dir / row["path"]
        assert path.is_file() and manifest_path(path).is_file()
        assert row["bytes"] == path.stat().st_size
        assert 0.5 < row["accuracy"] <= 1.0 and row["test_samples"] > 0
    for fmt in ("sparse", "shared"):
        assert rows[fmt]["bytes"] * 4 < (run_dir / "pruned" / "model.pt").stat().st_size
    # the same fp32 graph in onnxruntime: the same score
    assert abs(rows["onnx"]["accuracy_change_vs_stage"]) <= 0.001
    # fp16 non-zeros change no prediction of this small model by more than a few test images
    assert abs(rows["sparse"]["accuracy_change_vs_stage"]) <= 0.01
    assert "pruned-sparse-fp16.kdca" in result.output and "artifacts" in result.output


def test_report_json_lists_artifacts_with_bytes_ratios_and_latency(exported, monkeypatch):
    run_dir, _ = exported
    monkeypatch.setattr(latency_mod, "LATENCY_MIN_RUN_TIME", 0.02)
    report = build_report(run_dir, latency=True)
    arts = {a["format"]: a for a in report["artifacts"]}
    teacher_bytes = next(r for r in report["stages"] if r["stage"] == "teacher")["checkpoint_bytes"]
    for fmt, a in arts.items():
        for key in ("stage", "format", "path", "bytes", "accuracy", "latency_ms", "compression_vs_teacher"):
            assert key in a, key
        assert a["stage"] == "pruned" and not a["refused"] and not a["stale"]
        assert a["compression_vs_teacher"] == pytest.approx(teacher_bytes / a["bytes"])
        assert set(a["latency_ms"]) == {"1", "64"} and all(v > 0 for v in a["latency_ms"].values())
    text = _render(report_table(report))
    assert "pruned-shared-3bit.kdca" in text and "teacher" in text and "/ file" in text
    assert not [line for line in text.splitlines() if len(line.rstrip()) > 100]
    md = report_markdown(report)
    assert "## Artifacts" in md and "export/pruned-sparse-fp16.kdca" in md


def test_accuracy_is_measured_from_the_loaded_file_not_copied(run_copy, monkeypatch, kdc):
    """A decoder that returns a broken model gives the row a broken accuracy: the number comes from the file."""
    from kdcompress.export import sparse

    real = sparse.decode

    def broken(blob, **kwargs):
        model, preprocess = real(blob, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # every logit 0: argmax says class 0 for every image
        return model, preprocess

    monkeypatch.setattr(sparse, "decode", broken)
    result = kdc("export", str(run_copy), "--format", "sparse", "--force")
    kdc.assert_clean_exit(result, 0)
    row = next(r for r in read_artifacts(run_copy) if r["format"] == "sparse")
    assert row["accuracy"] < 0.2 < row["stage_accuracy"]


def test_an_up_to_date_artifact_is_kept_and_force_writes_it_again(run_copy, kdc):
    path = run_copy / "export" / "pruned-sparse-fp16.kdca"
    os.utime(path, (1, 1))
    result = kdc("export", str(run_copy), "--format", "sparse")
    kdc.assert_clean_exit(result, 0)
    assert "up to date" in kdc.flat(result) and path.stat().st_mtime == 1
    result = kdc("export", str(run_copy), "--format", "sparse", "--force")
    kdc.assert_clean_exit(result, 0)
    assert path.stat().st_mtime != 1


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(path: Path, marker: Path, fix_manifest: bool) -> None:
    blob = pickle.dumps({"weights": _Payload(str(marker))})
    path.write_bytes(blob)
    if fix_manifest:  # an attacker who rewrites the manifest too: the decoder itself must refuse
        manifest = json.loads(manifest_path(path).read_text())
        import hashlib

        manifest.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        manifest_path(path).write_text(json.dumps(manifest))


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["manifest-kept", "manifest-rewritten"])
@pytest.mark.parametrize("name", ["pruned-sparse-fp16.kdca", "pruned-shared-3bit.kdca", "pruned.onnx"])
def test_a_crafted_pickle_is_refused_by_load_artifact_and_the_report(run_copy, tmp_path, kdc, name, fix_manifest):
    marker = tmp_path / "payload-ran"
    path = run_copy / "export" / name
    _plant_pickle(path, marker, fix_manifest)
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    assert name in str(info.value) or "kdc artifact" in str(info.value) or "refused" in str(info.value)
    result = kdc("report", str(run_copy))
    kdc.assert_clean_exit(result, 0)
    assert "refused" in result.output and name in kdc.flat(result)
    assert not marker.exists()


def test_verify_artifact_names_a_missing_manifest(run_copy):
    path = run_copy / "export" / "pruned-sparse-fp16.kdca"
    manifest_path(path).unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        verify_artifact(path)


def test_export_before_the_stage_exists_says_which_command_to_run(write_recipe, kdc, in_tmp):
    write_recipe()
    result = kdc("export", "recipe.yaml", "--format", "sparse")
    assert result.exit_code != 0 and "Traceback" not in result.output
    text = kdc.flat(result)
    assert "cannot export the 'pruned' stage" in text and "kdc prune recipe.yaml" in text


def test_export_needs_a_format(write_recipe, kdc, in_tmp):
    write_recipe()
    result = kdc("export", "recipe.yaml")
    assert result.exit_code != 0 and "nothing to export" in kdc.flat(result)
    assert "Traceback" not in result.output


def test_a_misspelt_format_gets_a_suggestion(write_recipe, kdc, in_tmp):
    write_recipe()
    result = kdc("export", "recipe.yaml", "--format", "sprase")
    assert result.exit_code != 0 and "did you mean 'sparse'" in kdc.flat(result)
    assert "Traceback" not in result.output


def test_export_section_makes_kdc_run_write_the_artifacts(fresh_run, tiny_recipe_dict):
    import yaml

    tiny_recipe_dict["export"] = {"formats": ["sparse"], "stage": "distilled", "dtype": "fp32"}
    work, result = fresh_run(yaml.safe_dump(tiny_recipe_dict), "export-section", "run")
    rows = read_artifacts(work / RUN)
    assert [(r["stage"], r["format"], r["path"]) for r in rows] == [
        ("distilled", "sparse", "export/distilled-sparse-fp32.kdca")
    ]
    # fp32 keeps every bit: the file scores exactly what the checkpoint scored
    assert rows[0]["accuracy"] == rows[0]["stage_accuracy"]
    report = json.loads((work / RUN / "report.json").read_text())
    assert [a["path"] for a in report["artifacts"]] == ["export/distilled-sparse-fp32.kdca"]


def test_export_of_a_stage_that_is_not_trained_is_a_recipe_problem(write_recipe, kdc, in_tmp):
    write_recipe(changes={"student": {"baseline": False}, "export": {"formats": ["sparse"], "stage": "student"}})
    result = kdc("validate", "recipe.yaml")
    assert result.exit_code != 0 and "export.stage" in kdc.flat(result)


def test_a_run_whose_export_needs_a_missing_extra_stops_before_training(write_recipe, kdc, in_tmp, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    write_recipe(changes={"export": {"formats": ["sparse", "int8"]}})
    result = kdc("run", "recipe.yaml")
    assert result.exit_code != 0 and "Traceback" not in result.output
    text = kdc.flat(result)
    assert "pip install 'kdcompress[onnx]'" in text and "onnxruntime" in text
    assert not Path("runs/recipe/teacher/model.pt").exists()


def test_validate_lists_the_export(write_recipe, kdc, in_tmp):
    write_recipe(changes={"export": {"formats": ["sparse", "shared"]}})
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "export: sparse, shared of the pruned stage" in kdc.flat(result)


def test_the_deploy_example_in_docs_export_runs(exported, capsys):
    page = (Path(__file__).parents[2] / "docs" / "export.md").read_text(encoding="utf-8")
    blocks = [b.split("\n", 1)[1].split("```")[0] for b in page.split("```python")[1:]]
    (code,) = [b for b in blocks if "load_artifact(" in b]
    assert "runs/fashion-mnist-mlp/export/pruned-shared-4bit.kdca" in code
    run_dir, _ = exported
    exec(code.replace("runs/fashion-mnist-mlp", str(run_dir)).replace("4bit", "3bit"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and printed.count("'") == 16  # eight class names
