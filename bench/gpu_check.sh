#!/usr/bin/env bash
# One prepared GPU check (issue #17 item 5), sized for at most 8 minutes on one H100/H200:
# the merge engine against `mergekit-yaml --cuda` on a ~1.1B-parameter bfloat16 Llama family
# (TIES, linear and the subspace methods TSV and Iso-C: time, peak RSS, GPU memory, against the
# read+write floor), and the chat's decoding modes (tokens/s per panel with 1-3 panels, compile
# time at load) on SmolLM2-135M-shaped models; one Markdown table at the end.
#
#   bench/gpu_check.sh --prepare   # here, with a package registry: the wheels the GPU machine lacks -> .whl/
#   bench/gpu_check.sh             # there: installs .whl/ (no registry needed), runs, prints the table
#   bench/gpu_check.sh --tiny      # anywhere, CPU, seconds: the same steps on tiny models (a smoke test)
#
# The GPU machine has Python 3.12 with torch, transformers, accelerate, peft, safetensors, psutil and
# nvidia-ml-py; mergekit and what it needs beyond those travel as wheels (carry .whl).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="mergekit==0.1.5 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
immutables==0.21 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf optuna colorlog sqlalchemy alembic mako"

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    du -sh .whl
    exit 0
fi

if [[ " $* " != *" --tiny "* ]] && compgen -G ".whl/*.whl" > /dev/null; then  # the GPU machine's Python 3.12 wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
exec timeout 480 python3 bench/gpu_check.py "$@"
