#!/usr/bin/env bash
# One short GPU window (< 11 minutes): the GPU attention tests, then every figure of experiments/bench_accelerator.py, written to
# $OUT as each part ends, plus the device's name. Run it from the repository root on the lent machine
# (the `run` device tool: carry [".gpu"]); the machine is offline, so versions its image lacks come
# as wheels prepared here first:
#   mkdir -p .gpu/wheels && echo "/.gpu/" >> .git/info/exclude
#   pip download --no-deps -d .gpu/wheels flax==0.12.12
set -uo pipefail
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD"
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  pip install -q --no-deps --target "$PWD/.site" .gpu/wheels/*.whl && export PYTHONPATH="$PWD/.site:$PWD"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"
# The fused (cuDNN) attention against the XLA path, every mask kind: `auto` may only pick cuDNN
# (attention_kernels.AUTO_ATTENTION) once this passes on a real GPU.
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_attention_gpu.py 2>&1 \
  | tee "$out/fused_attention_gpu.log" | tail -3
# Each part has its own timeout inside (bench_accelerator.PART_TIMEOUT_S, 470 s in all); this one is a backstop.
# The compilation cache lives outside $OUT (it is large): a rerun on the still-warm machine reuses it.
timeout 500 python3 experiments/bench_accelerator.py --cache-dir "${XLA_CACHE:-/tmp/fipo_xla_cache}" \
  --out "$out/accelerator.json" 2>&1 | tee "$out/accelerator.log"
