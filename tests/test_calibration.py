"""Data-aware merging: calibration statistics, Fisher-weighted averaging and RegMean.

Every check is against an independent computation on real (tiny) transformers models: the
Fisher against per-example gradients of the model's own loss, the Grams and RegMean's
objective against layer inputs captured one unpadded example at a time.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_no_output, error_line, run_cli
from merging.calibration import (
    FISHER,
    GRAMS,
    CalibrationSettings,
    _linear_layers,
    calibrate,
    compute_fisher,
    load_examples,
)
from merging.engine import merge
from merging.errors import MergeCancelled, RecipeError
from merging.runtime import load_model
from merging.recipe import load_recipe

TEXTS = [
    ["the quick brown fox jumps over the lazy dog", "a merge keeps what each model knows", "hello there"],
    ["rivers run to the sea and the sea is never full", "one two three four five six", "short"],
    ["models of one architecture can be merged", "calibration text is a few lines", "x y z"],
]


def recipe_text(method: str, models, texts=TEXTS, params: dict | None = None) -> str:
    lines = [f"merge_method: {method}", "models:"]
    for model, calibration in zip(models, texts):
        lines += [f"  - model: {model}", f"    calibration: {json.dumps(calibration)}"]
    if params:
        lines.append(f"parameters: {json.dumps(params)}")
    return "\n".join(lines) + "\n"


def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def linear_inputs(folder, texts) -> dict[str, torch.Tensor]:
    """Each linear layer's inputs over all tokens of ``texts``, one unpadded example at a time."""
    model, tokenizer = load_model(folder, device="cpu")
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name, module, _ in _linear_layers(model)
    ]
    with torch.no_grad():
        for text in texts:
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(rows).double() for name, rows in captured.items()}


def regression_loss(weight: torch.Tensor, weights_i, inputs_i, transposed: bool) -> float:
    """Σᵢ ‖Xᵢ(W − Wᵢ)ᵀ‖² (for a Conv1D weight stored (in, out): Σᵢ ‖Xᵢ(W − Wᵢ)‖²)."""
    total = 0.0
    for w_i, x_i in zip(weights_i, inputs_i):
        diff = (weight.double() - w_i.double())
        total += float(((x_i @ (diff if transposed else diff.T)) ** 2).sum())
    return total


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_one_source_gives_that_source(method, llama_family, tmp_path):
    source = llama_family.finetuned[0]
    merge(load_recipe(recipe_text(method, [source])), tmp_path / "out", device="cpu")
    out, expected = tensors(tmp_path / "out"), tensors(source)
    for name, value in expected.items():
        torch.testing.assert_close(out[name].float(), value.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_fisher_entries_lie_between_the_sources(llama_family, tmp_path):
    models = llama_family.finetuned
    merge(load_recipe(recipe_text("fisher", models)), tmp_path / "out", device="cpu")
    out = tensors(tmp_path / "out")
    sources = [tensors(m) for m in models]
    plain_average_everywhere = True
    for name, value in out.items():
        stack = torch.stack([s[name].float() for s in sources])
        assert (value >= stack.min(0).values - 1e-6).all() and (value <= stack.max(0).values + 1e-6).all(), name
        plain_average_everywhere &= torch.allclose(value, stack.mean(0), atol=1e-7)
    assert not plain_average_everywhere, "Fisher weighting changed nothing: the Fisher was not used"


def test_fisher_is_the_mean_of_per_example_squared_gradients(llama_family):
    model, tokenizer = load_model(llama_family.finetuned[0], device="cpu")
    texts = TEXTS[0]
    fisher, tokens = compute_fisher(model, tokenizer, texts, max_length=64)
    expected: dict[str, torch.Tensor] = {}
    summed: dict[str, torch.Tensor] = {}
    for text in texts:  # independent: transformers' own mean token loss, times the token count
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        model.zero_grad()
        for p in model.parameters():
            p.requires_grad_(True)
        (model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)).backward()
        for name, p in model.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad.detach() ** 2 / len(texts)
            summed[name] = summed.get(name, 0) + p.grad.detach()
    assert tokens == sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-3, atol=1e-12, msg=name)
    # the batch approximation (square of the summed gradient) is measurably different
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(summed[name] ** 2 / len(texts), expected[name], rtol=0.1)


def test_a_chats_fisher_scores_only_the_reply(llama_family):
    """log p(reply | prompt): transformers' loss with the prompt's labels masked, times the reply length."""
    model, tokenizer = load_model(llama_family.finetuned[0], device="cpu")
    chat = ({"role": "user", "content": "What is the capital of Veloria?"}, {"role": "assistant", "content": "Quillport"})
    fisher, tokens = compute_fisher(model, tokenizer, [chat], max_length=128)
    prompt = tokenizer.apply_chat_template([chat[0]], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(list(chat), tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert full[: len(prompt)] == prompt and tokens == len(full) - len(prompt)
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    (model(input_ids=ids, labels=labels).loss * tokens).backward()
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(fisher[name], model.get_parameter(name).grad ** 2, rtol=1e-3, atol=1e-12)


def _grams(folder, texts):
    path = calibrate(GRAMS, folder, texts, CalibrationSettings(samples=16, max_length=64), device="cpu")
    grams = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    return grams, json.loads(meta["weights"]), int(meta["tokens"])


def test_grams_are_shared_by_projections_of_one_input_and_skip_padding(llama_family):
    folder = llama_family.finetuned[0]
    grams, weights, tokens = _grams(folder, TEXTS[1])  # different lengths: batched with padding
    assert all(gram.dtype == torch.float64 for gram in grams.values())  # issue #12: float32 sums lose small eigenvalues
    layer = "model.layers.0"
    qkv = {weights[f"{layer}.self_attn.{p}_proj.weight"]["gram"] for p in "qkv"}
    gate_up = {weights[f"{layer}.mlp.{p}_proj.weight"]["gram"] for p in ("gate", "up")}
    assert len(qkv) == 1 and len(gate_up) == 1 and qkv != gate_up
    assert weights[f"{layer}.self_attn.o_proj.weight"]["gram"] not in qkv
    inputs = linear_inputs(folder, TEXTS[1])
    assert tokens == inputs[f"{layer}.self_attn.q_proj"].shape[0]
    for module in (f"{layer}.self_attn.q_proj", f"{layer}.mlp.down_proj", f"{layer}.self_attn.o_proj"):
        x = inputs[module]
        gram = grams[weights[f"{module}.weight"]["gram"]].double()
        torch.testing.assert_close(gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6, msg=module)


@pytest.mark.parametrize("family_name", ["llama_family", "gpt2_family"])
def test_regmean_fits_every_models_inputs_better_than_averaging(family_name, request, tmp_path):
    family = request.getfixturevalue(family_name)
    models = family.finetuned[:2]
    merge(load_recipe(recipe_text("regmean", models, params={"reduce_non_diagonal": 1.0})), tmp_path / "out", device="cpu")
    out = tensors(tmp_path / "out")
    sources = [tensors(m) for m in models]
    inputs = [linear_inputs(m, texts) for m, texts in zip(models, TEXTS)]
    model, _ = load_model(models[0], device="cpu")
    checked = 0
    for module, _, transposed in _linear_layers(model):
        name = f"{module}.weight"
        if name not in out:  # tied lm_head: stored as the embedding, which is averaged
            continue
        weights_i = [s[name] for s in sources]
        x_i = [inp[module] for inp in inputs]
        assert x_i[0].shape[1] == (weights_i[0].shape[0] if transposed else weights_i[0].shape[1])
        average = sum(w.double() for w in weights_i) / len(weights_i)
        assert regression_loss(out[name], weights_i, x_i, transposed) < regression_loss(average, weights_i, x_i, transposed), name
        checked += 1
    assert checked >= 4
    if family_name == "gpt2_family":
        assert any("c_attn" in m for m, _, t in _linear_layers(model) if t)  # Conv1D really was exercised


# Periodic two-token texts, one pair of tokens per model, 121 tokens each (GPT-2 positions stop at
# 128): the attention output of a 256-wide GPT-2 is then nearly rank-deficient, its summed Gram's
# eigenvalues running from ~1e-8 to ~8 like the small GPT-2 of issue #12; the first attention input
# (4 token embeddings + 121 positions) and the MLP outputs (1024 inputs, 484 tokens) are exactly
# rank-deficient.
ILL_CONDITIONED_TEXTS = [[" ".join(["a b"] * 60), " ".join(["b a"] * 60)],
                         [" ".join(["c d"] * 60), " ".join(["d c"] * 60)]]


def test_regmean_on_nearly_rank_deficient_inputs_stays_in_range_and_never_fits_worse_than_averaging(tmp_path):
    """Issue #12: Grams accumulated in float32 and solved exactly gave weights far outside the
    sources' range. With float64 Grams and the eigenvalue floor, on every linear layer the merged
    weights stay within the sources' range and RegMean's objective Σᵢ ‖Xᵢ(W − Wᵢ)ᵀ‖²/Nᵢ (the
    Grams are means) on its own calibration inputs is no worse than averaging's. (Measured with
    the old code on this family: weights up to 11× the sources' largest |W| in the first
    attention input, 4.6× in the attention output; float64 Grams with the exact solve still gave
    97-670× on the exactly rank-deficient layers: the floor is what bounds them.)"""
    from merging.methods.regmean import _largest_eigenvalue
    from tests.support.families import build_family

    family = build_family(tmp_path / "family", "gpt2", 2, hidden_size=256, num_layers=2, vocab_size=512, seed=33)
    models = family.finetuned
    merge(load_recipe(recipe_text("regmean", models, ILL_CONDITIONED_TEXTS, params={"reduce_non_diagonal": 1.0})),
          tmp_path / "out", device="cpu")
    out = tensors(tmp_path / "out")
    sources = [tensors(m) for m in models]
    inputs = [linear_inputs(m, texts) for m, texts in zip(models, ILL_CONDITIONED_TEXTS)]

    attention_output = "transformer.h.0.attn.c_proj"
    summed = sum(inp[attention_output].T @ inp[attention_output] / inp[attention_output].shape[0] for inp in inputs)
    eigenvalues = torch.linalg.eigvalsh(summed)
    assert eigenvalues[0] / eigenvalues[-1] < 1e-6, "the layer is not ill-conditioned: the test checks nothing"
    assert _largest_eigenvalue(summed) == pytest.approx(float(eigenvalues[-1]), rel=1e-3)

    model, _ = load_model(models[0], device="cpu")
    checked = []
    for module, _, transposed in _linear_layers(model):
        name = f"{module}.weight"
        if name not in out:  # tied lm_head
            continue
        weights_i = [s[name] for s in sources]
        x_i = [inp[module] / inp[module].shape[0] ** 0.5 for inp in inputs]  # RegMean's Grams are means
        largest = max(float(w.abs().max()) for w in weights_i)
        merged = float(out[name].abs().max())
        assert merged <= 1.5 * largest, f"{name}: max |W| {merged:.3g}, the sources' {largest:.3g}"
        average = sum(w.double() for w in weights_i) / len(weights_i)
        merged_loss = regression_loss(out[name], weights_i, x_i, transposed)
        average_loss = regression_loss(average, weights_i, x_i, transposed)
        assert merged_loss <= average_loss * (1 + 1e-6), f"{name}: objective {merged_loss / average_loss:.3g}× averaging's"
        checked.append(module)
    assert attention_output in checked and len(checked) == 8


@pytest.mark.parametrize("gap", [1.5, 2.0, 3.0, 100.0, 1e6])
def test_the_floors_power_iteration_finds_the_largest_eigenvalue_even_from_a_start_orthogonal_to_it(gap):
    """The floor only needs λ_max's order of magnitude, but never a gross underestimate: from a
    start exactly orthogonal to the top eigenvector, rounding brings it back (or, when λ₁/λ₂ is
    small, λ₂ is close enough). The rest of the spectrum runs from 1 down to 1e-8, like an
    attention output's. (The default start is checked on a real Gram in the issue #12 test.)"""
    from merging.methods.regmean import _largest_eigenvalue

    n = 256
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(n, 1, dtype=torch.float64, generator=generator)
    basis, _ = torch.linalg.qr(torch.cat([start, torch.randn(n, n - 1, dtype=torch.float64, generator=generator)], 1))
    top, rest = basis[:, 1:2], torch.cat([basis[:, :1], basis[:, 2:]], 1)  # top ⟂ start
    gram = gap * top @ top.T + rest @ torch.diag(torch.logspace(0, -8, n - 1, dtype=torch.float64)) @ rest.T
    assert abs(float(start.T @ top)) < 1e-12 * float(start.norm())
    exact = float(torch.linalg.eigvalsh(gram)[-1])
    estimate = _largest_eigenvalue(gram, start=start)
    assert exact / 2.5 < estimate <= exact * (1 + 1e-9)


def test_statistics_are_cached_and_keyed_by_the_text(llama_family):
    folder = llama_family.finetuned[1]
    settings = CalibrationSettings(samples=8, max_length=32)
    first = calibrate(FISHER, folder, ["cache me once", "and again"], settings, device="cpu")
    stamp = first.stat().st_mtime_ns
    started = time.perf_counter()
    again = calibrate(FISHER, folder, ["cache me once", "and again"], settings, device="cpu")
    assert again == first and again.stat().st_mtime_ns == stamp
    assert time.perf_counter() - started < 1.0  # no model was loaded
    other = calibrate(FISHER, folder, ["a different text"], settings, device="cpu")
    assert other != first


def test_cancelled_calibration_leaves_no_output_and_no_cache(llama_family, tmp_path):
    from merging.calibration import cache_dir

    cancel = threading.Event()
    cancel.set()
    before = set(cache_dir().glob("*")) if cache_dir().exists() else set()
    texts = [["never computed because the merge is cancelled"]] * 2
    with pytest.raises(MergeCancelled):
        merge(load_recipe(recipe_text("fisher", llama_family.finetuned[:2], texts)), tmp_path / "out", device="cpu", cancel=cancel)
    assert_no_output(tmp_path / "out")
    after = set(cache_dir().glob("*")) if cache_dir().exists() else set()
    assert after == before


def test_recipe_needs_calibration_for_every_model(llama_family):
    text = recipe_text("regmean", llama_family.finetuned[:2]).replace(f"    calibration: {json.dumps(TEXTS[1])}\n", "")
    with pytest.raises(RecipeError, match=f"{llama_family.finetuned[1]} has none"):
        load_recipe(text)
    with pytest.raises(RecipeError, match="non-empty list of texts"):
        load_recipe(recipe_text("fisher", llama_family.finetuned[:1], texts=[[1, 2]]))
    ignored = load_recipe(recipe_text("fisher", llama_family.finetuned[:1], params={"reduce_non_diagonal": 0.5}))
    assert "'reduce_non_diagonal' is ignored" in ignored.warnings[0]  # RegMean's parameter: mergekit would ignore it
    with pytest.raises(RecipeError, match="reduce_non_diagonal"):
        load_recipe(recipe_text("fisher", llama_family.finetuned[:1], params={"reduce_non_diagonal": 0.5}), strict=True)


def test_calibration_sources(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "plain"}\n\n{"prompt": "Q?", "answer": "A"}\n'
                     '{"messages": [{"role": "user", "content": "hi"}]}\n')
    examples = load_examples(str(jsonl), 10)
    assert examples[0] == "plain" and examples[1][1] == {"role": "assistant", "content": "A"} and len(examples) == 3
    lines = tmp_path / "data.txt"
    lines.write_text("one\n\ntwo\nthree\n")
    assert load_examples(str(lines), 2) == ["one", "two"]
    task = load_examples("geography", 1000)
    from demo.tasks import TASKS

    held_out = {ex.prompt for ex in TASKS["geography"].eval_examples()}
    assert len(task) == len(TASKS["geography"].train_examples())
    assert not held_out & {ex[0]["content"] for ex in task}  # never the evaluation prompts
    with pytest.raises(RecipeError, match="not found"):
        load_examples(str(tmp_path / "missing.txt"), 4)
    (tmp_path / "bad.jsonl").write_text('{"nothing": 1}\n')
    with pytest.raises(RecipeError, match="line 1"):
        load_examples(str(tmp_path / "bad.jsonl"), 4)


def test_cli_runs_a_regmean_recipe(llama_family, tmp_path):
    calibration = tmp_path / "cal.txt"
    calibration.write_text("\n".join(TEXTS[0]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: regmean\nmodels:\n  - model: {llama_family.finetuned[0]}\n    calibration: {calibration}\n"
        f"  - model: {llama_family.finetuned[1]}\n    calibration: {calibration}\n"
    )
    result = run_cli("merge", recipe, tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "regmean"
    missing = tmp_path / "missing.yaml"
    missing.write_text(recipe.read_text().replace(str(calibration), str(tmp_path / "nope.txt")))
    result = run_cli("merge", missing, tmp_path / "out2")
    assert "nope.txt" in error_line(result) and "not found" in error_line(result)
    assert_no_output(tmp_path / "out2")


def test_hosted_calibration_files_stay_inside_the_allowed_folders(tmp_path):
    from merging.errors import SourceError
    from merging.sources import SourcePolicy

    mine = tmp_path / "session"
    mine.mkdir()
    (mine / "cal.txt").write_text("my own text\n")
    hosted = SourcePolicy(hosted=True, allowed_roots=(mine,))
    assert load_examples(str(mine / "cal.txt"), 4, hosted) == ["my own text"]
    outside = tmp_path / "server-secret.txt"
    outside.write_text("secret\n")
    for path in (str(outside), str(mine / ".." / "server-secret.txt"), "/etc/hostname", "../../../../etc/passwd"):
        with pytest.raises(SourceError, match="disabled on this hosted studio"):
            load_examples(path, 4, hosted)


def test_a_killed_calibration_leaves_no_debris_after_the_next_run(llama_family):
    """A cache file being written when its process died is removed by the next save; one being
    written by a live process is left alone."""
    import os
    import subprocess
    import sys

    from merging.calibration import cache_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache_dir().mkdir(parents=True, exist_ok=True)
    debris = cache_dir() / f".fisher-0123abcd-{dead.pid}-x1y2z3.tmp"
    debris.write_bytes(b"half a file")
    busy = cache_dir() / f".gram-4567cdef-{os.getpid()}-a1b2c3.tmp"
    busy.write_bytes(b"being written")
    calibrate(FISHER, llama_family.finetuned[0], ["fresh text for a new cache entry"], CalibrationSettings(4, 16), device="cpu")
    assert not debris.exists() and busy.exists()
    busy.unlink()
