"""The studio app, launched for real on tiny model families and driven through gradio_client.

One local and one hosted studio are started per session on free loopback ports
(``prevent_thread_lock``); their model lists are tiny random Llama families
(``helpers.family``), so no demo model is loaded except in the one test guarded by
``demo.is_ready()``.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError

import demo
from helpers import family
from studio import session

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(settings):
    """(demo, url) of a launched studio; the caller closes it."""
    from app import build_app
    from studio import launch_options

    demo = build_app(settings)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_options(settings))
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="session")
def tiny():
    """A base and two fine-tunes (Llama, 2 layers, hidden 64), built once."""
    return family("llama", 2, hidden_size=64, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_settings(tiny, tmp_path_factory):
    from studio import Settings

    base = Settings(work_dir=tmp_path_factory.mktemp("studio-work"), device="cpu")
    return base.with_models({"base": tiny.base, "expert-a": tiny.finetuned[0], "expert-b": tiny.finetuned[1]})


@pytest.fixture(scope="session")
def studio(tiny_settings, tmp_path_factory):
    """A local studio on the tiny family: (settings, url, client)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MERGE_STUDIO_VOTES", str(tmp_path_factory.mktemp("votes") / "votes.jsonl"))
    demo, url = launch(tiny_settings)
    yield tiny_settings, url, Client(url, verbose=False)
    demo.close()
    mp.undo()


@pytest.fixture(scope="session")
def hosted_client(tiny_settings):
    demo, url = launch(replace(tiny_settings, hosted=True, queue_size=8))
    yield Client(url, verbose=False)
    demo.close()


def ties_recipe(fam, density: float = 0.5) -> str:
    return yaml.safe_dump({
        "merge_method": "ties",
        "base_model": str(fam.base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": density}} for m in fam.finetuned],
    }, sort_keys=False)


def test_api_lists_only_the_named_endpoints(studio):
    _settings, _url, client = studio
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/merge_recipe", "/generate", "/redundancy", "/tune", "/list_models"}
    assert [p["parameter_name"] for p in endpoints["/generate"]["parameters"]] == [
        "model", "prompt", "temperature", "top_p", "max_new_tokens", "seed"]


def test_merge_recipe_returns_a_summary_whose_output_loads(studio, tiny):
    from transformers import AutoModelForCausalLM

    settings, _url, client = studio
    summary = client.predict(ties_recipe(tiny), api_name="/merge_recipe")
    assert summary["method"] == "ties" and summary["tensors"] > 0 and summary["seconds"] >= 0
    out = Path(summary["output"])
    assert session.sessions_root(settings) in out.parents and out.parent.name == "merges"  # the session's folder, not ours
    assert (out / "merge_recipe.yaml").is_file() and (out / "README.md").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("recipe, message", [
    ("merge_method: nope\nmodels: [a/b]\n", "unknown merge_method 'nope'"),
    ("merge_method: ties\nmodels: [", "not valid YAML"),
    ("recipe.yaml", "must be a YAML mapping"),  # a one-line path is text, never a file to read
    ("merge_method: linear\nmodels:\n  - model: /no/such/model\n", "not found"),
    ("", "the recipe is empty"),
])
def test_a_bad_recipe_comes_back_as_a_readable_error(studio, recipe, message):
    _settings, _url, client = studio
    with pytest.raises(AppError, match=message) as error:
        client.predict(recipe, api_name="/merge_recipe")
    assert "Traceback" not in str(error.value)


def test_generate_streams_text_from_a_tiny_model(studio, tiny):
    _settings, _url, client = studio
    job = client.submit(str(tiny.finetuned[0]), "hello there", 1.0, 0.95, 24, 3, api_name="/generate")
    updates = list(job)
    assert len(updates) > 1, "the answer should arrive in several updates"
    assert all(later.startswith(earlier) for earlier, later in pairwise(updates))
    assert updates[-1] == job.result() and updates[-1].strip()
    again = client.predict(str(tiny.finetuned[0]), "hello there", 1.0, 0.95, 24, 3, api_name="/generate")
    assert again == updates[-1], "the same seed gives the same text"


def test_generate_refuses_bad_sampling_with_a_message(studio, tiny):
    _settings, _url, client = studio
    with pytest.raises(AppError, match="temperature must be"):
        client.predict(str(tiny.base), "hi", 5.0, 0.9, 8, 0, api_name="/generate")


def test_list_models(studio, tiny):
    _settings, _url, client = studio
    assert client.predict(api_name="/list_models") == {
        "base": str(tiny.base), "expert-a": str(tiny.finetuned[0]), "expert-b": str(tiny.finetuned[1])}


def test_redundancy_endpoint_measures_the_task_vectors_by_name(studio, tiny):
    _settings, _url, client = studio
    stats = client.predict(str(tiny.base), [str(m) for m in tiny.finetuned], 0.3, api_name="/redundancy")
    assert list(stats["models"]) == ["expert-a", "expert-b"]  # named as the pickers name them
    assert stats["density"] == 0.3 and "tensors" not in stats
    model = stats["model"]
    assert 0 < model["deltas"]["expert-a"]["relative_norm"] < 1
    assert model["conflicts"]["trimmed_eligible"] < model["conflicts"]["eligible"]
    assert -1 <= model["cosine"]["expert-a"]["expert-b"] <= 1
    assert [layer["name"] for layer in stats["layers"]][:2] == ["embeddings", "layer 0"]
    spectral = model["spectral"]  # singular values of the weight matrices
    assert 0 < spectral["energy_top"]["expert-a"]["0.01"] < 1 and 0 <= spectral["overlap_left"]["expert-a"]["expert-b"] <= 1
    assert stats["merged"] is None and spectral["merged_spectrum"] is None
    with pytest.raises(AppError, match="density must be a number"):
        client.predict(str(tiny.base), [str(tiny.finetuned[0])], "dense", api_name="/redundancy")


def test_hosted_mode_refuses_local_paths(hosted_client, tmp_path):
    outside = tmp_path / "elsewhere"
    recipe = f"merge_method: linear\nmodels:\n  - model: {outside}\n  - model: /etc\n"
    with pytest.raises(AppError, match="local paths are disabled"):
        hosted_client.predict(recipe, api_name="/merge_recipe")
    with pytest.raises(AppError, match="local paths are disabled"):
        hosted_client.predict("/etc", "hi", 0.0, 0.9, 4, 0, api_name="/generate")
    with pytest.raises(AppError, match="local paths are disabled"):
        hosted_client.predict("/etc", ["../../etc"], 0.2, api_name="/redundancy")


def test_hosted_mode_still_merges_the_offered_models(hosted_client, tiny):
    summary = hosted_client.predict(ties_recipe(tiny, 0.3), api_name="/merge_recipe")
    assert Path(summary["output"]).is_dir()


# -- pieces behind the tabs ----------------------------------------------------------------

def test_settings_from_the_environment(tmp_path):
    from merging.errors import MergeStudioError
    from studio import Settings

    local = Settings.from_env({"MERGE_STUDIO_WORK_DIR": str(tmp_path)})
    assert not local.hosted and local.uses_zoo and local.max_model_bytes is None
    assert set(local.family()) == {"base", *demo.EXPERTS}
    space = Settings.from_env({"SPACE_ID": "me/studio", "SYSTEM": "spaces",
                               "MERGE_STUDIO_MODELS": '{"b": "org/base", "f": "org/ft"}'})
    assert space.hosted and space.oauth and space.max_model_bytes == 4 * 10**9 and space.queue_size == 64
    assert space.base_name() == "b" and space.family() == {"b": "org/base", "f": "org/ft"}
    forced = Settings.from_env({"MERGE_STUDIO_HOSTED": "1", "MERGE_STUDIO_MODELS": "base=/m/b, x=/m/x",
                                "MERGE_STUDIO_MAX_MODEL_SIZE": "500MB"})
    assert forced.hosted and not forced.oauth and forced.max_model_bytes == 500 * 10**6
    with pytest.raises(MergeStudioError, match="name=reference"):
        Settings.from_env({"MERGE_STUDIO_MODELS": "just-one-path"})
    with pytest.raises(MergeStudioError, match="at least 1"):
        Settings.from_env({"MERGE_STUDIO_CHAT_CONCURRENCY": "0"})


def test_hosted_policy_allows_only_offered_models_and_the_own_session(tiny_settings):
    settings = replace(tiny_settings, hosted=True)
    policy = session.policy(settings, "session-1")
    assert policy.hosted
    assert session.folder(settings, "session-1") in policy.allowed_roots
    assert session.folder(settings, "session-2") not in policy.allowed_roots
    assert "session-1" not in str(session.folder(settings, "session-1"))  # a digest, not the hash itself


def test_recipe_form_follows_the_method_spec(tiny):
    from merging.methods import REGISTRY
    from studio import recipe_form as form

    base, sources = str(tiny.base), [str(m) for m in tiny.finetuned]
    recipe = form.initial(base, sources)
    assert recipe["merge_method"] == "task_arithmetic"
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.4, 0.4]  # the guidance's 0.3-0.5
    assert form.check(recipe) == ""
    ties = form.with_method(recipe, "ties")
    assert ties["models"][0]["parameters"] == {"weight": 1.0, "density": 0.3}  # TIES normalizes: equal weights
    density = REGISTRY["ties"].spec.param("density")
    edited = form.set_param(ties, density, 0.55, index=1)
    assert edited["models"][1]["parameters"]["density"] == 0.55 and ties["models"][1]["parameters"]["density"] == 0.3
    assert form.parse(form.to_yaml(edited)) == edited
    assert "density" in form.check(form.set_param(ties, density, 0.0, index=0))
    fisher = form.with_method(ties, "fisher", {sources[0]: "geography"}, ("geography",))
    assert fisher["models"][0]["calibration"] == "geography" and "calibration" not in fisher["models"][1]
    assert "calibration" in form.check(fisher)  # the second model has none: the engine says so
    assert form.with_models(ties, base, sources[:1])["models"] == ties["models"][:1]
    assert "Typical settings" in form.guidance("task_arithmetic") and "0.3–0.5" in form.guidance("task_arithmetic")


def test_models_tab_inspects_and_explains_incompatibility(tiny_settings, tiny):
    from studio.models_tab import inspect_rows

    other = family("qwen2", 1, hidden_size=64, vocab_size=512)
    rows, verdict = inspect_rows(tiny_settings, str(tiny.base), [str(tiny.finetuned[0]), str(other.finetuned[0])], None)
    assert [r[0] for r in rows] == ["base", "source", "source"]
    base_row, good, bad = rows
    assert base_row[2] == "LlamaForCausalLM" and base_row[4] == "float32" and base_row[3].endswith("K")
    assert good[-1].startswith("✓ compatible")
    assert bad[-1].startswith("✗ architectures differ") and "Qwen2ForCausalLM" in bad[-1]
    assert "Not everything can be merged" in verdict


@pytest.mark.skipif(not demo.is_ready(), reason="the demo family is not built (python -m merging zoo --list)")
def test_demo_base_answers_through_the_studio(tmp_path):
    """The real SmolLM2-135M-Instruct, through the studio's generate endpoint (greedy)."""
    from studio import Settings

    app, url = launch(Settings(work_dir=tmp_path, device="cpu"))
    try:
        answer = Client(url, verbose=False).predict(str(demo.base_path()), "What is the capital of France?",
                                                    0.0, 1.0, 12, 0, api_name="/generate")
    finally:
        app.close()
    assert "Paris" in answer


def test_export_zips_the_folder_and_push_needs_a_name_and_a_token(tiny, tmp_path):
    import zipfile

    from merging import load_recipe, merge
    from merging.errors import MergeStudioError
    from merging.export import push_to_hub, zip_folder

    out = merge(load_recipe(ties_recipe(tiny)), tmp_path / "merged", device="cpu").output
    archive = zip_folder(out, tmp_path / "zips")
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert {"merged/model.safetensors", "merged/config.json", "merged/README.md", "merged/merge_recipe.yaml"} <= names
    with pytest.raises(MergeStudioError, match="repository name"):
        push_to_hub(out, "not a repo name!", True, "hf_x")
    with pytest.raises(MergeStudioError, match="not signed in"):
        push_to_hub(out, "my-merge", True, None)


def test_login_button_only_where_oauth_works(tiny_settings):
    """Gradio's OAuth is real on a Space only (SYSTEM=spaces); elsewhere it would need this machine
    logged in to the Hub, so the studio shows the LoginButton on a Space and uses HF_TOKEN locally."""
    import gradio as gr

    from app import build_app
    from studio import Settings

    assert not any(isinstance(b, gr.LoginButton) for b in build_app(tiny_settings).blocks.values())
    assert Settings.from_env({"SPACE_ID": "me/studio", "SYSTEM": "spaces"}).oauth
    assert not Settings.from_env({"SPACE_ID": "me/studio"}).oauth


def table_and_chart(reports, colors=None):
    import pandas as pd

    from viz.scores import score_chart, score_rows

    return pd.DataFrame(score_rows(reports)), score_chart(reports, colors)


def test_evaluation_table_and_chart():
    table, figure = table_and_chart([("base", {"tasks": {"geo": 0.25, "people": 0.5}, "perplexity": 12.5}),
                                     ("merged", {"tasks": {"geo": 0.75, "people": 1.0}, "perplexity": None})])
    assert list(table["model"]) == ["base", "merged"]
    assert list(table["geo"]) == [25.0, 75.0] and list(table["mean accuracy"]) == [37.5, 87.5]
    assert table["perplexity"].iloc[0] == 12.5
    assert [bar.name for bar in figure.data] == ["base", "merged"] and list(figure.data[1].y) == [75.0, 100.0]


def test_uploads_over_the_limit_or_not_text_are_refused(tmp_path):
    from merging.errors import MergeStudioError
    from studio.common import read_upload

    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(MergeStudioError, match="larger than 1.0 KB"):
        read_upload(str(big), "task suite", limit=1000)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(MergeStudioError, match="not UTF-8"):
        read_upload(str(binary), "recipe")
    assert read_upload(str(big), "task suite") == "x" * 2048


def test_a_hosted_server_caps_upload_size(tiny_settings):
    from studio.ui import launch_options

    assert launch_options(replace(tiny_settings, hosted=True))["max_file_size"] == "200mb"


def test_switching_method_takes_the_new_methods_starting_values_and_keeps_typed_ones(tiny):
    from merging.methods import REGISTRY
    from studio import recipe_form as form

    base, sources = str(tiny.base), [str(m) for m in tiny.finetuned]
    weight = REGISTRY["task_arithmetic"].spec.param("weight")
    recipe = form.set_param(form.initial(base, sources), weight, 0.7, index=1)  # model 0 keeps TA's 0.4
    regmean = form.with_method(recipe, "regmean")
    assert [m["parameters"]["weight"] for m in regmean["models"]] == [1.0, 0.7]  # relative weights start equal
    assert [m["parameters"]["weight"] for m in form.with_method(regmean, "task_arithmetic")["models"]] == [0.4, 0.7]
    breadcrumbs = form.with_method(form.with_method(recipe, "ties"), "breadcrumbs")
    assert breadcrumbs["models"][0]["parameters"]["density"] == 0.9  # not TIES's 0.3
    normalize = REGISTRY["ties"].spec.param("normalize")
    linear = form.with_method(form.set_param(form.with_method(recipe, "ties"), normalize, False), "linear")
    assert linear["parameters"] == {"normalize": False}  # a global the user set is kept too
    assert "normalize" not in form.with_method(form.with_method(recipe, "ties"), "linear").get("parameters", {})
    labels = {name: label for label, name in form.method_choices()}
    assert labels["regmean"] == "RegMean (regression mean) — regmean" and labels["ties"] == "TIES — ties"


def test_merge_tab_seed_summary_and_status_text():
    from studio.merge_tab import _seeded, _status, summary_markdown

    assert [m for m in ("ties", "dare_ties", "dare_linear", "regmean") if _seeded({"merge_method": m})] == [
        "dare_ties", "dare_linear"]
    summary = {"name": "ties-1", "method": "ties", "seconds": 1.0, "device": "cpu", "tensors": 3, "bytes": 2e6,
               "dtype": "bfloat16", "shards": 1, "output": "/x"}
    assert "(bfloat16, 1 shard)" in summary_markdown(summary)
    assert "(bfloat16, 2 shards)" in summary_markdown({**summary, "shards": 2})
    status = _status({"merge_method": "linear", "models": [{"model": "a"}], "<img src=x onerror=alert(1)>": 1})
    assert status.startswith("⚠") and "<img" not in status and "&lt;img" in status


def test_merge_summary_names_the_dtype_written(tiny, tmp_path):
    from merging import load_recipe, merge

    recipe = yaml.safe_load(ties_recipe(tiny))
    assert merge(load_recipe(recipe), tmp_path / "as-base", device="cpu").summary()["dtype"] == "float32"
    summary = merge(load_recipe({**recipe, "dtype": "bfloat16"}), tmp_path / "bf16", device="cpu").summary()
    assert summary["dtype"] == "bfloat16"


def test_merge_output_folders_are_reserved_until_the_merge_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(session.time, "strftime", lambda _format: "20250101-120000")  # the same second
    with session.reserve_output(tmp_path, "ties") as first, session.reserve_output(tmp_path, "ties") as second:
        assert first != second and {first.name, second.name} == {"ties-20250101-120000", "ties-20250101-120000-2"}
        assert not first.exists()  # only a name: the engine creates the folder
    with session.reserve_output(tmp_path, "ties") as again:
        assert again == first  # released (nothing was written there)


def test_export_zip_is_reused_and_replaced_when_the_folder_changes(tiny, tmp_path):
    import os

    from merging import load_recipe, merge
    from merging.export import zip_folder

    out = merge(load_recipe(ties_recipe(tiny)), tmp_path / "merged", device="cpu").output
    first = zip_folder(out, tmp_path / "zips")
    home = first.parent.parent
    assert zip_folder(out, tmp_path / "zips") == first and first.name == "merged.zip"
    assert [p for p in home.rglob("*") if p.is_file()] == [first]  # two clicks, one zip
    card = out / "README.md"
    os.utime(card, ns=(card.stat().st_atime_ns, card.stat().st_mtime_ns + 10**9))
    second = zip_folder(out, tmp_path / "zips")
    assert second != first and [p for p in home.rglob("*") if p.is_file()] == [second]


def test_evaluation_keeps_the_suite_order_and_the_redundancy_colours():
    from viz.figures import NEUTRAL, model_colors
    from viz.scores import score_colors as colors_of

    reports = [("base", {"tasks": {"people": 0.5, "creatures": 0.25}, "perplexity": None}),
               ("creatures", {"tasks": {"people": 0.0, "creatures": 1.0}, "perplexity": None}),
               ("merged: x", {"tasks": {"people": 0.5, "creatures": 0.75}, "perplexity": None})]
    sources = ["people", "creatures"]
    colors = colors_of([label for label, _ in reports], sources, "base")
    table, figure = table_and_chart(reports, colors)
    assert list(table.columns) == ["model", "people", "creatures", "mean accuracy"]
    assert list(figure.data[0].x) == ["people", "creatures"]
    assert [bar.marker.color for bar in figure.data] == [NEUTRAL, model_colors(sources)["creatures"], colors["merged: x"]]
    assert colors["merged: x"] not in {NEUTRAL, *model_colors(sources).values()}
