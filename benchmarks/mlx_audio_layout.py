"""Write a granite_nar model directory in mlx-audio's granite_speech_nar layout.

mlx-audio names the conv module's BatchNorm `bn`, keeps the Q-Former under `qformer.layers`, stores
the pointwise convs as Conv1d kernels (out, 1, in), and writes quantization as
{"group_size", "bits", "mode"} twice, under "quantization" and "quantization_config". Used by
bench.py --peer and by the tests that load this layout.
"""

import json

import mlx.core as mx


def to_mlx_audio_dir(model_dir, out, dtype=None):
    """Our converted directory -> mlx-audio's layout: conv.bn, qformer.layers, (out, 1, in) pointwise convs."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for key, value in mx.load(str(model_dir / "model.safetensors")).items():
        key = key.replace(".conv.batch_norm.", ".conv.bn.").replace("projector.layers.", "projector.qformer.layers.")
        if key.endswith(("up_conv.weight", "down_conv.weight")) and value.dtype != mx.uint32:
            value = value[:, None, :]
        weights[key] = value.astype(dtype) if dtype is not None and mx.issubdtype(value.dtype, mx.floating) else value
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization" in config:
        q = {"group_size": config["quantization"]["group_size"], "bits": config["quantization"]["bits"], "mode": "affine"}
        config["quantization"] = config["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((model_dir / name).read_bytes())
