"""Redundancy views: statistics of task vectors, the DARE drop-rate sweep, Plotly figures, a report.

    from viz import delta_statistics, dare_sweep
    from viz.figures import all_figures
    from viz.report import write_report

    stats = delta_statistics("base/", ["ft-a/", "ft-b/"], density=0.2, threads=1)
    stats = delta_statistics("base/", ["ft-a/", "ft-b/"], merged="merge/")  # its update in the SVD views
    sweep = dare_sweep("base/", "ft-a/", suite="zoo")        # minutes: one merge + evaluation per point
    all_figures(stats, sweep)                                 # {name: plotly Figure}
    write_report("out/", stats, sweep)                        # out/report.html, stats.json, sweep.json

No Gradio here: the studio's Redundancy tab calls these functions (and the Evaluate tab
``viz.scores``); ``python -m viz report``
writes a self-contained HTML report. Checkpoints are read through ``merging``'s reader and
merges go through ``merging``'s engine; nothing here changes a model.
"""

from viz.stats import RedundancyStats, delta_statistics, tensor_group
from viz.sweep import SweepResult, dare_sweep

__all__ = ["RedundancyStats", "SweepResult", "dare_sweep", "delta_statistics", "tensor_group"]
