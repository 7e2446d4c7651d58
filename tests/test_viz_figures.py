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
    for name in ("magnitudes", "relative_norm", "energy"):
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
