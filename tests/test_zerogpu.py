"""ZeroGPU (issue #16 item 6): what can be checked without a ZeroGPU Space.

The ``spaces`` package itself refuses to start ZeroGPU mode on a CPU build of torch, so the calls
are not run here. Checked instead: every piece of GPU work is a ``spaces.GPU`` task with a duration
sized to it; off ZeroGPU the real ``spaces.GPU`` leaves each function as it is; what Gradio passes
to those tasks survives the pickling into a ZeroGPU worker; the chat pool keeps its models on one
device and answers on another (on CUDA when this runs where there is one).
"""

from __future__ import annotations

import pickle

import gradio as gr
import pytest
import torch
from test_studio import tiny, tiny_settings  # noqa: F401  (fixtures)

from chat import ModelPool, SamplingParams, generate
from studio import zerogpu
from studio.session import StopSignal

HEAVY = {"run_merge", "run_stats", "run_sweep", "run_eval", "make_lora", "run_search",  # the tabs
         "merge_recipe", "redundancy", "tune",  # the API
         "answers"}  # chat, in the tab and the API


def test_every_piece_of_gpu_work_is_a_task_with_a_duration(tiny_settings):  # noqa: F811
    from studio import build

    build(tiny_settings)
    assert HEAVY <= set(zerogpu.TASKS)
    one = "merge_method: linear\nmodels:\n  - model: a\n"
    three = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n  - model: c\n  - model: d\n"
    assert zerogpu.merge_seconds(tiny_settings, three) > zerogpu.merge_seconds(tiny_settings, one) >= 30
    assert zerogpu.merge_seconds(tiny_settings, three.replace("ties", "regmean")) > zerogpu.merge_seconds(tiny_settings, three)
    short, long = SamplingParams(0.7, 0.9, 64, 0), SamplingParams(0.7, 0.9, 1024, 0)
    assert zerogpu.answer_seconds(["a"], [[]], short) < zerogpu.answer_seconds(["a"], [[]], long)
    assert zerogpu.answer_seconds(["a", "b"], [[], []], long) > zerogpu.answer_seconds(["a"], [[]], long)
    assert zerogpu.eval_seconds(tiny_settings, ["a", "b"]) > zerogpu.eval_seconds(tiny_settings, ["a"])


def test_off_zerogpu_spaces_gpu_leaves_the_function_as_it_is():
    import spaces  # the real package: a requirement, a no-op unless SPACES_ZERO_GPU is set

    def work(x):
        return x + 1

    assert not zerogpu.ACTIVE
    assert spaces.GPU(work) is work
    assert zerogpu.gpu(lambda x: 10)(work) is work and zerogpu.TASKS["work"](1) == 10


def test_what_gradio_hands_a_gpu_task_survives_the_trip_to_a_worker():
    signal = StopSignal()
    signal.stop()
    copied = pickle.loads(pickle.dumps(signal))
    assert isinstance(copied, StopSignal) and not copied.event.is_set()  # a click cannot reach the worker
    token = pickle.loads(pickle.dumps(gr.OAuthToken(token="hf_x", scope="openid", expires_at=1)))
    assert token.token == "hf_x"
    params = SamplingParams(0.0, 1.0, 8, 3)
    assert pickle.loads(pickle.dumps(params)) == params
    results = [{"name": "ties-1", "output": "/tmp/x", "method": "ties", "seconds": 1.0}]
    assert pickle.loads(pickle.dumps(results)) == results


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@pytest.mark.parametrize("run_device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: runs on the GPU machine"))])
def test_the_pool_keeps_models_where_it_loads_them_and_answers_on_its_run_device(tiny, run_device):  # noqa: F811
    pool = ModelPool("1GB", "cpu", run_device=run_device)
    ref = str(tiny.finetuned[0])
    params = SamplingParams(0.0, 1.0, 12, 0)
    conversation = [{"role": "user", "content": "hello there"}]
    expected = "".join(generate(ref, "hello there", 0.0, 1.0, 12, 0, pool=ModelPool("1GB", "cpu")))
    answers = zerogpu.answers(pool)
    with pool.leased([ref]) as (handle,):
        seen = []
        for _, text in answers([ref], [conversation], params):
            seen.append(_device_of(handle.model).type)
        assert set(seen) == {run_device}  # on the run device while it answers
        assert _device_of(handle.model).type == "cpu"  # and back in the pool's memory after
    assert text == expected


def test_a_forked_worker_does_not_wait_on_locks_the_parents_threads_hold(tiny):  # noqa: F811
    """A ZeroGPU call runs in a process forked from the studio's, with the pool as it was: locks
    held by the parent's threads at that moment must not stop the worker."""
    import os
    import threading
    import time

    from merging import runtime

    pool, ref = ModelPool("1GB", "cpu"), str(tiny.finetuned[1])
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with pool._lock, runtime.MODEL_LOAD_LOCK:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    pid = os.fork()
    if pid == 0:  # the worker: loads and answers with the parent's locks still taken there
        status = 1
        try:
            torch.set_num_threads(1)
            with pool.leased([ref]) as (handle,):
                status = 0 if handle.model is not None else 1
        finally:
            os._exit(status)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked worker waited on a lock held by a thread of its parent")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        holder.join()
