"""Independent float64 numpy reference of Granite Speech 4.1 NAR, written from
tests/fixtures/README.md only (not from granite_nar.py).

`reference_stages(config, weights, waveform)` takes the upstream config.json dict and
the upstream-named weights (PyTorch layouts) and returns every golden stage.
"""

import json
import math
import os

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


# ----------------------------------------------------------------------------- helpers
def linear(x, w, p=None):
    y = x @ w[p + ".weight"].T if p is not None else x @ w.T
    return y + w[p + ".bias"] if p is not None and p + ".bias" in w else y


def layer_norm(x, w, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def ctc_collapse(ids, blank):
    ids = [int(i) for i in ids]
    merged = [a for j, a in enumerate(ids) if j == 0 or a != ids[j - 1]]
    return np.array([a for a in merged if a != blank], dtype=np.int32)


def insertion_slots(preds, blank, min_len):
    ids = np.full(max(2 * len(preds) + 1, min_len), blank, dtype=np.int32)
    ids[1 : 2 * len(preds) : 2] = preds
    return ids


# ----------------------------------------------------------------------------- featurizer
def log_mel(x, sr=16000, n_fft=512, win=400, hop=160, n_mels=80):
    x = np.asarray(x, np.float64)
    n = len(x)
    window = np.zeros(n_fft)
    off = (n_fft - win) // 2
    window[off : off + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    xp = np.pad(x, n_fft // 2, mode="reflect")
    n_frames = 1 + n // hop
    frames = np.stack([xp[i * hop : i * hop + n_fft] for i in range(n_frames)]) * window
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # (frames, 257)
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    m_pts = np.linspace(mel(0.0), mel(sr / 2), n_mels + 2)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_b = np.linspace(0, sr / 2, n_fft // 2 + 1)[:, None]
    lo = (f_b - f_pts[None, :-2]) / (f_pts[1:-1] - f_pts[:-2])
    hi = (f_pts[None, 2:] - f_b) / (f_pts[2:] - f_pts[1:-1])
    fb = np.maximum(0.0, np.minimum(lo, hi)).astype(np.float32).astype(np.float64)
    T = n // (2 * hop)
    L = np.log10(np.maximum(power[: 2 * T] @ fb, 1e-10))
    L = np.maximum(L, L.max() - 8.0) / 4.0 + 1.0
    return L.reshape(T, 2 * n_mels)


# ----------------------------------------------------------------------------- encoder
def _ff(x, w, p):
    return linear(
        silu(linear(layer_norm(x, w, p + ".pre_norm", 1e-5), w, p + ".up_proj")),
        w,
        p + ".down_proj",
    )


def _attn(x, w, p, ec):
    T, H, dh, C, M = len(x), ec["num_heads"], ec["dim_head"], ec["context_size"], ec["max_pos_emb"]
    h = layer_norm(x, w, p + ".pre_norm", 1e-5)
    nblk = -(-T // C)
    h = np.concatenate([h, np.zeros((nblk * C - T, h.shape[1]))])
    q = h @ w[p + ".to_q.weight"].T
    kv = h @ w[p + ".to_kv.weight"].T
    k, v = kv[:, : H * dh], kv[:, H * dh :]
    split = lambda a: a.reshape(nblk, C, H, dh).transpose(0, 2, 1, 3)  # (nblk, H, C, dh)
    q, k, v = split(q), split(k), split(v)
    scale = dh**-0.5
    c = np.arange(C)
    rel = w[p + ".rel_pos_emb.weight"][c[:, None] - c[None, :] + M]  # (C, C, dh)
    pos = np.einsum("bhcd,crd->bhcr", q, rel) * scale
    rem = T % C
    if rem:
        bad = (c[:, None] >= rem) | (c[None, :] >= rem)
        pos[-1][:, bad] = -3.4028235e38
    scores = np.einsum("bhcd,bhrd->bhcr", q, k) * scale + pos
    out = softmax(scores) @ v  # (nblk, H, C, dh)
    out = out.transpose(0, 2, 1, 3).reshape(nblk * C, H * dh)[:T]
    return linear(out, w, p + ".to_out")


def _conv(x, w, p, ec):
    K = ec["conv_kernel_size"]
    h = layer_norm(x, w, p + ".norm", 1e-5)
    h = h @ w[p + ".up_conv.weight"][:, :, 0].T + w[p + ".up_conv.bias"]
    E = h.shape[1] // 2
    h = h[:, :E] * (1.0 / (1.0 + np.exp(-h[:, E:])))
    hp = np.pad(h, ((K // 2, K // 2 - (K + 1) % 2), (0, 0)))
    dw = w[p + ".depth_conv.conv.weight"][:, 0, :]  # (E, K)
    h = sum(hp[j : j + len(x)] * dw[:, j] for j in range(K))
    bn = p + ".batch_norm"
    h = (h - w[bn + ".running_mean"]) / np.sqrt(w[bn + ".running_var"] + 1e-5) * w[
        bn + ".weight"
    ] + w[bn + ".bias"]
    return silu(h) @ w[p + ".down_conv.weight"][:, :, 0].T + w[p + ".down_conv.bias"]


def _block(x, w, p, ec):
    x = x + 0.5 * _ff(x, w, p + ".ff1")
    x = x + _attn(x, w, p + ".attn", ec)
    x = x + _conv(x, w, p + ".conv", ec)
    x = x + 0.5 * _ff(x, w, p + ".ff2")
    return layer_norm(x, w, p + ".post_norm", 1e-5)


def encoder(feats, w, ec):
    x = linear(feats, w, "encoder.input_linear")
    hs, out = [x], {}
    for i in range(1, ec["num_layers"] + 1):
        x = _block(x, w, f"encoder.layers.{i - 1}", ec)
        if i == ec["self_conditioning_layer"]:
            out["encoder_selfcond_input"] = x
            out["encoder_mid_logits"] = linear(x, w, "encoder.out")
            p = softmax(out["encoder_mid_logits"])
            x = x + linear(p, w, "encoder.out_mid")
            importance = 1.0 - p[:, 0]
        hs.append(x)
    T, W = len(x), ec["bpe_pooling_window"]
    nw = -(-T // W)
    hp = np.concatenate([x, np.zeros((nw * W - T, x.shape[1]))]).reshape(nw, W, -1)
    ip = np.concatenate([importance, np.zeros(nw * W - T)]).reshape(nw, W)
    wt = ip / (ip.sum(1, keepdims=True) + 1e-8)
    out["encoder_bpe_pooled"] = np.einsum("nw,nwd->nd", wt, hp)
    out["encoder_bpe_logits"] = linear(out["encoder_bpe_pooled"], w, "encoder.out_bpe")
    out["encoder_hidden_states"] = np.stack(hs)
    return out


# ----------------------------------------------------------------------------- projector
def projector(hs, w, cfg):
    pc = cfg["projector_config"]
    eps, B, r, nh = pc["layernorm_eps"], pc["block_size"], pc["downsample_rate"], pc["num_heads"]
    feats = np.concatenate([hs[j] for j in cfg["encoder_layer_indices"]], -1)
    T, D = len(hs[0]), hs.shape[-1]
    x = np.concatenate(
        [
            layer_norm(feats[:, j * D : (j + 1) * D], w, f"projector.layer_norms.{j}", eps)
            for j in range(len(cfg["encoder_layer_indices"]))
        ],
        -1,
    )
    x = gelu(linear(x, w, "projector.layer_projector"))
    Hd = x.shape[1]
    nb = -(-T // B)
    x = np.concatenate([x, np.zeros((nb * B - T, Hd))]).reshape(nb, B, Hd)
    Q = w["projector.query"] + x.reshape(nb, B // r, r, Hd).mean(2)  # (nb, q, H)
    KV = x + w["projector.window_positions"]
    hd = Hd // nh
    heads = lambda a: a.reshape(a.shape[0], a.shape[1], nh, hd).transpose(0, 2, 1, 3)
    for i in range(pc["num_layers"]):
        p = f"projector.qformer.layers.{i}"
        ca = p + ".cross_attention"
        q = heads(linear(layer_norm(Q, w, p + ".attn_norm", eps), w, ca + ".q_proj"))
        k, v = heads(linear(KV, w, ca + ".k_proj")), heads(linear(KV, w, ca + ".v_proj"))
        o = softmax(q @ k.transpose(0, 1, 3, 2) * hd**-0.5) @ v
        Q = Q + linear(o.transpose(0, 2, 1, 3).reshape(Q.shape), w, ca + ".o_proj")
        Q = Q + linear(
            silu(linear(layer_norm(Q, w, p + ".mlp_norm", eps), w, p + ".mlp.fc1")),
            w,
            p + ".mlp.fc2",
        )
    out = linear(layer_norm(Q, w, "projector.out_norm", eps), w, "projector.out_linear")
    return feats, out.reshape(nb * (B // r), -1)


# ----------------------------------------------------------------------------- editor
def editor(audio_embeds, ids, w, tc):
    E = w["language_model.model.embed_tokens.weight"]
    h = np.concatenate([audio_embeds, E[ids]]) * tc["embedding_multiplier"]
    S, nh, nkv = len(h), tc["num_attention_heads"], tc["num_key_value_heads"]
    hd = tc["hidden_size"] // nh
    theta = tc.get("rope_parameters", {}).get("rope_theta", tc.get("rope_theta", 10000.0))
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(S)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rope = lambda x: x * cos + np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin
    eps, rm = tc["rms_norm_eps"], tc["residual_multiplier"]
    for i in range(tc["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        a = rms_norm(h, w[p + ".input_layernorm.weight"], eps)
        q = (a @ w[p + ".self_attn.q_proj.weight"].T).reshape(S, nh, hd).transpose(1, 0, 2)
        k = (a @ w[p + ".self_attn.k_proj.weight"].T).reshape(S, nkv, hd).transpose(1, 0, 2)
        v = (a @ w[p + ".self_attn.v_proj.weight"].T).reshape(S, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        g = nh // nkv
        k, v = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)  # head j -> kv head j // g
        o = softmax(q @ k.transpose(0, 2, 1) * tc["attention_multiplier"]) @ v
        h = h + rm * (
            o.transpose(1, 0, 2).reshape(S, nh * hd) @ w[p + ".self_attn.o_proj.weight"].T
        )
        m = rms_norm(h, w[p + ".post_attention_layernorm.weight"], eps)
        mlp = silu(m @ w[p + ".mlp.gate_proj.weight"].T) * (m @ w[p + ".mlp.up_proj.weight"].T)
        h = h + rm * (mlp @ w[p + ".mlp.down_proj.weight"].T)
    last = rms_norm(h, w["language_model.model.norm.weight"], eps)
    logits = last @ E.T / tc["logits_scaling"]
    return last, logits[len(audio_embeds) :]


# ----------------------------------------------------------------------------- pipeline
def reference_stages(config, weights, waveform):
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    ec, pc, tc = config["encoder_config"], config["projector_config"], config["text_config"]
    blank = config["blank_token_id"]
    s = {"input_features": log_mel(waveform)}
    s.update(encoder(s["input_features"], w, ec))
    s["encoder_bpe_argmax"] = s["encoder_bpe_logits"].argmax(-1).astype(np.int32)
    s["encoder_preds"] = ctc_collapse(s["encoder_bpe_argmax"], blank)
    s["multilayer_features"], s["projector_out"] = projector(s["encoder_hidden_states"], w, config)
    A = len(s["input_features"]) // pc["downsample_rate"]
    scale = tc["embedding_multiplier"] if config.get("scale_projected_embeddings", True) else 1.0
    s["audio_embeds"] = s["projector_out"][:A] / scale
    s["editor_input_ids"] = insertion_slots(
        s["encoder_preds"], blank, config["min_edit_sequence_length"]
    )
    E = w["language_model.model.embed_tokens.weight"]
    s["editor_inputs_embeds"] = np.concatenate([s["audio_embeds"], E[s["editor_input_ids"]]])
    s["editor_position_ids"] = np.arange(len(s["editor_inputs_embeds"]), dtype=np.int32)
    s["editor_last_hidden"], s["editor_text_logits"] = editor(
        s["audio_embeds"], s["editor_input_ids"], w, tc
    )
    s["editor_argmax"] = s["editor_text_logits"].argmax(-1).astype(np.int32)
    s["pred_ids"] = ctc_collapse(s["editor_argmax"], blank)
    return s


def load_checkpoint(path):
    """(config, float64 weights) from an upstream checkpoint dir (bf16 safetensors, read via
    mlx)."""
    import mlx.core as mx

    config = json.load(open(os.path.join(path, "config.json")))
    weights = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            for k, v in mx.load(os.path.join(path, f)).items():
                weights[k] = np.array(v.astype(mx.float32), dtype=np.float64)
    return config, weights


# ----------------------------------------------------------------------------- detokenizer
def byte_alphabet():
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it. Printable
    Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def decode(tokenizer, ids):
    """ids -> text, as a byte-level BPE tokenizer.json (a dict) decodes them: added (special)
    tokens dropped, every other token's characters read back as bytes, and the bytes as UTF-8
    with U+FFFD for each invalid sequence."""
    byte_of = {c: b for b, c in byte_alphabet().items()}
    token = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    special = {t["id"] for t in tokenizer["added_tokens"]}
    data = bytes(byte_of[c] for i in ids if int(i) not in special for c in token[int(i)])
    return data.decode("utf-8", errors="replace")
