"""Datasets read through a DataLoader: a user's factory by import path, and imagefolder:PATH."""

import json

import pytest
import torch

from kdcompress.data import Augment, LoaderData, load_data
from kdcompress.errors import DataError
from kdcompress.recipe import DataSection

FACTORY = """
import torch
from torch.utils.data import TensorDataset

def build(n_train=300, n_test=90):
    g = torch.Generator().manual_seed(0)
    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        return TensorDataset(x, y)
    return {"train": make(n_train), "test": make(n_test), "num_classes": 3}

def not_a_dataset():
    return 42
"""


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    (tmp_path / "userdata_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userdata_mod:build"


def test_user_dataset_batches_cover_each_sample_once(user_data):
    splits = load_data(DataSection(dataset=user_data, workers=0), seed=0)
    assert isinstance(splits.train, LoaderData)
    assert splits.num_classes == 3 and splits.input_shape == (1, 8, 8)
    seen = [idx for _, _, idx in splits.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(300))
    shards = [
        torch.cat(
            [
                i
                for _, _, i in splits.train.batches(
                    32, shuffle=True, generator=torch.Generator().manual_seed(1), shard=(r, 2)
                )
            ]
        )
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 150
    assert set(torch.cat(shards).tolist()) == set(range(300))


def test_user_dataset_with_wrong_return_type_is_a_clear_error(user_data):
    with pytest.raises(DataError, match="must return"):
        load_data(DataSection(dataset="userdata_mod:not_a_dataset"), seed=0)


def test_augment_keeps_shape_and_moves_pixels():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    out = Augment(crop_padding=2, hflip=True)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert not torch.equal(out, images)
    assert torch.equal(Augment()(images), images)


def reference_augment(images, padding, hflip, generator):
    """Crop and flip one image at a time by slicing, drawing from ``generator`` in Augment's documented order."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator) if padding else torch.zeros(n, dtype=torch.long)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator) if padding else torch.zeros(n, dtype=torch.long)
    flip = torch.rand(n, generator=generator) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    out = []
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (33, 1, 28, 28), (5, 2, 7, 9)])
@pytest.mark.parametrize("padding, hflip", [(4, True), (4, False), (0, True), (1, True), (3, False)])
def test_batch_augment_equals_per_image_crop_and_flip(shape, padding, hflip):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = Augment(crop_padding=padding, hflip=hflip)(images, torch.Generator().manual_seed(7))
    expected = reference_augment(images, padding, hflip, torch.Generator().manual_seed(7))
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, expected)


def test_run_on_user_dataset_and_imagefolder(user_data, tmp_path, kdc, monkeypatch):
    from PIL import Image

    for split, n in (("train", 12), ("test", 6)):
        for c, scale in (("dark", 60), ("light", 255)):
            folder = tmp_path / "imgs" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(10, 10, generator=torch.Generator().manual_seed(i)) * scale).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    for name, dataset, extra in (
        ("user", user_data, ""),
        ("folder", f"imagefolder:{tmp_path / 'imgs'}", "crop_padding: 1, hflip: true, "),
    ):
        (tmp_path / f"{name}.yaml").write_text(
            f"run: {{name: {name}}}\n"
            f"data: {{dataset: '{dataset}', {extra}batch_size: 16, workers: 0}}\n"
            "teacher: {model: mlp, args: {hidden: [16]}, epochs: 1}\n"
            "student: {args: {hidden: [8]}}\n"
            "distill: {epochs: 1}\n"
            "prune: {rate: 0.5, target_sparsity: 0.5, epochs: 1}\n"
            "report: {latency: false}\n"
        )
        result = kdc("run", f"{name}.yaml")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "runs" / name / "report.json").read_text())
        assert [r["stage"] for r in report["stages"]] == ["teacher", "student", "distilled", "pruned"]
        assert abs(report["stages"][-1]["sparsity"] - 0.5) < 0.01
    # augmented data: the teacher runs online, so no logit cache is written
    assert not (tmp_path / "runs" / "folder" / "cache").exists()
    assert any((tmp_path / "runs" / "user" / "cache").iterdir())


MINI_AS_USER_DATASET = """
from torch.utils.data import TensorDataset
from kdcompress.data import load_data
from kdcompress.recipe import DataSection

def build():
    s = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    return {"train": TensorDataset(s.train.normalise(s.train.images), s.train.labels),
            "test": TensorDataset(s.test.normalise(s.test.images), s.test.labels), "num_classes": 10}
"""


def test_in_memory_and_dataloader_paths_train_alike(tmp_path, monkeypatch):
    """The same data, seed and settings through the uint8 in-memory path and through a DataLoader give the
    same batches in the same order, so the same accuracy."""
    from rich.console import Console

    from kdcompress.models import MLP
    from kdcompress.recipe import TrainSettings
    from kdcompress.train import evaluate, fit

    (tmp_path / "mini_as_user.py").write_text(MINI_AS_USER_DATASET)
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = TrainSettings(epochs=2, optimizer="sgd", lr=0.05, momentum=0.9, schedule="constant")
    accuracy = {}
    for name in ("fashion-mnist-mini", "mini_as_user:build"):
        splits = load_data(DataSection(dataset=name, workers=0), seed=0)
        torch.manual_seed(0)
        model = MLP(input_shape=(1, 28, 28), num_classes=10, hidden=(32,))
        history = fit(
            model,
            lambda logits, y, idx, x: torch.nn.functional.cross_entropy(logits, y),
            splits,
            settings,
            batch_size=128,
            seed=0,
            console=Console(stderr=True, quiet=True),
        )
        assert history[-1]["train_accuracy"] > 0.6  # it learnt something
        accuracy[name] = evaluate(model, splits.test, 1000, torch.device("cpu"))["accuracy"]
    assert isinstance(load_data(DataSection(dataset="mini_as_user:build", workers=0), seed=0).train, LoaderData)
    assert abs(accuracy["fashion-mnist-mini"] - accuracy["mini_as_user:build"]) <= 0.005, accuracy
