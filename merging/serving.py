"""``python -m merging serve MODEL``: a merged folder on an OpenAI-compatible serving engine.

Past one process a merge is served, not loaded by the studio: ``transformers serve`` (the default,
fine on a CPU), vLLM or SGLang (GPUs, tensor parallelism), or llama.cpp's ``llama-server`` (a GGUF
file). This command builds the engine's command line, checks the engine is installed (and says
how to install it if not), starts it, waits until it answers ``/health``, and prints the
``openai:<base URL>#<model>`` reference to paste into the studio (a Chat panel, or
``MERGE_STUDIO_ENDPOINTS``); ``--print`` only prints the command, to run where the engine is.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from merging.cli import Command
from merging.endpoints import Endpoint
from merging.errors import MergeStudioError

ENGINES = ("transformers", "vllm", "sglang", "llama.cpp")
HEALTH_TIMEOUT_S = 600.0  # a 70B model on vLLM takes minutes to load


@dataclass(frozen=True)
class Launch:
    """How one engine serves one model: its command, and the model name requests use."""

    engine: str
    argv: list[str]
    model: str
    host: str
    port: int

    @property
    def endpoint(self) -> Endpoint:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return Endpoint(f"http://{host}:{self.port}/v1", self.model)

    def shell(self) -> str:
        return " ".join(_quote(part) for part in self.argv)


def _quote(part: str) -> str:
    return part if part and all(c.isalnum() or c in "-_./:=@+," for c in part) else "'" + part.replace("'", "'\\''") + "'"


def launch(model: str, engine: str = "transformers", *, host: str = "127.0.0.1", port: int = 8000,
           device: str = "auto", tensor_parallel: int = 1) -> Launch:
    """The engine's command for serving the merged folder ``model`` (a GGUF file for llama.cpp)."""
    path = Path(model).expanduser()
    if engine not in ENGINES:
        raise MergeStudioError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "llama.cpp":
        if path.suffix != ".gguf":
            raise MergeStudioError(
                f"llama.cpp serves GGUF files, and {model} is not one: convert the merge first with llama.cpp's "
                f"convert_hf_to_gguf.py {model} --outfile {path.name}.gguf, then serve that file")
    elif not (path / "config.json").is_file():
        raise MergeStudioError(f"{model} is not a model folder (no config.json); give a merged output folder")
    name = path.absolute().name if engine in ("vllm", "sglang", "llama.cpp") else str(path.absolute())
    folder = str(path.absolute())
    argv = {
        # transformers serve names the model by the path it was given
        "transformers": ["transformers", "serve", folder, "--host", host, "--port", str(port), "--device", device],
        "vllm": ["vllm", "serve", folder, "--host", host, "--port", str(port), "--served-model-name", name,
                 "--tensor-parallel-size", str(tensor_parallel)],
        "sglang": [sys.executable, "-m", "sglang.launch_server", "--model-path", folder, "--host", host,
                   "--port", str(port), "--served-model-name", name, "--tp-size", str(tensor_parallel)],
        "llama.cpp": ["llama-server", "-m", folder, "--host", host, "--port", str(port), "--alias", name],
    }[engine]
    return Launch(engine, argv, name, host, port)


INSTALL = {
    "transformers": "pip install 'transformers[serving]'",
    "vllm": "pip install vllm (Linux with a CUDA GPU; see docs.vllm.ai)",
    "sglang": "pip install 'sglang[all]' (a CUDA GPU; see docs.sglang.ai)",
    "llama.cpp": "build llama.cpp (github.com/ggml-org/llama.cpp) or install it (brew install llama.cpp), so that "
                 "llama-server is on the PATH",
}


def installed(engine: str) -> bool:
    if engine == "transformers":
        return all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")) and bool(
            shutil.which("transformers") or Path(sys.executable).with_name("transformers").exists())
    if engine == "sglang":
        return importlib.util.find_spec("sglang") is not None
    return shutil.which({"vllm": "vllm", "llama.cpp": "llama-server"}[engine]) is not None


def _executable(argv: list[str]) -> list[str]:
    """``transformers`` may sit beside this Python rather than on the PATH (a virtual environment not activated)."""
    beside = Path(sys.executable).with_name(argv[0])
    return [str(beside), *argv[1:]] if not shutil.which(argv[0]) and beside.exists() else argv


def wait_healthy(launched: Launch, process: subprocess.Popen, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    url = f"http://{launched.endpoint.base_url.split('//')[1].split('/')[0]}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MergeStudioError(f"{launched.engine} exited with status {process.returncode} before it answered; "
                                   "its output above says why")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (OSError, http.client.HTTPException):  # not up yet, or answering half-started
            time.sleep(0.5)
    raise MergeStudioError(f"{launched.engine} did not answer {url} within {timeout_s:.0f} s")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a merged model folder (a .gguf file for llama.cpp)")
    parser.add_argument("--engine", choices=ENGINES, default="transformers",
                        help="the serving engine (default: transformers serve, which runs on a CPU)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="transformers serve only: auto, cpu or cuda")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="vLLM and SGLang: GPUs to split the model over")
    parser.add_argument("--print", action="store_true", help="print the command and the reference; start nothing")


def cmd_serve(args) -> int:
    launched = launch(args.model, args.engine, host=args.host, port=args.port, device=args.device,
                      tensor_parallel=args.tensor_parallel)
    if args.print:
        print(launched.shell())
        print(f"then, in the studio: {launched.endpoint.ref}")
        return 0
    if not installed(args.engine):
        raise MergeStudioError(f"{args.engine} is not installed here: {INSTALL[args.engine]}; or run with --print "
                               "for the command to run where it is")
    print(f"starting: {launched.shell()}", file=sys.stderr, flush=True)
    # the engine's own output goes to stderr: stdout carries only the reference, for scripts to read
    process = subprocess.Popen(_executable(launched.argv), stdout=sys.stderr, start_new_session=True)
    try:
        wait_healthy(launched, process)
        print(launched.endpoint.ref, flush=True)
        print(f"serving {launched.model} on {launched.endpoint.base_url}; paste the line above into a Chat panel or "
              "MERGE_STUDIO_ENDPOINTS. Ctrl-C stops it.", file=sys.stderr, flush=True)
        return process.wait()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


SERVE = Command("serve", "serve a merged model on an OpenAI-compatible engine (transformers serve, vLLM, SGLang, "
                "llama.cpp) and print its openai: reference for the studio", _arguments, cmd_serve,
                "the server was stopped")
