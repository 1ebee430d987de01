"""The teacher-view table (distill.teacher_cache): views drawn once and made again exactly, learning from the
table equal to learning from the teacher run online on the same views, and the run's cache built, reused,
resumed and refused when damaged."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from kdcompress.data import Augment, DataSplits, TensorData
from kdcompress.distill import kd_loss
from kdcompress.recipe import TrainSettings
from kdcompress.train import Runtime, fit
from kdcompress.views import ViewAugment, ViewTable, draw_views, table_problem, teacher_view_logits

QUIET = Console(stderr=True, quiet=True)
RUN = "runs/tiny"


def splits(n: int = 96) -> DataSplits:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    data = TensorData(images, labels, (0.5,), (0.25,))
    return DataSplits("tiny", data, data, None, 4, (1, 8, 8), "tiny")


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 4)
    )


@pytest.mark.parametrize("augment", [Augment(2, True), Augment(0, True), Augment(3, False)], ids=str)
def test_a_drawn_view_is_made_again_exactly_and_the_random_path_draws_as_before(augment):
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = augment.draw(16, torch.Generator().manual_seed(5))
    assert torch.equal(augment(images, torch.Generator().manual_seed(5)), augment.apply(images, views))
    p = augment.crop_padding
    padded = F.pad(images, (p, p, p, p))
    for i, (dy, dx, flip) in enumerate(views.tolist()):  # each image by hand: the crop, then the mirror
        expected = padded[i, :, dy : dy + 8, dx : dx + 8]
        expected = expected.flip(-1) if flip else expected
        assert torch.equal(augment.apply(images, views)[i], expected)
    assert views[:, 2].any() == augment.hflip and bool(views[:, :2].any()) == (p > 0)


def test_with_k_at_least_the_epochs_every_epoch_shows_an_image_a_view_it_has_not_seen():
    views, start = draw_views(Augment(2, True), 50, 5, seed=3)
    table = ViewTable(views, start, torch.zeros(50, 5, 4))
    idx = torch.arange(50)
    seen = torch.stack([table.which(idx, epoch) for epoch in range(5)], dim=1)
    assert all(len(set(row)) == 5 for row in seen.tolist())
    assert len(set(start.tolist())) > 1  # images do not move through their views in lockstep


def _train(loss, augment, data, seed=0):
    model = net(seed)
    settings = TrainSettings(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, schedule="constant")
    fit(model, loss, data, settings, batch_size=16, console=QUIET, seed=seed, runtime=Runtime(augment=augment))
    return model.state_dict()


def test_learning_from_the_table_gives_the_weights_the_online_teacher_gives_on_the_same_views():
    data, augment, teacher = splits(), Augment(2, True), net(7).eval()
    views, start = draw_views(augment, len(data.train), 3, seed=11)  # K = epochs: every epoch's views stored
    logits = torch.stack(
        [teacher_view_logits(teacher, data.train, augment, views[:, k], 40, torch.device("cpu"))[0] for k in range(3)],
        dim=1,
    )
    shown = ViewAugment(augment, ViewTable(views, start, logits))

    def from_table(s, y, idx, x):
        return kd_loss(s, shown.targets(idx), y, 4.0, 0.7)

    def online(s, y, idx, x):
        with torch.inference_mode():
            target = teacher(x).float()
        return kd_loss(s, target.clone(), y, 4.0, 0.7)

    cached = _train(from_table, shown, data)
    same_views = _train(online, ViewAugment(augment, ViewTable(views, start, logits)), data)
    random_views = _train(online, augment, data)
    for name in cached:
        torch.testing.assert_close(cached[name], same_views[name], rtol=1e-5, atol=1e-6)
    assert max((cached[k] - random_views[k]).abs().max().item() for k in cached) > 1e-3  # the check can fail


def test_a_table_with_views_the_augmentation_cannot_draw_is_refused():
    augment = Augment(1, False)
    views, start = draw_views(augment, 10, 2, seed=0)
    table = ViewTable(views, start, torch.zeros(10, 2, 4, dtype=torch.float16))
    assert table_problem(table, 10, 2, 4, "float16", augment) is None
    views[3, 1, 2] = 1  # a flip the recipe does not ask for
    assert "flips outside 0..0" in table_problem(table, 10, 2, 4, "float16", augment)
    views[3, 1, 2], views[0, 0, 0] = 0, 3
    assert "crop offsets outside 0..2" in table_problem(table, 10, 2, 4, "float16", augment)
    assert "expected" in table_problem(table, 11, 2, 4, "float16", augment)


VIEWS = {"data": {"crop_padding": 2, "hflip": True}, "distill": {"teacher_cache": {"views": 2}}}


def test_the_run_builds_the_table_once_and_reads_it_again(in_tmp, write_recipe, kdc):
    path = write_recipe(changes=VIEWS)
    kdc.assert_clean_exit(kdc("train-teacher", path), 0)
    first = kdc("distill", path)
    kdc.assert_clean_exit(first, 0)
    assert re.search(
        r"teacher-view table: view 2/2, the teacher right on \d+\.\d% of the training images", kdc.flat(first)
    )
    cache = in_tmp / RUN / "cache"
    (table,) = cache.glob("teacher-views-*.pt")
    assert not list(cache.glob("teacher-logits-*")) and not list(cache.glob("*.partial.pt"))
    again = kdc("distill", path, "--force")
    kdc.assert_clean_exit(again, 0)
    assert "teacher-view table" not in kdc.flat(again)
    metrics = [json.loads(x) for x in (in_tmp / RUN / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test_accuracy"] > 0.6


def test_an_interrupted_build_goes_on_from_its_views_and_ends_with_the_table_a_whole_build_makes(
    in_tmp, monkeypatch, write_recipe, kdc
):
    import kdcompress.run.teacher_views as tv

    path = write_recipe(changes={**VIEWS, "distill": {"teacher_cache": {"views": 3}}})
    kdc.assert_clean_exit(kdc("train-teacher", path), 0)
    real, calls = tv.teacher_view_logits, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tv, "teacher_view_logits", second_fails)
    assert kdc("distill", path).exit_code != 0
    cache = in_tmp / RUN / "cache"
    assert len(list(cache.glob("*.partial.pt"))) == 1 and not list(cache.glob("teacher-views-*[!l].pt"))
    monkeypatch.setattr(tv, "teacher_view_logits", real)
    resumed = kdc("distill", path)
    kdc.assert_clean_exit(resumed, 0)
    assert "going on with the teacher-view table (1 of 3 views done)" in kdc.flat(resumed)
    assert not list(cache.glob("*.partial.pt"))
    (table,) = cache.glob("teacher-views-*.pt")
    resumed_table = torch.load(table, weights_only=True)
    table.unlink()
    kdc.assert_clean_exit(kdc("distill", path, "--force"), 0)  # the same key: the same views, drawn afresh
    whole = torch.load(table, weights_only=True)
    for key in ("views", "start", "logits"):
        assert torch.equal(whole[key], resumed_table[key])


@pytest.mark.parametrize("damage", ["truncated", "oversized", "other key"])
def test_a_damaged_table_is_refused_with_what_to_do(in_tmp, write_recipe, kdc, damage):
    path = write_recipe(changes=VIEWS)
    kdc.assert_clean_exit(kdc("train-teacher", path), 0)
    kdc.assert_clean_exit(kdc("distill", path), 0)
    (table,) = (in_tmp / RUN / "cache").glob("teacher-views-*.pt")
    if damage == "truncated":
        table.write_bytes(table.read_bytes()[:100])
    elif damage == "oversized":  # refused by its size, before torch.load reads it into memory
        table.write_bytes(table.read_bytes() + b"\0" * (2 * table.stat().st_size + 2**20))
    else:
        state = torch.load(table, weights_only=True)
        torch.save({**state, "key": "0" * 16}, table)
    result = kdc("distill", path, "--force")
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert "teacher-view cache" in text and "is damaged" in text and "delete it and rerun" in text, text


@pytest.mark.parametrize(
    "changes, says",
    [
        (VIEWS, "teacher targets: 2 stored views per image (distill.teacher_cache): 2 teacher passes"),
        (
            {"data": {"hflip": True}},
            "teacher targets: the teacher runs on every batch (augmentation, no teacher_cache)",
        ),
        ({}, "teacher targets: its logits on the training data, computed once and cached (no augmentation)"),
    ],
    ids=["views", "online", "cached"],
)
def test_validate_says_where_the_teachers_targets_come_from_and_what_an_epoch_costs(
    in_tmp, write_recipe, kdc, changes, says
):
    result = kdc("validate", write_recipe(changes=changes))
    kdc.assert_clean_exit(result, 0)
    text = kdc.flat(result)
    assert says in text, text
    if "online" in says:
        assert "x the MACs of a cross-entropy epoch" in text


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"distill": {"teacher_cache": {"views": 4}}}, "has no augmentation to store views of"),
        (
            {
                **VIEWS,
                "distill": {"teacher_cache": {"views": 4}, "features": [{"teacher": "net.1", "student": "net.1"}]},
            },
            "feature terms in distill.features need the teacher's activations",
        ),
    ],
    ids=["no augmentation", "feature terms"],
)
def test_a_teacher_cache_that_cannot_serve_is_refused_before_anything_runs(in_tmp, write_recipe, kdc, changes, says):
    result = kdc("validate", write_recipe(changes=changes))
    kdc.assert_clean_exit(result, 2)
    assert "distill.teacher_cache.views" in kdc.flat(result) and says in kdc.flat(result)


def test_distillation_from_the_table_interrupted_resumes_to_the_weights_of_an_uninterrupted_one(
    in_tmp, write_recipe, kdc, fail_training, checkpoints_equal
):
    path = write_recipe(changes=VIEWS)
    kdc.assert_clean_exit(kdc("train-teacher", path), 0)
    fired = fail_training("distilled", epoch=2, batch=5)
    kdc.assert_clean_exit(kdc("distill", path), 130)
    assert fired["fired"]
    resumed = kdc("distill", path)
    kdc.assert_clean_exit(resumed, 0)
    assert "distilled: resuming after epoch 1/2" in kdc.flat(resumed)
    model = in_tmp / RUN / "distilled" / "model.pt"
    kept = in_tmp / "resumed.pt"
    kept.write_bytes(model.read_bytes())
    manifest = model.with_name(model.name + ".manifest.json")
    (in_tmp / "resumed.pt.manifest.json").write_bytes(manifest.read_bytes())
    kdc.assert_clean_exit(kdc("distill", path, "--force"), 0)  # the same table, read again, from epoch 1
    checkpoints_equal(kept, model)


def test_every_seed_of_a_run_reads_the_first_seeds_table_when_its_split_is_the_same(in_tmp, write_recipe, kdc):
    path = write_recipe(changes={**VIEWS, "prune": {"distill": False}})
    result = kdc("run", path, "--seeds", "2")
    kdc.assert_clean_exit(result, 0)
    text = kdc.flat(result)
    assert text.count("teacher-view table: view 2/2") == 1, text  # built once, by the first seed
    assert f"distilled: using the teacher-view table of {(in_tmp / RUN).resolve()}" in text
    (first,) = (in_tmp / RUN / "cache").glob("teacher-views-*.pt")
    (second,) = (in_tmp / RUN / "seeds" / "seed-1" / "cache").glob("teacher-views-*.pt")
    assert first.name == second.name and first.read_bytes() == second.read_bytes()


def test_a_table_too_large_to_hold_is_refused_by_validate_before_the_teacher_trains(in_tmp, write_recipe, kdc):
    result = kdc("validate", write_recipe(changes={**VIEWS, "distill": {"teacher_cache": {"views": 20000}}}))
    kdc.assert_clean_exit(result, 1)
    text = kdc.flat(result)
    assert "distill.teacher_cache: 20000 views of 10,000 images with 10 classes take 4.8 GiB" in text, text
    assert "lower views" in text


def test_the_points_of_a_sweep_share_one_table(in_tmp, write_recipe, kdc):
    path = write_recipe(changes={**VIEWS, "prune": {"distill": False}})
    result = kdc("sweep", path, "--grid", "distill.alpha=0.3,0.7")
    kdc.assert_clean_exit(result, 0)
    text = kdc.flat(result)
    assert text.count("teacher-view table: view 2/2") == 1, text  # built by the first point, linked by the other
    assert "distilled: using the teacher-view table of" in text
    tables = sorted((in_tmp / RUN / "sweep").glob("*/cache/teacher-views-*.pt"))
    assert len(tables) == 2 and tables[0].read_bytes() == tables[1].read_bytes()
