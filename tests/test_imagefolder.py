"""Your own images as they are (issue 20, items 1, 2 and 5): channels from the files, one size or a resize,
the training split's own statistics recorded in every checkpoint, what `kdc validate` says about a folder,
and an imagefolder path looked up beside the recipe."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdcompress
from kdcompress.data import (
    ImageSpec,
    decode_image,
    load_data,
    measure_stats,
    plan_imagefolder,
    preprocess_info,
    scan_imagefolder,
)
from kdcompress.errors import DataError
from kdcompress.recipe import DataSection, recipe_to_dict
from kdcompress.run.stages import stage_named

CLASSES = ("shirt", "trouser", "pullover")  # labels 0, 1, 2 of fashion-mnist-mini, named by their folders


@pytest.fixture(scope="module")
def mini():
    return load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)


def make_folder(root: Path, mini, train: int = 60, test: int = 30, counts: dict | None = None) -> Path:
    """fashion-mnist-mini's first three classes as grey PNGs: ``train``/``test`` images per class (``counts``:
    {class: training images} for some classes instead)."""
    for split, data, per_class in (("train", mini.train, train), ("test", mini.test, test)):
        written = dict.fromkeys(range(len(CLASSES)), 0)
        for image, label in zip(data.images, data.labels.tolist()):
            limit = (counts or {}).get(CLASSES[label], per_class) if split == "train" and label < 3 else per_class
            if label >= len(CLASSES) or written[label] >= limit:
                continue
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{written[label]:04d}.png")
            written[label] += 1
    return root


def png_arrays(folder: Path) -> list[np.ndarray]:
    return [np.array(Image.open(p)) for p in sorted(folder.rglob("*.png"))]


def folder_recipe(write_recipe, dataset: str, where=None, **data):
    changes = {
        "data": {"dataset": dataset, "batch_size": 32, "workers": 0, **data},
        "teacher": {"args": {"hidden": [32]}, "epochs": 2},
        "student": {"args": {"hidden": [16]}},
        "distill": {"epochs": 1},
        "prune": {"rate": 0.5, "target_sparsity": 0.5, "every": 0.5, "epochs": 1},
    }
    return write_recipe(changes=changes, where=where)


# --------------------------------------------------------------------------- channels and normalisation


def test_a_grey_png_folder_trains_one_channel_models_that_load_model_feeds_with_the_pngs_own_arrays(
    mini, tmp_path, write_recipe, kdc, in_tmp
):
    root = make_folder(tmp_path / "imgs", mini)
    result = kdc("run", folder_recipe(write_recipe, f"imagefolder:{root}"))
    kdc.assert_clean_exit(result, 0)
    report = json.loads((in_tmp / "runs" / "tiny" / "report.json").read_text())
    assert report["input"]["channels"] == "L" and report["input"]["input_shape"] == [1, 28, 28]
    for row in report["stages"]:
        model, preprocess = kdcompress.load_model(in_tmp / "runs" / "tiny" / row["stage"] / "model.pt")
        assert preprocess.input_shape == (1, 28, 28) and preprocess.channels == "L"
        files = sorted((root / "test").rglob("*.png"))
        labels = torch.tensor([preprocess.classes.index(f.parent.name) for f in files])
        with torch.no_grad():  # each PNG as np.array(Image.open(png)) gives it: (28, 28) uint8
            predicted = model(preprocess([np.array(Image.open(f)) for f in files])).argmax(1)
        accuracy = (predicted == labels).float().mean().item()
        assert abs(accuracy - row["accuracy"]) <= 0.001, (row["stage"], accuracy, row["accuracy"])


def test_measured_statistics_are_numpys_mean_and_std_of_the_training_images_and_every_checkpoint_records_them(
    mini, tmp_path, write_recipe, kdc, in_tmp
):
    root = make_folder(tmp_path / "imgs", mini, train=40, test=10)
    pixels = np.stack(png_arrays(root / "train")).astype(np.float64) / 255
    result = kdc("train-teacher", folder_recipe(write_recipe, f"imagefolder:{root}", val_split=0.2))
    kdc.assert_clean_exit(result, 0)
    ckpt = torch.load(in_tmp / "runs" / "tiny" / "teacher" / "model.pt", weights_only=True)
    info = ckpt["preprocess"]
    assert info["normalize"] == "measured" and info["resize"] is None
    assert info["mean"] == pytest.approx([pixels.mean()], abs=1e-9)
    assert info["std"] == pytest.approx([pixels.std()], abs=1e-9)
    assert ckpt["arch"]["input_shape"] == [1, 28, 28]


def test_measuring_a_large_split_reads_a_seeded_sample_of_the_size_asked(mini, tmp_path):
    root = make_folder(tmp_path / "imgs", mini, train=30, test=2)
    samples = scan_imagefolder(f"imagefolder:{root}").samples["train"]
    first = measure_stats(samples, ImageSpec(1, (28, 28)), limit=20, seed=3)
    again = measure_stats(list(samples), ImageSpec(1, (28, 28)), limit=20, seed=3)
    assert first == again and first[2] == 20
    assert measure_stats(samples, ImageSpec(1, (28, 28)), limit=20, seed=4)[0] != first[0]


def test_one_colour_file_makes_a_folder_three_channels_and_validate_names_it(mini, tmp_path, write_recipe, kdc, in_tmp):
    root = make_folder(tmp_path / "imgs", mini, train=12, test=4)
    colour = root / "train" / "shirt" / "0003.png"
    Image.open(colour).convert("RGB").save(colour)  # grey pixels, saved as RGB
    result = kdc("validate", folder_recipe(write_recipe, f"imagefolder:{root}"))
    kdc.assert_clean_exit(result, 0)
    text = kdc.flat(result)
    assert "input: 3x28x28" in text and "channels: 3 (auto: 1 of" in text and str(colour) in text, text
    assert "data.channels: 1" in text  # how to read it as grey
    plan = plan_imagefolder(DataSection(dataset=f"imagefolder:{root}", channels=1))
    assert plan.spec.shape == (1, 28, 28)


def test_a_channel_count_kdc_was_told_decodes_every_file_to_it(tmp_path):
    path = tmp_path / "red.png"
    grey_spec, colour_spec = ImageSpec(1, (4, 5)), ImageSpec(3, (4, 5))
    Image.new("RGB", (5, 4), (255, 0, 0)).save(path)
    assert decode_image(str(path), grey_spec).shape == (1, 4, 5)
    assert decode_image(str(path), grey_spec)[0, 0, 0] == 76  # PIL's L: 0.299 * 255
    Image.new("L", (5, 4), 9).save(path)
    assert decode_image(str(path), colour_spec).shape == (3, 4, 5)
    assert (decode_image(str(path), colour_spec) == 9).all()


# --------------------------------------------------------------------------- sizes


def test_mixed_sizes_are_refused_at_validate_with_both_sizes_and_a_file_of_each(
    mini, tmp_path, write_recipe, kdc, in_tmp
):
    root = make_folder(tmp_path / "imgs", mini, train=8, test=4)
    odd = root / "test" / "trouser" / "0001.png"
    Image.open(odd).resize((30, 32)).save(odd)  # 32 high, 30 wide
    recipe = folder_recipe(write_recipe, f"imagefolder:{root}")
    for command in ("validate", "run"):
        result = kdc(command, recipe)
        kdc.assert_clean_exit(result, 2)
        text = kdc.flat(result)
        assert "28x28" in text and "32x30" in text and str(odd) in text, text
        assert str(root / "train" / "pullover" / "0000.png") in text, text  # the first 28x28 file
        assert "data.image_size" in text
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("method", ["resize", "center-crop", "pad"])
def test_with_image_size_set_a_folder_of_mixed_sizes_runs(method, mini, tmp_path, write_recipe, kdc, in_tmp):
    root = make_folder(tmp_path / "imgs", mini, train=8, test=4)
    odd = root / "train" / "trouser" / "0001.png"
    Image.open(odd).resize((40, 20)).save(odd)
    recipe = folder_recipe(write_recipe, f"imagefolder:{root}", image_size=[24, 20], resize=method)
    result = kdc("validate", recipe)
    kdc.assert_clean_exit(result, 0)
    assert "input: 1x24x20" in kdc.flat(result) and f"data.resize {method}" in kdc.flat(result)
    result = kdc("train-teacher", recipe)
    kdc.assert_clean_exit(result, 0)
    info = torch.load(in_tmp / "runs" / "tiny" / "teacher" / "model.pt", weights_only=True)["preprocess"]
    assert info["input_shape"] == [1, 24, 20] and info["resize"] == {"size": [24, 20], "method": method}


def test_each_resize_method_brings_an_image_to_the_size_as_it_says(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (40, 10), 200).save(path)  # 10 high, 40 wide
    assert (decode_image(str(path), ImageSpec(1, (20, 20), "resize")) == 200).all()  # stretched
    assert (decode_image(str(path), ImageSpec(1, (20, 20), "center-crop")) == 200).all()  # cut, never padded
    padded = decode_image(str(path), ImageSpec(1, (20, 20), "pad"))[0]
    assert padded.shape == (20, 20) and (padded[0] == 0).all() and (padded[10] == 200).all()  # black bars


# --------------------------------------------------------------------------- what validate says


def test_validate_says_classes_counts_shape_channels_resize_and_normalisation(
    mini, tmp_path, write_recipe, kdc, in_tmp
):
    root = make_folder(tmp_path / "imgs", mini, train=30, test=5, counts={"trouser": 2})
    result = kdc("validate", folder_recipe(write_recipe, f"imagefolder:{root}"))
    kdc.assert_clean_exit(result, 0)
    text = kdc.flat(result)
    assert "classes (3): pullover, shirt, trouser" in text, text
    assert "pullover 30 5" in text and "trouser 2 5" in text, text
    assert "input: 1x28x28" in text and "channels: 1 (auto: every image is grey, PIL mode L)" in text, text
    assert "resize: none: every image is 28x28" in text, text
    assert "normalisation: measured from the training split" in text, text
    assert "heavily imbalanced" in text and "'pullover'" in text and "'trouser'" in text, text


def test_a_given_normalisation_is_printed_and_recorded_as_given(mini, tmp_path, write_recipe, kdc, in_tmp):
    root = make_folder(tmp_path / "imgs", mini, train=8, test=4)
    recipe = folder_recipe(write_recipe, f"imagefolder:{root}", normalize={"mean": [0.25], "std": [0.5]})
    result = kdc("validate", recipe)
    kdc.assert_clean_exit(result, 0)
    assert "normalisation: data.normalize: mean [0.2500], std [0.5000]" in kdc.flat(result)
    splits = load_data(DataSection(dataset=f"imagefolder:{root}", workers=0, normalize="none"), seed=0)
    assert splits.preprocess["mean"] == [0.0] and splits.preprocess["std"] == [1.0]
    x, _, idx = next(splits.test.batches(4))  # in file order: not shuffled
    first = scan_imagefolder(f"imagefolder:{root}").samples["test"][0][0]
    expected = torch.from_numpy(decode_image(first, ImageSpec(1, (28, 28)))).float() / 255
    assert idx[0] == 0 and torch.allclose(x[0], expected, atol=1e-7)


def test_imagenet_statistics_on_a_grey_folder_are_refused_with_the_fix(mini, tmp_path, write_recipe, kdc, in_tmp):
    root = make_folder(tmp_path / "imgs", mini, train=4, test=2)
    result = kdc("validate", folder_recipe(write_recipe, f"imagefolder:{root}", normalize="imagenet"))
    kdc.assert_clean_exit(result, 2)
    assert "3 channels" in kdc.flat(result) and "data.channels: 3" in kdc.flat(result)
    assert plan_imagefolder(
        DataSection(dataset=f"imagefolder:{root}", channels=3, normalize="imagenet")
    ).mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"normalize": {"mean": [0.5], "sd": [0.2]}}, "data.normalize", "unknown key sd"),
        ({"normalize": {"mean": [0.5], "std": [0.0]}}, "data.normalize", "above 0"),
        ({"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2]}}, "data.normalize", "mean has 3 values and std 1"),
        ({"normalize": "imagnet"}, "data.normalize", "imagenet"),
        ({"channels": 2}, "data.channels", "auto or 1 or 3"),
        ({"image_size": [28]}, "data.image_size", "[height, width]"),
        ({"resize": "pad"}, "data.resize", "data.image_size"),
    ],
)
def test_bad_image_folder_keys_are_recipe_problems_with_their_line(data, key, words, mini, tmp_path, write_recipe, kdc):
    root = make_folder(tmp_path / "imgs", mini, train=2, test=1)
    result = kdc("validate", folder_recipe(write_recipe, f"imagefolder:{root}", **data))
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert key in text and words in text and "line" in text, text


# --------------------------------------------------------------------------- the built-in sets stay as they are


@pytest.mark.parametrize("data", [{"channels": 3}, {"image_size": [32, 32]}, {"normalize": "none"}])
def test_image_folder_keys_on_a_built_in_set_are_refused_as_not_applicable(data, write_recipe, kdc):
    result = kdc("validate", write_recipe(changes={"data": data}))
    kdc.assert_clean_exit(result, 2)
    key = next(iter(data))
    assert f"data.{key}" in kdc.flat(result) and "imagefolder:PATH datasets only" in kdc.flat(result)


def test_built_in_sets_keep_their_preprocessing_and_fingerprints(tiny_recipe_dict):
    from kdcompress.recipe import recipe_from_dict

    assert preprocess_info("fashion-mnist-mini", (1, 28, 28))["mean"] == [0.2860]
    assert "normalize" not in preprocess_info("fashion-mnist-mini", (1, 28, 28))
    recipe = recipe_to_dict(recipe_from_dict(tiny_recipe_dict))
    assert not any(k.startswith(("data.channels", "data.normalize")) for k in stage_named("teacher").inputs(recipe))
    recipe["data"]["dataset"] = "imagefolder:imgs"  # a folder's models changed: its older runs are out of date
    assert stage_named("teacher").inputs(recipe)["data.channels"] == "auto"


# --------------------------------------------------------------------------- paths


def test_a_folder_beside_the_recipe_is_found_from_another_directory(mini, tmp_path, write_recipe, kdc, monkeypatch):
    project = tmp_path / "project"
    make_folder(project / "imgs", mini, train=4, test=2)
    recipe = folder_recipe(write_recipe, "imagefolder:imgs", where=project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = kdc("validate", recipe)
    kdc.assert_clean_exit(result, 0)
    assert f"imagefolder:{project / 'imgs'}" in kdc.flat(result)


def test_a_folder_found_nowhere_names_every_place_looked(tmp_path, write_recipe, kdc, monkeypatch):
    recipe = folder_recipe(write_recipe, "imagefolder:no-such-imgs", where=tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = kdc("validate", recipe)
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert str(elsewhere / "no-such-imgs") in text and str(tmp_path / "project" / "no-such-imgs") in text, text
    assert "current directory, then in the recipe's folder" in text


def test_loading_an_unusable_header_is_a_data_error_naming_the_file(mini, tmp_path):
    root = make_folder(tmp_path / "imgs", mini, train=4, test=2)
    bad = root / "train" / "shirt" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:20])  # the signature, then nothing PIL can read
    with pytest.raises(DataError, match=str(bad)):
        plan_imagefolder(DataSection(dataset=f"imagefolder:{root}"))


def test_loading_a_folder_decodes_each_image_once_the_measured_statistics_included(mini, tmp_path, monkeypatch):
    """The statistics are measured from the cache's rows, not by decoding the training images a second time."""
    import kdcompress.data as data

    root = make_folder(tmp_path / "imgs", mini, train=8, test=4)
    calls = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda path, spec: calls.append(path) or real(path, spec))
    data.load_data(DataSection(dataset=f"imagefolder:{root}", workers=0), seed=0)
    assert len(calls) == len(set(calls)) == 3 * (8 + 4)
