"""granite_nar.py vs the independent float64 oracle (tests/numpy_reference.py) on random-weight
models whose every dimension differs from the dev golden set.

Each config writes a fake upstream checkpoint (config.json, bf16 model.safetensors, a truncated
byte-level tokenizer), converts it with convert.py, loads it with granite_nar.load and compares
every exposed stage with the oracle, on seeded random waveforms of several lengths.
"""

import copy
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from numpy_reference import decode, reference_stages  # noqa: E402

import granite_nar  # noqa: E402
from convert import convert  # noqa: E402

DEV_TOKENIZER = ROOT / "tests" / "fixtures" / "dev" / "checkpoint" / "tokenizer.json"
SPECIALS = ["<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|unk|>"]
RTOL = 1e-4  # of the reference stage's largest magnitude
MARGIN = 1e-3  # ids taken by argmax are compared only where top-1 minus top-2 exceeds this

# Each case: sizes (all differ from dev), the blank's position among the 5 specials, and encoder
# frame counts T (n_samples = 320 T + extra) chosen to hit / miss every padding path.
CASES = {
    # even kernel; T=30 < context 40 (single partial block) but a multiple of W, B, r;
    # T=120 all exact
    "k4_selfcond1": dict(
        enc=dict(
            num_layers=3,
            hidden_dim=24,
            num_heads=3,
            dim_head=10,
            feedforward_mult=2,
            output_dim=7,
            context_size=40,
            max_pos_emb=45,
            conv_kernel_size=4,
            conv_expansion_factor=3,
            self_conditioning_layer=1,
            bpe_pooling_window=3,
        ),
        indices=[0, -1],
        proj=dict(
            hidden_size=36,
            num_heads=3,
            num_layers=1,
            block_size=10,
            downsample_rate=2,
            mlp_ratio=3,
            llm_dim=40,
            layernorm_eps=1e-5,
        ),
        text=dict(
            hidden_size=40,
            intermediate_size=72,
            num_hidden_layers=3,
            num_attention_heads=5,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            rope_theta=500.0,
            attention_multiplier=0.1,
            embedding_multiplier=6.0,
            logits_scaling=4.0,
            residual_multiplier=0.3,
        ),
        vocab=290,
        blank_slot=0,
        min_edit=20,
        frames=[(30, 0), (120, 0), (77, 123)],
    ),
    # s = L; max_pos_emb = context - 1 (the Shaw table is used edge to edge); kv_heads == heads
    "selfcondL_mha": dict(
        enc=dict(
            num_layers=2,
            hidden_dim=32,
            num_heads=2,
            dim_head=12,
            feedforward_mult=3,
            output_dim=5,
            context_size=16,
            max_pos_emb=15,
            conv_kernel_size=7,
            conv_expansion_factor=1,
            self_conditioning_layer=2,
            bpe_pooling_window=5,
        ),
        indices=[2, 1, -1],
        proj=dict(
            hidden_size=48,
            num_heads=6,
            num_layers=3,
            block_size=12,
            downsample_rate=4,
            mlp_ratio=2,
            llm_dim=56,
            layernorm_eps=1e-6,
        ),
        text=dict(
            hidden_size=56,
            intermediate_size=100,
            num_hidden_layers=1,
            num_attention_heads=7,
            num_key_value_heads=7,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            attention_multiplier=0.125,
            embedding_multiplier=10.0,
            logits_scaling=6.0,
            residual_multiplier=0.15,
        ),
        vocab=300,
        blank_slot=4,
        min_edit=3,
        frames=[(240, 0), (7, 100), (53, 319)],
    ),
    # kernel 2, 1 attention head wider than D, projector without attention biases, GQA 4 -> 2
    "k2_nobias": dict(
        enc=dict(
            num_layers=5,
            hidden_dim=16,
            num_heads=1,
            dim_head=20,
            feedforward_mult=2,
            output_dim=9,
            context_size=6,
            max_pos_emb=8,
            conv_kernel_size=2,
            conv_expansion_factor=2,
            self_conditioning_layer=3,
            bpe_pooling_window=2,
        ),
        indices=[3, 0],
        proj=dict(
            hidden_size=20,
            num_heads=2,
            num_layers=2,
            block_size=6,
            downsample_rate=3,
            mlp_ratio=1,
            llm_dim=24,
            layernorm_eps=1e-5,
            attn_bias=False,
        ),
        text=dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            attention_multiplier=0.2,
            embedding_multiplier=4.0,
            logits_scaling=2.0,
            residual_multiplier=0.5,
        ),
        vocab=261,
        blank_slot=3,
        min_edit=1,
        frames=[(6, 0), (36, 0), (41, 7)],
    ),
    # kernel 1, a single layer that is also the self-conditioning layer, GQA 2 -> 1, epsilons large
    # enough to matter
    "k1_onelayer": dict(
        enc=dict(
            num_layers=1,
            hidden_dim=20,
            num_heads=4,
            dim_head=6,
            feedforward_mult=1,
            output_dim=3,
            context_size=25,
            max_pos_emb=30,
            conv_kernel_size=1,
            conv_expansion_factor=2,
            self_conditioning_layer=1,
            bpe_pooling_window=7,
        ),
        indices=[-1, 0, 1],
        proj=dict(
            hidden_size=30,
            num_heads=5,
            num_layers=1,
            block_size=25,
            downsample_rate=5,
            mlp_ratio=2,
            llm_dim=32,
            layernorm_eps=0.1,
            mlp_bias=False,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rms_norm_eps=2.0,
            rope_theta=2000.0,
            attention_multiplier=0.05,
            embedding_multiplier=8.0,
            logits_scaling=3.0,
            residual_multiplier=0.4,
        ),
        vocab=320,
        blank_slot=2,
        min_edit=12,
        frames=[(175, 0), (3, 5), (64, 200)],
    ),
}


# ---------------------------------------------------------------------------- checkpoint writing
def make_config(case):
    V, blank = case["vocab"], case["vocab"] - 5 + case["blank_slot"]
    pad = V - 5 if case["blank_slot"] != 0 else V - 4
    enc = dict(
        case["enc"],
        input_dim=160,
        bpe_output_dim=V,
        blank_token_id=blank,
        dropout=0.1,
        pred_dropout=0.25,
        model_type="granite_speech_nar_encoder",
        initializer_range=0.02,
    )
    proj = dict(
        dict(attn_bias=True, mlp_bias=True),
        **case["proj"],
        encoder_dim=enc["hidden_dim"],
        num_encoder_layers=len(case["indices"]),
        model_type="granite_speech_nar_projector",
        dropout_prob=0.1,
    )
    text = dict(
        case["text"],
        model_type="granite",
        architectures=["GraniteForCausalLM"],
        vocab_size=V,
        hidden_act="silu",
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": case["text"]["rope_theta"]},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=blank,
        eos_token_id=blank,
        pad_token_id=pad,
        initializer_range=0.02,
        use_cache=False,
    )
    return {
        "architectures": ["GraniteSpeechNarForASR"],
        "model_type": "granite_speech_nar",
        "encoder_config": enc,
        "projector_config": proj,
        "text_config": text,
        "encoder_layer_indices": case["indices"],
        "blank_token_id": blank,
        "scale_projected_embeddings": True,
        "min_edit_sequence_length": case["min_edit"],
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def make_weights(cfg, rng):
    """README "How the random weights were drawn" scales, float32."""
    ec, pc, tc = cfg["encoder_config"], cfg["projector_config"], cfg["text_config"]
    w = {}

    def lin(name, n_out, n_in, gain=None, bias=True, conv=False):
        g = rng.uniform(1.0, 1.5) if gain is None else gain
        shape = (n_out, n_in, 1) if conv else (n_out, n_in)
        w[name + ".weight"] = rng.normal(0, g / np.sqrt(n_in), shape)
        if bias:
            w[name + ".bias"] = rng.normal(0, 0.05, n_out)

    def norm(name, n, bias=True):
        w[name + ".weight"] = rng.uniform(0.9, 1.1, n)
        if bias:
            w[name + ".bias"] = rng.normal(0, 0.05, n)

    D, Hh, dh = ec["hidden_dim"], ec["num_heads"], ec["dim_head"]
    F, E, K = D * ec["feedforward_mult"], D * ec["conv_expansion_factor"], ec["conv_kernel_size"]
    lin("encoder.input_linear", D, ec["input_dim"])
    for i in range(ec["num_layers"]):
        p = f"encoder.layers.{i}"
        for ff in ("ff1", "ff2"):
            norm(f"{p}.{ff}.pre_norm", D)
            lin(f"{p}.{ff}.up_proj", F, D)
            lin(f"{p}.{ff}.down_proj", D, F)
        norm(f"{p}.attn.pre_norm", D)
        lin(f"{p}.attn.to_q", Hh * dh, D, bias=False)
        lin(f"{p}.attn.to_kv", 2 * Hh * dh, D, bias=False)
        lin(f"{p}.attn.to_out", D, Hh * dh)
        w[f"{p}.attn.rel_pos_emb.weight"] = rng.normal(0, 1, (2 * ec["max_pos_emb"] + 1, dh))
        norm(f"{p}.conv.norm", D)
        lin(f"{p}.conv.up_conv", 2 * E, D, conv=True)
        w[f"{p}.conv.depth_conv.conv.weight"] = rng.normal(
            0, rng.uniform(1, 1.5) / np.sqrt(K), (E, 1, K)
        )
        norm(f"{p}.conv.batch_norm", E)
        w[f"{p}.conv.batch_norm.running_mean"] = rng.normal(0, 0.1, E)
        w[f"{p}.conv.batch_norm.running_var"] = rng.uniform(0.5, 1.5, E)
        lin(f"{p}.conv.down_conv", D, E, conv=True)
        norm(f"{p}.post_norm", D)
    lin("encoder.out", ec["output_dim"], D)
    lin("encoder.out_mid", D, ec["output_dim"])
    lin("encoder.out_bpe", ec["bpe_output_dim"], D, gain=10.0)

    k, H, llm = pc["num_encoder_layers"], pc["hidden_size"], pc["llm_dim"]
    M = int(H * pc["mlp_ratio"])
    for j in range(k):
        norm(f"projector.layer_norms.{j}", D)
    lin("projector.layer_projector", H, k * D)
    w["projector.query"] = rng.normal(0, 0.5, (1, pc["block_size"] // pc["downsample_rate"], H))
    w["projector.window_positions"] = rng.normal(0, 0.5, (1, pc["block_size"], H))
    for i in range(pc["num_layers"]):
        p = f"projector.qformer.layers.{i}"
        norm(f"{p}.attn_norm", H)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin(f"{p}.cross_attention.{n}", H, H, bias=pc["attn_bias"])
        norm(f"{p}.mlp_norm", H)
        lin(f"{p}.mlp.fc1", M, H, bias=pc["mlp_bias"])
        lin(f"{p}.mlp.fc2", H, M, bias=pc["mlp_bias"])
    norm("projector.out_norm", H)
    em, rm = tc["embedding_multiplier"], tc["residual_multiplier"]
    lin(
        "projector.out_linear", llm, H, gain=2.0 * em
    )  # audio rows ~ token rows after the multiplier

    hd = tc["hidden_size"] // tc["num_attention_heads"]
    nq, nkv, I = (
        tc["num_attention_heads"] * hd,
        tc["num_key_value_heads"] * hd,
        tc["intermediate_size"],
    )
    big = (
        2.0 * em / rm
    )  # o_proj / down_proj: each sublayer moves the residual stream by about its size
    w["language_model.model.embed_tokens.weight"] = rng.normal(0, 2.0, (tc["vocab_size"], llm))
    for i in range(tc["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = rng.uniform(0.9, 1.1, llm)
        w[f"{p}.post_attention_layernorm.weight"] = rng.uniform(0.9, 1.1, llm)
        lin(f"{p}.self_attn.q_proj", nq, llm, bias=False)
        lin(f"{p}.self_attn.k_proj", nkv, llm, bias=False)
        lin(f"{p}.self_attn.v_proj", nkv, llm, bias=False)
        lin(f"{p}.self_attn.o_proj", llm, nq, gain=big, bias=False)
        lin(f"{p}.mlp.gate_proj", I, llm, bias=False)
        lin(f"{p}.mlp.up_proj", I, llm, bias=False)
        lin(f"{p}.mlp.down_proj", llm, I, gain=big, bias=False)
    w["language_model.model.norm.weight"] = rng.uniform(0.9, 1.1, llm)
    return w


def to_bf16(w):
    """bf16 arrays (as stored upstream) and the identical values as float64 for the oracle."""
    bf = {k: mx.array(v.astype(np.float32)).astype(mx.bfloat16) for k, v in w.items()}
    return bf, {k: np.array(v.astype(mx.float32), dtype=np.float64) for k, v in bf.items()}


def write_tokenizer(path, cfg, case):
    """The dev tokenizer cut to V - 5 ordinary tokens, then the 5 specials with the blank in its
    slot."""
    tok = json.loads(DEV_TOKENIZER.read_text())
    n_ordinary = case["vocab"] - 5
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < n_ordinary}
    assert len(vocab) == n_ordinary
    tok["model"]["vocab"] = vocab
    tok["model"]["merges"] = [
        m for m in tok["model"]["merges"] if "".join(m) in vocab and all(p in vocab for p in m)
    ]
    order = [s for s in SPECIALS if s != "<|end_of_text|>"]
    order.insert(case["blank_slot"], "<|end_of_text|>")
    template = tok["added_tokens"][0]
    tok["added_tokens"] = [
        dict(template, id=n_ordinary + j, content=s) for j, s in enumerate(order)
    ]
    assert tok["added_tokens"][case["blank_slot"]]["id"] == cfg["blank_token_id"]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    tc = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": "<|end_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": order[0],
        "unk_token": "<|unk|>",
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {str(t["id"]): dict(t, special=True) for t in tok["added_tokens"]},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tc))


def waveform(n_samples, seed, silence=0.0):
    """Seeded noise with a few drifting tones and a loudness envelope, so frames differ; the first
    `silence` fraction is digital silence (hits the log floor and the max - 8 clamp)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / 16000
    x = 0.05 * rng.normal(size=n_samples)
    for _ in range(3):
        f0, f1 = rng.uniform(100, 4000, 2)
        x += rng.uniform(0.05, 0.3) * np.sin(
            2 * np.pi * (f0 + (f1 - f0) * t / (t[-1] + 1e-3) / 2) * t
        )
    env = 0.2 + np.abs(np.sin(2 * np.pi * rng.uniform(0.5, 3) * t + rng.uniform(0, 6)))
    x = x * env
    x[: int(silence * n_samples)] = 0.0
    return x.astype(np.float32)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory):
    name = request.param
    case = CASES[name]
    cfg = make_config(case)
    seed = sum(map(ord, name))
    rng = np.random.default_rng(seed)
    w = make_weights(cfg, rng)
    waves = [
        waveform(320 * T + extra, seed + j, 0.3 * (j == 2))
        for j, (T, extra) in enumerate(case["frames"])
    ]

    # Center the BPE head: raise the blank's bias so it wins in ~40 % of the longest utterance's
    # windows.
    _, w64 = to_bf16(w)
    logits = reference_stages(cfg, w64, max(waves, key=len))["encoder_bpe_logits"]
    blank = cfg["blank_token_id"]
    gap = np.delete(logits, blank, axis=1).max(1) - logits[:, blank]
    w["encoder.out_bpe.bias"] = w["encoder.out_bpe.bias"] - np.median(w["encoder.out_bpe.bias"])
    w["encoder.out_bpe.bias"][blank] += np.quantile(gap, 0.4)
    bf, w64 = to_bf16(w)
    for i in range(cfg["encoder_config"]["num_layers"]):
        bf[f"encoder.layers.{i}.conv.batch_norm.num_batches_tracked"] = mx.array(
            1000, dtype=mx.int64
        )

    ckpt = tmp_path_factory.mktemp(name) / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    mx.save_safetensors(str(ckpt / "model.safetensors"), bf)
    write_tokenizer(ckpt, cfg, case)
    out = ckpt.parent / "mlx"
    convert(str(ckpt), str(out))
    model, tok = granite_nar.load(str(out), dtype=mx.float32)  # float32 on a GPU too
    refs = [reference_stages(copy.deepcopy(cfg), w64, x) for x in waves]
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    return dict(
        name=name,
        cfg=cfg,
        model=model,
        tok=tok,
        waves=waves,
        refs=refs,
        w64=w64,
        path=out,
        tokenizer=tokenizer,
    )


# ---------------------------------------------------------------------------- checks
def close(name, got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    if ref.size == 0:
        return
    scale = max(np.abs(ref).max(), 1e-6)
    err = np.abs(got - ref).max() / scale
    assert err <= RTOL, f"{name}: max |diff| = {err:.2e} of max |ref| {scale:.3g}"


def confident(logits):
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > MARGIN


def each(built):
    for x, ref in zip(built["waves"], built["refs"]):
        yield f"{built['name']} n={len(x)} T={len(x) // 320}", x, ref


def test_log_mel(built):
    for tag, x, ref in each(built):
        close(f"{tag} input_features", granite_nar.log_mel([x])[0][0], ref["input_features"])


@pytest.mark.parametrize("shifted", [False, True])  # load() picks one per backend
def test_encoder_hidden_states(built, shifted, monkeypatch):
    for layer in built["model"].encoder.layers:
        monkeypatch.setattr(layer.conv, "shifted", shifted)
    for tag, _, ref in each(built):
        hs, bpe = built["model"].encoder(mx.array(ref["input_features"].astype(np.float32))[None])
        assert len(hs) == built["cfg"]["encoder_config"]["num_layers"] + 1
        close(
            f"{tag} encoder_hidden_states",
            np.stack([np.array(h[0]) for h in hs]),
            ref["encoder_hidden_states"],
        )
        close(f"{tag} encoder_bpe_logits (encoder)", np.array(bpe[0]), ref["encoder_bpe_logits"])


def test_encode(built):
    for tag, _, ref in each(built):
        bpe, audio = built["model"].encode(mx.array(ref["input_features"].astype(np.float32))[None])
        bpe, audio = bpe[0], audio[0]
        close(f"{tag} encoder_bpe_logits", np.array(bpe), ref["encoder_bpe_logits"])
        close(f"{tag} audio_embeds", np.array(audio), ref["audio_embeds"])
        ok = confident(ref["encoder_bpe_logits"])
        got = np.array(mx.argmax(bpe, axis=-1))
        np.testing.assert_array_equal(
            got[ok], ref["encoder_bpe_argmax"][ok], err_msg=f"{tag} bpe argmax"
        )


def test_edit(built):
    for tag, _, ref in each(built):
        slots = mx.array(ref["editor_input_ids"].astype(np.int32))[None]
        logits = built["model"].edit(mx.array(ref["audio_embeds"].astype(np.float32))[None], slots)[
            0
        ]
        close(f"{tag} editor_text_logits", np.array(logits), ref["editor_text_logits"])
        ok = confident(ref["editor_text_logits"])
        got = np.array(mx.argmax(logits, axis=-1))
        np.testing.assert_array_equal(
            got[ok], ref["editor_argmax"][ok], err_msg=f"{tag} editor argmax"
        )


def test_ids(built):
    cfg = built["cfg"]
    blank, min_len = cfg["blank_token_id"], cfg["min_edit_sequence_length"]
    for tag, _, ref in each(built):
        preds = granite_nar.ctc_collapse(ref["encoder_bpe_argmax"], blank)
        assert list(preds) == ref["encoder_preds"].tolist(), tag
        slots = granite_nar.insert_slots(ref["encoder_preds"].tolist(), blank, min_len)
        assert list(slots) == ref["editor_input_ids"].tolist(), tag
        assert len(slots) == max(2 * len(preds) + 1, min_len)
        final = granite_nar.ctc_collapse(ref["editor_argmax"], blank)
        assert list(final) == ref["pred_ids"].tolist(), tag
        for ids in (preds, final):
            assert built["tok"].decode(ids) == decode(built["tokenizer"], ids), tag
    texts = [decode(built["tokenizer"], ref["pred_ids"]) for ref in built["refs"]]
    assert any(texts), texts  # some text to compare


def test_detokenizer_every_token(built):
    """The truncated vocabulary, token by token and all at once (bytes of a character split
    across tokens), with the specials among them."""
    tok, tokenizer, V = built["tok"], built["tokenizer"], built["cfg"]["text_config"]["vocab_size"]
    for i in range(V):
        assert tok.decode([i]) == decode(tokenizer, [i]), i
    ids = np.random.default_rng(0).permutation(V)
    assert tok.decode(ids.tolist()) == decode(tokenizer, ids)


def test_transcripts_and_the_edges_they_reach(built):
    """transcribe gives each wave the reference's text (decoded independently) where every argmax
    on the way was decided by more than MARGIN, "" under 0.1 s; and the cases reach what they
    claim: the code's BPE argmaxes hold blanks and other ids, and some hypothesis is not empty."""
    model, tok, cfg = built["model"], built["tok"], built["cfg"]
    blank = cfg["blank_token_id"]
    compared, argmaxes, hypotheses = 0, [], []
    for tag, x, ref in each(built):
        text = granite_nar.transcribe(model, tok, x)
        bpe, _ = model.encode(granite_nar.log_mel([x])[0])
        argmaxes.append(np.array(mx.argmax(bpe[0], axis=-1)))
        hypotheses.append(granite_nar.ctc_collapse(argmaxes[-1], blank))
        decided = confident(ref["encoder_bpe_logits"]).all()
        decided &= confident(ref["editor_text_logits"]).all()
        if len(x) < granite_nar.MIN_SECONDS * 16000:
            assert text == "", tag
        elif decided:
            assert text == decode(built["tokenizer"], ref["pred_ids"]), tag
            compared += 1
    assert compared, "no transcript compared"
    argmaxes = np.concatenate(argmaxes)
    assert (argmaxes == blank).any() and (argmaxes != blank).any()
    assert any(hypotheses), "every hypothesis is empty"


@pytest.mark.parametrize("steps", [(1, 1), (25, 16), "blocks"])
def test_one_padded_batch_matches_the_reference_per_sample(built, steps):
    """The configuration's waves as one batch (padded to the longest: partial attention blocks,
    convolution edges, pooling windows and projector blocks of every length): each sample's stages
    are the reference's for that sample alone. (25, 16): also padded as shape_steps does on a GPU;
    "blocks": frames to whole attention blocks."""
    model, cfg, refs = built["model"], built["cfg"], built["refs"]
    W, rate = (
        cfg["encoder_config"]["bpe_pooling_window"],
        cfg["projector_config"]["downsample_rate"],
    )
    frame_step, slot_step = (
        (cfg["encoder_config"]["context_size"], 16) if steps == "blocks" else steps
    )
    features, lengths = granite_nar.log_mel(built["waves"])
    T = -(-features.shape[1] // frame_step) * frame_step
    bpe, audio = model.encode(
        granite_nar.pad_rows(features, T), mx.arange(T) < mx.array(lengths)[:, None]
    )
    A = max(len(ref["audio_embeds"]) for ref in refs)
    ref_audio = np.stack(
        [np.pad(r["audio_embeds"], [(0, A - len(r["audio_embeds"])), (0, 0)]) for r in refs]
    )
    ref_audio[0, len(refs[0]["audio_embeds"]) :] = 1e3  # what padding holds must not matter
    blank, min_len = cfg["blank_token_id"], cfg["min_edit_sequence_length"]
    text_ids, text_lengths = granite_nar.slot_batch(
        [r["encoder_preds"].tolist() for r in refs], blank, min_len, slot_step
    )
    audio_lengths = mx.array([len(r["audio_embeds"]) for r in refs])
    logits = model.edit(
        mx.array(ref_audio.astype(np.float32)), text_ids, audio_lengths, text_lengths
    )
    for b, (tag, _, ref) in enumerate(each(built)):
        T = lengths[b]
        close(f"{tag} batched input_features", features[b, :T], ref["input_features"])
        close(f"{tag} batched encoder_bpe_logits", bpe[b, : -(-T // W)], ref["encoder_bpe_logits"])
        close(f"{tag} batched audio_embeds", audio[b, : T // rate], ref["audio_embeds"])
        L = len(ref["editor_text_logits"])
        close(f"{tag} batched editor_text_logits", logits[b, :L], ref["editor_text_logits"])
