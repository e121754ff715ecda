"""Write a granite_nar model directory in mlx-audio's granite_speech_nar layout.

mlx-audio names the conv module's BatchNorm `bn`, stores the pointwise convs as Conv1d kernels
(out, 1, in), keeps the editor's q/k/v and gate/up projections apart (granite_nar stacks them),
and writes quantization as {"group_size", "bits", "mode"} twice, under "quantization" and
"quantization_config". Used by bench.py --peer, fidelity.py and the tests.
"""

import json

import mlx.core as mx


def to_mlx_audio_dir(model_dir, out, dtype=None):
    """Our converted directory -> mlx-audio's layout, cast to dtype (None: as stored)."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    n_q, n_kv = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    stacked = {
        ".qkv_proj.": ([".q_proj.", ".k_proj.", ".v_proj."], [n_q, n_q + n_kv]),
        ".gate_up_proj.": ([".gate_proj.", ".up_proj."], 2),
    }
    weights = {}
    for key, value in mx.load(str(model_dir / "model.safetensors")).items():
        key = key.replace(".conv.batch_norm.", ".conv.bn.")
        if key.endswith(("up_conv.weight", "down_conv.weight")) and value.dtype != mx.uint32:
            value = value[:, None, :]
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        name = next((name for name in stacked if name in key), None)
        if name is None:
            weights[key] = value
        else:  # rows of the outputs, also of a quantized layer's scales and biases
            parts, splits = stacked[name]
            for part, rows in zip(parts, mx.split(value, splits, axis=0)):
                weights[key.replace(name, part)] = rows
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    if "quantization" in config:
        q = config["quantization"]
        q = {"group_size": q["group_size"], "bits": q["bits"], "mode": "affine"}
        config["quantization"] = config["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((model_dir / name).read_bytes())
