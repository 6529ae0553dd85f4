#!/usr/bin/env bash
# The GPU machine's command: `bash bench/run_gpu_check.sh [gpu_check.py options]`, from the repository root.
# The machine has python3 with torch (CUDA), transformers, accelerate, sentence-transformers and pyarrow; what it
# lacks travels as wheels in .whl/ (filled by shared/gpu/wheels.sh; ignored by git) and is installed into /tmp/site.
# Results (gpu_check_<card>.md, .json, .log) go to $OUT when it is set, else to bench/results/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_BUILD_OPS=0
export ARK_HF_GPU_CHECK_LAUNCHER="bash bench/run_gpu_check.sh $*"
exec python3 bench/gpu_check.py --out "${OUT:-bench/results}" "$@"
