"""Bad input through the real CLI: one line ``error: ...``, exit 1, no traceback, no output left.

Every case names the facts a user needs (the path, tensor, model, shapes, key) and leaves
neither the output folder nor a hidden ``.NAME.partial-*`` sibling behind.
"""

from __future__ import annotations

import math
import resource
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    assert_no_output,
    copy_model,
    edit_tensors,
    error_line,
    family,
    linear_recipe,
    load_model_tensors,
    run_cli,
    tree_hashes,
    write_recipe,
)

MID_TENSOR = "model.layers.1.mlp.down_proj.weight"  # neither the first nor the last tensor read


@pytest.fixture()
def out(tmp_path) -> Path:
    return tmp_path / "outputs" / "merged"


def merge_error(tmp_path, recipe, out, *extra, allow_progress=False, **kw) -> str:
    """Run ``merge`` on ``recipe`` expecting a clean failure; return the error message."""
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    message = error_line(run_cli("merge", path, out, *extra, **kw), allow_progress=allow_progress)
    assert_no_output(out)
    return message


# -- missing and malformed sources -----------------------------------------------------------

def test_missing_model_path(tmp_path, llama, out):
    missing = tmp_path / "no" / "such-model"
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], missing), out)
    assert str(missing) in message
    assert "not found" in message


def test_missing_recipe_file(tmp_path, out):
    missing = tmp_path / "nope.yaml"
    message = error_line(run_cli("merge", missing, out))
    assert str(missing) in message
    assert_no_output(out)


def test_folder_without_config(tmp_path, llama, out):
    bogus = tmp_path / "just-some-folder"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("not a model")
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], bogus), out)
    assert str(bogus) in message
    assert "config.json" in message


def test_architectures_differ(tmp_path, llama, out):
    qwen = family("qwen2", 1)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(llama.finetuned[0])}, {"model": str(qwen.finetuned[0])}],
    }
    message = merge_error(tmp_path, recipe, out)
    assert "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert str(qwen.finetuned[0]) in message


def test_tensor_shape_differs(tmp_path, llama, out):
    odd = copy_model(llama.finetuned[1], tmp_path / "odd")
    edit_tensors(odd, lambda s: s.__setitem__(MID_TENSOR, torch.zeros(64, 100)))
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], odd), out)
    assert MID_TENSOR in message
    assert "[64, 192]" in message and "[64, 100]" in message
    assert str(odd) in message


def test_tensor_missing_from_one_model(tmp_path, llama, out):
    holey = copy_model(llama.finetuned[1], tmp_path / "holey")
    edit_tensors(holey, lambda s: s.pop(MID_TENSOR))
    recipe = linear_recipe(llama.finetuned[0], holey)
    recipe["base_model"] = str(llama.base)
    message = merge_error(tmp_path, recipe, out)
    assert MID_TENSOR in message
    assert str(holey) in message
    assert "missing" in message


def test_extra_tensor_in_one_model(tmp_path, llama, out):
    extra = copy_model(llama.finetuned[1], tmp_path / "extra")
    edit_tensors(extra, lambda s: s.__setitem__("model.extra_adapter.weight", torch.zeros(4, 4)))
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], extra), out)
    assert "model.extra_adapter.weight" in message
    assert str(extra) in message


def _assert_vocabulary_message(message: str) -> None:
    assert "vocabulary sizes differ" in message
    assert "tokenizer_source: union" in message  # says how to merge them (tests/test_vocabulary.py does)


def test_vocabulary_sizes_differ(tmp_path, llama, out):
    bigger = family("llama", 1, vocab_size=600)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(llama.finetuned[0])}, {"model": str(bigger.finetuned[0])}],
    }
    message = merge_error(tmp_path, recipe, out)
    _assert_vocabulary_message(message)
    assert "512" in message and "600" in message
    assert str(bigger.finetuned[0]) in message


def test_embedding_rows_differ_with_same_config(tmp_path, llama, out):
    """A config that claims the same vocabulary but an embedding that says otherwise."""
    grown = copy_model(llama.finetuned[1], tmp_path / "grown")
    edit_tensors(grown, lambda s: s.__setitem__("model.embed_tokens.weight", torch.zeros(520, 64)))
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], grown), out)
    _assert_vocabulary_message(message)
    assert "512" in message and "520" in message


# -- pickles, corrupt files, bad numbers ------------------------------------------------------

def test_pickle_only_checkpoint(tmp_path, llama):
    pickled = copy_model(llama.finetuned[1], tmp_path / "pickled")
    state = load_file(pickled / "model.safetensors")
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(llama.finetuned[0], pickled))

    refused = tmp_path / "refused"
    message = error_line(run_cli("merge", recipe, refused))
    assert "--allow-pickle" in message
    assert "pickle" in message and str(pickled) in message
    assert_no_output(refused)

    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"prompt": "Say hi.", "answer": "hi"}\n')
    message = error_line(run_cli("eval", pickled, "--suite", suite))  # evaluation refuses it alike
    assert "--allow-pickle" in message and str(pickled) in message
    assert run_cli("eval", pickled, "--suite", suite, "--allow-pickle").returncode == 0

    allowed, reference = tmp_path / "allowed", tmp_path / "reference"
    assert run_cli("merge", recipe, allowed, "--allow-pickle", "--quiet").returncode == 0
    reference_recipe = write_recipe(tmp_path / "ref.yaml", linear_recipe(*llama.finetuned))
    assert run_cli("merge", reference_recipe, reference, "--quiet").returncode == 0
    got, want = load_model_tensors(allowed), load_model_tensors(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("damage", ["header", "truncated", "empty"])
def test_corrupt_safetensors(tmp_path, llama, out, damage):
    broken = copy_model(llama.finetuned[1], tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    if damage == "header":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"")
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], broken), out)
    assert "model.safetensors" in message
    assert str(broken) in message
    assert "corrupt" in message or "truncated" in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_source_tensor(tmp_path, llama, out, bad):
    damaged = copy_model(llama.finetuned[1], tmp_path / "damaged")

    def poison(state):
        state[MID_TENSOR][3, 5] = bad

    edit_tensors(damaged, poison)
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], damaged), out, allow_progress=True)
    assert MID_TENSOR in message
    assert str(damaged) in message
    assert "NaN" in message or "Inf" in message


NAN_RECIPES = {
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
    "slerp": None,
}


@pytest.mark.parametrize("method", sorted(NAN_RECIPES))
@pytest.mark.parametrize("where", ["finetuned", "base"])
def test_non_finite_source_every_method(tmp_path, llama, out, method, where):
    """Whatever the method does to a NaN (drop it, mask it, elect around it), it is reported."""
    damaged = copy_model(llama.base if where == "base" else llama.finetuned[1], tmp_path / "damaged")
    edit_tensors(damaged, lambda s: s[MID_TENSOR].__setitem__((1, 2), math.nan))
    base = damaged if where == "base" else llama.base
    other = llama.finetuned[1] if where == "base" else damaged
    if NAN_RECIPES[method] is None:  # slerp: exactly the base and one other model
        recipe = {"merge_method": method, "base_model": str(base), "models": [{"model": str(other)}],
                  "parameters": {"t": 0.3}}
    else:
        recipe = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, **NAN_RECIPES[method]}}
                       for m in (llama.finetuned[0], other)],
        }
    message = merge_error(tmp_path, recipe, out, "--quiet")
    assert MID_TENSOR in message
    assert str(damaged) in message


def test_merge_that_overflows_is_refused(tmp_path, llama, out):
    """Finite sources, but weights and lambda drive the result past float32: refused, not written."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(m), "parameters": {"weight": 3e38}} for m in llama.finetuned],
        "parameters": {"lambda": 3e38},
    }
    message = merge_error(tmp_path, recipe, out, "--quiet")
    assert "overflow" in message
    assert "lambda" in message


@pytest.mark.parametrize("method, scope, name", [
    ("task_arithmetic", "global", "lambda"),
    ("task_arithmetic", "model", "weight"),
    ("linear", "model", "weight"),  # with normalize: false, so the weight is used as given
])
def test_parameter_beyond_float32_range(tmp_path, llama, out, method, scope, name):
    """1e300 is a finite YAML number but no float32: a clear error, not a torch traceback."""
    recipe = {
        "merge_method": method,
        "base_model": str(llama.base),
        "models": [{"model": str(m)} for m in llama.finetuned],
    }
    if method == "linear":
        recipe["parameters"] = {"normalize": False}
    if scope == "global":
        recipe["parameters"] = {name: 1e300}
    else:
        recipe["models"][0]["parameters"] = {name: 1e300}
    message = merge_error(tmp_path, recipe, out, "--quiet")
    assert name in message


def test_merge_that_overflows_the_output_dtype_is_refused(tmp_path, llama, out):
    """Finite in float32 but beyond float16's range (65504): writing Inf would corrupt the model."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(m)} for m in llama.finetuned],
        "parameters": {"lambda": 1e9},
        "dtype": "float16",
    }
    message = merge_error(tmp_path, recipe, out, "--quiet")
    assert "float16" in message


def test_failure_while_streaming_prints_only_the_error(tmp_path, llama, out):
    """Stderr not a terminal: the progress bar must not come before the one error line."""
    damaged = copy_model(llama.finetuned[1], tmp_path / "damaged")
    edit_tensors(damaged, lambda s: s[MID_TENSOR].__setitem__((0, 0), math.nan))
    message = merge_error(tmp_path, linear_recipe(llama.finetuned[0], damaged), out)  # strict: one line
    assert MID_TENSOR in message


# -- recipe mistakes --------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_out_of_range(tmp_path, llama, out, density):
    recipe = {
        "merge_method": "ties",
        "base_model": str(llama.base),
        "models": [
            {"model": str(llama.finetuned[0]), "parameters": {"weight": 0.5, "density": density}},
            {"model": str(llama.finetuned[1]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }
    message = merge_error(tmp_path, recipe, out)
    assert "density" in message
    assert "(0, 1]" in message
    assert str(density) in message


def test_unknown_method(tmp_path, llama, out):
    from merging.methods import REGISTRY

    recipe = linear_recipe(*llama.finetuned)
    recipe["merge_method"] = "frankenmerge"
    message = merge_error(tmp_path, recipe, out)
    assert "frankenmerge" in message
    for name in REGISTRY:
        assert name in message


def test_unknown_recipe_key_is_an_error_with_strict(tmp_path, llama, out):
    """Without --strict it is a warning and the merge runs, as mergekit's would (test_recipe_compat)."""
    recipe = linear_recipe(*llama.finetuned, merge_strategy="fast")
    message = merge_error(tmp_path, recipe, out, "--strict")
    assert "'merge_strategy' is ignored" in message and "--strict" in message


def test_misspelt_per_model_parameter_is_an_error_with_strict(tmp_path, llama, out):
    recipe = linear_recipe(*llama.finetuned)
    recipe["models"][1]["parameters"] = {"wieght": 0.3}
    message = merge_error(tmp_path, recipe, out, "--strict")
    assert "'wieght' is ignored" in message
    assert "did you mean 'weight'?" in message


def test_invalid_yaml_names_the_line(tmp_path, llama, out):
    text = (
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {llama.finetuned[0]}\n"
        f"  - model: [{llama.finetuned[1]}\n"
        "parameters: {normalize: true}\n"
    )
    message = merge_error(tmp_path, text, out)
    assert "YAML" in message
    assert "line 5" in message


def test_lora_reference_to_a_folder_that_is_not_an_adapter(tmp_path, llama, out):
    """LoRA references run (tests/test_lora_refs.py); one whose adapter part is no PEFT adapter says so."""
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    recipe = linear_recipe(llama.finetuned[0], f"{llama.finetuned[1]}+{folder}")
    message = merge_error(tmp_path, recipe, out)
    assert f"+{folder}" in message and "not a PEFT adapter" in message and "adapter_config.json" in message


# -- the output folder ------------------------------------------------------------------------

def test_existing_output_refused_then_overwritten(tmp_path, llama):
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(*llama.finetuned))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    sources_before = {str(m): tree_hashes(m) for m in llama.finetuned}

    message = error_line(run_cli("merge", recipe, out))
    assert str(out) in message and "--overwrite" in message
    assert (out / "keep-me.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["keep-me.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]

    assert run_cli("merge", recipe, out, "--overwrite", "--quiet").returncode == 0
    assert not (out / "keep-me.txt").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert {str(m): tree_hashes(m) for m in llama.finetuned} == sources_before


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_a_source(tmp_path, llama, where):
    root = tmp_path / "models"
    source = copy_model(llama.finetuned[1], root / "ft2")
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(llama.finetuned[0], source))
    before = tree_hashes(root)
    target = {"same": source, "inside": source / "merged", "parent": root}[where]
    message = error_line(run_cli("merge", recipe, target, "--overwrite"))
    assert str(source) in message
    assert "source" in message
    assert tree_hashes(root) == before
    assert not (source / "merged").exists()
    assert not [p for p in root.parent.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("fraction", [0.0001, 0.33, 0.99], ids=["in-header", "mid-file", "near-end"])
def test_disk_write_failure_mid_merge(tmp_path, llama, out, fraction):
    """The output file may not grow past a limit (EFBIG): a clear error, nothing left behind.

    Where the limit falls decides whether bytes are still in the file's buffer when the
    write fails; every position must give the same one-line error.
    """
    model_bytes = (llama.finetuned[0] / "model.safetensors").stat().st_size
    limit = max(64, int(model_bytes * fraction))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(*llama.finetuned))
    result = run_cli("merge", recipe, out, preexec_fn=limit_file_size)
    message = error_line(result, allow_progress=True)
    assert "writ" in message  # "writing the merged model failed ..."
    assert "too large" in message.lower() or "EFBIG" in message
    assert_no_output(out)


def test_output_parent_is_a_file(tmp_path, llama):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(*llama.finetuned))
    message = error_line(run_cli("merge", recipe, blocker / "merged"))
    assert str(blocker) in message
    assert blocker.read_text() == "x"
