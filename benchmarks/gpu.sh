#!/usr/bin/env bash
# The GPU fast path on one GPU in one command, within 10 minutes: images/s of Swin V2 Tiny and SG-Former S
# (bare reference loop, 224/256/288 px, bf16/fp16, largest batch), each fast-path key on and off, gradient
# checkpointing, the trainer against the bare loop and fed by the shard reader, DeepSpeed ZeRO-1/2 fp16.
#
#   benchmarks/gpu.sh OUT_DIR [--smoke] [--resume]
#
# Writes OUT_DIR/RESULTS.md and OUT_DIR/results.json and prints the tables. Installs nothing: it runs the
# project's venv (.venv, or $PYTHON). --smoke: the same on the CPU with tiny models (about a minute).
# --resume: keep what OUT_DIR/results.json holds and measure only what it lacks (a run cut short).
# What each figure means: benchmarks/gpu.py.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUT_DIR [--smoke] [--budget-s SECONDS] [--resume]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "$python not found: run 'make venv' first, or set PYTHON to the project's interpreter" >&2
    exit 2
fi
out="$1"
shift
mkdir -p "$out"
# Its own log next to the results; pipefail passes gpu.py's exit status on.
"$python" "$here/gpu.py" "$out" "$@" 2>&1 | tee "$out/gpu.log"
