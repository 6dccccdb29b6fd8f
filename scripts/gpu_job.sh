#!/usr/bin/env bash
# The whole GPU job in one call (run through the device tool from the repo root):
#   - installs the carried wheels (.whl/: hydra-core, omegaconf, datasets, ...) into /tmp/site
#   - trains the configured runs concurrently on the one GPU, Multi30k from .gpudata/
#   - each run ends by choosing, on valid, best.pt or the average of its last checkpoints and
#     the length penalty (trainer.final), then translates test2016 with that choice
#   - EVALUATE=1 (default): also scores each run's best.pt on test2016 with each setting in
#     $DECODES (greedy, beam 5) through transformer.evaluate, several runs at once
#   (SKIP_INSTALL=1 and a python3 with the packages on PATH: a dry run on any machine;
#   RUN_THREADS: CPU threads per run, 2 by default)
#   - packs run directories (without checkpoints) into $OUT/runs.tar.gz, also when a phase
#     runs out of time: every phase ends by the deadline, $BUDGET_S seconds after the start.
# Usage: bash scripts/gpu_job.sh NAME "OVERRIDES" [NAME "OVERRIDES" ...]
# Prepare here first: bash scripts/gpu_prepare.sh (wheels into .whl/, Multi30k into .gpudata/;
# name both in the device call's carry)
set -u
deadline=$(($(date +%s) + ${BUDGET_S:-570}))
left() { echo $((deadline - $(date +%s) - ${1:-0})); }
source scripts/gpu_env.sh
# a warm machine keeps runs/ from the call before: its runs were packed then, and one of
# the same name would resume there (a finished one, training nothing)
rm -rf runs
mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee runs/gpu.txt
python3 -c "import torch; print('torch', torch.__version__)" | tee -a runs/gpu.txt
# Train the default tokenizer once so concurrent runs share the cached model.
python3 -c "
from omegaconf import OmegaConf
from hydra import compose, initialize_config_dir
from transformer.run_data import prepare_data
from pathlib import Path
with initialize_config_dir(version_base='1.3', config_dir='$PWD/conf'):
    cfg = compose('train', overrides=['run_dir=/tmp/tokprep'])
prepare_data(cfg, Path('/tmp/tokprep'))
" 2>&1 | tail -2
pids=() names=()
set -f  # overrides such as key=[1.0,1.4] are split on spaces, never globbed
while [ $# -ge 2 ]; do
  name=$1; overrides=$2; shift 2
  names+=("$name")
  # shellcheck disable=SC2086
  echo "python3 train.py $overrides" > runs/$name.cmd
  OMP_NUM_THREADS=${RUN_THREADS:-2} timeout -k 10 "${RUN_TIMEOUT:-$(left 150)}" \
    python3 train.py $overrides trainer.progress_bar=false hydra.run.dir=runs/$name \
    > runs/$name.log 2>&1 &
  pids+=($!)
done
set +f
for p in "${pids[@]}"; do wait "$p"; done
for f in runs/*/metrics.json; do echo "== $f"; python3 -c "
import json,sys; m=json.load(open('$f')); t=m.get('test2016',{})
print(m['model'], 'steps', m['steps'], 'train_s', m['train_seconds'], 'tok/s', m['train_tokens_per_s'],
      'best_valid_bleu', m['best_valid_bleu'], 'test BLEU', t.get('bleu'), 'chrF', t.get('chrf'))
f = m.get('final', {}); print('  final:', f.get('checkpoint'), 'beam', f.get('beam_size'), 'lp', f.get('length_penalty'),
      'valid BLEU', m.get('valid', {}).get('bleu'))"; done
tail -n 3 runs/*.log

score_run() {  # NAME: best.pt of one run on test2016 with each setting in $DECODES
  local name=$1
  [ -e "runs/$name/checkpoints/best.pt" ] || return 0
  # shellcheck disable=SC2086
  python3 -m transformer.evaluate "runs/$name/checkpoints/best.pt" --names "$name" \
    --decode ${DECODES:-greedy beam} --out runs/evaluate-$name > runs/evaluate-$name.log 2>&1
}
if [ "${EVALUATE:-1}" = 1 ]; then
  pids=()
  for name in "${names[@]}"; do
    (export -f score_run; timeout -k 10 "$(left 30)" bash -c "score_run $name") &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  cat runs/evaluate-*/README.md 2>/dev/null | grep '^| '
fi
tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude=.train.lock runs
