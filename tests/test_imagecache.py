"""An image folder is decoded once into one array file and read back memory-mapped (issue 20, items 3 and 4)."""

import io
import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from kdcompress.data import Augment, MappedData, TensorData, load_data
from kdcompress.errors import DataError
from kdcompress.imagecache import CACHE_SUFFIX, HEADER_BYTES, open_cache
from kdcompress.recipe import DataSection

CLASSES = ("ant", "bee", "cat")


def decode_rgb(path):
    """A file as RGB uint8 (3, H, W), its own size: the cache's decoder in these tests (kdc passes data.decode_image)."""
    with Image.open(path) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1))


def make_folder(root, per_class=12, size=6, classes=CLASSES):
    """root/<class>/<i>.png, noise images of ``size`` x ``size`` (RGB); returns (files, labels) in scan order."""
    files, labels = [], []
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            files.append(str(path))
            labels.append(label)
    return files, labels


class Counting:
    """decode_rgb that counts its calls (in this process: use workers=0)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return decode_rgb(path)


def console():
    return Console(file=io.StringIO(), width=400)


def said(out: Console) -> str:
    return out.file.getvalue()


def open_folder(root, files, labels, cache_dir, decode=decode_rgb, workers=0, out=None):
    out = out or console()
    cache = open_cache(files, labels, decode, {"decode": "rgb"}, cache_dir, workers, out, root=root, name="imgs")
    return cache, out


def direct(files, labels):
    """The split as decoding every file straight into memory would hold it."""
    images = torch.from_numpy(np.stack([decode_rgb(f) for f in files]))
    return TensorData(images, torch.tensor(labels), (0.5,) * 3, (0.5,) * 3)


def test_a_folder_is_decoded_once_and_the_next_load_decodes_nothing(tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    first = Counting()
    cache, out = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache", first)
    assert first.calls == len(files) and cache.decoded == len(files)
    assert "decoding 36 images once" in said(out) and "images/s" in said(out)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [CACHE_SUFFIX]  # one file, no temporary left
    again = Counting()
    reused, out = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache", again)
    assert again.calls == 0 and reused.decoded == 0 and said(out) == ""
    assert reused.images.shape == (36, 3, 6, 6) and reused.images.dtype == np.uint8
    assert torch.equal(reused.gather(torch.arange(36)), direct(files, labels).images)


def test_a_changed_file_makes_the_folder_decode_again_and_says_how_many_changed(tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    Image.new("RGB", (6, 6), (1, 2, 3)).save(files[4])
    os.utime(files[4], ns=(1, 1))  # a different mtime whatever the clock's resolution
    decode = Counting()
    cache, out = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache", decode)
    assert "1 file changed since the cache was made (1 modified); decoding again" in said(out)
    assert decode.calls == len(files) and cache.changed == 1
    assert cache.gather(torch.tensor([4]))[0, :, 0, 0].tolist() == [1, 2, 3]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # replaced, not added beside


def test_an_added_and_a_removed_file_are_counted(tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    extra = make_folder(tmp_path / "imgs", per_class=1, classes=("dog",))
    _, out = open_folder(tmp_path / "imgs", files[1:] + extra[0], labels[1:] + [3], tmp_path / "cache")
    assert "2 files changed since the cache was made (1 added, 1 removed); decoding again" in said(out)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[: len(b) - 10], "cut-short"),
        (lambda b: b[:HEADER_BYTES] + b"\0" * 10 + b[HEADER_BYTES:], "cut-short"),
        (lambda b: b"not a cache at all" + b[18:], "not a kdc image cache"),
        (lambda b: b[:8] + b"{garbage" + b[16:], "header is damaged"),
        (lambda b: b.replace(b'"count": 36', b'"count": 99'), "another format"),
    ],
)
def test_a_damaged_cache_file_is_refused_and_rebuilt(damage, why, tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    cache, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    cache.path.write_bytes(damage(cache.path.read_bytes()))
    decode = Counting()
    rebuilt, out = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache", decode)
    assert f"the image cache {cache.path} is refused" in said(out) and why in said(out), said(out)
    assert decode.calls == len(files)
    assert torch.equal(rebuilt.gather(torch.arange(36)), direct(files, labels).images)


def test_a_cache_file_of_other_images_under_the_same_name_is_not_used(tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    cache, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    forged = bytearray(cache.path.read_bytes())
    forged[HEADER_BYTES : HEADER_BYTES + 100] = bytes(100)
    start = forged.index(b'"key": "') + 8
    forged[start : start + 4] = b"beef"
    cache.path.write_bytes(bytes(forged))
    decode = Counting()
    rebuilt, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache", decode)
    assert decode.calls == len(files)
    assert torch.equal(rebuilt.gather(torch.arange(36)), direct(files, labels).images)


def test_batches_from_the_cache_equal_batches_from_decoding_directly(tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    cached = MappedData(open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")[0], (0.5,) * 3, (0.5,) * 3)
    held = direct(files, labels)
    for (x, y, i), (dx, dy, di) in zip(cached.batches(8), held.batches(8), strict=True):  # in order: identical
        assert torch.equal(x, dx) and torch.equal(y, dy) and torch.equal(i, di)
    crop = Augment(crop_padding=2, hflip=True)
    seen = []
    for x, y, i in cached.batches(8, shuffle=True, generator=torch.Generator().manual_seed(3)):
        assert torch.equal(x, held.normalise(held.images[i])) and torch.equal(y, held.labels[i])
        seen.append(i)
    assert sorted(torch.cat(seen).tolist()) == list(range(36))  # every image once
    again = [i for _, _, i in cached.batches(8, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert torch.equal(torch.cat(again), torch.cat(seen))  # the same seed, the same order
    mine, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    order = cached.cache.epoch_order(theirs)  # the draws batches() makes: the order, then each batch's crops
    for start, (x, _, i) in zip(range(0, 36, 8), cached.batches(8, True, mine, augment=crop), strict=True):
        assert torch.equal(i, order[start : start + 8])
        assert torch.equal(x, held.normalise(crop(held.images[i], theirs)))  # augmented as uint8, then normalised


def test_two_shards_are_disjoint_cover_the_data_and_each_reads_one_stretch_of_the_file(tmp_path):
    files, labels = make_folder(tmp_path / "imgs", per_class=11)  # 33 images: one padded sample
    cache, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    data = MappedData(cache, (0.5,) * 3, (0.5,) * 3)
    shards = [
        torch.cat([i for _, _, i in data.batches(4, True, torch.Generator().manual_seed(1), shard=(r, 2))])
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 17 == -(-33 // 2) and data.num_batches(4, 2) == 5
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(33))
    rows = [set(cache.rows[s.numpy()].tolist()) for s in shards]
    assert rows[0] == set(range(17))  # rank 0: the first half of the file
    assert rows[1] == set(range(17, 33)) | {0}  # rank 1: the rest, padded by wrapping around (as TensorData pads)


def test_shuffling_reads_contiguous_blocks_of_the_file_in_a_random_order(tmp_path):
    files, labels = make_folder(tmp_path / "imgs", per_class=20)
    cache, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    order = cache.epoch_order(torch.Generator().manual_seed(0), block=8)
    rows = cache.rows[order.numpy()]
    runs = [(block, list(group)) for block, group in itertools.groupby(rows.tolist(), key=lambda r: r // 8)]
    assert sorted(block for block, _ in runs) == list(range(8))  # each block of 8 rows read in one go
    assert [block for block, _ in runs] != list(range(8))  # the blocks in a random order
    assert any(group != sorted(group) for _, group in runs)  # and the rows within a block


def test_the_file_mixes_classes_so_that_a_block_holds_many(tmp_path):
    files, labels = make_folder(tmp_path / "imgs", per_class=20)  # listed class by class
    cache, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    by_row = np.argsort(cache.rows)
    assert len(set(cache.labels[by_row[:10]].tolist())) == 3


def test_a_held_out_split_shares_the_mapping(tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    cache, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    part = MappedData(cache, (0.5,) * 3, (0.5,) * 3).subset(torch.tensor([5, 1, 30]))
    assert part.cache.images is cache.images and part.labels.tolist() == [0, 0, 2]
    assert torch.equal(part.cache.gather(torch.tensor([2])), cache.gather(torch.tensor([30])))


def test_images_of_two_sizes_are_refused_naming_the_file_and_both_sizes(tmp_path):
    files, labels = make_folder(tmp_path / "imgs")
    Image.new("RGB", (9, 7)).save(files[-1])
    with pytest.raises(DataError) as caught:
        open_folder(tmp_path / "imgs", files, labels, tmp_path / "cache")
    assert files[-1] in str(caught.value) and "3 channel(s) of 7x9" in str(caught.value)
    assert "3 channel(s) of 6x6" in str(caught.value) and "data.image_size" in str(caught.value)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_two_worker_processes_decode_the_same_array(tmp_path):
    files, labels = make_folder(tmp_path / "imgs", per_class=50)
    alone, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "one")
    pooled, _ = open_folder(tmp_path / "imgs", files, labels, tmp_path / "two", workers=2)
    assert np.array_equal(alone.images, pooled.images)


def test_an_imagefolder_dataset_is_read_from_the_cache_on_the_second_load(tmp_path, image_cache):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        make_folder(root / split, per_class=4)
    section = DataSection(dataset=f"imagefolder:{root}", workers=0, val_split=0.25)
    first_out, second_out = console(), console()
    first = load_data(section, seed=0, console=first_out)
    second = load_data(section, seed=0, console=second_out)
    assert said(first_out).count("decoding 12 images once") == 2 and said(second_out) == ""
    assert isinstance(second.train, MappedData) and (len(second.train), len(second.val)) == (9, 3)
    assert second.input_shape == (3, 6, 6) and second.num_classes == 3
    batch = [torch.cat(t) for t in zip(*((x, y) for x, y, _ in second.test.batches(5)))]
    again = [torch.cat(t) for t in zip(*((x, y) for x, y, _ in first.test.batches(5)))]
    assert all(torch.equal(a, b) for a, b in zip(batch, again))


TORCHRUN_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from kdcompress import distributed
from kdcompress.data import load_data
from kdcompress.imagecache import CachedImages
from kdcompress.recipe import DataSection

distributed.init(torch.device("cpu"))
read = []
real = CachedImages.gather
CachedImages.gather = lambda self, pos: read.extend(self.rows[pos.numpy()].tolist()) or real(self, pos)
splits = load_data(DataSection(dataset="imagefolder:" + sys.argv[1], workers=0), seed=0)
for _ in splits.train.batches(4, True, torch.Generator().manual_seed(0), (distributed.rank(), 2)):
    pass
out = {"rank": distributed.rank(), "decoded": splits.train.cache.decoded, "rows": read}
open(os.path.join(sys.argv[2], f"rank{distributed.rank()}.json"), "w").write(json.dumps(out))
distributed.shutdown()
"""


@pytest.mark.slow
def test_two_torchrun_processes_read_disjoint_stretches_and_only_local_rank_0_decodes(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        make_folder(root / split, per_class=8)
    (tmp_path / "script.py").write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1", KDC_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, str(tmp_path / "script.py"), str(root), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["decoded"] for r in ranks] == [24, 0]
    assert sorted(ranks[0]["rows"]) == list(range(12)) and sorted(ranks[1]["rows"]) == list(range(12, 24))
