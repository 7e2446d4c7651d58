#!/usr/bin/env python
"""Time the redundancy statistics on the demo family: base + 3 experts, ~135M parameters each.

Each run is a fresh child process (so its peak RSS is its own) that imports everything, notes
its RSS, runs ``viz.stats.delta_statistics`` over the four float32 checkpoints (~2.2 GB read)
and reports wall-clock seconds of the statistics alone and the peak RSS. Memory is bounded like
a merge: one tensor per model at a time (the largest, the 49152×576 embedding, is 113 MB).

    python bench/viz_stats.py                      # 1 thread and torch's default, 3 runs each
    python bench/viz_stats.py --threads 1 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def child(threads: int, device: str) -> dict:
    import torch

    import demo
    from viz.stats import delta_statistics

    family = demo.ensure_family(lambda message: print(message, file=sys.stderr))
    before = _rss_gb()
    started = time.perf_counter()
    stats = delta_statistics(family["base"], [family[name] for name in demo.EXPERTS], device=device,
                             threads=threads or None)
    seconds = time.perf_counter() - started
    return {
        "threads": threads or torch.get_num_threads(), "device": stats.device, "seconds": round(seconds, 2),
        "rss_after_imports_gb": round(before, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "parameters": stats.model.numel, "tensors": len(stats.tensors),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,0", help="torch threads to try, comma-separated; 0 = torch's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write every run as JSON here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.device)))
        return 0

    runs = []
    for repeat in range(args.repeats):
        for threads in [int(t) for t in args.threads.split(",")]:
            done = subprocess.run([sys.executable, __file__, "--child", str(threads), "--device", args.device],
                                  capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["asked_threads"] = threads
            runs.append(run)
            print(f"run {repeat + 1}: threads {run['threads']}: {run['seconds']:.2f} s, peak RSS {run['peak_rss_gb']:.2f} GB",
                  file=sys.stderr)
    print("| threads | median s | min s | max s | peak RSS GB | RSS after imports GB |")
    print("|---|---|---|---|---|---|")
    for threads in dict.fromkeys(r["asked_threads"] for r in runs):
        mine = [r for r in runs if r["asked_threads"] == threads]
        seconds = [r["seconds"] for r in mine]
        print(f"| {mine[0]['threads']}{'' if threads else ' (torch default)'} | {statistics.median(seconds):.2f} | "
              f"{min(seconds):.2f} | {max(seconds):.2f} | {max(r['peak_rss_gb'] for r in mine):.2f} | "
              f"{mine[0]['rss_after_imports_gb']:.2f} |")
    print(f"\n{runs[0]['parameters'] / 1e6:.1f}M parameters per model, {runs[0]['tensors']} tensors, base + 3 experts, "
          f"device {runs[0]['device']}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
