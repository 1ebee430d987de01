"""Render report.html files in headless Chromium and say what came out (issue 12's rendering check).

    python scripts/render_report.py runs/quickstart/report.html cmp/report.html --out shots/

For each page: its size in bytes, its inline SVG charts, whether it references anything over the network,
and a full-width screenshot (PNG) with its dimensions and the share of non-white pixels. Exit code 1 when a
page references the network, has no chart, or renders blank. Needs Debian's `chromium` (.ci/run installs it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def ink(path: Path) -> float:
    """The share of pixels that are not (near) white."""
    from matplotlib.image import imread

    pixels = imread(path)[:, :, :3]
    return float((pixels < 0.9).any(axis=2).mean())


def render(page: Path, shot: Path, browser: str, width: int, height: int) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("screenshots"))
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for i, page in enumerate(args.pages):
        text = page.read_text(encoding="utf-8")
        charts = text.count("<svg")
        network = NETWORK.findall(text)
        shot = args.out / f"{i}-{page.parent.name}.png"
        render(page, shot, browser, args.width, args.height)
        width, height = png_size(shot)
        share = ink(shot)
        ok = charts > 0 and not network and share > 0.002  # a blank page has none
        failed |= not ok
        print(
            f"{'PASS' if ok else 'FAIL'}  {page}: {page.stat().st_size:,} bytes, {charts} inline SVG charts, "
            f"{len(network)} network references; screenshot {shot} {width}x{height} px, {share:.1%} ink"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
