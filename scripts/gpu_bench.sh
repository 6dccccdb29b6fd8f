#!/usr/bin/env bash
# The GPU benchmarks, one device call of under 10 minutes per mode (from the repo root):
#   bash scripts/gpu_bench.sh next     the one call that fits a 15-minute lease (BUDGET_S, 540 s
#                                      of steps by default; each step gets what is left, most
#                                      important first): the SDPA kernel sweep, eager, ours vs
#                                      Marian (Transformer-base at 25k tokens, the Multi30k
#                                      config at 4k; also ours with bf16-weights and on packed
#                                      rows, trainer.packed_rows); each attention call's
#                                      kernels against variable-length flash on the real
#                                      tokens and packed rows (bench/attention_kernels.py);
#                                      profiles of our Transformer-base step, autocast,
#                                      bf16-weights and packed rows of 128 (GPU time by kind
#                                      of kernel); the Multi30k
#                                      config at 4k through CUDA graphs (reduce-overhead; ours,
#                                      Marian, ours with bf16-weights); Transformer-base at 25k
#                                      (and in rows of 128) through torch.compile; the
#                                      profile and the compiled runs
#                                      use the kernels that won the sweep (bench/fastest_sdpa.py).
#                                      The device call:
#                                      bash scripts/gpu_bench.sh next 2>&1 | tee $OUT/next.log
#                                      with carry [.whl, .gpudata] and timeout_s 590
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
step() { echo "== $(date +%T) $*"; timeout -k 10 "$@"; echo "== rc $?"; pack; }
case "${1:-speed}" in
next)
  deadline=$(($(date +%s) + ${BUDGET_S:-540}))
  # step with at most $1 seconds, or what is left of the budget; skipped under 20 s
  within() {
    local cap=$1 left=$((deadline - $(date +%s)))
    shift
    ((left < cap)) && cap=$left
    if ((cap < 20)); then echo "== skipped, ${cap}s left: $*"; else step "$cap" "$@"; fi
  }
  # tokens per batch, Transformer-base (TB) and the Multi30k config (MT); STEPS, WARMUP:
  # smaller for a dry run on the CPU
  tb=${TB_TOKENS:-25000} mt=${MT_TOKENS:-4096}
  steps="--steps ${STEPS:-20} --warmup ${WARMUP:-3}"
  sweep="--sdpa flash+efficient,flash,efficient,math,cudnn $steps"
  tb_md="results/bench/train_speed_${gpu}_sdpa_base.md"
  mt_md="results/bench/train_speed_${gpu}_sdpa_small.md"
  # --ablate: also ours with the loss fused (off on GPUs); --bf16-weights: ours with
  # trainer.precision=bf16-weights (bench/host_overhead.py: 20% fewer launches per step)
  # --packed-rows: also ours on the same batches, several pairs to a row (trainer.packed_rows)
  within 120 python3 bench/train_speed.py --configs transformer-base --max-tokens "$tb" \
    $sweep --ablate --bf16-weights --packed-rows 128,256 --out "$tb_md"
  within 90 python3 bench/train_speed.py --configs multi30k-default --max-tokens "$mt" \
    $sweep --bf16-weights --packed-rows 128 --out "$mt_md"
  # the fastest setting for ours ('' = torch's own pick, also when the sweep has no row)
  tb_sdpa=$(python3 bench/fastest_sdpa.py "$tb_md" transformer-base "$tb") || tb_sdpa=
  mt_sdpa=$(python3 bench/fastest_sdpa.py "$mt_md" multi30k-default "$mt") || mt_sdpa=
  echo "== fastest SDPA kernels: transformer-base '$tb_sdpa', multi30k-default '$mt_sdpa'"
  # each attention call of a Transformer-base step through each kernel, through the
  # variable-length flash kernel on the real tokens only, and on packed rows (would packing pay?)
  within 50 python3 bench/attention_kernels.py --config transformer-base --max-tokens "$tb" \
    --out "results/bench/attention_kernels_${gpu}.md"
  # where the time of ours goes, by kind of kernel (what the MFU misses)
  # (autocast, then bf16-weights; each model's section is saved as it is measured)
  within 75 python3 bench/profile_step.py --config transformer-base --max-tokens "$tb" \
    --models ours,ours/bf16-weights,ours/rows-128 ${tb_sdpa:+--sdpa "$tb_sdpa"} \
    --out "results/bench/profile_${gpu}_fastest.md"
  within 200 python3 bench/train_speed.py --compiled-only --compile-mode reduce-overhead \
    ${mt_sdpa:+--sdpa "$mt_sdpa"} --configs multi30k-default --max-tokens "$mt" $steps \
    --bf16-weights --out "results/bench/train_speed_${gpu}_graphs.md"
  within 300 python3 bench/train_speed.py --compiled-only ${tb_sdpa:+--sdpa "$tb_sdpa"} \
    --configs transformer-base --max-tokens "$tb" $steps --packed-rows 128 \
    --out "results/bench/train_speed_${gpu}_compile.md"
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
*) echo "usage: bash scripts/gpu_bench.sh next|speed|compile|graphs|eager"; exit 2 ;;
esac
pack
