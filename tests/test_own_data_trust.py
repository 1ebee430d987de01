"""Honest numbers on your own image folders: classes follow the training split, unreadable images are named
before training, and a perfect score makes a report like any other (issue 17, rows 7 to 9)."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from kdcompress.data import load_data, scan_imagefolder
from kdcompress.errors import DataError
from kdcompress.recipe import DataSection
from kdcompress.report import compare_accuracy, report_markdown, report_table, report_warnings

# grey level of every pixel of a class's images: classes anyone can tell apart
GREY = {"ant": 0, "bee": 255, "cat": 128, "dog": 64, "eel": 192}


def make_folder(root, layout, size=8):
    """``layout``: {split: {class: number of images}}; each class's images are one flat grey (see GREY)."""
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (size, size), GREY[name]).save(folder / f"{i}.png")
    return root


def png_bytes(size=16):
    """A valid PNG whose pixels do not compress away, so that cutting it short loses image data."""
    image = Image.frombytes("L", (size, size), bytes((i * 7919) % 251 for i in range(size * size)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def folder_recipe(write_recipe, root, workers=0, **sections):
    changes = {
        "data": {"dataset": f"imagefolder:{root}", "batch_size": 16, "workers": workers},
        "teacher": {"args": {"hidden": [16]}, "epochs": 2},
        "student": {"args": {"hidden": [8]}},
        "prune": {"rate": 0.5, "target_sparsity": 0.5, "every": 0.5, "epochs": 1},
    }
    changes.update(sections)
    return write_recipe(changes=changes)


TWO_SPLITS = {"train": {"ant": 4, "bee": 4, "cat": 4}, "test": {"ant": 2, "bee": 2, "cat": 2}}


# --------------------------------------------------------------------------- class folders (row 7)


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_an_evaluation_split_missing_a_class_folder_is_refused_at_validate_naming_it_and_both_splits(
    held_out, tmp_path, write_recipe, kdc, in_tmp
):
    root = make_folder(tmp_path / "imgs", {"train": TWO_SPLITS["train"], held_out: {"ant": 2, "cat": 2}})
    recipe = folder_recipe(write_recipe, root)
    for command in ("validate", "run"):
        result = kdc(command, recipe)
        kdc.assert_clean_exit(result, 2)
        text = kdc.flat(result)
        assert "'bee'" in text and f"{root / 'train'}" in text and f"{root / held_out}" in text, text
    assert not (in_tmp / "runs").exists()  # refused before anything was trained


def test_an_extra_class_folder_in_the_test_split_is_refused_naming_it(tmp_path, write_recipe, kdc, in_tmp):
    root = make_folder(tmp_path / "imgs", {"train": TWO_SPLITS["train"], "test": {**TWO_SPLITS["test"], "dog": 2}})
    result = kdc("validate", folder_recipe(write_recipe, root))
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert "'dog'" in text and f"{root / 'test'}" in text and f"{root / 'train'}" in text, text


def test_loading_a_folder_with_a_missing_test_class_from_python_is_refused_too(tmp_path):
    """A 93.9 % model was reported at 47.5 %: the test split's labels were numbered from its own folders."""
    root = make_folder(tmp_path / "imgs", {"train": TWO_SPLITS["train"], "test": {"ant": 2, "cat": 2}})
    with pytest.raises(DataError, match="'bee'"):
        load_data(DataSection(dataset=f"imagefolder:{root}", workers=0), seed=0)


def test_test_labels_are_the_training_splits_class_numbers(tmp_path):
    root = make_folder(tmp_path / "imgs", TWO_SPLITS)
    scan = scan_imagefolder(f"imagefolder:{root}")
    assert scan.classes == ("ant", "bee", "cat")
    assert {(Path(p).parent.name, label) for p, label in scan.samples["test"]} == {("ant", 0), ("bee", 1), ("cat", 2)}
    splits = load_data(DataSection(dataset=f"imagefolder:{root}", workers=0), seed=0)
    assert sorted(int(v) for _, y, _ in splits.test.batches(6) for v in y) == [0, 0, 1, 1, 2, 2]


# --------------------------------------------------------------------------- unreadable images (row 8)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "empty"),
        (b"this is no picture at all", "not an image"),
        (png_bytes()[8:], "not an image"),  # the signature cut off
    ],
)
def test_an_empty_or_corrupt_image_is_named_at_validate(content, why, tmp_path, write_recipe, kdc, in_tmp):
    root = make_folder(tmp_path / "imgs", TWO_SPLITS)
    bad = root / "test" / "bee" / "broken.png"
    bad.write_bytes(content)
    recipe = folder_recipe(write_recipe, root)
    for command in ("validate", "run"):
        result = kdc(command, recipe)
        kdc.assert_clean_exit(result, 2)
        text = kdc.flat(result)
        assert str(bad) in text and why in text, text
    assert not (in_tmp / "runs").exists()


def test_every_unreadable_image_is_named_at_once(tmp_path):
    root = make_folder(tmp_path / "imgs", TWO_SPLITS)
    bad = [root / "train" / "ant" / "0.png", root / "test" / "cat" / "1.png"]
    for path in bad:
        path.write_bytes(b"")
    with pytest.raises(DataError) as caught:
        scan_imagefolder(f"imagefolder:{root}")
    assert all(str(path) in str(caught.value) for path in bad), caught.value


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_fails_to_decode_in_training_is_a_data_error_naming_it(
    workers, tmp_path, write_recipe, kdc, in_tmp
):
    root = make_folder(tmp_path / "imgs", TWO_SPLITS)
    bad = root / "train" / "bee" / "cut.png"
    bad.write_bytes(png_bytes(8)[:60])  # a sound header (the folder's size), the image data cut short
    scan_imagefolder(f"imagefolder:{root}")  # the header check passes it
    result = kdc("run", folder_recipe(write_recipe, root, workers=workers))
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert str(bad) in text and "cannot decode" in text, text


# --------------------------------------------------------------------------- a perfect score (row 9)


def test_a_difference_of_zero_with_a_standard_error_of_zero_is_within_noise():
    perfect = {"stage": "student", "accuracy": 1.0, "accuracy_se": 0.0}
    comp = compare_accuracy(perfect, {**perfect, "stage": "distilled"})
    assert comp["se"] == 0.0 and comp["difference"] == 0.0
    assert comp["within_noise"] is True and comp["z"] == 0.0
    json.dumps(comp, allow_nan=False)


def test_a_distilled_student_at_zero_against_a_perfect_baseline_is_beyond_noise_and_warns_without_crashing():
    def row(stage, accuracy):
        return {
            "stage": stage,
            "accuracy": accuracy,
            "accuracy_se": 0.0,
            "settings": {},
            "chance_accuracy": None,
            "train_accuracy": None,
        }

    comp = compare_accuracy(row("student", 1.0), row("distilled", 0.0))
    assert comp["difference"] == -1.0 and comp["se"] == 0.0
    assert comp["within_noise"] is False and comp["z"] is None  # infinitely many SEs: no JSON number says that
    json.dumps(comp, allow_nan=False)
    (warning,) = report_warnings({"stages": [row("student", 1.0), row("distilled", 0.0)], "comparisons": [comp]})
    assert "100.00 points lower" in warning and "beyond noise (infinitely many standard errors" in warning


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_run_whose_students_score_100_percent_writes_all_three_report_files(tmp_path, write_recipe, kdc, in_tmp):
    from rich.console import Console

    from kdcompress.report.html import render_html

    root = make_folder(tmp_path / "imgs", {"train": {"ant": 24, "bee": 24}, "test": {"ant": 12, "bee": 12}})
    result = kdc("run", folder_recipe(write_recipe, root))
    kdc.assert_clean_exit(result, 0)
    run_dir = in_tmp / "runs" / "tiny"
    report = strict_json((run_dir / "report.json").read_text())
    accuracy = {row["stage"]: row["accuracy"] for row in report["stages"]}
    assert accuracy == {"teacher": 1.0, "student": 1.0, "distilled": 1.0, "pruned": 1.0}  # the case under test
    for comp in report["comparisons"]:
        assert comp["se"] == 0.0 and comp["within_noise"] is True, comp
    assert "within noise" in (run_dir / "report.md").read_text()
    assert "within noise" in (run_dir / "report.html").read_text()
    # the same report with the distilled student at 0 %: beyond noise, in every form the report takes
    rows = {row["stage"]: row for row in report["stages"]}
    rows["distilled"]["accuracy"] = 0.0
    report["comparisons"] = [compare_accuracy(rows["student"], rows["distilled"])]
    for text in (report_markdown(report), render_html(report)):
        assert "-100.00 points ± 0.00 (SE): infinitely many SE, beyond noise" in text
    assert any("100.00 points lower, beyond noise" in w for w in report_warnings(report))
    Console(file=io.StringIO()).print(report_table(report))
