"""report.html (issue 12): one self-contained page with inline SVG charts, for a run and for runs compared.

The page must render from report.json alone, old reports included (their sections say "not recorded"),
reference nothing over the network, escape every text, keep the ids of several SVGs on one page apart, and
show its charts in a real browser (headless Chromium, skipped where none is installed).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE, _deep_merge, measured_in_chromium

from kdcompress.report.compare import build_comparison, comparison_markdown
from kdcompress.report.html import render_comparison_html, render_html

RUN = Path("runs") / "tiny"
STAGES = ["teacher", "student", "distilled", "pruned"]
NEW_KEYS = ("schema_version", "generated_at", "run_name", "recipe_resolved", "environment", "class_changes")
NEW_STAGE_KEYS = ("curve", "per_class", "layers")
CLASSES = ["T-shirt/top", "Trouser", "Pull & over"]  # an ampersand to escape


@pytest.fixture(scope="module")
def tiny_run(fresh_run):
    """`kdc run` then `kdc export` (sparse and shared files) on the tiny recipe; returns the run directory."""
    recipe = _deep_merge(TINY_RECIPE, {"export": {"formats": ["sparse", "shared"]}})
    work, _ = fresh_run(yaml.safe_dump(recipe, sort_keys=False), "html", "run", "export")
    return work / RUN


@pytest.fixture(scope="module")
def tiny_report(tiny_run):
    return json.loads((tiny_run / "report.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- a report with every field


def _curve(stage: str, epochs: int = 3) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "train_accuracy": 0.6 + 0.1 * e,
            "test_loss": 1.2 / e,
            "test_accuracy": 0.55 + 0.1 * e,
            "val_loss": None,
            "val_accuracy": None,
            "lr": 0.1 / e,
            "sparsity": (0.25 * e if stage == "pruned" else None),
            "seconds": 0.5,
        }
        for e in range(1, epochs + 1)
    ]


def _per_class(shift: float) -> dict:
    confusion = [[8, 1, 1], [0, 10, 0], [2, 1, 7]]
    confusion[2][0] += int(shift * 10)
    confusion[2][2] -= int(shift * 10)
    return {
        "classes": CLASSES,
        "accuracy": [row[i] / sum(row) for i, row in enumerate(confusion)],
        "confusion": confusion,
    }


def _stage(stage: str, accuracy: float, nbytes: int, seeds: list[float]) -> dict:
    pruned = stage == "pruned"
    return {
        "stage": stage,
        "description": f"the {stage} stage",
        "model": "mlp",
        "stale": None,
        "accuracy": accuracy,
        "accuracy_se": 0.01,
        "test_samples": 2000,
        "test_loss": 0.4,
        "train_accuracy": 0.9,
        "num_classes": 3,
        "chance_accuracy": 1 / 3,
        "has_batchnorm": False,
        "epochs": 3,
        "settings": {
            "model": "mlp",
            "args": {"hidden": [32]},
            "loss": "cross-entropy",
            "epochs": 3,
            "optimizer": "sgd",
            "lr": 0.05,
            "schedule": "cosine",
            "batch_size": 128,
        },
        "params": 25450,
        "nonzero_params": 6394 if pruned else 25450,
        "sparsity": 0.75 if pruned else 0.0,
        "channel_sparsity": None,
        "target_sparsity": 0.75 if pruned else None,
        "checkpoint_bytes": nbytes,
        "macs": 25408,
        "sparse_macs": 6352 if pruned else 25408,
        "latency_ms": {"1": 0.05, "64": 0.1 + nbytes / 1e6},
        "latency": {
            b: {
                "median_ms": 0.1 + nbytes / 1e6,
                "iqr_ms": 0.01,
                "p25_ms": 0.095 + nbytes / 1e6,
                "p75_ms": 0.105 + nbytes / 1e6,
                "batch": int(b),
                "threads": 1,
            }
            for b in ("1", "64")
        },
        "train_seconds": 1.5,
        "curve": [] if stage == "teacher" else _curve(stage),
        "per_class": _per_class({"teacher": 0.0, "student": 0.1, "distilled": 0.2, "pruned": 0.3}[stage]),
        "layers": [
            {"name": "net.1", "kind": "weights", "total": 25088, "kept": 6094 if pruned else 25088},
            {"name": "net.3", "kind": "weights", "total": 320, "kept": 258 if pruned else 320},
        ],
        "seeds": [{"seed": s, "accuracy": a} for s, a in enumerate(seeds)],
        "accuracy_mean": sum(seeds) / len(seeds),
        "accuracy_std": 0.004,
        "trained_once": stage == "teacher",
        "bytes_ratio_vs_teacher": 209501 / nbytes,
        "nonzero_ratio_vs_teacher": 2.0,
        "accuracy_change_vs_teacher": 0.0,
    }


def full_report(name: str = "full") -> dict:
    """A hand-made report.json with every field of schema 1: curves, per-class, layers, seeds, artifacts..."""
    stages = [
        _stage("teacher", 0.85, 209501, [0.85, 0.85]),
        _stage("student", 0.83, 107741, [0.83, 0.825]),
        _stage("distilled", 0.84, 107869, [0.84, 0.838]),
        _stage("pruned", 0.835, 108317, [0.835, 0.83]),
    ]
    seed_comp = {
        "n": 2,
        "differences": [{"seed": 0, "difference": 0.01}, {"seed": 1, "difference": 0.013}],
        "mean": 0.0115,
        "std": 0.002,
        "se": 0.0015,
        "noise_z": 2.0,
        "mean_above_2se": True,
    }
    return {
        "schema_version": 1,
        "generated_at": "2025-03-04T05:06:07+00:00",
        "run_name": name,
        "recipe": name,
        "dataset": "fashion-mnist-mini",
        "latency_batches": [1, 64],
        "threads": 1,
        "threads_asked": 2,
        "omp_wait_policy": "PASSIVE",
        "noise_z": 2.0,
        "stale_checked": True,
        "stale_check_problem": None,
        "stages": stages,
        "comparisons": [
            {
                "stage": "distilled",
                "against": "student",
                "difference": 0.01,
                "se": 0.0141,
                "z": 0.7,
                "within_noise": True,
                "noise_z": 2.0,
                "seeds": seed_comp,
            }
        ],
        "class_changes": [
            {
                "from_stage": "student",
                "to_stage": "pruned",
                "true": 2,
                "predicted": 0,
                "true_name": CLASSES[2],
                "predicted_name": CLASSES[0],
                "before": 3,
                "after": 5,
                "change": 2,
            }
        ],
        "artifacts": [
            {
                "stage": "pruned",
                "format": "sparse",
                "path": "export/pruned-sparse-fp16.kdca",
                "accuracy": 0.835,
                "accuracy_se": 0.01,
                "test_samples": 2000,
                "bytes": 12587,
                "compression_vs_teacher": 16.6,
                "compression_vs_stage": 8.6,
                "accuracy_change_vs_stage": 0.0,
                "options": {"dtype": "fp16"},
                "refused": None,
                "stale": None,
                "latency_ms": {"1": 0.06, "64": 0.3},
                "latency": None,
            },
            {
                "stage": "pruned",
                "format": "shared",
                "path": "export/broken.kdca",
                "refused": "its manifest does not match",
                "latency_ms": None,
            },
        ],
        "recipe_resolved": {
            "run": {"name": name, "seed": 0, "seeds": [0, 1]},
            "data": {"dataset": "fashion-mnist-mini"},
            "distill": {"temperature": 4.0},
        },
        "environment": {
            "kdcompress": "0.1.0",
            "torch": "2.14.1",
            "torchvision": "0.29.1",
            "python": "3.11.7",
            "platform": "Linux-test",
            "cpu_count": 2,
            "train_device": "cpu",
            "latency_threads": 1,
            "latency_measured_at": "2025-03-04T05:00:00+00:00",
        },
        "warnings": ["distilled <b>looks</b> fine & dandy"],
    }


def old_report(report: dict) -> dict:
    """``report`` as a kdc from before schema 1 wrote it: none of the new keys."""
    old = copy.deepcopy(report)
    for key in NEW_KEYS:
        old.pop(key, None)
    for row in old["stages"]:
        for key in NEW_STAGE_KEYS:
            row.pop(key, None)
    return old


# --------------------------------------------------------------------------- checks on a page


def svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def chart_titles(page: str) -> list[str]:
    return re.findall(r'<svg role="img" aria-label="([^"]*)"', page)


def assert_self_contained(page: str) -> None:
    """Nothing to fetch: no script, style sheet, font or image from anywhere, and no web address at all."""
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script|<link|<iframe|<img|<object|<embed|@import|@font-face", page, flags=re.I)
    for target in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page):
        assert target.startswith("#"), target  # only this page's own anchors and SVG ids
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def assert_ids_unique_and_local(page: str) -> None:
    """Every id once on the page, and every reference inside an SVG pointing into that same SVG."""
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), sorted(i for i in set(ids) if ids.count(i) > 1)
    for svg in svgs(page):
        own = set(re.findall(r'\sid="([^"]+)"', svg))
        refs = set(re.findall(r'(?:url\(#|href="#)([^")]+)', svg))
        assert refs <= own, refs - own


# --------------------------------------------------------------------------- a real run


def test_every_run_writes_report_html_with_its_charts(tiny_run, tiny_report):
    page = (tiny_run / "report.html").read_text(encoding="utf-8")
    assert page == render_html(tiny_report)  # a function of report.json alone
    assert_self_contained(page)
    assert_ids_unique_and_local(page)
    titles = chart_titles(page)
    assert len(titles) == len(svgs(page)) >= 1
    assert "accuracy against bytes on disk" in titles
    size_chart = svgs(page)[titles.index("accuracy against bytes on disk")]
    artifacts = [Path(a["path"]).name for a in tiny_report["artifacts"]]
    assert len(artifacts) == 2  # sparse and shared, from `kdc export`
    for label in STAGES + artifacts:  # one labelled point each, text kept as text
        assert f">{label}</text>" in size_chart, label
    for stage in STAGES:
        assert f"<td class=l>{stage}</td>" in page
    assert "latency not measured" in page  # the tiny recipe has report.latency: false
    # the new fields are drawn when the report has them, and said to be missing when not
    if all("curve" in row for row in tiny_report["stages"]):
        assert "training curves of the pruned stage" in titles
    else:
        assert 'Training curves</h2><p class="missing">not recorded' in page
    print(f"\nreport.html of the tiny run: {(tiny_run / 'report.html').stat().st_size:,} bytes, {len(titles)} charts")


def test_a_report_with_every_field_gets_every_chart():
    page = render_html(full_report())
    assert_self_contained(page)
    assert_ids_unique_and_local(page)
    titles = chart_titles(page)
    assert titles == [
        "accuracy against bytes on disk",
        "accuracy against latency at batch 64",
        "accuracy per epoch of the student alone and the distilled student",
        "training curves of the student stage",
        "training curves of the distilled stage",
        "training curves of the pruned stage",
        "kept weights per layer of the pruned stage",
        "per-class test accuracy of each stage",
        "test accuracy of each seed per stage",
    ]
    charts = dict(zip(titles, svgs(page)))
    assert ">sparsity (%)</text>" in charts["training curves of the pruned stage"]  # the second axis
    assert ">sparsity (%)</text>" not in charts["training curves of the student stage"]
    both = charts["accuracy per epoch of the student alone and the distilled student"]
    for row in full_report()["stages"]:
        if row["stage"] in ("student", "distilled"):  # each legend gives the last epoch's, not the best
            last = [p for p in row["curve"] if p.get("epoch") is not None][-1]
            split = "val" if last.get("val_accuracy") is not None else "test"
            assert f">{row['stage']} (last epoch {100 * last[f'{split}_accuracy']:.2f}%)</text>" in both
    assert ">24.3%  6,094 / 25,088</text>" in charts["kept weights per layer of the pruned stage"]
    assert ">pruned-sparse-fp16.kdca</text>" in charts["accuracy against latency at batch 64"]
    assert "broken.kdca</text>" not in charts["accuracy against bytes on disk"]  # refused: no point
    assert "refused: its manifest does not match" in page
    for stage in STAGES:
        assert f">{stage}</text>" in charts["per-class test accuracy of each stage"]  # the legend
    assert "Pull &amp; over" in charts["per-class test accuracy of each stage"]
    # the confusions that changed most, the seeds, the recipe and the environment
    assert "<td class=l>student → pruned</td><td class=l>Pull &amp; over</td><td class=l>T-shirt/top</td>" in page
    assert "<td>+2</td>" in page
    assert "no per-epoch record for: teacher" in page
    assert "mean +1.15 points" in page and "per seed 0: +1.00, 1: +1.30" in page
    assert "<pre>run:\n  name: full\n" in page and "temperature: 4.0" in page
    for value in ("2.14.1", "0.29.1", "3.11.7", "Linux-test", "latency measured at", "2025-03-04T05:06:07+00:00"):
        assert value in page, value
    assert "not recorded" not in page


def test_an_old_report_renders_with_its_missing_sections_said(tiny_report):
    page = render_html(old_report(full_report()))
    assert_self_contained(page)
    for section in ("curves", "layers", "classes", "recipe"):
        body = re.search(rf'<section id="{section}">(.*?)</section>', page, flags=re.S).group(1)
        assert '<p class="missing">not recorded in this report' in body, section
    assert "versions and device not recorded" in page
    assert chart_titles(page)[:2] == ["accuracy against bytes on disk", "accuracy against latency at batch 64"]
    # and the real run's report, whatever schema it has, loses nothing it had
    assert "accuracy against bytes on disk" in chart_titles(render_html(old_report(tiny_report)))


def test_every_text_is_escaped_in_tables_and_charts():
    report = full_report("<script>alert(1)</script>")
    report["stages"][0]["model"] = "<img src=x onerror=alert(2)>"
    report["artifacts"][0]["path"] = "export/a<b>&c.kdca"
    report["stages"][3]["layers"][0]["name"] = "net.<i>1</i> costs $5 and $6"  # '$..$' would be mathtext
    report["stages"][3]["layers"][1]["name"] = 'fc url(#m1) id="x"'  # looks like the SVG's own ids
    page = render_html(report)
    assert "<script>" not in page and "<img" not in page and "<b>looks" not in page and "<i>" not in page
    assert "kdc report: &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert ">a&lt;b&gt;&amp;c.kdca</text>" in page  # in the chart: matplotlib escapes SVG text
    assert ">net.&lt;i&gt;1&lt;/i&gt; costs $5 and $6</text>" in page  # drawn as written, not as maths
    assert '>fc url(#m1) id="x"</text>' in page  # the ids are renamed in tags, never in a label's text
    assert "distilled &lt;b&gt;looks&lt;/b&gt; fine &amp; dandy" in page
    assert_self_contained(page)


def test_rendering_is_deterministic():
    """The same report gives the same page: chart ids are salted per chart, not random."""
    report = full_report()
    assert render_html(report) == render_html(copy.deepcopy(report))


# --------------------------------------------------------------------------- runs compared


def test_comparison_has_one_table_and_one_chart_with_every_run(tiny_report):
    other = copy.deepcopy(tiny_report)
    for row in other["stages"]:
        row["accuracy"] -= 0.05
    comparison = build_comparison([("tiny", tiny_report), ("t2 <T=2>", other), ("tiny", full_report())])
    assert [run["name"] for run in comparison["runs"]] == ["tiny", "t2 <T=2>", "tiny (2)"]
    assert comparison["schema_version"] == 1 and comparison["generated_at"]
    json.dumps(comparison)  # written as report.json

    page = render_comparison_html(comparison)
    assert_self_contained(page)
    assert_ids_unique_and_local(page)
    assert page.count("<table") == 1 and len(svgs(page)) == 1
    table = re.search(r"<table>.*?</table>", page, flags=re.S).group(0)
    chart = svgs(page)[0]
    for name in ("tiny", "t2 &lt;T=2&gt;", "tiny (2)"):
        assert f"<td class=l>{name}</td>" in table, name
        assert f">{name}</text>" in chart, name  # the legend: one colour per run
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    n_rows = sum(len(r["report"]["stages"]) + len(r["report"]["artifacts"]) for r in comparison["runs"])
    assert len(rows) == n_rows
    # each run's points in its own colour
    colours = set(re.findall(r"stroke: (#[0-9a-f]{6})", chart)) & {"#4c72b0", "#dd8452", "#55a868"}
    assert len(colours) == 3

    md = comparison_markdown(comparison)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 + n_rows  # one table: header, alignment, a row per stage and artifact
    assert lines[0].startswith("| run | stage / artifact |") and "latency batch 64" in lines[0]
    assert "| t2 <T=2> | pruned | mlp; unstructured magnitude |" in md
    assert re.search(
        r"^\| tiny \| artifact pruned-sparse-fp16.kdca \(from pruned\) \| sparse \| \d+\.\d\d% \|", md, re.M
    )
    assert "| tiny (2) | teacher | mlp | 85.00% | 1.00 pt | 209,501 | 25,450 | 25,408 | 0.3095 |" in md


# --------------------------------------------------------------------------- a real browser


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_headless_chromium_renders_every_chart(tiny_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (.ci/run does) to render report.html")
    page = tmp_path / "report.html"
    shutil.copy(tiny_run / "report.html", page)
    shot = tmp_path / "shot.png"
    started = time.monotonic()
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    seconds = time.monotonic() - started
    assert _png_size(shot) == (1200, 3000)
    from matplotlib.image import imread  # matplotlib's PNG reader: no other package

    pixels = imread(shot)[:, :, :3]
    ink = (pixels < 0.9).any(axis=2).mean()
    assert ink > 0.01, f"the screenshot is blank ({ink:.2%} of its pixels not white)"
    # the size chart's points and error bars in the teacher's and the pruned stage's colours
    for colour in ("#4c72b0", "#c44e52"):
        rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        near = (abs(pixels - rgb) < 0.06).all(axis=2).sum()
        assert near > 20, f"no pixels of {colour}: the charts were not drawn"
    print(
        f"\nchromium: {seconds:.1f} s; report.html {page.stat().st_size:,} bytes; screenshot "
        f"{'x'.join(map(str, _png_size(shot)))} px, {shot.stat().st_size:,} bytes, {ink:.1%} ink"
    )


_MEASURE = """<script>
window.addEventListener('load', () => {
  const boxes = [...document.querySelectorAll('svg')].map(s => {
    const r = s.getBoundingClientRect();
    return [Math.round(r.width), Math.round(r.height), Math.round(r.left), Math.round(r.right)];
  });
  const out = document.createElement('pre');
  out.id = 'kdc-measure';
  out.textContent = JSON.stringify({svgs: boxes, innerWidth: window.innerWidth,
                                    scrollWidth: document.documentElement.scrollWidth});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.parametrize("width", [1200, 380])
def test_every_chart_is_laid_out_visibly_on_a_wide_and_a_narrow_screen(tiny_run, tmp_path, width):
    """Chromium lays the page out; a measuring script added to a copy (the report itself has none) reports
    every chart's box: each must have a size and fit inside the window, and the page must not scroll sideways
    on a phone-sized screen."""
    html = (tiny_run / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    measured = measured_in_chromium(html, _MEASURE, width, tmp_path)
    assert len(measured["svgs"]) == html.count("<svg") >= 4
    for w, h, left, right in measured["svgs"]:
        assert w > 50 and h > 50, measured
        assert left >= 0 and right <= measured["innerWidth"] + 1, measured
    assert measured["scrollWidth"] <= measured["innerWidth"] + 1, measured


def _label_boxes(svg: str) -> list[tuple[str, float, float, float, float]]:
    """(text, left, bottom, right, top) of each point label (6.5 px text) of a chart, as the page draws it."""
    boxes = []
    for style, x, y, text in re.findall(
        r'<text style="([^"]*font-size: 6\.5px[^"]*)" x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]*)</text>', svg
    ):
        width = 0.55 * 6.5 * len(text)  # DejaVu Sans at 6.5 px: a little narrower than the placing estimate
        left = float(x) - (width if "text-anchor: end" in style else 0)
        boxes.append((text, left, float(y) - 6.5, left + width, float(y)))
    return boxes


def test_comparison_chart_labels_do_not_overlap_and_the_table_says_how_each_run_pruned():
    from kdcompress.report.charts import Charts, comparison_chart

    first = full_report("a")
    next(r for r in first["stages"] if r["stage"] == "pruned")["settings"]["method"] = "unstructured magnitude"
    second, third = copy.deepcopy(first), copy.deepcopy(first)
    for row in second["stages"]:
        row["accuracy"] -= 0.004
    for row in third["stages"]:
        row["accuracy"] += 0.003
        row["checkpoint_bytes"] = int(row["checkpoint_bytes"] * 1.1)
        if row["stage"] == "pruned":
            row["settings"] = {**row.get("settings", {}), "method": "structured, whole channels by l1"}
    comparison = build_comparison([("a", first), ("b", second), ("c", third)])
    boxes = _label_boxes(comparison_chart(comparison, Charts()))
    assert len(boxes) >= 4
    for i, (text, *one) in enumerate(boxes):
        for other_text, *other in boxes[i + 1 :]:
            overlap = one[0] < other[2] and other[0] < one[2] and one[1] < other[3] and other[1] < one[3]
            assert not overlap, f"{text!r} overlaps {other_text!r}"
    md = comparison_markdown(comparison)
    assert "| c | pruned | mlp; structured, whole channels by l1 |" in md
    assert "| a | pruned | mlp; unstructured magnitude |" in md
    assert "mlp; structured, whole channels by l1" in render_comparison_html(comparison)


_MEASURE_TABLES = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'kdc-measure';
  out.textContent = JSON.stringify([...document.querySelectorAll('#stages table')].map(
    t => [Math.round(t.getBoundingClientRect().width), t.parentElement.clientWidth]));
  document.body.appendChild(out);
});
</script>"""


def test_the_single_run_stage_tables_fit_a_1280_pixel_window(tmp_path):
    """Chromium lays out a report with latency at two batch sizes (the widest stage rows): every table of the
    stages section is whole in its column, none scrolls sideways."""
    tables = measured_in_chromium(render_html(full_report()), _MEASURE_TABLES, 1280, tmp_path)
    assert len(tables) >= 2
    for width, room in tables:
        assert width <= room, tables
