"""MLX's quantized matmul against dequantize-then-matmul, at the editor's shapes and several row counts.
One JSON line per case: milliseconds per product for each, timed over a chain of products (one launch each).

    python benchmarks/quantized_matmul.py [--bits 5] [--group-size 64]
"""
import argparse
import json
import statistics
import time

import mlx.core as mx

SHAPES = {"qkv_proj": (2560, 2048), "o_proj": (2048, 2048), "gate_up_proj": (8192, 2048), "down_proj": (2048, 4096)}
CHAIN = 40  # products per timing, as many as editor layers


def timed(fn, reps=10):
    fn()
    mx.synchronize()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times) / CHAIN


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    for name, (n_out, n_in) in SHAPES.items():
        w = (mx.random.normal((n_out, n_in)) * 0.02).astype(mx.bfloat16)
        q, scales, biases = mx.quantize(w, args.group_size, args.bits)
        for rows in (16, 64, 128, 390, 1024, 4096):
            x = mx.random.normal((rows, n_in)).astype(mx.bfloat16)
            mx.eval(q, scales, biases, x)
            quantized = lambda: [mx.quantized_matmul(x, q, scales, biases, True, args.group_size, args.bits) for _ in range(CHAIN)]  # noqa: E731
            dequantized = lambda: [x @ mx.dequantize(q, scales, biases, args.group_size, args.bits).T for _ in range(CHAIN)]  # noqa: E731
            bf16 = lambda: [x @ w.T for _ in range(CHAIN)]  # noqa: E731
            row = {"shape": name, "rows": rows, "quantized_ms": round(timed(quantized), 4),
                   "dequantize_matmul_ms": round(timed(dequantized), 4), "bf16_ms": round(timed(bf16), 4)}  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
