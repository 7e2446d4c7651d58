"""The studio in a real browser: Debian's chromium driven by playwright, on a tiny model family.

One walk through the product: the seven tabs are there (no Guide: not the demo family); on the Merge tab, choosing TIES rebuilds
the controls from its spec (a density slider per model) and editing one updates the YAML; the
merge runs from the Merge button; the result chats beside a source with both answers streaming;
the Redundancy tab draws its Plotly figures, the singular-value spectra with that merge. The Tune
tab runs a two-trial search on an uploaded JSONL suite, draws its history and lists its trials,
and hands the best recipe to the Merge tab's editor. Screenshots go to the test's tmp folder
(``MERGE_STUDIO_SCREENSHOTS`` keeps them elsewhere).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from test_studio import launch, tiny, tiny_settings  # noqa: F401  (fixtures)

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def page(tiny_settings, tmp_path_factory):  # noqa: F811
    from playwright.sync_api import sync_playwright

    mp = pytest.MonkeyPatch()
    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    mp.setenv("MERGE_STUDIO_VOTES", str(votes))
    demo, url = launch(tiny_settings)
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.errors = errors
        page.votes = votes
        yield page
        browser.close()
    demo.close()
    mp.undo()


def shot(page, tmp_path, name: str) -> Path:
    folder = Path(os.environ.get("MERGE_STUDIO_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def chat_with_merge(page, merged_option: str) -> None:
    """Chat tab: panel 2 takes the merge named by ``merged_option`` (a regex), one message is sent,
    and every panel answers."""
    page.get_by_role("tab", name="Chat").click()
    page.get_by_label("Panel 2 model").click()
    page.get_by_role("option", name=re.compile(merged_option)).click()
    page.get_by_placeholder("Type a message").fill("hello there")
    page.get_by_role("button", name="Send").click()
    page.get_by_text(re.compile(r"Done in [\d.]+ s")).wait_for()
    assert all(text.strip() for text in page.get_by_test_id("bot").all_inner_texts())


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")
def test_merge_chat_and_plots_in_the_browser(page, tmp_path):
    from playwright.sync_api import expect

    for name in ("Models", "Merge", "Tune", "Redundancy", "Chat", "Evaluate", "Export"):
        page.get_by_role("tab", name=name).wait_for()
    assert page.get_by_role("tab", name="Guide").count() == 0  # the Guide tells the demo family's story only
    page.get_by_text("All 2 source model(s) can be merged with the base").wait_for()

    # Merge: the controls follow the method's spec, and edits reach the YAML.
    page.get_by_role("tab", name="Merge").click()
    page.get_by_label("Merge method").click()
    page.get_by_role("option", name="TIES — ties", exact=True).click()
    density = page.get_by_label("number input for density")
    density.first.wait_for()
    assert density.count() == 2, "one density control per source model"
    density.nth(1).fill("0.7")
    density.nth(1).press("Enter")
    yaml_view = page.locator(".cm-content")
    page.wait_for_function("() => document.querySelector('.cm-content').innerText.includes('density: 0.7')")
    assert "merge_method: ties" in yaml_view.inner_text()
    page.get_by_role("button", name="Merge", exact=True).click()
    summary = page.locator("#merge-summary")
    summary.get_by_text("Merged").wait_for()
    assert re.search(r"ties in [\d.]+ s", summary.inner_text())
    shot(page, tmp_path, "merge")

    # Chat: the merge is offered at once; both panels stream their answers.
    chat_with_merge(page, "^merged: ties-")
    assert page.get_by_test_id("bot").count() == 2
    shot(page, tmp_path, "chat")
    # Stop ends a long generation within a token or so, keeping what was written.
    page.get_by_text("Sampling (shared by every panel)").click()
    page.get_by_label("number input for max new tokens").fill("1024")
    page.get_by_label("number input for max new tokens").press("Enter")
    page.get_by_placeholder("Type a message").fill("tell me a long story")
    page.get_by_role("button", name="Send").click()
    page.get_by_text("Generating…").wait_for()
    page.get_by_role("button", name="Stop", exact=True).click()
    page.get_by_text(re.compile(r"Stopped in [\d.]+ s")).wait_for()
    assert page.get_by_test_id("bot").count() == 4

    # Redundancy: the viz figures render as Plotly plots, the singular-value views with the merge
    # made above (offered by the merged-model picker) beside the sources.
    page.get_by_role("tab", name="Redundancy").click()
    page.get_by_label("Merged model to compare (this session's merges)").click()
    page.get_by_role("option", name=re.compile("^merged: ties-")).click()
    page.get_by_role("button", name="Compute statistics").click()
    page.locator(".js-plotly-plot").nth(7).wait_for()
    assert page.locator(".js-plotly-plot").count() == 8
    page.get_by_text(re.compile(r"Measured 20 tensors of 2 model\(s\), compared with the merge ties-")).wait_for()
    spectra = page.locator(".js-plotly-plot").filter(has_text="Singular-value spectra")
    expect(spectra.locator(".legendtext")).to_have_text(["expert-a", "expert-b", "Σδᵢ (sum of the task matrices)",
                                                          re.compile("^merged: ties-")])
    assert spectra.locator(".scatterlayer .trace path.js-line").count() == 4  # a drawn line per spectrum
    overlap = page.locator(".js-plotly-plot").filter(has_text="Subspace interference")
    expect(overlap.locator(".legendtext").filter(has_text="in the merged update")).to_have_count(1)
    shot(page, tmp_path, "redundancy")
    assert not page.errors, page.errors


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")
def test_blind_ab_vote_is_recorded_and_reveals_the_models(page, tiny, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    names = {str(tiny.base): "base (base)", str(tiny.finetuned[1]): "expert-b"}
    page.get_by_role("tab", name="Chat").click()
    expect(page.get_by_label("Panel 1 model")).to_have_value("base (base)")
    page.get_by_label("Panel 2 model").click()
    page.get_by_role("option", name="expert-b", exact=True).click()
    max_new_tokens = page.get_by_label("number input for max new tokens")
    if not max_new_tokens.is_visible():  # the accordion is open if the walk above ran first
        page.get_by_text("Sampling (shared by every panel)").click()
    max_new_tokens.fill("24")
    max_new_tokens.press("Enter")

    # Blind: the pickers go, the panels become Model A and Model B, and the vote buttons appear.
    page.get_by_label("Blind A/B").check()
    expect(page.get_by_role("button", name="A is better")).to_be_visible()
    expect(page.get_by_label("Panel 1 model")).to_be_hidden()
    labels = page.get_by_test_id("block-label").filter(visible=True)
    expect(labels).to_have_text(["Model A", "Model B"])
    prompt = "which of you is better?"
    page.get_by_placeholder("Type a message").fill(prompt)
    page.get_by_role("button", name="Send").click()
    page.get_by_text(re.compile(r"Done in [\d.]+ s\. Which answer is better\?")).wait_for()
    answers = page.get_by_test_id("bot").filter(visible=True)
    expect(answers).to_have_count(2)
    assert all(text.strip() for text in answers.all_inner_texts())
    expect(labels).to_have_text(["Model A", "Model B"])  # still anonymous after answering
    assert not page.get_by_text(re.compile("expert-b|base \\(base\\)")).filter(visible=True).count()
    assert not page.votes.exists(), "nothing is recorded before the vote"
    shot(page, tmp_path, "blind-ab")

    # The vote is appended to the votes file, then the models are named.
    page.get_by_role("button", name="B is better").click()
    reveal = page.get_by_text(re.compile(r"Your vote \(B is better\) is recorded"))
    reveal.wait_for()
    shown = re.search(r"Model A was (.+), Model B was (.+)\. Your vote", reveal.inner_text())
    assert shown and set(shown.groups()) == set(names.values()), reveal.inner_text()
    expect(labels).to_have_text([f"Model A: {shown[1]}", f"Model B: {shown[2]}"])
    votes = [json.loads(line) for line in page.votes.read_text().splitlines()]
    assert len(votes) == 1, votes
    vote = votes[0]
    assert (names[vote["model_a"]], names[vote["model_b"]]) == shown.groups()
    assert vote["choice"] == "B" and vote["winner"] == vote["model_b"]
    for side in ("conversation_a", "conversation_b"):
        assert [m["role"] for m in vote[side]] == ["user", "assistant"], vote[side]
        assert vote[side][0]["content"] == prompt and vote[side][1]["content"].strip()
    shot(page, tmp_path, "blind-ab-voted")
    assert not page.errors, page.errors


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")
def test_stop_cancels_a_merge_still_waiting_behind_another_users_job(page, tiny_settings, tmp_path):  # noqa: F811
    """Heavy jobs of all users share one slot: a Stop pressed while this user's merge waits in the
    queue behind another user's merge still cancels it when its turn comes; nothing is written."""
    import time
    from dataclasses import replace

    import yaml
    from gradio_client import Client
    from gradio_client.utils import Status
    from helpers import family
    from merging.runtime import MODEL_LOAD_LOCK
    from playwright.sync_api import expect
    from test_faults import BIG

    # Another user's merge holds the heavy slot for a few seconds: TIES over the ~34 MB/model
    # family, each fine-tune listed 24 times (~0.1 s per listed model here). Built under the lock
    # of model construction: a studio's Models tab may be building a model on the meta device.
    with MODEL_LOAD_LOCK:
        big = family("llama", 2, **BIG)
    recipe = yaml.safe_dump({"merge_method": "ties", "base_model": str(big.base), "models": [
        {"model": str(big.finetuned[i % 2]), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(48)]})
    settings = replace(tiny_settings, work_dir=tmp_path / "work", heavy_concurrency=1)
    demo, url = launch(settings)
    ours = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})  # a session of its own
    try:
        ours.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        ours.on("pageerror", lambda error: errors.append(str(error)))
        ours.goto(url)
        ours.get_by_role("tab", name="Merge").click()
        ours.get_by_text("✓ valid recipe").wait_for()  # the tiny family's default recipe

        job = Client(url, verbose=False).submit(recipe, api_name="/merge_recipe")
        while job.status().code != Status.PROCESSING:
            assert not job.done(), "the other user's merge ended before it could hold the slot"
            time.sleep(0.02)
        ours.get_by_role("button", name="Merge", exact=True).click()
        summary = ours.locator("#merge-summary")
        expect(summary).to_contain_text(re.compile(r"queue: 1/1"), timeout=5_000)  # waiting behind the other merge
        assert not job.done(), "the other merge must still hold the slot when Stop is pressed"
        ours.get_by_role("button", name="Stop", exact=True).click()

        # Its turn comes when the other merge ends (a few seconds; more on a busy machine).
        expect(summary).to_contain_text(re.compile("Merge stopped|Merged"), timeout=TIMEOUT_MS)
        assert "Merge stopped; nothing was written." in summary.inner_text(), summary.inner_text()
        done = job.result(timeout=120)
        assert done["method"] == "ties" and done["tensors"] > 0
        assert (Path(done["output"]) / "model.safetensors").is_file()
        theirs = Path(done["output"]).parents[1]
        # Our merge ran when its turn came (our session folder exists) and stopped before writing anything.
        from studio.session import sessions_root

        mine = [folder for folder in sessions_root(settings).iterdir() if folder != theirs]
        assert len(mine) == 1, list(sessions_root(settings).iterdir())
        assert not list((mine[0] / "merges").iterdir()), list((mine[0] / "merges").iterdir())
        assert [p.name for p in (theirs / "merges").iterdir()] == [Path(done["output"]).name]
        shot(ours, tmp_path, "merge-stopped-in-queue")
        assert not errors, errors
    finally:
        ours.close()
        demo.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")
def test_tune_tab_searches_and_hands_the_best_recipe_to_merge(page, tmp_path):
    """Two trials over the default methods on a four-line suite: a few seconds on the tiny family."""
    from playwright.sync_api import expect

    suite = tmp_path / "tiny.jsonl"
    suite.write_text("".join(json.dumps({"prompt": p, "answer": a, "task": t}) + "\n" for p, a, t in [
        ("Say yes.", "yes", "a"), ("Say no.", "no", "a"), ("One plus one?", "2", "b"), ("Two plus two?", "4", "b")]))
    page.get_by_role("tab", name="Tune").click()
    # The ranges are generated from the methods' specs: untick one, and the search spec leaves it out.
    density = page.get_by_label("search density (per model; ties)")
    expect(density).to_be_checked()
    expect(page.get_by_label("weight min")).to_have_value("0.1")  # Param.search of weight
    density.uncheck()
    page.locator("#tune-suite-file input[type=file]").set_input_files(str(suite))
    page.locator("#tune-suite").get_by_label("uploaded JSONL").check()
    page.get_by_label("Trials to add").fill("2")
    page.get_by_role("button", name="Start search").click()

    summary = page.locator("#tune-summary")
    expect(summary).to_contain_text(re.compile(r"Best of 2 trials: [\d.]+"), timeout=TIMEOUT_MS)
    page.locator("#tune-history .js-plotly-plot").wait_for()
    expect(page.locator("#tune-history .js-plotly-plot")).to_contain_text("Optimization history")
    expect(page.locator("#tune-trials [role=grid]")).to_have_attribute("aria-rowcount", "3")  # header + 2 trials
    expect(page.locator("#tune-log textarea")).to_have_value(re.compile(r"trial 1: "))
    page.get_by_text("Search spec (python -m merging tune SPEC.yaml runs it)").click()
    spec = page.locator("#tune-spec .cm-content").inner_text()
    assert "weight:" in spec and "density" not in spec and "tiny.jsonl" in spec, spec
    best = page.locator("#tune-best .cm-content").inner_text()
    assert best.startswith("merge_method: "), best
    shot(page, tmp_path, "tune")

    page.get_by_role("button", name="Use this recipe").click()
    expect(page.get_by_role("tab", name="Merge")).to_have_attribute("aria-selected", "true")
    page.wait_for_function("best => document.querySelector('#merge-yaml .cm-content').innerText === best", arg=best)
    page.get_by_text("✓ valid recipe").wait_for()
    assert not page.errors, page.errors
