"""Write a granite_nar model directory in mlx-audio's granite_speech_nar layout.

mlx-audio names the conv module's BatchNorm `bn`, keeps the Q-Former under `qformer.layers`, stores
the pointwise convs as Conv1d kernels (out, 1, in), keeps the editor's q/k/v_proj and gate/up_proj apart
(granite_nar stacks them: qkv_proj, gate_up_proj), and writes quantization as
{"group_size", "bits", "mode"} twice, under "quantization" and "quantization_config". Used by
bench.py --peer and by the tests that load this layout.
"""

import json

import mlx.core as mx


def to_mlx_audio_dir(model_dir, out, dtype=None):
    """Our converted directory -> mlx-audio's layout: conv.bn, qformer.layers, (out, 1, in) pointwise convs,
    separate editor projections."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["text_config"]["hidden_size"]  # rows of q_proj; k_proj and v_proj share the rest
    weights = {}
    for key, value in _unstacked(mx.load(str(model_dir / "model.safetensors")), hidden):
        key = key.replace(".conv.batch_norm.", ".conv.bn.").replace("projector.layers.", "projector.qformer.layers.")
        if key.endswith(("up_conv.weight", "down_conv.weight")) and value.dtype != mx.uint32:
            value = value[:, None, :]
        weights[key] = value.astype(dtype) if dtype is not None and mx.issubdtype(value.dtype, mx.floating) else value
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    if "quantization" in config:
        q = {"group_size": config["quantization"]["group_size"], "bits": config["quantization"]["bits"], "mode": "affine"}
        config["quantization"] = config["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((model_dir / name).read_bytes())


def _unstacked(weights, hidden):
    """Split granite_nar's stacked editor projections (weights, scales, biases: rows are outputs)."""
    for key, value in weights.items():
        if ".qkv_proj." in key:
            kv = (value.shape[0] - hidden) // 2
            for name, part in zip(("q_proj", "k_proj", "v_proj"), mx.split(value, [hidden, hidden + kv])):
                yield key.replace("qkv_proj", name), part
        elif ".gate_up_proj." in key:
            for name, part in zip(("gate_proj", "up_proj"), mx.split(value, 2)):
                yield key.replace("gate_up_proj", name), part
        else:
            yield key, value
