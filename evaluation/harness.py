"""lm-evaluation-harness on the studio's suites and models: ``python -m merging eval MODEL --lm-eval TASKS``.

Each task of a suite (a registered one such as the demo's ``zoo``, or a JSONL file) becomes a local
lm-eval task, written on the fly (a JSONL of its examples and a task YAML, in the cache), so it
runs offline and scores as ``python -m merging eval`` does: greedy, 16 new tokens, the answer's
first line, exact match after the same normalization (surrounding spaces, quotes, a final period
or exclamation mark, case). Other names are lm-eval's own tasks (those may download their data).
A folder is evaluated with lm-eval's ``hf`` model, a served model (``openai:URL#model``) with
``local-chat-completions``; both through the chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from evaluation.scoring import MAX_NEW_TOKENS
from evaluation.suites import load_suite, registered_suites
from merging.endpoints import api_key, is_endpoint, parse_endpoint
from merging.checkpoint import write_text_atomically
from merging.errors import MergeStudioError
from merging.runtime import cache_root, pick_device

# The normalization of evaluation.scoring.normalize, as lm-eval's exact_match applies it (each
# pattern removed in turn from prediction and reference; ignore_case lowercases).
IGNORED = [r"^\s+", r"\s+$", "^[\"'`]+", "[\"'`]+$", r"[.!]+$", r"\s+$"]


# A ``contains`` task (evaluation.suites) is scored by our own rule through lm-eval's hook for
# custom scoring: a module beside the task YAMLs, imported by lm-eval's ``!function`` tag.
MATCH_MODULE = "merge_studio_match"
MATCH_CODE = '''"""Scoring of Merge Studio's ``contains`` tasks, as ``python -m merging eval`` scores them."""
from evaluation.scoring import is_correct
from evaluation.suites import Example


def contains(doc, results):
    return {"exact_match": float(is_correct(results[0], Example(doc["prompt"], doc["answer"], "contains")))}
'''


def task_yaml(name: str, data: Path, match: str = "exact") -> str:
    """An lm-eval task reading ``data`` (JSONL of {prompt, answer}), scored as ours: lm-eval's exact
    match with our normalization, or for ``contains`` our own rule (``MATCH_MODULE``)."""
    ignored = ", ".join(json.dumps(pattern) for pattern in IGNORED)
    scoring = (f"process_results: !function {MATCH_MODULE}.contains\nmetric_list:\n  - metric: exact_match\n"
               f"    aggregation: mean\n    higher_is_better: true\n" if match == "contains" else
               f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
               f"    ignore_case: true\n    regexes_to_ignore: [{ignored}]\n")
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_NEW_TOKENS}
  do_sample: false
{scoring}"""


def write_tasks(suite: str | Path, folder: Path | None = None) -> tuple[Path, dict[str, str]]:
    """The lm-eval tasks of ``suite``: (include folder, {suite task: lm-eval task name})."""
    tasks = load_suite(suite)
    label = Path(str(suite)).stem if str(suite).endswith(".jsonl") else str(suite)
    content = json.dumps({task: [(ex.prompt, ex.answer, ex.match) for ex in examples] for task, examples in tasks.items()},
                         sort_keys=True)
    folder = folder or cache_root() / "lm_eval" / f"{label}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    module = folder / f"{MATCH_MODULE}.py"
    if not module.is_file() or module.read_text(encoding="utf-8") != MATCH_CODE:  # never half-written for a reader
        write_text_atomically(module, MATCH_CODE)
    for task, examples in tasks.items():
        if len({ex.match for ex in examples}) > 1:
            raise MergeStudioError(f"task {task!r} mixes exact and contains examples: lm-eval scores a task one way; "
                                   "give each its own task")
        name = f"merge_studio_{label}_{task}".replace("-", "_")
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n" for ex in examples),
                        encoding="utf-8")
        (folder / f"{name}.yaml").write_text(task_yaml(name, data, examples[0].match), encoding="utf-8")
        names[task] = name
    return folder, names


def run_lm_eval(model: str, tasks: list[str], device: str = "auto", limit: int | None = None) -> dict[str, float]:
    """Accuracy (exact match) per task: our suites' tasks by their own names, lm-eval's by theirs."""
    try:
        # Deferred: lm-eval is an optional, heavy dependency (pip install lm_eval), only for this command.
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MergeStudioError("lm-evaluation-harness is not installed: pip install lm_eval") from None
    include, ours = [], {}
    for task in tasks:
        if task in registered_suites() or task.endswith(".jsonl"):
            folder, names = write_tasks(task)
            include.append(str(folder))
            ours.update({name: suite_task for suite_task, name in names.items()})
        else:
            ours[task] = task
    if is_endpoint(model):
        endpoint = parse_endpoint(model)
        backend = "local-chat-completions"
        args = (f"model={endpoint.model},base_url={endpoint.base_url}/chat/completions,num_concurrent=4,"
                f"max_retries=1,tokenized_requests=False")
        kwargs = {}
    else:
        if not (Path(model) / "config.json").is_file():
            raise MergeStudioError(f"{model} is not a model folder (no config.json)")
        backend, args = "hf", f"pretrained={Path(model).absolute()},dtype=float32"
        kwargs = {"device": str(pick_device(device)), "batch_size": 16}
    previous = os.environ.get("OPENAI_API_KEY")
    if is_endpoint(model):
        os.environ["OPENAI_API_KEY"] = api_key()  # where local-chat-completions reads the key
    try:
        results = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=list(ours),
                                          task_manager=TaskManager(include_path=include or None),
                                          apply_chat_template=True, limit=limit, **kwargs)
    except MergeStudioError:
        raise
    except Exception as exc:  # lm-eval raises many types (unknown task, no network for its datasets, ...)
        reason = str(exc).splitlines()[0] if str(exc).strip() else "no message"
        raise MergeStudioError(f"lm-evaluation-harness failed: {type(exc).__name__}: {reason}") from None
    finally:
        if previous is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = previous
    scores = {}
    for name, metrics in results["results"].items():
        value = next((v for k, v in metrics.items() if k.startswith(("exact_match,", "acc,")) and "stderr" not in k), None)
        if value is not None:
            scores[ours.get(name, name)] = float(value)
    return scores

