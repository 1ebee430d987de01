#!/usr/bin/env bash
# The CUDA check for a lent GPU machine (see the device tool): quickstart on cuda, in fp32 and in
# bf16 + channels_last, then the benchmark with --device cuda. Run from the repository root;
# .gpu-data/ must hold Debian's four Fashion-MNIST .gz files (the GPU machine has no network).
# Results go to $OUT (or ./gpu-out).
set -uo pipefail
REPO=$PWD
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision, typer, rich, yaml; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
mkdir -p /usr/share/datasets/fashion-mnist && cp "$REPO"/.gpu-data/*.gz /usr/share/datasets/fashion-mnist/ 2>/dev/null
WORK=$(mktemp -d) && cd "$WORK"
for variant in "fp32" "bf16"; do
  extra=(); [ "$variant" = bf16 ] && extra=(--set run.precision=bf16 --set run.channels_last=true)
  start=$(date +%s.%N)
  python3 -m kdcompress run --set run.device=cuda --set "run.name=qs-cuda-$variant" "${extra[@]}" \
    > "$OUT/quickstart-$variant.txt" 2> "$OUT/quickstart-$variant.log"
  rc=$?
  echo "quickstart $variant: exit $rc, $(python3 -c "import time; print(round(time.time() - $start, 1))") s" | tee -a "$OUT/gpu.txt"
  grep -E "epoch .*/|test accuracy" "$OUT/quickstart-$variant.log" | grep -E "epoch 1/|epoch 2/|test accuracy" | head -20
  cat "$OUT/quickstart-$variant.txt"
done
timeout 300 python3 "$REPO/scripts/bench.py" --device cuda --json-out "$OUT/bench-cuda.json" | tee "$OUT/bench-cuda.txt"
echo "bench exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu.txt"
