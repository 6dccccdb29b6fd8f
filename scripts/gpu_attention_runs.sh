#!/usr/bin/env bash
# Claim 4 of the attention family (results/attention/): every attention kind trained on
# Multi30k de->en with the same recipe and budget (3,000 updates), all at once on the one GPU,
# plus the RNN (for decoding speed) and a trainer.compile=true run; then decoding speed on the
# GPU with the trained Transformer and RNN.
# Results: $OUT/runs.tar.gz (run directories without checkpoints) and $OUT/decode_speed_*.md.
set -u
budget="trainer.max_steps=3000 trainer.patience=0 trainer.max_time_minutes=4 decode=beam"
runs=()
for kind in scaled_dot dot additive local sparse linear; do
  runs+=("attn_$kind" "model.attention.kind=$kind $budget")
done
export TORCH_LOGS=recompiles
EVALUATE=0 RUN_TIMEOUT=330 bash scripts/gpu_job.sh "${runs[@]}" \
  rnn "model=rnn $budget" \
  compile "trainer.compile=true $budget"
unset TORCH_LOGS
SKIP_INSTALL=1 source scripts/gpu_env.sh  # gpu_job.sh installed the wheels
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
timeout 110 python3 bench/decode_speed.py --ckpt runs/attn_scaled_dot/checkpoints/best.pt \
  --rnn-ckpt runs/rnn/checkpoints/best.pt --out "$OUT/decode_speed_${gpu}.md"
