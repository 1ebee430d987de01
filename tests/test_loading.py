"""Using a trained checkpoint (issue 8): how to feed it, and who can read the files a run writes.

Defect 2: a checkpoint records its preprocessing (input shape, 1/255 scaling,
mean, std, NCHW layout, class names), and ``kdcompress.load_model`` returns
the model in eval mode with a ``preprocess`` callable for raw uint8 images.
Defect 3: files written through temporary files follow the umask (mkstemp
alone makes them 0600).

One tiny ``kdc run`` (no baseline stage) happens once for this module, under
umask 0022.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import kdcompress
from kdcompress.checkpoint import load_checkpoint, save_checkpoint, save_state
from kdcompress.data import CLASS_NAMES, IDX_FILES, load_data, mini_dir, preprocess_info, read_idx, unpack_gz
from kdcompress.errors import CheckpointError
from kdcompress.files import atomic_write_text, manifest_path
from kdcompress.loading import Preprocess
from kdcompress.recipe import DataSection

RUN = ("runs", "tiny")
FASHION = list(CLASS_NAMES["FashionMNIST"])


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class _umask:
    """Set the process umask for a block, restoring the previous one after."""

    def __init__(self, mask: int):
        self.mask = mask

    def __enter__(self):
        self.old = os.umask(self.mask)

    def __exit__(self, *exc):
        os.umask(self.old)


@pytest.fixture(scope="module")
def run_dir(fresh_run, tiny_recipe_text):
    """A whole tiny `kdc run` (teacher, distilled, pruned, report), made under umask 0022."""
    recipe = yaml.safe_load(tiny_recipe_text)
    recipe["student"]["baseline"] = False  # the stages checked here do not need it
    with _umask(0o022):
        work, _ = fresh_run(yaml.safe_dump(recipe, sort_keys=False), "loading", "run")
    return work.joinpath(*RUN)


def _raw_test_split():
    """The shipped test images as stored on disk: uint8 (N, 28, 28), 0-255, and their labels."""
    folder = mini_dir()
    return read_idx(folder / "t10k-images-idx3-ubyte.gz"), read_idx(folder / "t10k-labels-idx1-ubyte.gz").long()


# --------------------------------------------------------------------------- defect 2: how to feed the model


def test_pruned_model_fed_through_preprocess_scores_its_recorded_test_accuracy(run_dir):
    path = run_dir / "pruned" / "model.pt"
    model, preprocess = kdcompress.load_model(path)
    images, labels = _raw_test_split()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 500):
            logits = model(preprocess(images[start : start + 500]))
            correct += int((logits.argmax(1) == labels[start : start + 500]).sum())
    recorded = load_checkpoint(path)["metrics"]["test_accuracy"]
    assert len(labels) == 2000
    assert abs(correct / len(labels) - recorded) <= 0.001, (correct / len(labels), recorded)


def test_loaded_model_is_in_eval_mode_and_checkpoint_records_its_preprocessing(run_dir):
    path = run_dir / "pruned" / "model.pt"
    model, preprocess = kdcompress.load_model(path)
    assert not model.training and not any(m.training for m in model.modules())
    info = load_checkpoint(path)["preprocess"]  # weights_only=True: plain data only
    assert info["mean"] == pytest.approx([0.2860]) and info["std"] == pytest.approx([0.3530])
    assert info["scale"] == pytest.approx(1 / 255)
    assert info["input_shape"] == [1, 28, 28] and info["layout"] == "NCHW" and info["channels"] == "L"
    assert info["dtype"] == "uint8" and info["known"] is True
    assert info["classes"] == FASHION
    assert preprocess.classes == FASHION and preprocess.mean == pytest.approx((0.2860,))
    for stage in ("teacher", "distilled"):
        assert load_checkpoint(run_dir / stage / "model.pt")["preprocess"] == info


def test_readme_loading_example_runs(run_dir, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("\n", 1)[1].split("```")[0] for b in readme.split("```python")[1:]]
    (code,) = [b for b in blocks if "kdcompress.load_model(" in b and "runs/quickstart/pruned/model.pt" in b]
    exec(code.replace("runs/quickstart", str(run_dir)), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and any(name in printed for name in FASHION)


def test_class_names_are_torchvisions():
    from torchvision.datasets import MNIST, FashionMNIST

    assert list(CLASS_NAMES["FashionMNIST"]) == FashionMNIST.classes
    assert list(CLASS_NAMES["MNIST"]) == MNIST.classes
    assert preprocess_info("mnist", (1, 28, 28))["classes"] == MNIST.classes


def test_preprocess_gives_the_training_batches_for_every_accepted_layout():
    from PIL import Image

    splits = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    raw = splits.test.images[:5]  # uint8 (5, 1, 28, 28)
    expected = splits.test.normalise(raw)
    pre = Preprocess(splits.preprocess)
    assert splits.preprocess == preprocess_info("fashion-mnist-mini", (1, 28, 28))
    assert torch.equal(pre(raw), expected)
    assert torch.equal(pre(raw[:, 0]), expected)  # (N, H, W)
    assert torch.equal(pre(raw[0]), expected[:1])  # (C, H, W)
    assert torch.equal(pre(raw[0, 0]), expected[:1])  # (H, W)
    assert torch.equal(pre(raw[0].permute(1, 2, 0).numpy()), expected[:1])  # numpy (H, W, C)
    assert torch.equal(pre(raw.permute(0, 2, 3, 1)), expected)  # (N, H, W, C)
    pil = Image.fromarray(raw[0, 0].numpy())
    assert torch.equal(pre(pil), expected[:1])
    assert torch.equal(pre(pil.convert("RGB")), expected[:1])  # converted to the model's grey "L"
    assert torch.equal(pre([pil, raw[1, 0]]), expected[:2])
    assert pre(raw).dtype == torch.float32 and pre(raw).shape == (5, 1, 28, 28)


@pytest.mark.parametrize(
    "value", [torch.rand(2, 28, 28), np.random.rand(28, 28), torch.zeros(28, 28, dtype=torch.int64)]
)
def test_preprocess_refuses_anything_but_uint8(value):
    pre = Preprocess(preprocess_info("fashion-mnist-mini", (1, 28, 28)))
    with pytest.raises(TypeError, match=r"uint8 values 0-255.*\* 255"):
        pre(value)


def test_preprocess_refuses_a_wrong_size_and_says_which():
    pre = Preprocess(preprocess_info("fashion-mnist-mini", (1, 28, 28)))
    with pytest.raises(ValueError, match=r"\(32, 32\).*1 channel\(s\) of 28x28.*nothing is resized"):
        pre(torch.zeros(32, 32, dtype=torch.uint8))


def test_imagefolder_records_classes_and_preprocess_equals_its_transform(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, scale in (("dark", 60), ("light", 255)):
            folder = tmp_path / "imgs" / split / c
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = (torch.rand(10, 10, generator=torch.Generator().manual_seed(i)) * scale).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    splits = load_data(DataSection(dataset=f"imagefolder:{tmp_path / 'imgs'}", workers=0), seed=0)
    info = splits.preprocess
    assert info["classes"] == ["dark", "light"] and info["channels"] == "L"  # grey PNGs: one channel
    assert info["input_shape"] == [1, 10, 10] and info["normalize"] == "measured"
    image = Image.open(tmp_path / "imgs" / "test" / "light" / "1.png")
    fed_in_training = next(splits.test.batches(4))[0][3]  # light/1.png, as training reads it (from the cache)
    assert torch.allclose(Preprocess(info)(image)[0], fed_in_training, atol=1e-6)
    assert torch.allclose(Preprocess(info)(np.array(image))[0], fed_in_training, atol=1e-6)


USER_DATA = """
import torch
from torch.utils.data import TensorDataset

class Named(TensorDataset):
    classes = ["cat", "dog", "eel"]

def build():
    x, y = torch.randn(30, 1, 4, 4), torch.arange(30) % 3
    return {"train": Named(x, y), "test": Named(x, y), "num_classes": 3}
"""


def test_own_dataset_records_its_classes_and_no_known_preprocessing(tmp_path, monkeypatch):
    (tmp_path / "named_data_mod.py").write_text(USER_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    info = load_data(DataSection(dataset="named_data_mod:build", workers=0), seed=0).preprocess
    assert info["known"] is False and info["classes"] == ["cat", "dog", "eel"]
    assert info["mean"] is None and info["scale"] is None and info["input_shape"] == [1, 4, 4]
    pre = Preprocess(info)
    assert pre.classes == ["cat", "dog", "eel"]
    with pytest.raises(ValueError, match="your own dataset"):
        pre(torch.zeros(1, 4, 4, dtype=torch.uint8))


def test_checkpoint_from_before_preprocess_was_recorded_gets_it_from_its_dataset(run_dir, tmp_path):
    payload = load_checkpoint(run_dir / "pruned" / "model.pt")
    for key in ("preprocess", "format", "format_version", "kdc_version"):
        payload.pop(key)
    old = tmp_path / "old.pt"
    save_checkpoint(old, payload)
    _, preprocess = kdcompress.load_model(old)
    assert preprocess.info == load_checkpoint(run_dir / "pruned" / "model.pt")["preprocess"]


def test_load_model_does_not_import_code_a_checkpoint_names(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = load_checkpoint(run_dir / "pruned" / "model.pt")
    payload["arch"] = {**payload["arch"], "model": "os:system", "args": {"command": "touch planted"}}
    path = tmp_path / "planted.pt"
    save_checkpoint(path, payload)
    with pytest.raises(CheckpointError, match="allow_import=True"):
        kdcompress.load_model(path)
    assert not (tmp_path / "planted").exists()


def test_import_kdcompress_stays_cheap():
    import subprocess
    import sys

    code = "import sys, kdcompress; assert 'torch' not in sys.modules; print(kdcompress.load_model.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kdcompress.loading"


# --------------------------------------------------------------------------- defect 3: files follow the umask


def test_atomic_writes_follow_the_umask(tmp_path):
    # 0077 guards the other side: following the umask must not make files more open than it allows
    for mask, expected in ((0o022, 0o644), (0o077, 0o600), (0o027, 0o640)):
        folder = tmp_path / oct(mask)
        with _umask(mask):
            atomic_write_text(folder / "report.md", "# report\n")
            save_checkpoint(folder / "model.pt", {"state_dict": {"w": torch.zeros(2)}})
            save_state(folder / "state.pt", {"step": 1})
        names = ("report.md", "model.pt", manifest_path(folder / "model.pt").name, "state.pt")
        assert {n: oct(_mode(folder / n)) for n in names} == {n: oct(expected) for n in names}, oct(mask)


def test_unpacked_dataset_files_follow_the_umask(tmp_path):
    source, raw = tmp_path / "src", tmp_path / "raw"
    source.mkdir()
    for name in IDX_FILES:
        (source / f"{name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x07"))
    with _umask(0o022):
        unpack_gz(source, raw)
    assert [_mode(raw / name) for name in IDX_FILES] == [0o644] * 4


def test_a_whole_run_is_readable_by_the_group_and_others_under_umask_022(run_dir):
    files = [run_dir / name for name in ("recipe.yaml", "report.md", "report.json", "kdc-run.json")]
    for stage in ("teacher", "distilled", "pruned"):
        files += [
            run_dir / stage / "model.pt",
            run_dir / stage / "model.pt.manifest.json",
            run_dir / stage / "metrics.jsonl",
        ]
    assert {str(f.relative_to(run_dir)): oct(_mode(f)) for f in files} == {
        str(f.relative_to(run_dir)): oct(0o644) for f in files
    }
