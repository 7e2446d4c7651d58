#!/usr/bin/env python
"""Speed and memory benchmark: Merge Studio's ``python -m merging merge`` against mergekit.

Builds (or reuses) a synthetic homologous family -- a base Llama plus 3 fine-tunes, by
default ~163M parameters in bfloat16 -- writes one recipe per merge method that both tools
read, runs each tool as a subprocess and records

* wall-clock seconds from spawn to exit (interpreter start-up and imports included), and
* peak RSS of the child's process tree, sampled every ~20 ms with psutil (sum of the RSS
  of the process and all its descendants; the maximum over the run). The kernel's own
  high-water mark for the child (``ru_maxrss`` from ``wait4``) goes into the JSON too.

It prints a Markdown table and, with ``--json PATH``, writes the same data as JSON.
A tool that fails is reported in its cells as ``error: <line of stderr>``; the
benchmark carries on. Full logs are kept under ``WORKDIR/logs``.

Examples::

    python bench/merge_speed.py --size small            # smoke run, seconds
    python bench/merge_speed.py --json results.json     # ~163M bf16 Llama, CPU
    python bench/merge_speed.py --device cuda --methods ties
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.families import build_family  # noqa: E402

METHODS = ("ties", "dare_ties", "linear", "task_arithmetic", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear", "sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "nearswap",
           "arcee_fusion", "ram", "ramplus_tl", "passthrough")  # every method of mergekit 0.1.5
#: Methods mergekit does not have (issue #14): only ours runs; the table sets them beside TIES.
BEYOND_MERGEKIT = ("iso_c", "iso_cts", "tsv", "consensus_ta", "consensus_ties", "wudi", "wudi_exact",
                   "regmean", "regmean_plus_plus")
DEFAULT_METHODS = ("ties", "dare_ties", "linear")
#: Calibration text for the data-aware rows: 32 lines a random model reads as well as any.
CALIBRATION = [f"line {i}: models of one architecture can be merged, and the merge keeps what each knows"
               for i in range(32)]
TOOLS = ("ours", "mergekit")
FLOOR = "floor"  # a third "tool": read every input tensor and write one output (bench/io_floor.py)

#: Family shapes. "170m": Llama, hidden 768, 12 layers, MLP 3072, vocab 32000, untied
#: embeddings -> 162.6M parameters (~325 MB per bf16 checkpoint).
SIZES = {
    "small": dict(arch="llama", hidden_size=64, num_layers=2, vocab_size=512,
                  intermediate_size=192, tie_word_embeddings=False),
    "170m": dict(arch="llama", hidden_size=768, num_layers=12, vocab_size=32000,
                 intermediate_size=3072, tie_word_embeddings=False),
    # ~1.1B (TinyLlama's widths, 32 heads): what bench/gpu_check.sh merges on a GPU
    "1b": dict(arch="llama", hidden_size=2048, num_layers=22, vocab_size=32000,
               intermediate_size=5632, tie_word_embeddings=False),
}
N_FINETUNED = 3
POLL_S = 0.02
GB = 1e9


# --------------------------------------------------------------------------- recipes


def recipe_for(method: str, base: Path, finetuned: list[Path]) -> dict:
    """The recipe both tools run for ``method``: typical settings, the same for both."""
    def entries(models, **parameters):
        return [{"model": str(m), **({"parameters": dict(parameters)} if parameters else {})} for m in models]

    origin = {"base_model": str(base)}
    ft, first, pair = finetuned, finetuned[:1], finetuned[:2]
    recipes = {
        "linear": {"models": entries([base, *ft], weight=1.0)},  # no base: a plain mean of base + fine-tunes
        "task_arithmetic": {**origin, "models": entries(ft, weight=0.5)},
        "ties": {**origin, "models": entries(ft, weight=0.5, density=0.5)},
        "dare_ties": {**origin, "models": entries(ft, weight=0.5, density=0.5)},
        "dare_linear": {**origin, "models": entries(ft, weight=0.5, density=0.5)},
        "breadcrumbs": {**origin, "models": entries(ft, weight=0.5, density=0.5, gamma=0.01)},
        "breadcrumbs_ties": {**origin, "models": entries(ft, weight=0.5, density=0.5, gamma=0.01)},
        "della": {**origin, "models": entries(ft, weight=0.5, density=0.5, epsilon=0.1)},
        "della_linear": {**origin, "models": entries(ft, weight=0.5, density=0.5, epsilon=0.1)},
        "sce": {**origin, "models": entries(ft), "parameters": {"select_topk": 0.5}},
        "model_stock": {**origin, "models": entries(ft)},
        "slerp": {**origin, "models": entries([base, *first]), "parameters": {"t": 0.5}},
        "nuslerp": {**origin, "models": entries(pair, weight=0.5)},
        "multislerp": {**origin, "models": entries(ft, weight=1.0)},
        "karcher": {"models": entries(ft)},
        "nearswap": {**origin, "models": entries(first), "parameters": {"t": 0.0001}},
        "arcee_fusion": {**origin, "models": entries(first)},
        "ram": {**origin, "models": entries(ft)},
        "ramplus_tl": {**origin, "models": entries(ft)},
        "passthrough": {"models": entries(first)},
        # beyond mergekit: the studio's suggested settings
        "iso_c": {**origin, "models": entries(ft), "parameters": {"lambda": 1.5}},
        "iso_cts": {**origin, "models": entries(ft), "parameters": {"lambda": 1.5}},
        "tsv": {**origin, "models": entries(ft), "parameters": {"lambda": 1.0}},
        "consensus_ta": {**origin, "models": entries(ft, weight=0.5)},
        "consensus_ties": {**origin, "models": entries(ft, weight=0.5, density=0.5)},
        "wudi": {**origin, "models": entries(ft)},
        "wudi_exact": {**origin, "models": entries(ft), "parameters": {"solver": "exact"}},
        "regmean": {"models": [{**e, "calibration": CALIBRATION} for e in entries(ft)]},
        "regmean_plus_plus": {"models": [{**e, "calibration": CALIBRATION} for e in entries(ft)]},
    }
    if method not in recipes:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS + BEYOND_MERGEKIT}")
    return {"merge_method": method.removesuffix("_exact"), **recipes[method], "dtype": "bfloat16"}


def write_recipe(path: Path, method: str, base: Path, finetuned: list[Path]) -> Path:
    """Write the recipe YAML for ``method`` (shared by both tools) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe_for(method, base, finetuned), sort_keys=False))
    return path


def mergekit_executable() -> list[str]:
    """The real ``mergekit-yaml`` console script (bypassing pyenv shims when possible)."""
    beside = Path(sys.executable).parent / "mergekit-yaml"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("mergekit-yaml")
    if found:
        return [found]
    return [sys.executable, "-m", "mergekit.scripts.run_yaml"]


def tool_command(tool: str, recipe: Path, out: Path, device: str, extra: list[str]) -> list[str]:
    """Command line for one merge run of ``tool``."""
    if tool == "ours":
        return [sys.executable, "-m", "merging", "merge", str(recipe), str(out),
                "--overwrite", "--device", device, *extra]
    if tool == "mergekit":
        return [*mergekit_executable(), str(recipe), str(out),
                *(["--cuda"] if device == "cuda" else []), *extra]
    if tool == FLOOR:
        return [sys.executable, str(REPO_ROOT / "bench" / "io_floor.py"), str(recipe), str(out), "--device", device]
    raise ValueError(tool)


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One measured subprocess run."""

    tool: str
    method: str
    command: list[str]
    returncode: int | None = None
    wall_s: float | None = None
    peak_rss_gb: float | None = None
    kernel_maxrss_gb: float | None = None
    cpu_s: float | None = None
    loadavg_1m_at_start: float | None = None
    samples: int = 0
    timed_out: bool = False
    error: str | None = None
    stdout_log: str = ""
    stderr_log: str = ""
    output_files: list[str] = field(default_factory=list)
    output_gb: float | None = None
    peak_gpu_gb: float | None = None  # GPU memory in use at the peak, above what was in use before (NVML)


def tree_rss(proc: psutil.Process) -> int:
    """Sum of RSS bytes of ``proc`` and all its live descendants (0 for vanished ones)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        procs = [proc]
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return total


_NVML = None


def gpu_used() -> int | None:
    """Bytes of GPU 0's memory in use now (NVML: every process, so run alone), or None without NVML."""
    global _NVML
    try:
        if _NVML is None:
            import pynvml

            pynvml.nvmlInit()
            _NVML = pynvml.nvmlDeviceGetHandleByIndex(0)
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(_NVML).used)
    except Exception:  # no NVIDIA driver or no nvidia-ml-py: CPU runs report no GPU memory
        return None


def error_line(stderr: str, limit: int = 160) -> str:
    """The most telling stderr line: a traceback's exception line, else the last line saying
    "error", else the first line; shortened to ``limit`` characters."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return "no stderr output"
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        line = lines[-1]
    else:
        errors = [ln for ln in lines if "error" in ln.lower()]
        line = errors[-1] if errors else lines[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def measure(run: Run, cwd: Path, env: dict, log_dir: Path, timeout: float | None) -> Run:
    """Run ``run.command``, filling in wall time, peak tree RSS and the error (if any)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_log = log_dir / f"{run.method}-{run.tool}.stdout.log"
    err_log = log_dir / f"{run.method}-{run.tool}.stderr.log"
    run.stdout_log, run.stderr_log = str(out_log), str(err_log)
    run.loadavg_1m_at_start = os.getloadavg()[0]

    with open(out_log, "wb") as fout, open(err_log, "wb") as ferr:
        t0 = time.perf_counter()
        try:
            child = subprocess.Popen(run.command, cwd=cwd, env=env, stdout=fout, stderr=ferr,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            run.error = f"error: {exc}"
            return run
        done = threading.Event()
        result: dict = {}

        def reap() -> None:
            # wait4 gives the exact end time and the kernel's rusage of this very child.
            _, status, usage = os.wait4(child.pid, 0)
            result.update(end=time.perf_counter(), status=status, usage=usage)
            done.set()

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        try:
            ps = psutil.Process(child.pid)
        except psutil.NoSuchProcess:  # already gone (and reaped) before the first sample
            ps = None
        peak = samples = 0
        gpu_before = gpu_peak = gpu_used()
        while not done.is_set():
            if ps is not None:
                peak = max(peak, tree_rss(ps))
            if gpu_before is not None:
                gpu_peak = max(gpu_peak, gpu_used() or 0)
            samples += 1
            if timeout is not None and time.perf_counter() - t0 > timeout and not run.timed_out:
                run.timed_out = True
                try:  # the child leads its own session: kill just its process group
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            done.wait(POLL_S)
        waiter.join()
        child.returncode = os.waitstatus_to_exitcode(result["status"])  # already reaped

    run.returncode = child.returncode
    run.wall_s = result["end"] - t0
    run.peak_rss_gb = peak / GB
    run.peak_gpu_gb = None if gpu_before is None else (gpu_peak - gpu_before) / GB
    usage = result["usage"]
    run.kernel_maxrss_gb = usage.ru_maxrss * 1024 / GB  # ru_maxrss is in KiB on Linux
    run.cpu_s = usage.ru_utime + usage.ru_stime  # child + reaped descendants; robust to CPU contention
    run.samples = samples
    if run.timed_out:
        run.error = f"error: timed out after {timeout:.0f} s"
    elif run.returncode != 0:
        run.error = "error: " + error_line(err_log.read_text(errors="replace"))
    return run


def describe_output(run: Run, out: Path) -> None:
    """Record the files a run produced (names and total size)."""
    if out.is_dir():
        files = sorted(p for p in out.rglob("*") if p.is_file())
        run.output_files = [str(p.relative_to(out)) for p in files]
        run.output_gb = sum(p.stat().st_size for p in files) / GB


# --------------------------------------------------------------------------- reporting


def machine_info(device: str) -> dict:
    """Machine description for the report."""
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / GB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:
        from importlib.metadata import version

        info["mergekit"] = version("mergekit")
        info["transformers"] = version("transformers")
    except Exception:  # pragma: no cover - informational only
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarise(runs: list[Run]) -> dict:
    """Median wall time and max peak RSS over the successful runs, or the first error."""
    ok = [r for r in runs if r.error is None]
    if not ok:
        return {"error": runs[0].error if runs else "error: not run"}
    return {
        "wall_s": statistics.median(r.wall_s for r in ok),
        "peak_rss_gb": max(r.peak_rss_gb for r in ok),
        "kernel_maxrss_gb": max(r.kernel_maxrss_gb for r in ok),
        "cpu_s": statistics.median(r.cpu_s for r in ok),
        "ok_runs": len(ok),
        "runs": len(runs),
        "error": None if len(ok) == len(runs) else next(r.error for r in runs if r.error),
    }


def ratio(num, den) -> float | None:
    """num / den, or None when either is missing or den is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def markdown_table(rows: list[dict], machine: dict, family: dict) -> str:
    """The result table plus a line describing machine and family."""

    def cell(summary: dict, key: str) -> str:
        if summary.get(key) is None:
            return (summary.get("error") or "n/a").replace("|", "\\|")  # keep the table intact
        text = f"{summary[key]:.2f}"
        if summary.get("ok_runs", 0) < summary.get("runs", 0):
            text += f" ({summary['ok_runs']}/{summary['runs']} runs ok)"
        return text

    def rcell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    out = [
        "| method | ours s | mergekit s | speed ratio (mergekit/ours) | ours peak RSS GB "
        "| mergekit peak RSS GB | RSS ratio (ours/mergekit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        o, m = row["ours"], row["mergekit"]
        out.append(
            f"| {row['method']} | {cell(o, 'wall_s')} | {cell(m, 'wall_s')} | {rcell(row['speed_ratio'])} "
            f"| {cell(o, 'peak_rss_gb')} | {cell(m, 'peak_rss_gb')} | {rcell(row['rss_ratio'])} |"
        )
    cpu = []
    for row in rows:
        o, m = (row[t].get("cpu_s") for t in ("ours", "mergekit"))
        cpu.append(f"{row['method']} {'n/a' if o is None else f'{o:.1f}'}/{'n/a' if m is None else f'{m:.1f}'}")
    out.append("")
    out.append("CPU seconds, user+sys (ours/mergekit): " + ", ".join(cpu) + ".")
    gpu = f" ({machine['gpu']})" if machine.get("gpu") else ""
    out.append("")
    out.append(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_count_physical']} physical), "
        f"{machine['ram_gb']} GB RAM, torch {machine['torch']}, device {machine['device']}{gpu}, "
        f"mergekit {machine.get('mergekit', '?')}, transformers {machine.get('transformers', '?')}, "
        f"Python {machine['python']}."
    )
    out.append(
        f"Family: {family['size']} {family['arch']} base + {family['n_finetuned']} fine-tunes, "
        f"{family['params_m']:.1f}M parameters each, bfloat16. Peak RSS: max over ~{POLL_S * 1000:.0f} ms "
        f"samples of the summed RSS of the tool's process tree; time: median of {family['repeats']} run(s). "
        f"1-min load average before the first run: {family['loadavg_1m']:.2f}."
    )
    return "\n".join(out)


def beyond_table(rows: list[dict], ties: dict | None) -> str:
    """Methods mergekit lacks: our time and peak RSS against TIES's in the same run (ours and mergekit's)."""
    ours_ties = (ties or {}).get("ours", {})
    mergekit_ties = (ties or {}).get("mergekit", {})

    def number(value, suffix="") -> str:
        return "n/a" if value is None else f"{value:.2f}{suffix}"

    out = ["| method (ours only) | s | time ÷ our TIES | peak RSS GB | RSS ÷ mergekit's TIES |", "|---|---|---|---|---|"]
    for row in rows:
        o = row["ours"]
        if o.get("wall_s") is None:
            out.append(f"| {row['method']} | {(o.get('error') or 'n/a').replace('|', '/')} | | | |")
            continue
        out.append(f"| {row['method']} | {o['wall_s']:.2f} | {number(ratio(o['wall_s'], ours_ties.get('wall_s')), 'x')} "
                   f"| {o['peak_rss_gb']:.2f} | {number(ratio(o['peak_rss_gb'], mergekit_ties.get('peak_rss_gb')), 'x')} |")
    return "\n".join(out)


def count_params(base: Path) -> int:
    """Number of parameters stored in a safetensors checkpoint folder."""
    from safetensors import safe_open

    total = 0
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merge_studio_bench",
                   help="where the family, recipes, outputs and logs go (default: %(default)s)")
    p.add_argument("--size", choices=sorted(SIZES), default="170m")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods, 'all' (every method of mergekit 0.1.5: %s) or 'beyond' "
                        "(ties and the methods mergekit lacks, run by ours only: %s); default %s"
                        % (",".join(METHODS), ",".join(BEYOND_MERGEKIT), ",".join(DEFAULT_METHODS)))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="measured runs per tool and method")
    p.add_argument("--warmup", action="store_true",
                   help="run each tool once (unmeasured) before measuring, to warm the page cache")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of ours,mergekit")
    p.add_argument("--floor", action="store_true",
                   help="also time the read+write floor: every input read, one output written (bench/io_floor.py)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    p.add_argument("--ours-args", default="", help="extra arguments for our CLI, shell-quoted; use the = form: --ours-args='--foo 1'")
    p.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml, shell-quoted; use the = form: --mergekit-args=--lazy-unpickle")
    args = p.parse_args(argv)
    named = {"all": list(METHODS), "beyond": ["ties", *BEYOND_MERGEKIT]}
    args.methods = named.get(args.methods) or [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS + BEYOND_MERGEKIT]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {METHODS + BEYOND_MERGEKIT}")
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not args.tools or any(t not in TOOLS for t in args.tools):
        p.error(f"--tools must be a subset of {TOOLS}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shape = SIZES[args.size]

    import torch

    t0 = time.perf_counter()
    family = build_family(workdir / f"family-{args.size}", n_finetuned=N_FINETUNED,
                          dtype=torch.bfloat16, seed=0, **shape)
    build_s = time.perf_counter() - t0
    params = count_params(family.base)
    print(f"family ready in {build_s:.1f} s: {family.base.parent} ({params / 1e6:.1f}M params)",
          file=sys.stderr)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    extra = {"ours": shlex.split(args.ours_args), "mergekit": shlex.split(args.mergekit_args)}
    recipes = {m: write_recipe(workdir / "recipes" / f"{m}.yaml", m, family.base, family.finetuned)
               for m in args.methods}
    log_dir = workdir / "logs"
    loadavg = os.getloadavg()[0]  # > 0.5 or so means something else is competing for the CPUs

    def one(tool: str, method: str, tag: str = "") -> Run:
        out = workdir / "out" / f"{method}-{tool}{tag}"
        if out.exists():
            shutil.rmtree(out)  # same starting point for both tools; deletion is not timed
        cmd = tool_command(tool, recipes[method], out, args.device, extra.get(tool, []))
        run = measure(Run(tool=tool, method=method, command=cmd), REPO_ROOT, env,
                      log_dir if not tag else log_dir / "warmup", args.timeout)
        describe_output(run, out)
        status = run.error or f"{run.wall_s:.2f} s, peak RSS {run.peak_rss_gb:.2f} GB"
        print(f"  {method:9s} {tool:8s}{tag}: {status}", file=sys.stderr)
        return run

    if args.warmup:
        for tool in args.tools:
            one(tool, args.methods[0], tag="-warmup")

    all_runs: dict[tuple[str, str], list[Run]] = {}
    for i, method in enumerate(args.methods):
        for rep in range(args.repeats):
            # Alternate which tool goes first, so neither always gets the warmer cache.
            order = args.tools if (i + rep) % 2 == 0 else list(reversed(args.tools))
            for tool in [t for t in order if t == "ours" or method in METHODS]:
                all_runs.setdefault((method, tool), []).append(one(tool, method))

    floor = asdict(one(FLOOR, args.methods[0])) if args.floor else None
    rows = []
    for method in args.methods:
        row = {"method": method}
        for tool in TOOLS:
            runs = all_runs.get((method, tool), [])
            row[tool] = summarise(runs) if runs else {"error": "not run"}
            row[tool + "_runs"] = [asdict(r) for r in runs]
        o, m = row["ours"], row["mergekit"]
        row["speed_ratio"] = ratio(m.get("wall_s"), o.get("wall_s"))
        row["rss_ratio"] = ratio(o.get("peak_rss_gb"), m.get("peak_rss_gb"))
        rows.append(row)

    machine = machine_info(args.device)
    fam_info = {"size": args.size, "arch": shape["arch"], "n_finetuned": N_FINETUNED,
                "params_m": params / 1e6, "repeats": args.repeats, "shape": shape,
                "base": str(family.base), "finetuned": [str(p) for p in family.finetuned],
                "build_or_reuse_s": build_s, "loadavg_1m": loadavg}
    table = markdown_table([r for r in rows if r["method"] in METHODS], machine, fam_info)
    beyond = [r for r in rows if r["method"] in BEYOND_MERGEKIT]
    if beyond:
        table += "\n\n" + beyond_table(beyond, next((r for r in rows if r["method"] == "ties"), None))
    if floor is not None and not floor["error"]:
        table += f"\n\nRead+write floor (every input read, one output written, nothing computed): {floor['wall_s']:.2f} s"
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "family": fam_info, "methods": args.methods,
                   "tools": args.tools, "warmup": args.warmup, "results": rows, "floor": floor,
                   "recipes": {m: str(p) for m, p in recipes.items()}, "table_markdown": table}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
