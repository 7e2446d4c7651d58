"""Shared test helpers: tiny model families, copies to damage, and a fast way to run the CLI.

Running ``python -m merging`` costs 1.5-3 s per call, almost all of it importing torch, and the
bad-input suite makes a few dozen calls. ``run_cli`` therefore goes through a small fork server:
one helper process imports the CLI's modules once, and for each call forks a child that runs
``merging.__main__`` exactly as ``python -m merging`` does (``runpy``, real ``sys.argv``, real
stdout/stderr file descriptors, real exit status, an uncaught exception prints its traceback
and exits 1 as the interpreter would). Only the interpreter start-up is skipped. Pass
``fresh=True`` (or set ``MERGE_TESTS_FRESH_CLI=1`` to do it everywhere) for a brand-new
``python -m merging`` process; a call made after a test changed the ``HF_*`` environment (the
``hub`` fixture's local Hub server, ``HF_TOKEN``) gets one too, since the warm process imported
``huggingface_hub``, which reads those variables once.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from tests.support.families import load_tensors as load_model_tensors  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests import ``merging`` however pytest was started
    sys.path.insert(0, str(REPO))
FRESH_ALWAYS = os.environ.get("MERGE_TESTS_FRESH_CLI") == "1"
CLI_TIMEOUT = 120

# -- tiny families, built once per test process ---------------------------------------------

_ROOT: Path | None = None
_FAMILIES: dict[tuple, object] = {}


def scratch_root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="merge-studio-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def family(arch: str = "llama", n_finetuned: int = 2, **kwargs):
    """A cached ``tests.support.families.build_family`` family (read-only: copy before damaging)."""
    from tests.support.families import build_family

    key = (arch, n_finetuned, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _FAMILIES:
        name = f"{arch}-{n_finetuned}-" + hashlib.sha1(repr(key).encode()).hexdigest()[:8]
        _FAMILIES[key] = build_family(scratch_root() / name, arch, n_finetuned, **kwargs)
    return _FAMILIES[key]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit) -> None:
    """Load ``model.safetensors`` of ``folder``, let ``edit(state_dict)`` change it, save it back."""
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest), to prove nothing changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def write_recipe(path: Path, recipe: dict | str) -> Path:
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(text)
    return path


def linear_recipe(*models: Path, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models], **extra}


def assert_no_output(out_dir: Path) -> None:
    """Neither the output folder nor any hidden partial/old sibling of it exists."""
    out_dir = Path(out_dir)
    assert not out_dir.exists(), f"{out_dir} was left behind"
    if out_dir.parent.exists():
        leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
        assert not leftovers, f"hidden siblings left behind: {leftovers}"


# -- running the CLI ------------------------------------------------------------------------

@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


_SERVER_SOURCE = textwrap.dedent(r"""
    import json, os, runpy, sys, traceback
    import merging.cli, merging.engine, merging.recipe, merging.sources, merging.checkpoint  # noqa: F401
    import tqdm  # noqa: F401  (imported by the merge command)

    def child(req):
        os.chdir(req["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.argv = ["python -m merging", *req["argv"]]
        code = 0
        try:
            runpy.run_module("merging", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()
""")

_server: subprocess.Popen | None = None
_HUB_PREFIXES = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_")


def _hub_env() -> dict[str, str]:
    """The environment variables ``huggingface_hub`` reads once, at import (``HF_ENDPOINT``, ...)."""
    return {k: v for k, v in os.environ.items() if k.startswith(_HUB_PREFIXES)}


_BASE_HUB_ENV = _hub_env()  # the session's own: the warm server always runs with it


def _get_server() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = {k: v for k, v in _cli_env().items() if not k.startswith(_HUB_PREFIXES)}
        env.update(_BASE_HUB_ENV)
        env.setdefault("HF_HUB_OFFLINE", "1")
        _server = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SOURCE], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )
        atexit.register(_stop_server, _server)
    return _server


def _stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_cli(*args, cwd: Path | None = None, fresh: bool = False, preexec_fn=None) -> CliResult:
    """Run ``python -m merging ARGS`` and return its exit status and output."""
    argv = [str(a) for a in args]
    cwd = Path(cwd or REPO)
    # The warm server imported huggingface_hub with the session's HF_* environment; a test that
    # changed it (the ``hub`` fixture's HF_ENDPOINT, an HF_TOKEN) needs a fresh process.
    hub_env_changed = _hub_env() != _BASE_HUB_ENV
    if fresh or FRESH_ALWAYS or preexec_fn is not None or hub_env_changed:
        done = subprocess.run(
            [sys.executable, "-m", "merging", *argv], cwd=cwd, capture_output=True, text=True,
            env=_cli_env(), timeout=CLI_TIMEOUT, preexec_fn=preexec_fn,
        )
        return CliResult(done.returncode, done.stdout, done.stderr)
    server = _get_server()
    with tempfile.TemporaryDirectory(prefix="cli-io-") as io_dir:
        out, err = Path(io_dir) / "stdout", Path(io_dir) / "stderr"
        server.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}) + "\n")
        server.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(server.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=CLI_TIMEOUT):
            server.kill()
            raise TimeoutError(f"python -m merging {' '.join(argv)} did not finish in {CLI_TIMEOUT} s")
        reply = json.loads(server.stdout.readline())
        return CliResult(reply["rc"], out.read_text(), err.read_text())


# tqdm's progress bar also goes to stderr; a failure during streaming leaves it above the error.
_PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")


def error_line(result: CliResult, *, allow_progress: bool = False) -> str:
    """Check the one-line error contract and return the message after ``error: ``.

    Exit status 1, no traceback, and stderr is exactly one line ``error: ...`` (with
    ``allow_progress``, progress-bar lines printed before the failure are tolerated).
    """
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    if allow_progress:
        lines = [ln for ln in lines if not _PROGRESS.search(ln)]
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    if not allow_progress:
        assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), repr(result.stderr)
    return lines[0][len("error: "):]
