#!/usr/bin/env bash
# Run here (not on the GPU machine), from the repo root, once per checkout, before the first
# device call of scripts/gpu_{bench,recipe,job}.sh: fetches the wheels the GPU image lacks into
# .whl/ (git-ignored) and copies Multi30k into .gpudata/ (git-ignored); every device call then
# names both in `carry`. The image has torch, sentencepiece, sacrebleu, tqdm, transformers,
# pyarrow, pandas, fsspec, huggingface-hub, xxhash (/work/.library/device/KINDS.md), not
# hydra-core, omegaconf or datasets; the versions below are the ones this repo is tested with.
# Check there with: source scripts/gpu_env.sh && python3 -c "import hydra, datasets"
set -eu
cd "$(git rev-parse --show-toplevel)"
# (checked before .whl/ goes: without ../shared a GPU call would carry an empty .whl/ and
# fail on its install, after the machine took minutes to start)
[ -x ../shared/gpu/wheels ] && [ -d ../shared/data/multi30k ] || {
  echo "gpu_prepare.sh needs ../shared/gpu/wheels and ../shared/data/multi30k" >&2; exit 1; }
rm -rf .whl
mkdir -p .git/info  # the wheels script notes .whl/ there; a fresh clone may lack the folder
../shared/gpu/wheels hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
rm -rf .gpudata && mkdir -p .gpudata && cp -r ../shared/data/multi30k .gpudata/
du -sh .whl .gpudata
