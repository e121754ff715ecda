r"""How far convert.py's editor quantization moves the editor's logits, per bits and group size.

    python benchmarks/quant_drift.py --model DIR [--bits 4 5 6 8] [--group-sizes 32 64 128] \
        [--seconds 10]

DIR is a bf16 convert.py output (make_random_checkpoint.py, then convert.py). One JSON line per
setting, then a Markdown table: model.safetensors' tensor bytes, the editor's logit error
max |q - ref| / max |ref| over the text rows, the share of rows whose argmax agrees, and whether
the final ids (CTC collapse of the argmax) are the same.

Random weights make this numerical drift, not word error rate. Everything runs in float32: the
reference is the bf16 editor upcast; a setting replaces every editor Linear and the tied
embedding (what convert.py quantizes) by dequantize(quantize(W)) with bf16 scales and biases, as
convert.py stores them (test_granite_nar.py shows the quantized model computes exactly that).
Peak memory: the float32 model plus one setting's dequantized editor.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import granite_nar as g  # noqa: E402  (first: it loads OpenBLAS before MLX)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from clips import fixed_hypothesis, synthetic_audio  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402


def editor_logits(model, audio_embeds, text_ids, weights=None):
    """The editor's text logits (float32 numpy), its matrices replaced by `weights` (path ->
    lazy array) while the graph is built: each replacement is computed when its layer runs."""
    modules = dict(model.editor.named_modules())
    originals = {p: modules[p].weight for p in weights or {}}
    for p, w in (weights or {}).items():
        modules[p].weight = w
    logits = model.edit(audio_embeds, text_ids)[0]
    for p, w in originals.items():
        modules[p].weight = w
    return np.array(logits)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="bf16 convert.py output")
    parser.add_argument("--bits", type=int, nargs="+", choices=[4, 5, 6, 8], default=[4, 5, 6, 8])
    parser.add_argument(
        "--group-sizes", type=int, nargs="+", choices=[32, 64, 128], default=[32, 64, 128]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="synthetic clip length")
    args = parser.parse_args()
    if g.read_config(args.model).get("quantization"):
        sys.exit(f"error: {args.model} is quantized: give the bf16 conversion")

    model, _ = g.load(args.model, dtype=mx.float32)
    blank, vocab = model.args.blank_token_id, model.args.editor.vocab_size
    features, _ = g.log_mel([synthetic_audio(args.seconds)])
    _, audio_embeds = model.encode(features)
    hypothesis = fixed_hypothesis(args.seconds, vocab=vocab)
    text_ids = mx.array([g.insert_slots(hypothesis, blank, model.args.min_edit_sequence_length)])
    ref = editor_logits(model, audio_embeds, text_ids)
    matrices = {
        p: m.weight
        for p, m in model.editor.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding))
    }
    all_bytes = sum(v.size * 2 for _, v in tree_flatten(model.parameters()))  # bf16 as stored
    rows = [
        {
            "bits": None,
            "group_size": None,
            "size_gb": all_bytes / 1e9,
            "rel_err": 0.0,
            "top1_agree": 1.0,
            "final_ids_equal": True,
        }
    ]
    print(json.dumps(rows[0]), flush=True)
    for bits in args.bits:
        for group_size in args.group_sizes:
            packed = {
                p: mx.quantize(w.astype(mx.bfloat16), group_size, bits) for p, w in matrices.items()
            }
            size = all_bytes + sum(
                sum(a.nbytes for a in q) - matrices[p].size * 2 for p, q in packed.items()
            )
            weights = {
                p: mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size, bits)
                for p, (w, s, b) in packed.items()
            }
            logits = editor_logits(model, audio_embeds, text_ids, weights)
            del packed, weights
            row = {
                "bits": bits,
                "group_size": group_size,
                "size_gb": size / 1e9,
                "rel_err": float(np.abs(logits - ref).max() / np.abs(ref).max()),
                "top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                "final_ids_equal": (
                    g.ctc_collapse(logits.argmax(-1), blank)
                    == g.ctc_collapse(ref.argmax(-1), blank)
                ),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| bits | group | model.safetensors | editor logits, max rel. error | top-1 agreement"
        " | final ids |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        bits, group = r["bits"] or "bf16", r["group_size"] or "-"
        same = "same" if r["final_ids_equal"] else "differ"
        print(
            f"| {bits} | {group} | {r['size_gb']:.2f} GB | {r['rel_err']:.2e}"
            f" | {r['top1_agree']:.3f} | {same} |"
        )


if __name__ == "__main__":
    main()
