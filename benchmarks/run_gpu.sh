#!/usr/bin/env bash
# The GPU measurements in README.md, on the device machine after MLX's CUDA build is installed
# into /tmp/site (../shared/tools/gpu-mlx-prepare.sh). mlx-audio comes as a wheel in .whl/.
# Makes the full-size random checkpoint there, converts it to bf16 and 5-bit, and benchmarks both:
#   PART=latency    batch 1 at 5, 24.9 and 60 s (PEER=1: mlx-audio beside), then the host cost of one kernel and
#                   per pass the host/GPU split, kernel count and peak memory (also without CUDA graphs), MLX's
#                   quantized matmul against dequantize + matmul, and the measurements behind two GPU choices
#   PART=throughput 256 LibriSpeech-like clips at batch sizes 32 and 128, 1024 at 128
#   PART=graphs     batch 1 end to end with MLX's CUDA graphs on (its default) and off, alternating, twice
set -euo pipefail
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-/tmp/bench_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -d /tmp/ckpt ] || python3 benchmarks/make_random_checkpoint.py --out /tmp/ckpt
[ -d /tmp/bf16 ] || python3 convert.py --hf-path /tmp/ckpt --mlx-path /tmp/bf16
[ -d /tmp/q5 ] || python3 convert.py --hf-path /tmp/ckpt --mlx-path /tmp/q5 -q
case "${PART:-latency}" in
latency)
  for model in q5 bf16; do
    python3 benchmarks/bench.py --model /tmp/$model --seconds 5 24.9 60 --reps 10 ${PEER:+--peer} 2>/dev/null | tee -a "$out/bench_gpu.jsonl"
  done
  python3 benchmarks/gpu_overhead.py /tmp/bf16 --seconds 5 24.9 60 | tee "$out/gpu_overhead.txt"
  MLX_USE_CUDA_GRAPHS=0 python3 benchmarks/gpu_overhead.py /tmp/bf16 --seconds 24.9 | tee "$out/gpu_overhead_nographs.txt"
  python3 benchmarks/quantized_matmul.py | tee "$out/quantized_matmul.jsonl"
  python3 benchmarks/gpu_choices.py /tmp/bf16 | tee "$out/gpu_choices.jsonl"
  ;;
throughput)
  for model in bf16 q5; do
    python3 benchmarks/bench.py --model /tmp/$model --clips 256 --batch-sizes 32 128 2>/dev/null | tee -a "$out/throughput_gpu.jsonl"
    python3 benchmarks/bench.py --model /tmp/$model --clips 1024 --batch-sizes 128 2>/dev/null | tee -a "$out/throughput_gpu.jsonl"
  done
  ;;
graphs)
  for round in 1 2; do
    for graphs in 1 0; do
      for model in bf16 q5; do
        MLX_USE_CUDA_GRAPHS=$graphs python3 benchmarks/bench.py --model /tmp/$model --seconds 5 24.9 60 --reps 10 2>/dev/null \
          | sed "s/^/graphs=$graphs round=$round /" | tee -a "$out/graphs.txt"
      done
    done
  done
  ;;
esac
