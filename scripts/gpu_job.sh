#!/usr/bin/env bash
# The whole GPU job in one call (run through the device tool from the repo root):
#   - installs the carried wheels (.whl/: hydra-core, omegaconf, datasets, ...) into /tmp/site
#   - trains the configured runs concurrently on the one GPU, Multi30k from .gpudata/
#   - scores greedy vs beam 5 on test2016 for each run (transformer.evaluate)
#   - packs run directories (without checkpoints) into $OUT/runs.tar.gz
# Usage: bash scripts/gpu_job.sh NAME "OVERRIDES" [NAME "OVERRIDES" ...]
# Prepare here first: ../shared/gpu/wheels ... ; mkdir -p .gpudata && cp -r ../shared/data/multi30k .gpudata/
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export MT_DATA_DIR=$PWD/.gpudata HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 MT_CACHE_DIR=/tmp/mtcache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee runs/gpu.txt
python3 -c "import torch; print('torch', torch.__version__)" | tee -a runs/gpu.txt
# Train the tokenizer once so concurrent runs share the cached model.
python3 -c "
from omegaconf import OmegaConf
from hydra import compose, initialize_config_dir
from transformer.trainer import prepare_data
from pathlib import Path
with initialize_config_dir(version_base='1.3', config_dir='$PWD/conf'):
    cfg = compose('train', overrides=['run_dir=/tmp/tokprep'])
prepare_data(cfg, Path('/tmp/tokprep'))
" 2>&1 | tail -2
pids=()
while [ $# -ge 2 ]; do
  name=$1; overrides=$2; shift 2
  # shellcheck disable=SC2086
  echo "python3 train.py $overrides" > runs/$name.cmd
  OMP_NUM_THREADS=2 timeout "${RUN_TIMEOUT:-480}" python3 train.py $overrides \
    trainer.progress_bar=false hydra.run.dir=runs/$name > runs/$name.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for f in runs/*/metrics.json; do echo "== $f"; python3 -c "
import json,sys; m=json.load(open('$f')); t=m.get('test2016',{})
print(m['model'], 'steps', m['steps'], 'train_s', m['train_seconds'], 'tok/s', m['train_tokens_per_s'],
      'best_valid_bleu', m['best_valid_bleu'], 'test BLEU', t.get('bleu'), 'chrF', t.get('chrf'))"; done
tail -n 3 runs/*.log
# Greedy vs beam 5 (and any other settings in $DECODES) on test2016 for every trained run
# (EVALUATE=0 skips it),
# hypothesis files included: runs/evaluate/{README.md,results.json,NAME/*.hyp}.
ckpts=(runs/*/checkpoints/best.pt)
[ "${EVALUATE:-1}" = 1 ] && [ -e "${ckpts[0]}" ] && python3 -m transformer.evaluate "${ckpts[@]}" \
  --decode ${DECODES:-greedy beam} --out runs/evaluate 2>&1 | tail -n 20
tar czf "$OUT/runs.tar.gz" --exclude='*.pt' runs
