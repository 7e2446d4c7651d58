"""``python -m viz report BASE FT [FT ...] --out DIR``: the redundancy report of fine-tuned models.

Errors print one line ``error: ...`` and exit 1 (``--debug`` shows the traceback instead),
like ``python -m merging``, whose command machinery (``merging.cli``) this uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from evaluation import default_suite, load_suite
from merging.cli import Command
from merging.cli import main as run_main
from merging.errors import MergeStudioError
from merging.sources import SourcePolicy, resolve_model
from viz.report import prepare_output, report_output, write_files
from viz.stats import delta_statistics
from viz.sweep import DROP_RATES, dare_sweep, drop_rates


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of drop rates like 0,0.5,0.9") from None


def _arguments(report: argparse.ArgumentParser) -> None:
    """The ``report`` command's arguments."""
    report.description = ("Statistics of the task vectors of FT models on BASE, the DARE sweep of the first FT, "
                          "and a self-contained HTML report. Models are local folders or Hub ids (safetensors only).")
    report.add_argument("base", help="base model: a local folder or a Hub id org/name[@revision]")
    report.add_argument("finetuned", nargs="+", metavar="FT", help="fine-tuned models of the same architecture")
    report.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty, unless --overwrite)")
    report.add_argument("--suite", default=default_suite(),
                        help="sweep task suite: a JSONL file of {prompt, answer}, or a registered suite "
                             f"(default: {default_suite() or 'none'}; 'zoo' is the demo tasks)")
    report.add_argument("--text", type=Path, default=None, help="a UTF-8 text file: the sweep also measures perplexity on it")
    report.add_argument("--density", type=float, default=0.2, help="TIES trim density for the sign conflicts after trimming (default 0.2)")
    report.add_argument("--merged", metavar="FOLDER", default=None,
                        help="a merge of the FT models (local folder or Hub id): its update θ_merged − θ_base joins the "
                             "singular-value views (spectrum, effective rank, subspace overlap after merging)")
    report.add_argument("--spectra", action=argparse.BooleanOptionalAction, default=True,
                        help="singular values of every 2-D weight matrix: spectra, effective rank, subspace overlap "
                             "(default on; about 1-2 s more on the demo family, one SVD per matrix and model)")
    report.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="run the DARE drop-rate sweep on the first FT (minutes: one merge and evaluation per point)")
    report.add_argument("--rates", type=_rates, default=DROP_RATES,
                        help="sweep drop rates, default " + ",".join(f"{r:g}" for r in DROP_RATES))
    report.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    report.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the whole run (default: 1 for the statistics pass, the fastest "
                             "on a busy CPU, and torch's default for the sweep's merges and evaluations)")
    report.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    report.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    report.add_argument("--quiet", action="store_true", help="no progress on stderr")


def cmd_report(args) -> int:
    """Check inputs and the output folder first, then statistics, the sweep, and the report files."""
    # Deferred: tqdm is only needed once the report runs.
    from tqdm import tqdm

    if args.sweep:
        args.rates = drop_rates(args.rates)  # a bad rate fails now, not after the statistics
    prepare_output(args.out, args.overwrite)  # before minutes of work
    if args.threads is not None:
        if args.threads < 1:
            raise MergeStudioError("--threads must be a positive number")
        torch.set_num_threads(args.threads)
    suite = args.suite if args.sweep else None
    if args.sweep:
        if args.suite is not None:
            load_suite(args.suite)  # a missing or bad suite fails now
        if args.text is not None and not args.text.is_file():
            raise MergeStudioError(f"text file {args.text} not found")

    bars: dict[str, tqdm] = {}

    def progress(kind: str, unit: str):
        def update(done: int, total: int, name: str) -> None:
            if kind not in bars:
                bars[kind] = tqdm(total=total, unit=unit, desc=kind, disable=True if args.quiet else None)
            bars[kind].set_postfix_str(name[-40:], refresh=False)
            bars[kind].update(done - bars[kind].n)
        return update

    policy = SourcePolicy()
    # source folders from their configs alone (a few KB for Hub models), so a bad output folder
    # fails before minutes of statistics and sweep
    if args.merged is not None and not args.spectra:
        raise MergeStudioError("--merged is compared in the singular-value views; drop --no-spectra")
    refs = [args.base, *args.finetuned, *([args.merged] if args.merged is not None else [])]
    protected = [resolve_model(ref, policy, weights=False).folder for ref in refs]
    with report_output(args.out, overwrite=args.overwrite, protected=protected) as folder:
        try:
            stats = delta_statistics(args.base, args.finetuned, density=args.density, device=args.device,
                                     progress=progress("statistics", "tensor"), policy=policy, threads=args.threads or 1,
                                     merged=args.merged, spectra=args.spectra)
            sweep = None
            if args.sweep:
                sweep = dare_sweep(args.base, args.finetuned[0], rates=args.rates, suite=suite, text=args.text,
                                   device=args.device, seed=args.seed, policy=policy, label=stats.labels[0],
                                   progress=progress("DARE sweep", "model"))
        finally:
            for bar in bars.values():
                bar.close()
        write_files(folder, stats, sweep)
    path = args.out.expanduser().absolute() / "report.html"
    print(f"wrote {path} and {path.with_name('stats.json').name} ({stats.seconds:.1f} s of statistics)")
    for line in sweep.summary() if sweep else []:
        print(line)
    return 0


REPORT = Command("report", "write report.html (self-contained) and stats.json for a base and fine-tuned models",
                 _arguments, cmd_report, "no report was written")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 with one ``error: ...`` line on bad input)."""
    return run_main(argv, [REPORT], prog="python -m viz", description="Redundancy views of fine-tuned models.")
