"""Data loading: the shipped mini set, the Debian Fashion-MNIST files, clear errors."""

from pathlib import Path

import pytest
import torch

from kdcompress.data import DEBIAN_FASHION_MNIST, IDX_FILES, load_data, read_idx
from kdcompress.errors import DataError
from kdcompress.recipe import DataSection

debian = pytest.mark.skipif(
    not all((DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in IDX_FILES),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)


def test_mini_set_is_balanced_and_small():
    splits = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    assert splits.train.images.shape == (10000, 1, 28, 28)
    assert splits.test.images.shape == (2000, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert torch.bincount(splits.train.labels).tolist() == [1000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [200] * 10
    folder = Path(__file__).resolve().parent.parent / "kdcompress" / "embedded" / "fashion-mnist-mini"
    assert sum(p.stat().st_size for p in folder.glob("*.gz")) <= 6_000_000
    assert "MIT" in (folder / "LICENSE").read_text()


def test_batches_are_normalised_and_cover_every_sample():
    splits = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    seen = []
    for x, y, idx in splits.train.batches(1000, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert torch.equal(y, splits.train.labels[idx])
        seen.append(idx)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(10000))
    x, _, _ = next(splits.train.batches(10000))
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1


def test_validation_split_is_held_out_of_training():
    splits = load_data(DataSection(dataset="fashion-mnist-mini", val_split=0.1), seed=3)
    assert len(splits.val) == 1000 and len(splits.train) == 9000
    assert splits.eval_split[0] == "val"
    again = load_data(DataSection(dataset="fashion-mnist-mini", val_split=0.1), seed=3)
    assert torch.equal(splits.val.images, again.val.images)


@debian
def test_full_fashion_mnist_from_debian_package(tmp_path):
    splits = load_data(DataSection(dataset="fashion-mnist", root=str(tmp_path)), seed=0)
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    # unpacked where torchvision reads them, and equal to the package's data
    raw = tmp_path / "FashionMNIST" / "raw"
    assert all((raw / n).is_file() for n in IDX_FILES)
    assert torch.equal(read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"), splits.test.labels.to(torch.uint8))


def test_missing_dataset_names_the_paths_tried(tmp_path):
    with pytest.raises(DataError) as info:
        load_data(DataSection(dataset="mnist", root=str(tmp_path)), seed=0)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data.root" in message and "KDC_DATA" in message


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(DataError, match="did you mean 'fashion-mnist'"):
        load_data(DataSection(dataset="fashion-mnst"), seed=0)


def test_truncated_idx_file_is_reported(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(10))
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad)
