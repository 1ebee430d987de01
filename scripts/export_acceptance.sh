#!/usr/bin/env bash
# Issue 10's acceptance figures, from scratch: the full Fashion-MNIST MLP and CNN recipes, run and exported
# in every format, then checked by scripts/export_acceptance.py (which prints each figure beside its goal).
# Needs the onnx extra and Debian's dataset-fashion-mnist; about an hour on a 2-core CPU (the CNN recipe
# takes most of it). Usage: scripts/export_acceptance.sh [WORK_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-export-acceptance}"
mkdir -p "$work" && cd "$work"
[ -f fashion-mnist-mlp.yaml ] || kdc recipes copy fashion-mnist-mlp
[ -f fashion-mnist-cnn.yaml ] || kdc recipes copy fashion-mnist-cnn
kdc run fashion-mnist-mlp.yaml            # its export section writes sparse and 4-bit shared files
kdc export runs/fashion-mnist-mlp --format sparse --dtype fp32
for bits in 2 3 8; do kdc export runs/fashion-mnist-mlp --format shared --bits "$bits"; done
kdc export runs/fashion-mnist-mlp --format onnx
kdc run fashion-mnist-cnn.yaml
kdc export runs/fashion-mnist-cnn --format int8 --format onnx
python "$here/export_acceptance.py" --mlp runs/fashion-mnist-mlp --cnn runs/fashion-mnist-cnn
