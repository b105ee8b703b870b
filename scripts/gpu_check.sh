#!/usr/bin/env bash
# The GPU checks of issue 18, in one go, for a session that has a GPU (an H200) for a few minutes.
# Run from the repository root:  scripts/gpu_check.sh [--dry-run]
# Writes under $OUT (the device machine's result folder; ./gpu-check-out when unset), at most
# 6 files, at most 2 levels down:
#   nvidia-smi.txt      the device
#   decode.json         scripts/gpu_check.py: CUDA vs CPU tokens, syncs per document (counted and
#                       torch's sync detector), dst at base in bf16 with 64 documents in flight:
#                       sync_every 1 / 8 / 8 + CUDA graphs (docs/s, step ms, peak memory)
#   decode.log          its output
#   bench_dst_base.json pidec bench --device cuda --dtype bfloat16 --model-size base --workload dst --docs 64
#   bench.log           its table
#   pytest.log          the CUDA-only tests (skipped on the CPU) and the sync tests
# Budget: under 8 minutes in all (each step has its own timeout; one failing does not stop the rest).
# --dry-run: on the CPU, the Python part only with a tiny model (checks the script, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--dry-run" ]; then
  exec timeout 600 "$PY" scripts/gpu_check.py --dry-run --out "$OUT/decode.json"
fi
start=$(date +%s)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, transformers, typer; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$OUT/nvidia-smi.txt" 2>&1
timeout 200 "$PY" scripts/gpu_check.py --out "$OUT/decode.json" --size base --docs 64 > "$OUT/decode.log" 2>&1
echo "gpu_check.py: rc $? after $(( $(date +%s) - start )) s"
timeout 180 "$PY" -m pidec bench --device cuda --dtype bfloat16 --model-size base --workload dst --docs 64 \
  --repeats 1 --configs hf-pie,pidec-pid --json "$OUT/bench_dst_base.json" > "$OUT/bench.log" 2>&1
echo "bench: rc $? after $(( $(date +%s) - start )) s"
timeout 80 "$PY" -m pytest tests/test_decode_buckets.py tests/test_decode_sync.py -q -p no:cacheprovider -x \
  > "$OUT/pytest.log" 2>&1
echo "pytest: rc $? after $(( $(date +%s) - start )) s"
tail -n 3 "$OUT/pytest.log"
grep -E "pidec-pid|hf-pie" "$OUT/bench.log" | head -n 4
