"""RegMean++: RegMean whose Grams for a layer come from each model's calibration text run through
the already merged earlier layers.

The reference here is written from the paper's definition, independently of
``merging.propagation``: for layer l and model i, take the *merged* model as written, put model
i's own layer l into it, run model i's texts one unpadded example at a time, and record the
inputs of layer l's linear layers; RegMean's float64 least-squares solve on those Grams must give
the merged layer l.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.calibration import _linear_layers, cache_dir
from merging.engine import merge
from merging.errors import MergeStudioError
from merging.propagation import decoder_layers
from merging.recipe import load_recipe
from merging.runtime import load_model
from tests.support.families import build_family

TEXTS = [
    ["the quick brown fox jumps over the lazy dog", "a merge keeps what each model knows", "hello there"],
    ["rivers run to the sea and the sea is never full", "one two three four five six", "short"],
]
FLOOR = 1e-6  # RegMean's eigenvalue floor, relative to the largest eigenvalue (merging.methods.regmean)


def recipe_text(method: str, models, params: dict | None = None, extra: str = "") -> str:
    lines = [f"merge_method: {method}", "models:"]
    for model, calibration in zip(models, TEXTS):
        lines += [f"  - model: {model}", f"    calibration: {json.dumps(calibration)}"]
    lines.append(f"parameters: {json.dumps(params or {'reduce_non_diagonal': 1.0})}")
    return "\n".join(lines) + "\n" + extra


def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def layer_inputs(merged_folder, own_folder, layer: int | None, texts) -> dict[str, torch.Tensor]:
    """Inputs of the linear layers of decoder layer ``layer`` (None: those after the decoder layers)
    when the merged model, with ``own_folder``'s layer ``layer`` put in, reads ``texts`` one
    unpadded example at a time."""
    model, tokenizer = load_model(merged_folder, device="cpu")
    prefix, layers = decoder_layers(model)
    own = tensors(own_folder)
    linear = [(name, module) for name, module, _ in _linear_layers(model)]
    if layer is not None:
        scope = f"{prefix}.{layer}."
        with torch.no_grad():
            for name, param in layers[layer].named_parameters(prefix=scope.rstrip(".")):
                param.copy_(own[name])
        linear = [(name, module) for name, module in linear if name.startswith(scope)]
    else:
        linear = [(name, module) for name, module in linear if not name.startswith(prefix + ".")]
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [module.register_forward_pre_hook(
        lambda m, args, name=name: captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name, module in linear]
    with torch.no_grad():
        for text in texts:
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(rows).double() for name, rows in captured.items()}


def regmean_solution(weights, inputs, transposed: bool) -> torch.Tensor:
    """argmin_W Σᵢ ‖Xᵢ(W − Wᵢ)ᵀ‖²/Nᵢ + ε‖W − W̄‖², ε = FLOOR·λ_max(Σ XᵢᵀXᵢ/Nᵢ), in float64."""
    grams = [x.T @ x / x.shape[0] for x in inputs]
    w_t = [(w.double() if transposed else w.double().T) for w in weights]  # (in, out)
    lhs = sum(grams)
    epsilon = FLOOR * float(torch.linalg.eigvalsh(lhs).max())
    average = sum(w_t) / len(w_t)
    solution = torch.linalg.solve(lhs + epsilon * torch.eye(lhs.shape[0], dtype=torch.float64),
                                  sum(g @ w for g, w in zip(grams, w_t)) + epsilon * average)
    return solution if transposed else solution.T


def relative_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family_name", ["llama_family", "qwen2_family", "gpt2_family"])
def test_every_layer_is_regmean_on_inputs_through_the_merged_earlier_layers(family_name, request, tmp_path):
    family = request.getfixturevalue(family_name)
    models = family.finetuned[:2]
    merge(load_recipe(recipe_text("regmean_plus_plus", models)), tmp_path / "pp", device="cpu")
    merge(load_recipe(recipe_text("regmean", models)), tmp_path / "plain", device="cpu")
    out, plain = tensors(tmp_path / "pp"), tensors(tmp_path / "plain")
    sources = [tensors(m) for m in models]
    model, _ = load_model(models[0], device="cpu")
    prefix, layers = decoder_layers(model)
    transposed = {name: t for name, _, t in _linear_layers(model)}
    checked = differs = 0
    for layer in [*range(len(layers)), None]:
        inputs = [layer_inputs(tmp_path / "pp", m, layer, texts) for m, texts in zip(models, TEXTS)]
        for module in inputs[0]:
            name = f"{module}.weight"
            if name not in out:  # a tied output head is the embedding: averaged
                continue
            expected = regmean_solution([s[name] for s in sources], [x[module] for x in inputs], transposed[module])
            assert relative_error(out[name], expected) < 1e-4, name
            checked += 1
            differs += relative_error(plain[name], expected) > 1e-2
    assert checked >= 4 * len(layers) + (family_name == "qwen2_family")  # the untied head is checked too
    assert differs >= len(layers)  # the propagated inputs really differ from each model's own
    for name in out:
        if name.rsplit(".", 1)[0] not in transposed or not name.endswith(".weight"):  # norms, biases, embeddings
            torch.testing.assert_close(out[name], sum(s[name] for s in sources) / 2, rtol=1e-5, atol=1e-6)


def test_for_a_one_layer_model_with_shared_embeddings_it_equals_regmean(tmp_path_factory, tmp_path):
    """With one decoder layer, a tied head and the same embeddings in every model, each model's
    layer sees its own inputs in both methods: RegMean++ is RegMean."""
    family = build_family(tmp_path_factory.mktemp("one_layer"), "llama", 2, hidden_size=64, vocab_size=512,
                          num_layers=1, tie_word_embeddings=True, delta_scale=0.05, seed=5)
    shared = tensors(family.finetuned[0])
    models = []
    for index, folder in enumerate(family.finetuned):
        copy = tmp_path / f"m{index}"
        shutil.copytree(folder, copy)
        weights = tensors(copy)
        for name in ("model.embed_tokens.weight", "model.norm.weight"):
            weights[name] = shared[name]
        save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
        models.append(copy)
    merge(load_recipe(recipe_text("regmean_plus_plus", models, {"reduce_non_diagonal": 0.9})), tmp_path / "pp", device="cpu")
    merge(load_recipe(recipe_text("regmean", models, {"reduce_non_diagonal": 0.9})), tmp_path / "plain", device="cpu")
    out, plain = tensors(tmp_path / "pp"), tensors(tmp_path / "plain")
    assert out.keys() == plain.keys()
    for name in out:
        torch.testing.assert_close(out[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert relative_error(out["model.layers.0.self_attn.q_proj.weight"],
                          sum(tensors(m)["model.layers.0.self_attn.q_proj.weight"] for m in models) / 2) > 1e-3


def test_statistics_are_cached_per_recipe(llama_family, tmp_path):
    models = llama_family.finetuned[:2]

    def files():
        return {p.name: p.stat().st_mtime_ns for p in cache_dir().glob("gram-propagated-*.safetensors")}

    merge(load_recipe(recipe_text("regmean_plus_plus", models, {"reduce_non_diagonal": 0.7})), tmp_path / "a", device="cpu")
    first = files()
    merge(load_recipe(recipe_text("regmean_plus_plus", models, {"reduce_non_diagonal": 0.7})), tmp_path / "b", device="cpu")
    assert files() == first  # found in the cache, not recomputed
    assert tensors(tmp_path / "a").keys() == tensors(tmp_path / "b").keys()
    for name, value in tensors(tmp_path / "a").items():
        assert torch.equal(value, tensors(tmp_path / "b")[name]), name
    # α changes how the earlier layers merge, so the later layers' statistics too: computed anew
    merge(load_recipe(recipe_text("regmean_plus_plus", models, {"reduce_non_diagonal": 0.5})), tmp_path / "c", device="cpu")
    assert len(files()) == len(first) + 2


def test_a_tokenizer_setting_is_refused_before_any_calibration(llama_family, tmp_path):
    models = llama_family.finetuned[:2]
    text = recipe_text("regmean_plus_plus", models, extra=f"tokenizer:\n  source: union\n  tokens:\n    '<new>':\n      source: {models[0]}\n")
    with pytest.raises(MergeStudioError, match="needs one vocabulary"):
        merge(load_recipe(text), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
