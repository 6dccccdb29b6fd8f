#!/usr/bin/env bash
# Issue 8's recipe sweep in one device call (under 10 minutes on one H100), from the repo root:
#   bash scripts/gpu_recipe.sh
# Ten Multi30k de->en trainings share the GPU, each with the same training-time budget
# ($MINUTES, default 4; evaluation excluded) and every checkpoint of its last 5 validations
# kept: the default Transformer and RNN, and the Transformer with one change each
# (vocabulary type and size, label smoothing, peak learning rate, warmup, batch size).
# Then scripts/gpu_job.sh averages each run's last 5 checkpoints and decodes best.pt and the
# average on valid (and test2016, reported only): beam 5 for every run, and for the two
# default runs also length penalty 0 and 1.0 and beam 10, to choose on valid (greedy valid
# BLEU of best.pt is in each run's valid log).
# Results: $OUT/runs.tar.gz (logs, metrics.json, hyps, evaluate-{valid,test2016}/), to unpack
# under results/gpu/<gpu>-recipe/ and summarise in results/ablations.md.
set -u
m=${MINUTES:-4}
common="decode=beam trainer.max_time_minutes=$m trainer.keep_checkpoints=5 trainer.patience=0"
export AVERAGE=5 VALID_DECODES=beam GRID_RUNS="tf_default rnn_default"
export GRID_DECODES="beam beam:length_penalty=0.0 beam:length_penalty=1.0 beam:beam_size=10"
exec bash scripts/gpu_job.sh \
  tf_default "$common" \
  rnn_default "model=rnn $common" \
  tf_bpe8k "data.spm_model_type=bpe $common" \
  tf_vocab4k "data.vocab_size=4000 $common" \
  tf_vocab16k "data.vocab_size=16000 $common" \
  tf_ls0 "trainer.label_smoothing=0.0 $common" \
  tf_ls02 "trainer.label_smoothing=0.2 $common" \
  tf_lr2e-3 "trainer.optimizer.lr=2e-3 $common" \
  tf_warmup4k "trainer.warmup_steps=4000 $common" \
  tf_batch8k "data.max_tokens=8192 $common"
