"""How far convert.py's editor quantization moves the editor, per bits and group size, against bf16.

    python benchmarks/quant_drift.py --model DIR [--bits 4 5 6 8] [--group-sizes 32 64 128] [--seconds 10] [--hyp-tokens K]
    python benchmarks/quant_drift.py --check-size QDIR    # the size formula against a real quantized conversion

DIR is a bf16 convert.py output (a full-size random one: make_random_checkpoint.py, then convert.py).
Per setting it prints one JSON line, then a Markdown table: model.safetensors size, the editor's
logit relative error max|q - ref| / max|ref| over the text rows, the fraction of text rows whose
argmax agrees, and whether the final ids (CTC collapse of the argmax) are identical (with their
Levenshtein distance).

On random weights the editor's outputs are arbitrary: these numbers measure the numerical drift
that quantizing the weights causes, not word error rate.

Method, on float32 compute: the model is loaded once; the audio embeddings are computed once from
benchmarks/bench.py's synthetic audio (GraniteNAR._encode_graph: encode() without its compiled
trace), and the hypothesis is K fixed tokens (as in bench.py). For each setting, every editor Linear
and the tied embedding (what convert.quantize(..., scope="editor") quantizes) is replaced by
mx.dequantize(*mx.quantize(W_bf16)) with bf16 scales and biases, as convert.py stores them, upcast
to float32; test_granite_nar.py proves the quantized editor equals this float editor to float32
noise, and on the CPU it is ~40x faster than MLX's quantized matmul.
Every run, the reference included, goes through the uncompiled GraniteNAR._edit_graph (the compiled
edit() captures the weights of its first trace).

Memory (a float32 2B model is 9 GB, and granite_nar.load's float32 cast peaks at ~13 GB): the model is
loaded in bf16, as stored; the encoder, projector and norms are cast to float32 (exact) and dropped
after encoding; the editor matrices stay bf16, the originals. Every run gets float32 matrices as lazy
inputs of the editor graph (the originals upcast for the reference, a setting's dequantized packed
weights otherwise), and the module attributes are put back before the graph is evaluated, so each
float32 matrix exists only while its layer runs (the embedding's for the whole pass: lookup and head).
The float32 editor is therefore exactly granite_nar.load(DIR)'s on the CPU; peak ~7 GB.

Sizes are computed, not written: float tensors at 2 bytes (bf16), a quantized (out, in) matrix at
out * in * bits / 8 bytes of packed uint32 plus a bf16 scale and bias per group; tensor bytes of
model.safetensors, without its JSON header (~0.1 MB). They are checked against convert.quantize
applied to an unevaluated model of the same config, and --check-size checks them against a file.
"""

import argparse
import json
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import granite_nar as g  # noqa: E402  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from benchmarks.bench import synthetic_audio  # noqa: E402
from convert import quantize  # noqa: E402

FLOAT_BYTES = 2  # convert.py keeps the checkpoint's bf16
# MLX's CPU dequantize builds temporaries of ~6x its float32 output at 5 and 6 bits (5 GB for the embedding)
CHUNK = 1 << 23


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def editor_matrices(model):
    """model path -> module, for every nn.Linear / nn.Embedding under model.editor."""
    return {f"editor.{p}": m for p, m in model.editor.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def size_bytes(model, bits=None, group_size=None):
    """Tensor bytes of the model.safetensors convert.py writes from a bf16 checkpoint (bits None: unquantized)."""
    quantized = {f"{p}.weight" for p in editor_matrices(model)} if bits else set()
    total = 0
    for name, value in tree_flatten(model.parameters()):
        if name in quantized:
            out_dim, in_dim = value.shape
            assert in_dim % group_size == 0 and (in_dim * bits) % 32 == 0, (name, value.shape)
            total += out_dim * in_dim * bits // 8  # packed uint32: out * in * bits / 32 words
            total += 2 * out_dim * (in_dim // group_size) * FLOAT_BYTES  # bf16 scales and biases
        else:
            total += value.size * FLOAT_BYTES
    return total


def convert_quantize_bytes(config, bits, group_size):
    """The same size from convert.quantize's own modules, on a model that is never evaluated (shapes only)."""
    model = g.GraniteNAR(g.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    if bits:
        quantize(model, bits, group_size, "editor")
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def stored_tensor_bytes(weights_file):
    """{name: (dtype, bytes)} from a safetensors header, without reading the tensors."""
    with open(weights_file, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def check_size(q_dir):
    """Formula on a shapes-only model of q_dir's config vs the tensor bytes of its model.safetensors."""
    config = g.read_config(q_dir)
    q = config.get("quantization")
    if not q or q.get("scope", "editor") != "editor":
        sys.exit(f"error: {q_dir} is not an editor-scope quantized conversion (quantization: {q})")
    model = g.GraniteNAR(g.ModelArgs.from_dict(config))  # never evaluated: only shapes are read
    formula = size_bytes(model, q["bits"], q["group_size"])
    stored = sum(v.nbytes for v in mx.load(str(Path(q_dir) / "model.safetensors")).values())
    row = {"check": str(q_dir), "bits": q["bits"], "group_size": q["group_size"], "formula_bytes": formula, "stored_tensor_bytes": stored,
           "file_bytes": (Path(q_dir) / "model.safetensors").stat().st_size, "equal": formula == stored}  # fmt: skip
    print(json.dumps(row))
    sys.exit(0 if formula == stored else 1)


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def run_editor(model, matrices, weight_of, audio_embeds, slots):
    """model._edit_graph with each editor matrix p set to weight_of(p) (a float32 array, usually lazy) while the
    graph is built; the current ones are back in place before it is evaluated, and nothing else holds the
    lazy ones, so each is computed when its layer needs it and freed after."""
    current = {p: m.weight for p, m in matrices.items()}
    try:
        for p, m in matrices.items():
            m.weight = weight_of(p)
        logits = model._edit_graph(audio_embeds, slots)
    finally:
        for p, m in matrices.items():
            m.weight = current[p]
    mx.eval(logits)
    return np.array(logits)


def quantize_all(originals, bits, group_size):
    """(packed uint32, bf16 scales, bf16 biases) of every matrix, as convert.py stores them, materialized one by one."""
    packed = {}
    for p, w in originals.items():
        packed[p] = mx.quantize(w, group_size, bits)  # w is bf16: scales and biases come out bf16
        mx.eval(packed[p])
    return packed


def dequantized(packed, bits, group_size):
    """p -> the float32 matrix the quantized layer computes with (scales and biases upcast): lazy, except a
    matrix over CHUNK elements (the embedding), which is materialized CHUNK elements at a time."""

    def weight_of(p):
        wq, scales, biases = packed[p]
        rows = max(1, CHUNK // (wq.shape[1] * 32 // bits))
        part = lambda i: mx.dequantize(  # noqa: E731  (row blocks: dequantize is elementwise, so bit-identical)
            wq[i : i + rows], scales[i : i + rows].astype(mx.float32), biases[i : i + rows].astype(mx.float32), group_size, bits
        )
        if wq.shape[0] <= rows:
            return part(0)
        parts = []
        for i in range(0, wq.shape[0], rows):
            parts.append(part(i))
            mx.eval(parts[-1])
        return mx.concatenate(parts)

    return weight_of


def compare(ref, logits, blank):
    ref_top, top = ref.argmax(-1), logits.argmax(-1)
    ref_ids, ids = g.ctc_collapse(ref_top, blank), g.ctc_collapse(top, blank)
    return {
        "rel_err": float(np.abs(logits - ref).max() / np.abs(ref).max()),
        "top1_agree": float((ref_top == top).mean()),
        "final_ids_equal": ids == ref_ids,
        "final_ids_edit_distance": levenshtein(ref_ids, ids),
        "final_len": len(ids),
        "final_len_ref": len(ref_ids),
    }


def table(rows):
    lines = ["| bits | group | size (GB) | logit rel. err | top-1 agreement | final ids equal |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["bits"] is None:
            lines.append(f"| bf16 | - | {r['size_gb']:.3f} | 0 | 1 | yes |")
        else:
            equal = "yes" if r["final_ids_equal"] else f"no (edit distance {r['final_ids_edit_distance']} / {r['final_len_ref']})"
            lines.append(f"| {r['bits']} | {r['group_size']} | {r['size_gb']:.3f} | {r['rel_err']:.2e} | {r['top1_agree']:.3f} | {equal} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="bf16 convert.py output directory")
    parser.add_argument("--bits", type=int, nargs="+", choices=[4, 5, 6, 8], default=[4, 5, 6, 8])
    parser.add_argument("--group-sizes", type=int, nargs="+", choices=[32, 64, 128], default=[32, 64, 128])
    parser.add_argument("--settings", nargs="+", metavar="BITS:GROUP", help="explicit (bits, group) pairs instead of the grid, e.g. 4:64 5:32")
    parser.add_argument("--seconds", type=float, default=10.0, help="synthetic clip length (default 10)")
    parser.add_argument("--hyp-tokens", type=int, help="hypothesis length (default: round(2.8 x seconds))")
    parser.add_argument("--check-size", type=Path, metavar="QDIR", help="only check the size formula against a quantized convert.py output")
    args = parser.parse_args()
    if args.check_size:
        return check_size(args.check_size)
    if not args.model:
        parser.error("--model is required (or --check-size)")
    if args.settings:
        settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    else:
        settings = [(b, gs) for b in args.bits for gs in args.group_sizes]
    start = time.perf_counter()

    config = g.read_config(args.model)
    if config.get("quantization"):
        sys.exit(f"error: {args.model} is already quantized: give the bf16 conversion")
    stored = stored_tensor_bytes(args.model / "model.safetensors")
    if {dtype for dtype, _ in stored.values()} != {"BF16"}:
        sys.exit(f"error: {args.model}/model.safetensors is not all bf16 (convert.py without --dtype keeps the checkpoint's bf16)")

    log(f"loading {args.model}")
    # Loaded as stored (bf16, 4.5 GB: a float32 load peaks at ~13 GB), then everything but the editor matrices
    # goes to float32; those stay bf16, the originals, and every run upcasts or dequantizes them lazily.
    model, _ = g.load(args.model, dtype=mx.bfloat16)
    matrices = editor_matrices(model)
    originals = {p: m.weight for p, m in matrices.items()}
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in params if k.removesuffix(".weight") not in matrices]))
    del params
    mx.eval(model.parameters())
    assert model.dtype == mx.float32 and all(w.dtype == mx.bfloat16 for w in originals.values())
    log(f"loaded in {time.perf_counter() - start:.0f} s, active memory {mx.get_active_memory() / 1e9:.2f} GB")
    blank = model.args.blank_token_id
    sizes = {None: size_bytes(model)}
    assert sizes[None] == sum(n for _, n in stored.values()), "bf16 size formula != stored tensor bytes"
    for bits, group_size in settings:
        sizes[(bits, group_size)] = size_bytes(model, bits, group_size)
        assert sizes[(bits, group_size)] == convert_quantize_bytes(config, bits, group_size), (bits, group_size)

    n_tokens = args.hyp_tokens if args.hyp_tokens is not None else round(2.8 * args.seconds)
    # bench.py's fixed tokens (random weights make the model's own hypothesis arbitrary); the modulo only
    # matters for a tiny test vocabulary (an out-of-range id would gather garbage)
    hypothesis = [(1000 + 7 * i % 5000) % model.args.editor.vocab_size for i in range(n_tokens)]
    slots = mx.array(g.insert_slots(hypothesis, blank, model.args.min_edit_sequence_length), dtype=mx.int32)
    tic = time.perf_counter()
    features = g.log_mel(synthetic_audio(args.seconds))
    _, audio_embeds = model._encode_graph(features)  # encode() uncompiled: no trace holds the weights
    mx.eval(audio_embeds)
    log(f"encoded {args.seconds:g} s: {audio_embeds.shape[0]} audio rows + {slots.size} text slots ({time.perf_counter() - tic:.1f} s)")
    model.encoder, model.projector = nn.Module(), nn.Module()  # the editor alone from here on
    mx.clear_cache()
    log(f"active memory without the encoder: {mx.get_active_memory() / 1e9:.2f} GB")

    tic = time.perf_counter()
    mx.reset_peak_memory()
    ref = run_editor(model, matrices, lambda p: originals[p].astype(mx.float32), audio_embeds, slots)
    log(f"reference editor pass: {time.perf_counter() - tic:.1f} s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB")

    base = {"seconds_audio": args.seconds, "hyp_tokens": n_tokens, "text_rows": ref.shape[0]}
    rows = [{"bits": None, "group_size": None, **base, "size_bytes": sizes[None], "size_gb": sizes[None] / 1e9}]
    print(json.dumps(rows[0]), flush=True)
    for bits, group_size in settings:
        tic = time.perf_counter()
        mx.reset_peak_memory()
        packed = quantize_all(originals, bits, group_size)
        logits = run_editor(model, matrices, dequantized(packed, bits, group_size), audio_embeds, slots)
        del packed
        mx.clear_cache()
        row = {"bits": bits, "group_size": group_size, **base, "size_bytes": sizes[(bits, group_size)],
               "size_gb": sizes[(bits, group_size)] / 1e9, **compare(ref, logits, blank)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        log(f"{bits} bits, group {group_size}: {time.perf_counter() - tic:.1f} s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
    assert all(m.weight is originals[p] for p, m in matrices.items())  # every run put the originals back
    log(f"total {time.perf_counter() - start:.0f} s")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
