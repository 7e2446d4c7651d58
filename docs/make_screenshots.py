"""The README's screenshots: one PNG per tab of the studio, on the demo family.

    OMP_NUM_THREADS=2 python docs/make_screenshots.py [--out docs/screenshots]

Launches the studio in this process on a free loopback port (session folders and A/B votes go
to a temporary folder; calibration statistics to the usual cache, so a second run skips them),
then drives Debian's chromium with playwright through the work a person does, one screenshot
per tab:

- **Models**: the demo base and its three experts inspected, with the compatibility verdict;
- **Merge**: RegMean over the three experts, each calibrated on its own demo task, with the summary;
- **Redundancy**: the statistics of the three task vectors: the findings and the first two of five figures;
- **Chat**: the base, the geography expert and the merge answering a geography question, greedy;
- **Evaluate**: those five models on the whole demo suite (48 held-out questions), table and chart;
- **Export**: the merge prepared as a zip download.

Needs the demo family (``python -m merging zoo --list`` builds it) and ``/usr/bin/chromium``.
About 100 s on a 2-core CPU (the evaluation ~47 s, the merge ~20 s, or ~45 s when RegMean's
calibration is not cached yet); each step's time is printed. A step that fails leaves a
full-page screenshot of where it stopped in the temporary folder's parent, and says where.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
WIDTH = 1400
QUESTION = "What is the capital of Veloria?"  # a fact the geography expert learned (demo/tasks.py)
STEP_TIMEOUT_MS = 30 * 60_000  # a merge or an evaluation on a slow CPU
MAX_PNG_BYTES = 400_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(work: Path) -> tuple[object, str]:
    """(demo, url): the studio on the demo family, launched in this process."""
    os.environ["MERGE_STUDIO_WORK_DIR"] = str(work / "studio")
    os.environ["MERGE_STUDIO_VOTES"] = str(work / "votes.jsonl")
    os.environ["MERGE_STUDIO_MODELS"] = "zoo"  # the steps name the demo models
    sys.path.insert(0, str(REPO))
    from app import build_app, prepare
    from studio import Settings, launch_options

    settings = Settings.from_env()
    prepare(settings)
    demo = build_app(settings)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_options(settings))
    return demo, f"http://127.0.0.1:{port}/"


# The bottom of the open tab's content, in page coordinates (the tab panel's own box can end
# short of content that Gradio renders later, such as gr.render's controls).
CONTENT_BOTTOM = """() => {
  const panel = [...document.querySelectorAll('[role=tabpanel]')].find(p => p.offsetParent !== null);
  let bottom = 0;
  for (const el of panel.querySelectorAll('*')) {
    const box = el.getBoundingClientRect();
    if (box.width > 0 && box.height > 0) bottom = Math.max(bottom, box.bottom);
  }
  return bottom + window.scrollY;
}"""


def shot(page, out: Path, name: str, until=None) -> Path:
    """Save the page from its top down to the end of the open tab (no footer), or to the end of
    the element ``until``, full width.

    A PNG over ``MAX_PNG_BYTES`` is re-saved with a 256-colour palette (text and flat UI
    colours survive it; a screenshot shrinks about threefold).
    """
    from PIL import Image

    page.mouse.move(0, 0)  # no hover highlights
    if until is not None:
        box = until.bounding_box()
        bottom = box["y"] + box["height"] + page.evaluate("window.scrollY")
    else:
        bottom = page.evaluate(CONTENT_BOTTOM)
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": WIDTH, "height": int(bottom) + 16})
    if path.stat().st_size > MAX_PNG_BYTES:
        with Image.open(path) as image:
            small = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        small.save(path, optimize=True)
    return path


def models_tab(page):
    page.get_by_role("tab", name="Models").click()  # the Guide is the first tab
    page.get_by_text("All 3 source model(s) can be merged with the base").wait_for()
    page.get_by_text("compatible: same architecture").filter(visible=True).first.wait_for()


def merge_tab(page):
    """RegMean over the three experts; each one's calibration is its own demo task."""
    page.get_by_role("tab", name="Merge").click()
    page.get_by_label("Merge method").click()
    page.get_by_role("option", name=re.compile(r"— regmean$")).click()
    page.wait_for_function("() => ['merge_method: regmean', 'calibration: geography', 'calibration: people', "
                           "'calibration: creatures'].every(s => document.querySelector('.cm-content').innerText.includes(s))")
    page.get_by_text("✓ valid recipe").wait_for()
    page.get_by_role("button", name="Merge", exact=True).click()
    page.locator("#merge-summary").get_by_text("Merged").wait_for(timeout=STEP_TIMEOUT_MS)


def redundancy_tab(page):
    """The findings and the first two of the five figures (the whole tab is about 4,000 px tall)."""
    page.get_by_role("tab", name="Redundancy").click()
    page.get_by_role("button", name="Compute statistics").click()
    page.get_by_text(re.compile(r"Measured \d+ tensors of 3 model")).wait_for(timeout=STEP_TIMEOUT_MS)
    page.locator(".js-plotly-plot .main-svg").nth(4).wait_for()
    return page.locator(".js-plotly-plot").nth(1)


def chat_tab(page):
    """Three panels (base, geography expert, the merge), greedy, on a geography question."""
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("radio", name="3").check()
    page.get_by_label("Panel 3 model").wait_for()
    for number, option in ((1, "base (base)"), (2, "geography"), (3, re.compile("^merged: regmean-"))):
        picker = page.get_by_label(f"Panel {number} model")
        picker.click()
        page.get_by_role("option", name=option, exact=isinstance(option, str)).filter(visible=True).first.click()
        page.keyboard.press("Escape")
    page.get_by_text("Sampling (shared by every panel)").click()
    for name, value in (("temperature", "0"), ("max new tokens", "64")):
        field = page.get_by_label(f"number input for {name}")
        field.fill(value)
        field.press("Enter")
    page.get_by_placeholder("Type a message").fill(QUESTION)
    page.get_by_role("button", name="Send").click()
    page.get_by_text(re.compile(r"Done in [\d.]+ s")).wait_for(timeout=STEP_TIMEOUT_MS)


def evaluate_tab(page):
    """Base, experts and the merge on the whole demo suite."""
    page.get_by_role("tab", name="Evaluate").click()
    page.get_by_role("checkbox", name=re.compile("merged: regmean-")).check()
    page.get_by_role("button", name="Evaluate", exact=True).click()
    page.get_by_text("5 models measured.").wait_for(timeout=STEP_TIMEOUT_MS)
    page.locator(".js-plotly-plot .main-svg").filter(visible=True).first.wait_for()


def export_tab(page):
    page.get_by_role("tab", name="Export").click()
    page.get_by_role("button", name="Prepare a zip").click()
    # Gradio's file preview: the name in the cell's aria-label, a "538.1 MB ⇣" download link beside it
    page.locator('td.filename[aria-label^="regmean-"][aria-label$=".zip"]').wait_for(timeout=STEP_TIMEOUT_MS)
    page.get_by_role("link", name=re.compile("MB ⇣")).wait_for()


# Each step drives one tab from where the previous one left off; it returns None (the screenshot
# takes the whole tab) or the element the screenshot ends at.
STEPS = (("models", models_tab), ("merge", merge_tab), ("redundancy", redundancy_tab), ("chat", chat_tab),
         ("evaluate", evaluate_tab), ("export", export_tab))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="merge-studio-screenshots-") as work:
        demo, url = launch(Path(work))
        errors: list[str] = []
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
                page.set_default_timeout(120_000)
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(url)
                for name, step in STEPS:
                    t0 = time.monotonic()
                    try:
                        until = step(page)
                    except Exception:
                        failed = Path(work).parent / f"merge-studio-{name}-failed.png"
                        page.screenshot(path=str(failed), full_page=True)
                        print(f"{name}: failed; the page as it was: {failed}", file=sys.stderr, flush=True)
                        raise
                    path = shot(page, args.out, name, until)
                    print(f"{name:<11} {time.monotonic() - t0:6.1f} s  {path} ({path.stat().st_size // 1000} KB)",
                          flush=True)
                browser.close()
        finally:
            demo.close()
    if errors:
        print("page errors:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
