# Sourced by the GPU scripts, from the repo root: installs the carried wheels (.whl/: hydra-core,
# omegaconf, datasets, ...) into /tmp/site, unless SKIP_INSTALL=1 (a dry run on a machine that
# has the packages, or a second script in the same call), and sets the environment they run
# in: Multi30k from .gpudata/, no Hub, the caches under /tmp, results under $OUT.
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export MT_DATA_DIR=$PWD/.gpudata HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export MT_CACHE_DIR=${MT_CACHE_DIR:-/tmp/mtcache}
OUT=${OUT:-/tmp/out}
