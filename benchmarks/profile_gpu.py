"""Where a 24.9 s clip's time goes: each compiled unit, one encoder/editor layer and their parts.

    python benchmarks/profile_gpu.py FULL_SIZE_MODEL_DIR      (output: benchmarks/profile_gpu_h100.txt)

Sizes in the alternatives (2048 channels, 7 blocks of 200, 249 audio rows) are the full model's.
"""
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import granite_nar as g  # noqa: E402  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench import synthetic_audio  # noqa: E402
model, tok = g.load(sys.argv[1])
def t(label, f, *a, n=20):
    for _ in range(3): mx.eval(f(*a))
    ts = []
    for _ in range(n):
        tic = time.perf_counter(); mx.eval(f(*a)); ts.append(time.perf_counter() - tic)
    print(f"{label:34s} {1e3*np.median(ts):8.3f} ms", flush=True)
    return f(*a)
wav = synthetic_audio(24.9); hyp = [1000 + 7 * i % 5000 for i in range(70)]
feats = t("log_mel", g.log_mel, wav).astype(model.dtype)
T = feats.shape[0]
enc = mx.compile(model.encoder)
hs, bpe = t("encoder (compiled)", lambda f: enc(f[None]), feats)
ml = mx.concatenate([hs[i] for i in model.args.encoder_layer_indices], axis=-1)
pj = mx.compile(model.projector)
po = t("projector (compiled)", pj, ml)
ae = po[0, :T // 5] / 12
t("encode (compiled, both)", model.encode, feats)
t("edit (compiled)", model.edit, ae, hyp)
x = hs[-2]; blk = model.encoder.layers[-1]
for name in ("ff1", "attn", "conv", "ff2"):
    t(f"  enc layer {name} x16", mx.compile(getattr(blk, name)), x)
t("  enc layer whole x16", mx.compile(blk), x)
c = blk.conv
h = mx.random.normal((1, T + 14, 2048)).astype(model.dtype)
t("    depthwise shifted", g._depthwise_conv, h, c.depth_conv.weight)
t("    depthwise conv1d", lambda h: mx.conv1d(h, c.depth_conv.weight, groups=2048), h)
a = blk.attn
q = mx.random.normal((7, 8, 200, 128)).astype(model.dtype); m = mx.random.normal((7, 8, 200, 200)).astype(model.dtype)
t("    sdpa + mask (7 blocks)", lambda q, m: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.08, mask=m), q, m)
t("    sdpa no mask", lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.08), q)
rel = a.rel_pos_emb(mx.arange(200)[:, None] - mx.arange(200)[None] + 512)
t("    shaw einsum", lambda q: mx.einsum("bnhcd,crd->bnhcr", q[None], rel), q)
slots = g.insert_slots(hyp, 100257, 8)
emb = mx.concatenate([ae, model.editor.embed_tokens(mx.array(slots))])[None].astype(model.dtype)
l0 = model.editor.layers[0]
t("  editor layer x40", mx.compile(l0), emb)
t("    editor attn", mx.compile(lambda h: l0.self_attn(l0.input_layernorm(h))), emb)
t("    editor mlp", mx.compile(lambda h: l0.mlp(l0.post_attention_layernorm(h))), emb)
t("  editor head (141 rows)", lambda h: model.editor.head(h[:, 249:]), emb)
