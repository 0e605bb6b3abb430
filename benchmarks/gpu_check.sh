#!/usr/bin/env bash
# The device check for a session that is lent a CUDA GPU: one prepared script, so that the
# 15 minutes of device time go to measuring, not to setting up. It needs only python3 with
# torch (CUDA), numpy, tifffile and pytest, which the GPU machine's image has; napari is not
# needed (tests/core only). The shared stacks do not travel with the checkout: copy them into
# an ignored folder that the run carries, e.g. here
#     echo /.gpudata/ >> .git/info/exclude; mkdir -p .gpudata; cp ../shared/data/*.tif .gpudata/
# then run  bash benchmarks/gpu_check.sh .gpudata  with carry [".gpudata"] (timeout ~500 s).
# What it writes goes to $OUT (the device tool's folder) or /tmp/gpu_check.
set -u -o pipefail
DATA=${1:-.gpudata}
DEST=${OUT:-/tmp/gpu_check}
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  nproc; date -u; } 2>&1 | tee "$DEST/machine.txt"
# the CUDA test (same seed, CPU vs CUDA) and the rest of the core tests on this machine
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/core 2>&1 | tee "$DEST/pytest_core.log"
# seconds per section and GPU memory for 30 x 512^2, 8 and 20 x 1024^2 (cold and warm)
timeout 240 python3 benchmarks/bench_speed.py --plan gpu --device cuda --data "$DATA" \
    --output speed_cuda.json 2>&1 | tee "$DEST/bench_speed.log"
cp benchmarks/results/speed_cuda.json "$DEST/" 2>/dev/null || true
