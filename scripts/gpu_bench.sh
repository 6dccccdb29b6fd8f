#!/usr/bin/env bash
# The GPU benchmarks, one device call of under 10 minutes per mode (from the repo root):
#   bash scripts/gpu_bench.sh next     the one call that fits a 15-minute lease (BUDGET_S, 540 s
#                                      of steps by default; each step gets what is left, most
#                                      important first): what the three H200 calls of
#                                      2026-12-04 left open. Transformer-base at 25k tokens:
#                                      ours' fastest eager setting (rows of 128, bf16-weights)
#                                      compiled, against Marian compiled, at Multi30k's lengths
#                                      (the third call's ran out of time: inductor's cache was
#                                      cold, Marian compiled for 47 s); the RNN with its
#                                      source lengths from the host against from the device;
#                                      the trainer with 2 data workers against none (as
#                                      `workers`, eager, 700 updates a run); a profile of the
#                                      compiled fastest at --join 2, the best MFU so far.
#                                      The device call:
#                                      bash scripts/gpu_bench.sh next 2>&1 | tee $OUT/next.log
#                                      with carry [.whl, .gpudata] and timeout_s 590
#   bash scripts/gpu_bench.sh joined   what `next` was for the third H200 call of 2026-12-04
#                                      (540 s): ours' fastest compiled against Marian compiled;
#                                      sentences like WMT's (--join 2 and 4) eager in rounds and
#                                      compiled at --join 2; a profile of the compiled fastest
#   bash scripts/gpu_bench.sh defaults what `next` was for the first two H200 calls of 2026-12-04:
#                                      ours against Marian as the trainer
#                                      now trains on CUDA (the efficient SDPA kernel, rows of
#                                      128, bf16-weights) and with torch's kernels, padded,
#                                      eager, in alternating rounds, Transformer-base at 25k
#                                      tokens and the Multi30k config at 4k; both models
#                                      compiled (efficient kernel) and a profile of ours
#                                      compiled; a profile of the eager defaults; the Multi30k
#                                      config through CUDA graphs (reduce-overhead).
#   bash scripts/gpu_bench.sh speed    ours vs HF Marian at 4k and 25k tokens, both configs, with
#                                      each SDPA kernel set (trainer.sdpa_backends) and the fused
#                                      loss on and off; profiles of a Transformer-base step with
#                                      cuDNN (torch's pick) and with the efficient kernel
#   SDPA=efficient bash scripts/gpu_bench.sh compile
#                                      ours and Marian through torch.compile, both with the
#                                      $SDPA kernels (pick them from the speed table), at 25k
#                                      tokens, both configs (compiling takes minutes per model;
#                                      CONFIGS=transformer-base for one; each row group is
#                                      saved as it is measured)
#   bash scripts/gpu_bench.sh graphs   the Multi30k config at 4k tokens (launch-bound on an
#                                      H100): a profile of an eager step (where the time
#                                      goes), then ours and Marian eager and through
#                                      torch.compile(mode="reduce-overhead"): CUDA graphs, one
#                                      per batch shape (trainer.compile_mode); torch's kernels
#   bash scripts/gpu_bench.sh long     Transformer-base at 25k tokens on sentences like WMT's: the
#                                      training pairs joined 2 (33 subwords a sentence) and 4
#                                      (63) at a time (--join), ours padded and in rows of 128
#                                      against Marian, eager in rounds, then both compiled at
#                                      join 2: MFU where attention's share of a step is not
#                                      Multi30k's (17 subwords; results/bench/README.md)
#   bash scripts/gpu_bench.sh workers  the trainer itself, the default Multi30k Transformer, with its
#                                      batches made in the training loop or by 2 worker
#                                      processes (trainer.data_workers), eager and through
#                                      CUDA graphs, whose steps wait for the host (about 6 min)
#   bash scripts/gpu_bench.sh eager    the first benchmark: profile, throughput vs Marian (+ RNN)
#                                      at 4k/8k/25k, per attention kind, attention against length
# Results: $OUT/bench.tar.gz holding results/bench/*_<gpu>*.md and results/attention/gpu/.
# Committing them: give each new table a row in results/bench/README.md (a test checks).
# Prepare here first: bash scripts/gpu_prepare.sh (wheels into .whl/, Multi30k into .gpudata/;
# name both in the device call's carry)
set -u
source scripts/gpu_env.sh
mkdir -p "$OUT" results/bench results/attention/gpu
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
# Each step: at most $1 seconds (then SIGKILL 10 s after SIGTERM: a process stuck in a
# driver call would outlive the call's limit), and the tables so far packed into $OUT after
# it, as $OUT is what comes back (the repo does not) even when the call is cut short
pack() { tar czf "$OUT/bench.tar.gz" results/bench results/attention/gpu; }
# ($rc: the step's exit status, 124 or 137 when its time ran out)
rc=0
step() { echo "== $(date +%T) $*"; timeout -k 10 "$@"; rc=$?; echo "== rc $rc"; pack; }
deadline=$(($(date +%s) + ${BUDGET_S:-540}))
# step with at most $1 seconds, or what is left of the budget; skipped under 20 s
within() {
  local cap=$1 left=$((deadline - $(date +%s)))
  shift
  ((left < cap)) && cap=$left
  if ((cap < 20)); then echo "== skipped, ${cap}s left: $*"; else step "$cap" "$@"; fi
}
# tokens per batch, Transformer-base (TB) and the Multi30k config (MT); STEPS, WARMUP, ROUNDS:
# smaller for a dry run on the CPU
tb=${TB_TOKENS:-25000} mt=${MT_TOKENS:-4096}
steps="--steps ${STEPS:-20} --warmup ${WARMUP:-3}"
case "${1:-speed}" in
next)
  # ours' fastest eager setting compiled, against Marian compiled, at Multi30k's lengths: the
  # third call gave it 150 s, and on a fresh machine Marian's compile took 47 s, ours' over 70
  fastest="ours/rows-128/bf16-weights+compile/sdpa=efficient"
  compiled="--compiled-only --sdpa efficient --packed-rows 128 --bf16-weights --models $fastest"
  within 240 python3 bench/train_speed.py --configs transformer-base --max-tokens "$tb" \
    $compiled $steps --out "results/bench/train_speed_${gpu}_compile_fastest_next.md"
  compile_rc=$rc  # (the profile below reuses this step's inductor cache)
  # the RNN with its source lengths counted on the host (the trainer's way since 2026-12-04)
  # against counting them from the device's mask, a copy back and a wait at every step (its
  # H100 step took 44-52 ms at 4k-25k tokens: bound by the host), alternating rounds
  within 60 python3 bench/train_speed.py --configs multi30k-default --max-tokens "$mt" \
    --rnn --ablate --models rnn,rnn/lengths-from-device --steps $((${STEPS:-20} * 5)) \
    --warmup "${WARMUP:-3}" --rounds "${ROUNDS:-4}" --out "results/bench/train_speed_${gpu}_rnn.md"
  # the trainer itself with its batches made by 2 worker processes or in the loop (the
  # `workers` mode's first step, shorter): the Multi30k model's eager step waits for the host
  within 160 python3 bench/data_workers.py --workers 0,2 --rounds 2 --steps 700 \
    --out "results/bench/data_workers_${gpu}.md"
  # where the best MFU so far (18.4%, compiled at --join 2) goes, by kind of kernel (a fresh
  # inductor cache only if the compile above was killed mid-write: not for a later step's)
  ((compile_rc == 124 || compile_rc == 137)) && export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-after-kill
  within 80 python3 bench/profile_step.py --config transformer-base --max-tokens "$tb" \
    --join 2 --models ours/rows-128/bf16-weights --compile --sdpa efficient \
    --out "results/bench/profile_${gpu}_join2_compiled_fastest.md"
  ;;
joined)
  # ours' fastest eager setting (1.76x Marian with the same kernels, 18.1% MFU) compiled, with
  # the efficient kernel as every compiled row so far, against Marian compiled (433,728 tok/s
  # in the second call, its fastest); only these two compile (--models)
  fastest="ours/rows-128/bf16-weights+compile/sdpa=efficient"
  compiled="--compiled-only --sdpa efficient --packed-rows 128 --bf16-weights --models $fastest"
  within 150 python3 bench/train_speed.py --configs transformer-base --max-tokens "$tb" \
    $compiled $steps --out "results/bench/train_speed_${gpu}_compile_fastest.md"
  # sentences like WMT's: the training pairs joined 2 (33 subwords a sentence) and 4 (63) at
  # a time, eager, with torch's kernels and the efficient one, in alternating rounds
  for join in 2 4; do
    within 100 python3 bench/train_speed.py --configs transformer-base --max-tokens "$tb" \
      --join "$join" --sdpa efficient --packed-rows 128 --bf16-weights $steps \
      --rounds "${ROUNDS:-4}" --out "results/bench/train_speed_${gpu}_join${join}.md"
  done
  within 150 python3 bench/train_speed.py --configs transformer-base --max-tokens "$tb" \
    --join 2 $compiled $steps --out "results/bench/train_speed_${gpu}_join2_compile.md"
  # where the compiled fastest step's time goes (a fresh inductor cache if a compile was
  # killed mid-write: it can leave a truncated file there)
  ((rc == 124 || rc == 137)) && export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-after-kill
  within 70 python3 bench/profile_step.py --config transformer-base --max-tokens "$tb" \
    --models ours/rows-128/bf16-weights --compile --sdpa efficient \
    --out "results/bench/profile_${gpu}_compiled_fastest.md"
  ;;
defaults)
  # The settings the H200 run of 2026-12-04 left standing: torch's pick (cuDNN) against the
  # efficient kernel (trainer.sdpa_backends=auto), each padded and in rows of 128
  # (trainer.packed_rows=auto), with bf16-weights; both models in each kernel set. The
  # models alternate in $ROUNDS rounds over the same batches (--rounds): that run's ratios
  # moved 1.43-1.56x between two repeats, each model timed in one go.
  # (The sweep over flash, math and cudnn alone is in results/bench/train_speed_h200_sdpa_*.md)
  sweep="--sdpa efficient --packed-rows 128 --bf16-weights $steps --rounds ${ROUNDS:-4}"
  within 120 python3 bench/train_speed.py --configs transformer-base --max-tokens "$tb" \
    $sweep --out "results/bench/train_speed_${gpu}_defaults_base.md"
  within 70 python3 bench/train_speed.py --configs multi30k-default --max-tokens "$mt" \
    $sweep --out "results/bench/train_speed_${gpu}_defaults_small.md"
  # ours and Marian compiled with the efficient kernel, and ours in rows of 128: the ratio
  # the H200 run could not give (Marian's compile ran out of time). One model at a time
  # (no rounds), each row saved as measured: compiling takes a minute or more per model.
  within 230 python3 bench/train_speed.py --compiled-only --sdpa efficient \
    --configs transformer-base --max-tokens "$tb" $steps --packed-rows 128 \
    --out "results/bench/train_speed_${gpu}_compile.md"
  # where the compiled step's time goes (the best MFU so far, 17.2%, was compiled; 35%
  # needs 18.8 ms a step): inductor's cache holds the graphs the step above compiled, unless
  # its time ran out: a compiler killed mid-write leaves a truncated file in the cache (a dry
  # run on the CPU then failed "file too short" loading a kernel), so start a fresh one
  ((rc == 124 || rc == 137)) && export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-after-kill
  within 90 python3 bench/profile_step.py --config transformer-base --max-tokens "$tb" \
    --models ours/rows-128,ours --compile --sdpa efficient \
    --out "results/bench/profile_${gpu}_compiled.md"
  # where the time of the trainer's eager GPU defaults goes
  within 60 python3 bench/profile_step.py --config transformer-base --max-tokens "$tb" \
    --models ours/rows-128/bf16-weights,ours/rows-128 --sdpa efficient \
    --out "results/bench/profile_${gpu}_defaults.md"
  # CUDA graphs for the launch-bound small model, now timed after two untimed passes (a
  # shape's graph is recorded at its second use; the 2026-12-04 run timed the recordings)
  within 200 python3 bench/train_speed.py --compiled-only --compile-mode reduce-overhead \
    --sdpa efficient --configs multi30k-default --max-tokens "$mt" $steps --bf16-weights \
    --out "results/bench/train_speed_${gpu}_graphs.md"
  ;;
speed)
  step 300 python3 bench/train_speed.py --configs multi30k-default,transformer-base \
    --max-tokens 4096,25000 --sdpa efficient,math,cudnn --ablate --steps 20 --warmup 3 \
    --out "results/bench/train_speed_${gpu}_sdpa.md"
  step 100 python3 bench/profile_step.py --config transformer-base --max-tokens 25000 \
    --out "results/bench/profile_${gpu}_cudnn.md"
  step 100 python3 bench/profile_step.py --config transformer-base --max-tokens 25000 \
    --sdpa efficient --out "results/bench/profile_${gpu}_efficient.md"
  ;;
compile)
  step 540 python3 bench/train_speed.py --compiled-only --sdpa "${SDPA:-efficient}" \
    --configs "${CONFIGS:-transformer-base,multi30k-default}" --max-tokens 25000 \
    --steps 20 --warmup 3 \
    --out "results/bench/train_speed_${gpu}_compile.md"
  ;;
graphs)
  step 60 python3 bench/profile_step.py --config multi30k-default --max-tokens 4096 \
    --out "results/bench/profile_${gpu}_small.md"
  step 480 python3 bench/train_speed.py --compile --compile-mode reduce-overhead \
    --configs multi30k-default --max-tokens 4096 --steps 20 --warmup 3 \
    --out "results/bench/train_speed_${gpu}_graphs.md"
  ;;
workers)
  # making a batch and packing it took 1.3 ms of host time a step on this project's CPU
  # (results/bench/collate_time_cpu.md, packed_fill_cpu.md): up to 6% of an eager step of
  # the Multi30k model on an H200 (23 ms in training: 3,941 updates in 90 s), up to 20% through CUDA graphs
  within 240 python3 bench/data_workers.py --workers 0,2 --rounds 2 --steps 1500 \
    --out "results/bench/data_workers_${gpu}.md"
  within 260 python3 bench/data_workers.py --workers 0,2 --rounds 1 --steps 1500 \
    --overrides "trainer.compile=true trainer.compile_mode=reduce-overhead" \
    --out "results/bench/data_workers_${gpu}_graphs.md"
  ;;
long)
  for join in 2 4; do
    step 150 python3 bench/train_speed.py --configs transformer-base --max-tokens 25000 \
      --join "$join" --sdpa efficient --packed-rows 128 --bf16-weights --steps 20 --warmup 3 \
      --rounds 4 --out "results/bench/train_speed_${gpu}_join${join}.md"
  done
  step 240 python3 bench/train_speed.py --compiled-only --sdpa efficient \
    --configs transformer-base --max-tokens 25000 --join 2 --packed-rows 128 --steps 20 \
    --warmup 3 --out "results/bench/train_speed_${gpu}_join2_compile.md"
  ;;
eager)
  step 120 python3 bench/profile_step.py --config transformer-base --max-tokens 25000 \
    --out "results/bench/profile_${gpu}_eager.md"
  step 200 python3 bench/train_speed.py --rnn --steps 20 --warmup 3 \
    --out "results/bench/train_speed_${gpu}.md"
  step 150 python3 bench/train_speed.py --configs multi30k-default --max-tokens 8192,25000 \
    --kinds scaled_dot,dot,additive,local,sparse,linear --steps 20 --warmup 3 \
    --out "results/bench/train_speed_${gpu}_kinds.md"
  step 60 python3 bench/attention_claims.py --device cuda --out results/attention/gpu
  ;;
*) echo "usage: bash scripts/gpu_bench.sh next|joined|defaults|speed|compile|graphs|workers|long|eager"; exit 2 ;;
esac
pack
