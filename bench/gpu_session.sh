#!/usr/bin/env bash
# One device session: install, GPU benchmark, GPU trainer runs (CLIP vs SuperCLIP). Writes into $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation . 2>&1 | tail -2
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/run.py --device cuda --idf-captions 0 --fused-head-update --output "$OUT/bench_gpu.md" 2>&1 | grep -v Warning | tail -15
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
from pathlib import Path
from trainer_utils import make_wds
print(make_wds(Path("/tmp/wds224"), n=1024, shards=8, size=224))
print(make_wds(Path("/tmp/wds64"), n=1024, shards=8, size=64))
PY
run() {  # name model size batch steps extra...
  local name=$1 model=$2 size=$3 batch=$4 steps=$5; shift 5
  torchrun --nproc_per_node 1 bench/peak_memory.py --model "$model" --train-data "/tmp/wds$size/{000000..000007}.tar" \
    --dataset-type webdataset --dataset-resampled --train-num-samples $((batch * steps)) --batch-size "$batch" \
    --epochs 1 --workers 8 --precision amp_bf16 --lr 1e-4 --warmup 10 --log-every-n-steps 25 --report-to '' \
    --logs-dir /tmp/gpulogs --name "$name" --seed 0 "$@" > "/tmp/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E "Train Epoch.*100%|PEAK_CUDA|Error" "/tmp/$name.log" | tail -3
  grep "Train Epoch" "/tmp/$name.log" | tail -4 | sed -E 's/.*Batch \(t\): ([0-9.]+).*/batch_time \1/' | tr '\n' ' '; echo
  cp "/tmp/$name.log" "$OUT/$name.log" 2>/dev/null
}
run tiny_clip SuperCLIP-ViT-Tiny 64 256 300 --superclip-lambda 0
run tiny_superclip SuperCLIP-ViT-Tiny 64 256 300
run b16_clip SuperCLIP-ViT-B-16 224 256 200 --superclip-lambda 0
run b16_superclip SuperCLIP-ViT-B-16 224 256 200
