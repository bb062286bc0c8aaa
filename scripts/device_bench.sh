#!/usr/bin/env bash
# The GPU throughput check in one command, run from the repository root on a machine with one
# CUDA device (../shared/GPU.md says how the project's device machine is prepared):
#
#   scripts/device_bench.sh            # ~5 min on an H100: scoring 135M + 1.7B, generation 1.7B
#
# - Scoring (bench.scoring): naive loop, padded length buckets and padding-free packed rows
#   in the same run, against the 8192^3 bf16 matmul peak, for random-init checkpoints of
#   SmolLM2's 135M and 1.7B shapes (bench.shapes; throughput does not depend on weights).
# - Generation (bench.generation): transformers' generate vs the backend's early-exit decode
#   loop, plain and compiled (static cache + torch.compile), at 32 and 128 prompts.
#
# Needs only torch, transformers, numpy and the project's own light dependencies (pydantic,
# pydantic-settings, grpcio, protobuf): wheels for a machine without a registry go in .whl/
# (installed with --no-index into /tmp/site). Without the packaged model's wheel, point
# SLUICE_BENCH_TOKENIZER at a folder with its config.json and tokenizer files; without gensim,
# BENCH_SHIM at a folder whose gensim/test/utils.py provides datapath() for the demo news.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD${BENCH_SHIM:+:$BENCH_SHIM}
else
    export PYTHONPATH=$PWD${BENCH_SHIM:+:$BENCH_SHIM}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || exit 4
"$PY" -m bench.shapes 135m 1.7b --device cuda --dtype bfloat16 || exit 5
status=0
timeout 150 "$PY" -m bench.scoring --sizes 135m,1.7b --device cuda --dtype bfloat16 --samples 600 --reps 2 || status=$?
for n in 32 128; do
    timeout 150 "$PY" -m bench.generation --sizes 1.7b --device cuda --dtype bfloat16 \
        --prompts $n --max-new-tokens 64 --compile --no-naive || status=$?
done
exit $status
