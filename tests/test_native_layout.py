"""The transformers-native checkpoint layout (shared/UPSTREAM.md): one small random model written
in the original hub layout, in the native one and with older transformers names loads to the same
parameters and outputs, directly and through convert.py, with IBM's semantics. Its projector is as
wide as its editor: the native layout cannot hold the dev fixture's (128 wide, editor 96)."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import granite_nar  # noqa: E402
from convert import convert  # noqa: E402

DEV = ROOT / "tests" / "fixtures" / "dev"
AUDIO = str(DEV / "audio.wav")
TO_NATIVE = (  # UPSTREAM.md's renames: anchored prefixes, specific before general, first wins
    ("language_model.model.", "model.language_model."),
    ("encoder.out_bpe.", "model.out_bpe."),
    ("encoder.", "model.encoder."),
    ("projector.layer_projector.", "model.projector.proj."),
    ("projector.out_linear.", "model.projector.qformer.linear."),
    ("projector.query", "model.projector.qformer.queries"),
    ("projector.window_positions", "model.projector.qformer.pos_emb"),
    ("projector.", "model.projector."),
)
NORMS = re.compile(r"projector\..*norm")  # the projector LayerNorms, which the native layout drops
ENCODER_KEYS = {"bpe_output_dim": "vocabulary_size", "bpe_pooling_window": "pooling_window"}
PROJECTOR_KEYS = {
    "num_heads": "num_attention_heads",
    "num_layers": "num_hidden_layers",
    "block_size": "window_size",
    "layernorm_eps": "layer_norm_eps",
    "attn_bias": "attention_bias",
}
GONE = {
    "pred_dropout",
    "blank_token_id",
    "llm_dim",
    "encoder_dim",
    "num_encoder_layers",
    "mlp_bias",
}


def original_shapes(config):
    """Every tensor of the original layout and its shape, as tests/fixtures/README.md lists them.
    In the tables a name ending in "+" is a Linear or Conv1d with a bias, "~" a norm's affine."""
    e, p, t = config["encoder_config"], config["projector_config"], config["text_config"]
    D, C, V, K = e["hidden_dim"], e["output_dim"], e["bpe_output_dim"], e["conv_kernel_size"]
    inner, F = e["num_heads"] * e["dim_head"], D * e["feedforward_mult"]
    E, P = D * e["conv_expansion_factor"], 2 * e["max_pos_emb"] + 1
    H, k, B = p["hidden_size"], p["num_encoder_layers"], p["block_size"]
    M, L, I = int(H * p["mlp_ratio"]), t["hidden_size"], t["intermediate_size"]
    hd = L // t["num_attention_heads"]
    heads, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    tables = [
        (
            "encoder.",
            {
                "input_linear+": (D, e["input_dim"]),
                "out+": (C, D),
                "out_mid+": (D, C),
                "out_bpe+": (V, D),
            },
        )
    ]
    tables += [
        (
            f"encoder.layers.{i}.",
            {
                "ff1.pre_norm~": D,
                "ff1.up_proj+": (F, D),
                "ff1.down_proj+": (D, F),
                "ff2.pre_norm~": D,
                "ff2.up_proj+": (F, D),
                "ff2.down_proj+": (D, F),
                "attn.pre_norm~": D,
                "attn.to_q.weight": (inner, D),
                "attn.to_kv.weight": (2 * inner, D),
                "attn.to_out+": (D, inner),
                "attn.rel_pos_emb.weight": (P, e["dim_head"]),
                "conv.norm~": D,
                "conv.up_conv+": (2 * E, D, 1),
                "conv.depth_conv.conv.weight": (E, 1, K),
                "conv.batch_norm~": E,
                "conv.batch_norm.running_mean": (E,),
                "conv.batch_norm.running_var": (E,),
                "conv.batch_norm.num_batches_tracked": (),
                "conv.down_conv+": (D, E, 1),
                "post_norm~": D,
            },
        )
        for i in range(e["num_layers"])
    ]
    tables += [
        (
            "projector.",
            {
                **{f"layer_norms.{j}~": D for j in range(k)},
                "layer_projector+": (H, k * D),
                "query": (1, B // p["downsample_rate"], H),
                "window_positions": (1, B, H),
                "out_norm~": H,
                "out_linear+": (p["llm_dim"], H),
            },
        )
    ]
    tables += [
        (
            f"projector.qformer.layers.{i}.",
            {
                "attn_norm~": H,
                **{f"cross_attention.{x}_proj+": (H, H) for x in "qkvo"},
                "mlp_norm~": H,
                "mlp.fc1+": (M, H),
                "mlp.fc2+": (H, M),
            },
        )
        for i in range(p["num_layers"])
    ]
    tables += [("language_model.model.", {"embed_tokens.weight": (V, L), "norm.weight": (L,)})]
    tables += [
        (
            f"language_model.model.layers.{i}.",
            {
                "input_layernorm.weight": (L,),
                "post_attention_layernorm.weight": (L,),
                "self_attn.q_proj.weight": (heads, L),
                "self_attn.k_proj.weight": (kv, L),
                "self_attn.v_proj.weight": (kv, L),
                "self_attn.o_proj.weight": (L, heads),
                "mlp.gate_proj.weight": (I, L),
                "mlp.up_proj.weight": (I, L),
                "mlp.down_proj.weight": (L, I),
            },
        )
        for i in range(t["num_hidden_layers"])
    ]
    shapes = {}
    for prefix, table in tables:
        for name, shape in table.items():
            base = prefix + name[:-1]
            if name[-1] == "~":
                shapes[base + ".weight"] = shapes[base + ".bias"] = (shape,)
            elif name[-1] == "+":
                shapes[base + ".weight"], shapes[base + ".bias"] = shape, shape[:1]
            else:
                shapes[prefix + name] = shape
    return shapes


def random_weights(config, seed=0):
    """bf16: matrices normal / sqrt(fan_in), norms ~1 (projector LayerNorms exactly identity)."""
    rng, out = np.random.default_rng(seed), {}
    for key, shape in original_shapes(config).items():
        if key.endswith("num_batches_tracked"):
            out[key] = mx.array(int(rng.integers(1, 1000)), mx.int64)
            continue
        x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        if len(shape) == 1:
            x = np.full(shape, float(key.endswith(("weight", "running_var"))))  # or bias, mean
            x += 0 if NORMS.match(key) else 0.05 * rng.standard_normal(shape)
        out[key] = mx.array(x.astype(np.float32)).astype(mx.bfloat16)
    return out


def to_native(config, weights):
    """Original config.json and tensors -> the native layout, as UPSTREAM.md describes it."""
    config = json.loads(json.dumps(config))
    layers = config.pop("encoder_layer_indices")
    for key in ("min_edit_sequence_length", "scale_projected_embeddings"):
        del config[key]
    for section, names in (("encoder_config", ENCODER_KEYS), ("projector_config", PROJECTOR_KEYS)):
        config[section] = {names.get(k, k): v for k, v in config[section].items() if k not in GONE}
    config["encoder_config"]["cat_hidden_layers"] = layers[:-1]
    proj = config["projector_config"]
    proj["intermediate_size"] = int(proj["hidden_size"] * proj.pop("mlp_ratio"))
    config["text_config"]["model_type"] = "granite_speech_nar_text"
    rename = lambda k: next(new + k[len(old) :] for old, new in TO_NATIVE if k.startswith(old))
    native = {rename(k): v for k, v in weights.items() if not NORMS.match(k)}
    return config, {k.replace(".cross_attention.", ".cross_attn."): v for k, v in native.items()}


def write(path, config, weights):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEV / "checkpoint" / name, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native_layout")
    config = json.loads((DEV / "checkpoint" / "config.json").read_text())
    width = config["text_config"]["hidden_size"]
    config["projector_config"].update(hidden_size=width, llm_dim=width, num_heads=4)
    weights = random_weights(config)
    native = to_native(config, weights)
    older = {
        "model." + k.replace("language_model.model.", "language_model."): v
        for k, v in weights.items()
    }
    return dict(
        original=write(tmp / "original", config, weights),
        native_layout=native,
        native=write(tmp / "native", *native),
        older=write(tmp / "older", config, older),
        tmp=tmp,
    )


@pytest.fixture(scope="module")
def loaded(ckpt):
    return {k: granite_nar.load(ckpt[k], dtype=mx.float32) for k in ("original", "native", "older")}


def assert_same_parameters(a, b):
    a, b = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == mx.float32, k
        assert np.array(a[k]).tobytes() == np.array(b[k]).tobytes(), k


def outputs(model, tokenizer):
    """(hypothesis, transcript, bytes of the BPE logits, audio embeddings and editor logits)."""
    bpe_logits, audio_embeds = model.encode(granite_nar.log_mel([granite_nar.load_audio(AUDIO)])[0])
    blank = model.args.blank_token_id
    hyp = granite_nar.ctc_collapse(mx.argmax(bpe_logits[0], -1), blank)
    slots = granite_nar.insert_slots(hyp, blank, model.args.min_edit_sequence_length)
    logits = model.edit(audio_embeds, mx.array([slots]))
    text = granite_nar.transcribe(model, tokenizer, AUDIO)
    return hyp, text, *(np.array(x).tobytes() for x in (bpe_logits, audio_embeds, logits))


def test_native_checkpoint_reads_as_the_original(ckpt):
    """read_checkpoint maps the native layout back to the original one: UPSTREAM.md's renames of
    config keys and tensors inverted, the dropped projector norms restored as identities (the
    original's are), so that the same model arguments and the same tensors come out, before any
    loading. No native tensor name is an original one: none is read as it is."""
    native_config, native = ckpt["native_layout"]
    original = granite_nar.read_weights(ckpt["original"])
    assert not set(native) & set(original)
    assert "encoder_layer_indices" not in native_config
    ours, theirs = (
        granite_nar.read_checkpoint(ckpt["native"]),
        granite_nar.read_checkpoint(ckpt["original"]),
    )

    def effective(args):  # a native config gives intermediate_size instead of mlp_ratio
        p = args.projector
        size = p.intermediate_size or int(p.hidden_size * p.mlp_ratio)
        return dataclasses.replace(
            args, projector=dataclasses.replace(p, mlp_ratio=0, intermediate_size=size)
        )

    assert effective(ours[1].args) == effective(theirs[1].args)
    assert ours[1].args.encoder_layer_indices == [1, 2, 3, -1]
    assert sorted(ours[2]) == sorted(theirs[2])
    for key, value in theirs[2].items():
        assert ours[2][key].dtype == value.dtype, key
        assert mx.array_equal(ours[2][key], value).item(), key


@pytest.mark.parametrize("layout", ["native", "older"])
def test_same_parameters_and_outputs(loaded, layout):
    assert_same_parameters(loaded["original"][0], loaded[layout][0])
    expected = outputs(*loaded["original"])
    assert expected[0] and expected[1]  # a hypothesis and a transcript to compare
    assert outputs(*loaded[layout]) == expected


def test_convert_native(ckpt, loaded):
    convert(ckpt["native"], ckpt["tmp"] / "converted")
    cli = [sys.executable, "convert.py", "--hf-path", str(ckpt["native"])]
    run = subprocess.run(
        [*cli, "--mlx-path", str(ckpt["tmp"] / "cli")], cwd=ROOT, text=True, capture_output=True
    )
    assert run.returncode == 0, run.stderr
    for out in ("converted", "cli"):
        model, tokenizer = granite_nar.load(ckpt["tmp"] / out, dtype=mx.float32)
        assert_same_parameters(loaded["original"][0], model)
        assert model.args.min_edit_sequence_length == 8
        assert outputs(model, tokenizer) == outputs(*loaded["original"])


def test_native_keeps_ibm_semantics(ckpt, loaded):
    args = loaded["native"][0].args
    cat = ckpt["native_layout"][0]["encoder_config"]["cat_hidden_layers"]
    assert args.min_edit_sequence_length == 8
    assert args.encoder_layer_indices == cat + [-1] == [1, 2, 3, -1]


@pytest.mark.parametrize(
    "key, value, message",
    [  # value None: the tensor is dropped
        (
            "model.encoder.layers.1.attn.to_q.weight",
            None,
            "1 missing: encoder.layers.1.attn.to_q.weight",
        ),
        (
            "model.language_model.layers.0.mlp.up_proj.weight",
            None,
            "1 missing: editor.layers.0.mlp.up_proj.weight",
        ),
        (
            "model.language_model.layers.1.self_attn.v_proj.weight",
            mx.zeros((16, 7)),
            "mis-shaped: editor.layers.1.self_attn.q_proj.weight",
        ),
        ("model.encoder.extra.weight", mx.zeros((2,)), "1 unknown: encoder.extra.weight"),
        (
            "model.projector.qformer.queries",
            mx.zeros((1, 4, 96)),
            "1 mis-shaped: projector.query (1, 4, 96) (expected (1, 3, 96))",
        ),
        (
            "model.projector.qformer.layers.1.cross_attn.k_proj.weight",
            mx.zeros((96, 64)),
            "1 mis-shaped: projector.qformer.layers.1.cross_attention.k_proj.weight (96, 64)",
        ),
    ],
)
def test_native_mismatched_tensors_refused_by_name(ckpt, tmp_path, key, value, message):
    config, weights = ckpt["native_layout"]
    weights = {k: v for k, v in weights.items() if k != key}
    if value is not None:
        weights[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        granite_nar.load(write(tmp_path / "bad", config, weights), dtype=mx.float32)


def test_native_stored_projector_norms_kept(ckpt, tmp_path):
    config, weights = ckpt["native_layout"]
    stored = {
        "model.projector.layer_norms.2.weight": mx.arange(64) / 8,
        "model.projector.qformer.layers.1.mlp_norm.bias": mx.arange(96) / 16 - 3,
    }
    path = write(tmp_path / "norms", config, {**weights, **stored})
    params = dict(tree_flatten(granite_nar.load(path, dtype=mx.float32)[0].parameters()))
    for key, value in stored.items():
        np.testing.assert_array_equal(np.array(params[key.removeprefix("model.")]), value)
    assert mx.all(params["projector.out_norm.weight"] == 1).item()  # the others: identity
    assert mx.all(params["projector.qformer.layers.1.mlp_norm.weight"] == 1).item()


def test_from_native_detects_the_native_config_only(ckpt):
    for layout in ("original", "older"):
        assert granite_nar.from_native(granite_nar.read_config(ckpt[layout])) is None
    mapped = granite_nar.from_native(granite_nar.read_config(ckpt["native"]))
    assert isinstance(mapped, dict) and mapped["encoder_layer_indices"] == [1, 2, 3, -1]
    assert mapped["encoder_config"]["bpe_output_dim"] == 357
    assert mapped["projector_config"]["llm_dim"] == 96
