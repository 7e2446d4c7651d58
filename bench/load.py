#!/usr/bin/env python
"""Load: N concurrent users of a launched studio, mixing chat streams, merges and redundancy
statistics, for a bounded time.

Each user is its own ``gradio_client`` session (its own session hash, as separate browsers
are). Users 0 and 1 wait the first third of the time (chats alone, the baseline), then user 0
merges again and again through ``/merge_recipe`` and user 1 measures the redundancy statistics
again and again through ``/redundancy`` (both in the heavy queue, one at a time); the others
stream answers through ``/generate`` and time the first token. Reported: completed requests,
errors (there should be none), first-token latency p50/p95 (overall and while heavy work was
running), merges and statistics finished, whether every merge landed in its own session's
folder, and the server's peak RSS.

    python bench/load.py                      # the demo family, 8 users, 60 s
    python bench/load.py --users 8 --seconds 30 --tiny   # a tiny random family (fast)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["What is the capital of France?", "Name a primary colour.", "Write one sentence about the sea.",
           "What do bees make?", "How many days are in a week?"]


@dataclass
class LoadReport:
    users: int
    seconds: float
    chats: int = 0
    merges: int = 0
    statistics: int = 0
    errors: list[str] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    first_token_during_heavy_work_s: list[float] = field(default_factory=list)
    first_token_alone_s: list[float] = field(default_factory=list)
    merge_outputs: list[str] = field(default_factory=list)
    peak_rss_gb: float | None = None

    def summary(self) -> dict:
        def pct(values, q):
            return round(statistics.quantiles(values, n=100)[q - 1], 3) if len(values) >= 2 else (values[0] if values else None)

        return {
            "users": self.users, "seconds": self.seconds, "chats": self.chats, "merges": self.merges,
            "redundancy_runs": self.statistics,
            "errors": len(self.errors), "first_errors": self.errors[:3],
            "first_token_p50_s": pct(self.first_token_s, 50), "first_token_p95_s": pct(self.first_token_s, 95),
            "first_token_without_heavy_p50_s": pct(self.first_token_alone_s, 50),
            "first_token_during_heavy_p50_s": pct(self.first_token_during_heavy_work_s, 50),
            "first_token_during_heavy_p95_s": pct(self.first_token_during_heavy_work_s, 95),
            "chats_during_heavy_work": len(self.first_token_during_heavy_work_s),
            "merge_folders_distinct": len(set(self.merge_outputs)) == len(self.merge_outputs),
            "peak_rss_gb": self.peak_rss_gb,
        }


def run_load(url: str, users: int = 8, seconds: float = 60.0, max_new_tokens: int = 16) -> LoadReport:
    """Drive the studio at ``url`` with ``users`` concurrent sessions for ``seconds``."""
    from gradio_client import Client

    report = LoadReport(users, seconds)
    lock = threading.Lock()
    in_flight = [0]  # heavy requests (merges, statistics) in flight
    stop_at = time.monotonic() + seconds

    def during_heavy() -> bool:
        with lock:
            return in_flight[0] > 0

    def heavy_user(name: str, request, record) -> None:
        client = Client(url, verbose=False)
        models = client.predict(api_name="/list_models")
        base, sources = models["base"], [ref for label, ref in models.items() if label != "base"]
        time.sleep(seconds / 3)  # the baseline: chats alone
        while time.monotonic() < stop_at:
            with lock:
                in_flight[0] += 1
            try:
                result = request(client, base, sources)
                with lock:
                    record(result)
            except Exception as exc:  # every failure counts as an error in the report
                with lock:
                    report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            finally:
                with lock:
                    in_flight[0] -= 1

    def merge(client, base, sources) -> dict:
        recipe = f"merge_method: ties\nbase_model: {base}\nmodels:\n" + "".join(
            f"  - model: {ref}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for ref in sources[:2])
        return client.predict(recipe, api_name="/merge_recipe")

    def merged(summary: dict) -> None:
        report.merges += 1
        report.merge_outputs.append(summary["output"])

    def measure(client, base, sources) -> dict:
        stats = client.predict(base, sources, 0.2, api_name="/redundancy")
        if list(stats["models"].values()) != sources:
            raise AssertionError(f"statistics of {list(stats['models'].values())}, asked for {sources}")
        return stats

    def measured(_stats: dict) -> None:
        report.statistics += 1

    def chatter(index: int) -> None:
        client = Client(url, verbose=False)
        models = client.predict(api_name="/list_models")
        refs = list(models.values())
        turn = 0
        while time.monotonic() < stop_at:
            ref, prompt = refs[(index + turn) % len(refs)], PROMPTS[(index + turn) % len(PROMPTS)]
            turn += 1
            during_heavy_work = during_heavy()
            started = time.monotonic()
            first = None
            try:
                job = client.submit(ref, prompt, 0.7, 0.9, max_new_tokens, index, api_name="/generate")
                for _ in job:
                    if first is None:
                        first = time.monotonic() - started
                job.result()
                with lock:
                    report.chats += 1
                    if first is not None:
                        report.first_token_s.append(first)
                        if during_heavy_work:
                            report.first_token_during_heavy_work_s.append(first)
                        elif not report.merges and not report.statistics and not in_flight[0]:
                            report.first_token_alone_s.append(first)
            except Exception as exc:
                with lock:
                    report.errors.append(f"chat: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=heavy_user, args=("merge", merge, merged), name="user-0-merges"),
               threading.Thread(target=heavy_user, args=("redundancy", measure, measured), name="user-1-statistics")]
    threads += [threading.Thread(target=chatter, args=(i,), name=f"user-{i}-chats") for i in range(2, users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 600)
    return report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peak_rss(pid: int, stop: threading.Event, out: list) -> None:
    import psutil

    process, peak = psutil.Process(pid), 0
    while not stop.is_set():
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
        except psutil.Error:
            break
        time.sleep(0.2)
    out.append(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tiny", action="store_true", help="a tiny random family instead of the demo family")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    env = dict(os.environ)
    work = Path(tempfile.mkdtemp(prefix="merge-studio-load-"))
    if args.tiny:
        from tests.support.families import build_family

        fam = build_family(work / "family", "llama", 2, hidden_size=64, vocab_size=512)
        env["MERGE_STUDIO_MODELS"] = json.dumps({"base": str(fam.base), **{f"ft{i}": str(p) for i, p in enumerate(fam.finetuned, 1)}})
    port = _free_port()
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", MERGE_STUDIO_WORK_DIR=str(work / "studio"))
    server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        from urllib.request import urlopen

        deadline = time.monotonic() + 300
        while True:
            try:
                urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the studio did not start")
                time.sleep(0.5)
        stop, peaks = threading.Event(), []
        watcher = threading.Thread(target=_peak_rss, args=(server.pid, stop, peaks))
        watcher.start()
        report = run_load(url, args.users, args.seconds)
        stop.set()
        watcher.join()
        report.peak_rss_gb = round(peaks[0] / 1e9, 3) if peaks else None
    finally:
        server.terminate()
        server.wait(timeout=30)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
