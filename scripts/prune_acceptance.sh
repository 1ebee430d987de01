#!/usr/bin/env bash
# Issue 9's measured acceptance, rerunnable: the product's own commands on the built-in quickstart, in a fresh
# directory, then (with --cnn) `kdc run` of the shipped CNN recipe on full Fashion-MNIST (about half an hour on
# a 2-core CPU; needs the data: apt-get install dataset-fashion-mnist). Prints each command's exit code and time,
# and the report's figures. Usage: scripts/prune_acceptance.sh [--cnn] [WORKDIR]
set -uo pipefail
CNN=0; [ "${1:-}" = "--cnn" ] && { CNN=1; shift; }
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK" && cd "$WORK" || exit 1
# no OMP_WAIT_POLICY here: training runs as users run it, and `kdc report` times latency in its own process
step() {  # run one kdc command, print its exit code and wall time
  local start=$(date +%s.%N)
  kdc "$@" > "log-$(echo "$*" | tr ' /' '__').txt" 2>&1
  local rc=$?
  echo "kdc $*: exit $rc, $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
}
echo "working in $WORK"
step train-teacher; step train-student; step distill; step prune --rate 0.05; step report runs/quickstart
python3 - <<'PY'
import json
rows = {r["stage"]: r for r in json.load(open("runs/quickstart/report.json"))["stages"]}
p, d = rows["pruned"], rows["distilled"]
print(f"quickstart pruned: sparsity {p['sparsity']:.4f} (target {p['target_sparsity']}), accuracy {p['accuracy']:.4f} "
      f"vs distilled {d['accuracy']:.4f} ({(p['accuracy'] - d['accuracy']) * 100:+.2f} points)")
PY
if [ "$CNN" = 1 ]; then
  kdc recipes copy fashion-mnist-cnn --force > /dev/null 2>&1
  step run fashion-mnist-cnn.yaml
  python3 - <<'PY'
import json
report = json.load(open("runs/fashion-mnist-cnn/report.json"))
rows = {r["stage"]: r for r in report["stages"]}
p, d = rows["pruned"], rows["distilled"]
print(f"cnn: threads {report.get('threads')}; pruned channel sparsity {p.get('channel_sparsity')}")
print(f"cnn: MACs {d['macs']:,} -> {p['macs']:,} ({d['macs'] / p['macs']:.2f}x fewer)")
print(f"cnn: latency batch 64 {d['latency_ms']['64']:.2f} -> {p['latency_ms']['64']:.2f} ms "
      f"({d['latency_ms']['64'] / p['latency_ms']['64']:.2f}x lower)")
print(f"cnn: accuracy distilled {d['accuracy']:.4f}, pruned {p['accuracy']:.4f} "
      f"({(p['accuracy'] - d['accuracy']) * 100:+.2f} points); stage seconds "
      + ", ".join(f"{r['stage']} {r['train_seconds']:.0f}" for r in report["stages"]))
PY
fi
