#!/usr/bin/env bash
# The GPU benchmarks, in two device calls of under 10 minutes each (from the repo root):
#   bash scripts/gpu_bench.sh eager    profile of a Transformer-base step (ours and HF Marian),
#                                      throughput vs Marian (+ RNN), per attention kind,
#                                      attention time/memory against length (claim 3)
#   bash scripts/gpu_bench.sh compile  the same profile and throughput through torch.compile
#                                      (compiling takes minutes per model on that machine)
# Results: $OUT/bench.tar.gz holding results/bench/*_<gpu>*.md and results/attention/gpu/.
# Prepare here first: ../shared/gpu/wheels ... ; mkdir -p .gpudata && cp -r ../shared/data/multi30k .gpudata/
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export MT_DATA_DIR=$PWD/.gpudata HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 MT_CACHE_DIR=/tmp/mtcache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" results/bench results/attention/gpu
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
step() { echo "== $(date +%T) $*"; timeout "$@"; echo "== rc $?"; }
if [ "${1:-eager}" = eager ]; then
  step 120 python3 bench/profile_step.py --config transformer-base --max-tokens 25000 \
    --out "results/bench/profile_${gpu}_eager.md"
  step 200 python3 bench/train_speed.py --rnn --steps 20 --warmup 3 \
    --out "results/bench/train_speed_${gpu}.md"
  step 150 python3 bench/train_speed.py --configs multi30k-default --max-tokens 8192,25000 \
    --kinds scaled_dot,dot,additive,local,sparse,linear --steps 20 --warmup 3 \
    --out "results/bench/train_speed_${gpu}_kinds.md"
  step 60 python3 bench/attention_claims.py --device cuda --out results/attention/gpu
else
  step 240 python3 bench/profile_step.py --config transformer-base --max-tokens 25000 --compile \
    --out "results/bench/profile_${gpu}_compile.md"
  step 320 python3 bench/train_speed.py --compile --configs transformer-base,multi30k-default \
    --max-tokens 25000 --steps 20 --warmup 3 --out "results/bench/train_speed_${gpu}_compile.md"
fi
tar czf "$OUT/bench.tar.gz" results/bench results/attention/gpu
