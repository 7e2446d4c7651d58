"""Named API endpoints for scripting with ``gradio_client`` (no UI): merge_recipe, generate, redundancy,
tune, list_models.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    summary = client.predict(recipe_yaml, api_name="/merge_recipe")
    for text in client.submit(summary["output"], "Hello!", 0.7, 0.9, 128, 0, api_name="/generate"):
        print(text)
    *lines, result = client.submit(search_spec_yaml, 10, api_name="/tune")  # progress lines, then JSON

Errors come back as ``gradio_client.exceptions.AppError`` whose message says what to fix.
"""

import json
import threading

import gradio as gr

from chat import ModelPool, SamplingParams, check_message
from merging.endpoints import is_endpoint
from merging.errors import MergeStudioError
from merging.sources import check_local_access
from studio import session, zerogpu
from studio.common import CHAT, HEAVY, session_hash, user_errors
from studio.settings import Settings
from tuning.search import describe_trial


def register(settings: Settings, pool: ModelPool) -> None:
    """Add the endpoints to the Blocks being built."""

    def merge_recipe(recipe: str, request: gr.Request) -> dict:
        """Merge the models of a YAML recipe (mergekit's format) into a new folder of this session.

        Returns the summary: {"name", "output" (the folder, usable as a model in generate),
        "method", "seconds", "tensors", "bytes", "shards", "dtype", "device"}.
        """
        return session.merge_recipe(settings, recipe, session_hash(request))

    # Annotated with the type of each streamed update: Gradio documents the endpoint from it
    # (an Iterator[str] annotation would show as "Any" in the API page and view_api()).
    def generate(model: str, prompt: str, temperature: float = 0.7, top_p: float = 0.9,
                 max_new_tokens: int = 256, seed: int = 0, request: gr.Request = None) -> str:
        """Stream a model's answer to one user message (through its chat template, or as a plain transcript for a model without one).

        ``model``: a reference as in recipes (a Hub id; locally also a folder) or the ``output``
        of merge_recipe. Each update is the whole answer so far. Temperature 0 is greedy; the
        same seed gives the same text.
        """
        # The pool serves every session's merges; this user may read only the offered models and their own.
        check_local_access(model, session.policy(settings, session_hash(request)))
        params = SamplingParams(temperature, top_p, max_new_tokens, seed)
        conversation = [{"role": "user", "content": check_message(prompt)}]
        with pool.leased([] if is_endpoint(model) else [model]):  # loaded here; the answer is a GPU call on ZeroGPU
            for _, text in zerogpu.answers(pool)([model], [conversation], params):
                yield text

    def redundancy(base: str, sources: list[str], density: float = 0.2, merged: str = "",
                   request: gr.Request = None) -> dict:
        """The redundancy statistics of the sources' task vectors on ``base`` (as the Redundancy tab).

        Returns the whole-model and per-layer figures: {"base", "models" {label: reference},
        "density", "device", "seconds", "spectral_seconds", "merged", "merged_label", "model",
        "layers", "definitions"}, where "model" and each layer hold per-label "deltas" (norm,
        relative_norm, quantiles, energy_top, ...), "conflicts" (sign-conflict rates before and
        after TIES trimming to ``density``), "cosine" (label -> label) and "spectral" (singular
        values of the weight matrices: pooled spectra, the share of ‖δ‖²_F in the top 1/5/10% of
        singular values, subspace overlaps between tasks; the same for their sum and, when
        ``merged`` names a merge such as merge_recipe's "output", its update). Per-tensor
        figures and the histogram are left out.
        """
        stats = session.measure(settings, base, list(sources or []), density, session_hash(request),
                                merged=merged or None)
        summary = stats.to_dict()
        for detail in ("tensors", "histogram"):
            summary.pop(detail)
        return summary

    def tune(spec: str, trials: int = 0, request: gr.Request = None) -> str:
        """Search a merge's parameters with Optuna (as the Tune tab): ``spec`` is the YAML text of a
        search spec, a recipe whose values may be ranges ({min, max[, log, step]}, {choices: [...]} or
        ``tune``), ``merge_method`` may be {choices: [...]}, plus a ``tune:`` section (suite, test_suite,
        objective mean|pareto, sampler, seed; the format of ``python -m merging tune``). ``trials``:
        trials to add (0: the spec's tune.trials).

        Each update is one progress line (sources scored, one line per finished trial); the last
        update is the JSON text of the result: {"best": {"value", "params", "recipe" (a plain recipe
        for merge_recipe), "validation" {task: accuracy}}, "trials" (in the study), "test" ({"suite",
        "tasks", "value", "sources"}, or null without a test split), "study", "storage", "seconds"
        [, "pareto"]}. The study is kept in this session's folder: the same spec again continues it.
        Cancelling the job stops the search after the current task.
        """
        parsed = session.search_spec(spec)
        count = trials or parsed.settings.trials
        cancel = threading.Event()
        result = None
        for update in session.search(settings, parsed, count, session_hash(request), cancel=cancel):
            if update.message:
                yield update.message
            if update.trial is not None:
                yield describe_trial(update.trial)
            result = update.result or result
        if result is None:
            raise MergeStudioError("the search stopped before any trial finished: nothing to report")
        yield json.dumps(result.to_json())

    def list_models() -> dict:
        """The models this studio offers by name (the demo family, or its configured list): {name: reference}."""
        return settings.family()

    # user_errors inside the GPU call too: ZeroGPU passes on a gr.Error from its worker, nothing else
    merge_recipe = zerogpu.gpu(lambda recipe, *_: zerogpu.merge_seconds(settings, recipe))(user_errors(merge_recipe))
    redundancy = zerogpu.gpu(lambda base, sources=(), *_, **__: zerogpu.stats_seconds(settings, base, sources))(
        user_errors(redundancy))
    tune = zerogpu.gpu(lambda *_, **__: zerogpu.search_seconds(settings))(user_errors(tune))
    gr.api(user_errors(merge_recipe), api_name="merge_recipe", concurrency_id=HEAVY,
           concurrency_limit=settings.heavy_concurrency)
    gr.api(user_errors(generate), api_name="generate", concurrency_id=CHAT, concurrency_limit=settings.chat_concurrency)
    gr.api(user_errors(redundancy), api_name="redundancy", concurrency_id=HEAVY,
           concurrency_limit=settings.heavy_concurrency)
    gr.api(user_errors(tune), api_name="tune", concurrency_id=HEAVY, concurrency_limit=settings.heavy_concurrency)
    gr.api(list_models, api_name="list_models", queue=False)
