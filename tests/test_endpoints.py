"""Endpoint models (issue #17 item 1): ``openai:<base URL>#<model>`` answers through the real
``openai`` client from a real ``transformers serve`` process on the CPU, beside local models.

A key-checking proxy (``tests/support/serving.py``) stands where a deployment puts one in front
of its engine, and drops a stream halfway on request.
"""

from __future__ import annotations

import threading

import pytest

from chat import ModelPool, SamplingParams, generate, stream_many
from evaluation.scoring import normalize
from merging.endpoints import Endpoint, configured_endpoints, parse_endpoint
from merging.errors import MergeStudioError
from merging.sources import SourcePolicy, check_local_access
from tests.support.serving import KEY, free_port, served  # noqa: F401  (fixture)

GREEDY = SamplingParams(0.0, 1.0, 24, 0)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture()
def keyed(monkeypatch):
    monkeypatch.setenv("MERGE_STUDIO_ENDPOINT_API_KEY", KEY)


def _answer(panels, conversations=None, params=GREEDY, stop_event=None) -> list[str]:
    texts = [""] * len(panels)
    for index, text in stream_many(panels, conversations or [QUESTION] * len(panels), params, stop_event):
        texts[index] = text
    return texts


def test_references_parse_and_the_configured_list_is_read():
    endpoint = parse_endpoint("openai:http://127.0.0.1:8000/v1/#org/my-merge")
    assert endpoint == Endpoint("http://127.0.0.1:8000/v1", "org/my-merge")
    assert endpoint.ref == "openai:http://127.0.0.1:8000/v1#org/my-merge"
    for bad in ("openai:127.0.0.1:8000#m", "openai:http://127.0.0.1:8000/v1", "openai:ftp://h/v1#m"):
        with pytest.raises(MergeStudioError, match="openai:<base URL>#<model name>"):
            parse_endpoint(bad)
    with pytest.raises(MergeStudioError, match="must not hold credentials"):
        parse_endpoint("openai:http://user:secret@gpu-box:8000/v1#m")  # shown wherever the reference is
    listed = configured_endpoints({"MERGE_STUDIO_ENDPOINTS": "big=openai:http://gpu:8000/v1#org/big, small=http://cpu:8080/v1#s"})
    assert listed == {"big": "openai:http://gpu:8000/v1#org/big", "small": "openai:http://cpu:8080/v1#s"}


def test_the_endpoints_greedy_answer_equals_the_local_models(served, keyed):
    folder, server, proxy = served
    local = "".join(generate(str(folder), QUESTION[0]["content"], 0.0, 1.0, 24, 0, pool=ModelPool("2GB", "cpu")))
    remote = _answer([parse_endpoint(f"openai:{proxy.base_url}#{folder}")])[0]
    assert "Paris" in local and remote == local


def test_a_local_and_a_served_model_stream_side_by_side(served, keyed):
    folder, server, proxy = served
    pool = ModelPool("2GB", "cpu")
    updates = []
    with pool.leased([str(folder)]) as (handle,):
        for index, text in stream_many([handle, parse_endpoint(f"openai:{server.base_url}#{folder}")],
                                       [QUESTION, QUESTION], GREEDY):
            updates.append(index)
    assert set(updates) == {0, 1} and updates.count(1) > 1  # both grow, the served one chunk by chunk


def test_each_failure_is_a_message_in_its_own_panel_while_the_other_answers(served, keyed, monkeypatch):
    folder, server, proxy = served
    pool = ModelPool("2GB", "cpu")
    cases = {
        f"openai:http://127.0.0.1:{free_port()}/v1#{folder}": "cannot reach the server at 127.0.0.1:",
        f"openai:{server.base_url}#no-such-model": "has no model 'no-such-model'",
    }
    with pool.leased([str(folder)]) as (handle,):
        for ref, message in cases.items():
            local, failed = _answer([handle, parse_endpoint(ref)])
            assert local.strip() and failed.startswith("⚠") and message in failed, failed
        monkeypatch.setenv("MERGE_STUDIO_ENDPOINT_API_KEY", "sk-wrong")
        local, failed = _answer([handle, parse_endpoint(f"openai:{proxy.base_url}#{folder}")])
        assert local.strip() and "refused the API key" in failed and "MERGE_STUDIO_ENDPOINT_API_KEY" in failed


def test_a_stream_cut_in_the_middle_keeps_what_came_and_says_so(served, keyed):
    folder, server, proxy = served
    proxy.cut_after = 600  # a few chunks of server-sent events, then the connection drops
    try:
        (text,) = _answer([parse_endpoint(f"openai:{proxy.base_url}#{folder}")])
    finally:
        proxy.cut_after = None
    kept, _, note = text.partition("\n\n⚠ ")
    assert kept and "was cut after" in note and "send the message again" in note


def test_stop_ends_a_served_answer(served, keyed):
    folder, server, proxy = served
    stop = threading.Event()
    stop.set()
    (text,) = _answer([parse_endpoint(f"openai:{server.base_url}#{folder}")], stop_event=stop)
    assert text == ""


def test_hosted_mode_refuses_an_endpoint_it_was_not_configured_with():
    configured = "openai:http://127.0.0.1:8000/v1#served"
    hosted = SourcePolicy(hosted=True, endpoints=(configured,))
    check_local_access(configured, hosted)
    with pytest.raises(MergeStudioError, match="only uses the endpoints it is configured with"):
        check_local_access("openai:http://169.254.169.254/v1#anything", hosted)
    check_local_access("openai:http://127.0.0.1:9/v1#anything", SourcePolicy())  # locally, any


# -- python -m merging serve -------------------------------------------------------------------

def test_serve_starts_transformers_serve_waits_for_it_and_prints_the_reference(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import demo
    from helpers import REPO

    if not demo.is_ready():
        pytest.skip("needs the demo family: python -m merging zoo --list builds it")
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "merging", "serve", str(demo.base_path()), "--port", str(port),
                                "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        reference = process.stdout.readline().strip()  # printed once the server answers /health
        assert reference == f"openai:http://127.0.0.1:{port}/v1#{demo.base_path().absolute()}"
        (answer,) = _answer([parse_endpoint(reference)])
        assert "Paris" in answer
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(30)
    log.seek(0)
    assert "interrupted; the server was stopped" in log.read()


def test_serve_says_how_to_install_a_missing_engine_and_prints_commands_for_elsewhere(tmp_path, llama):
    from helpers import error_line, run_cli

    printed = run_cli("serve", llama.base, "--engine", "vllm", "--port", "9000", "--tensor-parallel", "4", "--print")
    command, reference = printed.stdout.splitlines()
    assert command.startswith("vllm serve ") and "--tensor-parallel-size 4" in command
    assert reference.endswith(f"openai:http://127.0.0.1:9000/v1#{llama.base.name}")
    import shutil
    if shutil.which("vllm") is None:
        assert "pip install vllm" in error_line(run_cli("serve", llama.base, "--engine", "vllm"))
    assert "convert_hf_to_gguf.py" in error_line(run_cli("serve", llama.base, "--engine", "llama.cpp"))
    assert "not a model folder" in error_line(run_cli("serve", tmp_path))


# -- evaluation through an engine (issue #17 item 3) -----------------------------------------------

def test_eval_scores_a_served_model_on_the_same_suite_as_its_folder(served, keyed, tmp_path):
    import json

    from evaluation.run import evaluate
    from helpers import error_line, run_cli

    from evaluation.suites import load_suite

    folder, server, proxy = served
    ref = f"openai:{proxy.base_url}#{folder}"
    suite = tmp_path / "suite.jsonl"  # four prompts of each demo task: the same suite, a third of the time
    suite.write_text("".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer, "task": task}) + "\n"
                             for task, examples in load_suite("zoo").items() for ex in examples[:4]))
    local, remote = evaluate(folder, suite, device="cpu"), evaluate(ref, suite)
    assert remote.tasks.keys() == local.tasks.keys() == {"geography", "people", "creatures"}
    pairs = [(a[2], b[2]) for task in local.answers for a, b in zip(local.answers[task], remote.answers[task])]
    same = sum(normalize(mine) == normalize(theirs) for mine, theirs in pairs)
    # greedy both ways; the studio batches prompts with left padding, the server answers one at a time,
    # so a near tie may fall the other way now and then
    assert same >= 0.9 * len(pairs), [p for p in pairs if normalize(p[0]) != normalize(p[1])]
    direct = f"openai:{server.base_url}#{folder}"  # the CLI process gets no key: the server itself wants none
    result = run_cli("eval", direct, "--suite", suite, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tasks"] == remote.summary()["tasks"]
    assert "perplexity needs the model's weights" in error_line(run_cli("eval", direct, "--text", __file__))
