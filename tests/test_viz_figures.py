"""Plotly figures (viz.figures) and the sweep's reading of its numbers (viz.sweep)."""

import pytest

from test_viz_stats import viz_family
from viz import figures
from viz.stats import delta_statistics
from viz.sweep import METHOD_TITLES, SweepPoint, SweepResult, sweep_recipe


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def stats():
    fam = viz_family()
    return delta_statistics(fam.base, fam.finetuned, density=0.2, device="cpu", threads=1)


def _sweep(accuracies: dict[str, list[float]], base: float = 0.0, perplexity: bool = False) -> SweepResult:
    """A sweep result as dare_sweep returns it, with the demo family's published shape."""
    rates = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99)
    points = [
        SweepPoint(method, rate, {"geography": acc}, 10.0 + 10 * rate if perplexity else None)
        for method, values in accuracies.items() for rate, acc in zip(rates, values)
    ]
    base_point = SweepPoint("base", 0.0, {"geography": base, "people": 0.0}, 30.0 if perplexity else None)
    return SweepResult("ft1", "/m/ft1", "/m/base", "zoo", None, 0, ["geography"], base_point, points)


def _titles(figure) -> tuple[str, str, str]:
    layout = figure.layout
    return layout.title.text, layout.xaxis.title.text, layout.yaxis.title.text


def test_every_figure_has_a_title_axis_labels_and_the_shared_template(stats):
    for name, figure in figures.all_figures(stats).items():
        title, x_title, y_title = _titles(figure)
        assert title and x_title and y_title, name
        assert figure.layout.template.layout.colorway == figures.TEMPLATE.layout.colorway, name
        figure.to_json()  # valid for plotly.js


def test_magnitude_distribution_has_one_log_scale_curve_per_model(stats):
    figure = figures.magnitude_distribution(stats)
    assert [t.name.split(" (")[0] for t in figure.data] == stats.labels
    assert figure.layout.xaxis.type == "log" and "log scale" in figure.layout.xaxis.title.text
    assert all(len(t.x) == len(stats.histogram.edges) - 1 for t in figure.data)
    assert "% of all entries" in figure.data[0].hovertemplate and "ft1" in figure.data[0].hovertemplate


def test_relative_norm_has_a_line_per_model_and_names_each_tensor(stats):
    figure = figures.relative_norm_by_layer(stats)
    lines = {t.name: t for t in figure.data if t.mode == "lines+markers"}
    assert list(lines) == stats.labels
    ft1 = lines["ft1"]
    assert list(ft1.x) == ["embed", "0", "1", "norm"]
    assert ft1.y[1] == pytest.approx(100 * stats.layers[1].deltas["ft1"].relative_norm)
    dots = next(t for t in figure.data if t.name == "ft1: tensors")
    assert {row[0] for row in dots.customdata} == {t.name for t in stats.tensors}
    assert "tensor %{customdata[0]}" in dots.hovertemplate and "%{customdata[1]}" in dots.hovertemplate  # tensor and layer
    assert "(%)" in figure.layout.yaxis.title.text


def test_energy_curves_show_the_exact_top_k_shares(stats):
    figure = figures.energy_concentration(stats)
    whole = {t.name: t for t in figure.data if t.mode == "lines+markers"}
    assert list(whole) == stats.labels
    assert list(whole["ft2"].x) == [1, 5, 10, 20, 100]
    assert whole["ft2"].y[3] == pytest.approx(100 * stats.model.deltas["ft2"].energy_top["0.2"])
    assert any(t.name.startswith("every entry equal") for t in figure.data)
    per_layer = [t for t in figure.data if t.name.startswith("ft2: ")]
    assert len(per_layer) == len(stats.layers) and "layer 1" in per_layer[2].hovertemplate


def test_sign_conflicts_before_and_after_trimming(stats):
    figure = figures.sign_conflicts_by_layer(stats)
    before = next(t for t in figure.data if t.name == "before trimming")
    after = next(t for t in figure.data if t.name == "after trimming to density 0.2")
    assert before.y[2] == pytest.approx(100 * stats.layers[2].conflicts.rate)
    assert after.y[2] == pytest.approx(100 * stats.layers[2].conflicts.trimmed_rate)
    assert before.customdata[2][0] == "layer 1" and "%{customdata[0]}" in before.hovertemplate
    assert "density 0.2" in figure.layout.title.text


def test_similarity_heatmaps_hold_the_cosines(stats):
    figure = figures.task_vector_similarity(stats)
    whole, per_layer = figure.data
    assert [list(row) for row in whole.z] == [[stats.model.cosine[a][b] for b in stats.labels] for a in stats.labels]
    assert list(per_layer.y) == ["ft1 · ft2", "ft1 · ft3", "ft2 · ft3"]
    assert per_layer.z[0][1] == stats.layers[1].cosine["ft1"]["ft2"]
    assert (whole.zmin, whole.zmax) == (-1, 1)


def test_a_model_keeps_its_colour_across_figures(stats):
    colors = figures.model_colors(stats.labels)
    sweep = _sweep({"random": [0.9] * 6})
    drawn = figures.all_figures(stats, sweep)
    for name in ("magnitudes", "relative_norm", "energy", "spectra", "spectral_energy"):
        for trace in drawn[name].data:
            label = trace.name.split(" (")[0].split(":")[0]
            if label in colors:
                assert trace.line.color == colors[label] or trace.marker.color == colors[label], (name, trace.name)
    assert drawn["sweep"].data[0].line.color == colors["ft1"]


def test_one_model_figures_say_what_is_missing(stats):
    from viz.stats import RedundancyStats

    single = RedundancyStats.from_dict({**stats.to_dict(), "models": {"ft1": "x"}})
    for group in [*single.tensors, *single.layers, single.model]:
        group.deltas = {"ft1": group.deltas["ft1"]}
        group.conflicts = None
        group.cosine = {"ft1": {"ft1": 1.0}}
    assert "two or more" in figures.sign_conflicts_by_layer(single).layout.annotations[0].text
    assert len(figures.task_vector_similarity(single).data) == 1


def test_sweep_chart_and_where_it_breaks():
    # the README's measured geography sweep: flat to 70%, then down
    sweep = _sweep({"random": [0.94, 0.94, 0.94, 0.75, 0.62, 0.0], "magnitude": [0.94, 0.94, 0.81, 0.5, 0.25, 0.0]},
                   perplexity=True)
    assert sweep.basis() == "accuracy gain"
    assert sweep.breaking_point("random") == (0.7, 0.9)
    assert sweep.breaking_point("magnitude") == (0.5, 0.7)
    assert [round(sweep.retained(p), 3) for p in sweep.series("random")] == [1.0, 1.0, 1.0, 0.798, 0.66, 0.0]
    lines = sweep.summary()
    assert "accuracy gain" in lines[0]
    assert lines[1].startswith(METHOD_TITLES["random"]) and "holds up to a 70% drop" in lines[1] and "breaks at 90%" in lines[1]
    figure = figures.sweep_chart(sweep, "#123456")
    names = [t.name for t in figure.data if t.showlegend]
    assert names == [METHOD_TITLES["random"], METHOD_TITLES["magnitude"], "base model"]
    random_accuracy = figure.data[0]
    assert list(random_accuracy.x) == ["0%", "50%", "70%", "90%", "95%", "99%"]
    assert random_accuracy.y[3] == pytest.approx(75.0) and random_accuracy.line.color == "#123456"
    assert figure.layout.yaxis2.type == "log" and "perplexity" in figure.layout.yaxis2.title.text
    assert "accuracy" in figure.layout.yaxis.title.text and "drop rate" in figure.layout.xaxis2.title.text
    assert "drop rate %{x}" in random_accuracy.hovertemplate


def test_sweep_recipes_are_single_model_engine_merges():
    assert sweep_recipe("b", "m", "random", 0.9) == {
        "merge_method": "dare_linear", "base_model": "b", "seed": 0,
        "models": [{"model": "m", "parameters": {"weight": 1.0, "density": 0.1}}],
    }
    assert sweep_recipe("b", "m", "magnitude", 0.7)["merge_method"] == "ties"
    assert sweep_recipe("b", "m", "magnitude", 0.7)["models"][0]["parameters"]["density"] == 0.3


def test_a_sweep_that_breaks_at_the_first_drop_says_so():
    sweep = _sweep({"random": [0.94, 0.3, 0.2, 0.1, 0.0, 0.0]})
    assert sweep.breaking_point("random") == (0.0, 0.5)
    assert sweep.summary()[1] == f"{METHOD_TITLES['random']}: breaks already at a 50% drop (accuracy 30%, keeps 32%)."


# -- singular-value views ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_stats(tmp_path_factory):
    """The tiny family's statistics with a TIES merge of it as the merged model."""
    from merging.engine import merge
    from merging.recipe import load_recipe

    fam = viz_family()
    out = tmp_path_factory.mktemp("viz-figures") / "ties"
    merge(load_recipe({"merge_method": "ties", "base_model": str(fam.base), "models": [
        {"model": str(m), "parameters": {"weight": 1.0, "density": 0.3}} for m in fam.finetuned]}), out, device="cpu")
    return delta_statistics(fam.base, fam.finetuned, density=0.2, device="cpu", threads=1, merged=out)


def test_spectra_have_a_line_per_model_the_sum_and_the_merge_and_a_slider_over_layers(merged_stats):
    stats = merged_stats
    figure = figures.singular_value_spectra(stats)
    names = [t.name for t in figure.data]
    assert names == [*stats.labels, figures.SUM_LABEL, "merged: ties"]
    colors = figures.model_colors(stats.labels)
    assert [t.line.color for t in figure.data[:3]] == [colors[label] for label in stats.labels]
    ft2 = figure.data[1]
    assert list(ft2.y) == stats.model.spectral.spectra["ft2"].values and list(ft2.x) == stats.model.spectral.spectra["ft2"].index
    assert "<b>ft2</b> · whole model" in ft2.hovertemplate and "numerical rank" in ft2.hovertemplate
    assert figure.layout.xaxis.type == figure.layout.yaxis.type == "log"
    assert "log scale" in figure.layout.xaxis.title.text and "weight units" in figure.layout.yaxis.title.text
    steps = figure.layout.sliders[0].steps
    layers = [g for g in stats.layers if g.spectral is not None]
    assert [s.label for s in steps] == ["whole model", *[figures._axis_label(g) for g in layers]]
    layer_1 = steps[[g.name for g in layers].index("layer 1") + 1].args[0]
    assert layer_1["y"][3] == stats.layers[2].spectral.sum_spectrum.values  # the sum, in layer 1
    assert "layer 1" in layer_1["hovertemplate"][4] and "merged: ties" in layer_1["hovertemplate"][4]


def test_effective_rank_curves_show_the_shares_of_the_top_singular_values(merged_stats):
    stats = merged_stats
    figure = figures.spectral_energy(stats)
    whole = {t.name: t for t in figure.data if t.mode == "lines+markers"}
    assert list(whole) == [*stats.labels, figures.SUM_LABEL, "merged: ties"]
    assert list(whole["ft1"].x) == [1, 5, 10, 100]
    assert whole["ft1"].y[1] == pytest.approx(100 * stats.model.spectral.energy_top["ft1"]["0.05"])
    assert whole["merged: ties"].y[2] == pytest.approx(100 * stats.model.spectral.merged_energy_top["0.1"])
    per_layer = [t for t in figure.data if t.name.startswith("ft3: ")]
    assert [t.name for t in per_layer] == [f"ft3: {g.name}" for g in stats.layers if g.spectral is not None]
    assert "· layer 0" in per_layer[1].hovertemplate and any(t.name.startswith("flat spectrum") for t in figure.data)
    assert "(%)" in figure.layout.yaxis.title.text


def test_subspace_overlap_per_layer_before_and_after_merging_against_chance(merged_stats):
    stats = merged_stats
    figure = figures.subspace_overlap(stats)
    lines = [t for t in figure.data if t.mode == "lines+markers" and not t.name.endswith(": alignment")]
    assert [t.name for t in lines] == ["before merging (the task matrices)", "in the merged update (ties)"] * 2
    groups = [g for g in stats.layers if g.spectral is not None and g.spectral.chance_left is not None]
    before_left, after_left, before_right, _ = lines
    assert list(before_left.x) == [figures._axis_label(g) for g in groups]
    pairs = [("ft1", "ft2"), ("ft1", "ft3"), ("ft2", "ft3")]
    expected = sum(groups[1].spectral.overlap_left[a][b] for a, b in pairs) / 3
    assert before_left.y[1] == pytest.approx(expected)
    assert after_left.y[1] == pytest.approx(sum(groups[1].spectral.merged_overlap_left[a][b] for a, b in pairs) / 3)
    assert before_right.xaxis == "x2" and before_right.line.color == figures.BEFORE
    dots = next(t for t in figure.data if t.name == "before merging (the task matrices): pairs")
    assert {row[1] for row in dots.customdata} == {"ft1 · ft2", "ft1 · ft3", "ft2 · ft3"}
    assert "%{customdata[0]}" in dots.hovertemplate and "%{customdata[1]}" in dots.hovertemplate  # layer and pair
    chance = next(t for t in figure.data if t.name.startswith("random subspaces"))
    assert chance.y[1] == pytest.approx(groups[1].spectral.chance_left)
    assert tuple(figure.layout.yaxis.range) == (0, 1.02)
    alignment = [t for t in figure.data if t.name.endswith(": alignment")]
    assert [t.name for t in alignment] == [f"{label}: alignment" for label in stats.labels]
    assert alignment[1].xaxis == "x3" and alignment[1].line.color == figures.model_colors(stats.labels)["ft2"]
    assert alignment[1].y[1] == pytest.approx(groups[1].spectral.merged_alignment["ft2"])
    assert "<b>ft2</b> · %{customdata[0]}" in alignment[1].hovertemplate


def test_singular_value_views_say_when_they_were_not_computed(stats):
    bare = delta_statistics(viz_family().base, viz_family().finetuned[:1], device="cpu", threads=1, spectra=False)
    for draw in (figures.singular_value_spectra, figures.spectral_energy, figures.subspace_overlap):
        assert "not computed" in draw(bare).layout.annotations[-1].text
    single = delta_statistics(viz_family().base, viz_family().finetuned[:1], device="cpu", threads=1)
    assert "two or more" in figures.subspace_overlap(single).layout.annotations[-1].text
    assert [t.name for t in figures.singular_value_spectra(single).data] == ["ft1"]  # no sum of one model
