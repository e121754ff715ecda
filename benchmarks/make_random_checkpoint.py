r"""Write a seeded random-weight Granite Speech 4.1 2B NAR checkpoint in the original hub layout.

    python benchmarks/make_random_checkpoint.py --out /tmp/granite_full_ckpt \
        [--seed 0] [--shard-gb 2]
    python benchmarks/make_random_checkpoint.py --out /tmp/rc_small --small     # dev sizes, seconds

The output (config.json, model-0000K-of-0000N.safetensors in bf16, model.safetensors.index.json,
tokenizer.json, tokenizer_config.json, preprocessor_config.json) has the structure of
tests/fixtures/dev/checkpoint at the real sizes (~2.25 B parameters, ~4.5 GB), so benchmarks can
time the real `convert.py -> granite_nar.load -> transcribe` path. Weights are drawn as described
in tests/fixtures/README.md so activations stay bounded; the tokenizer is a synthetic byte-level
BPE with the full vocabulary. Same seed, same bytes. Peak memory is about one shard.
"""

import argparse
import itertools
import json
import math
import shutil
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path

import mlx.core as mx

DEV = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dev" / "checkpoint"

# Each size: (name, full: Granite Speech 4.1 2B NAR, small: the dev fixture's)
SIZE_TABLE = [
    ("L", 16, 4),
    ("D", 1024, 64),
    ("heads", 8, 4),
    ("dim_head", 128, 16),
    ("C", 348, 12),
    ("context", 200, 50),
    ("max_pos", 512, 64),
    ("s", 8, 2),
    ("V", 100352, 357),
    ("blank", 100257, 353),
    ("H", 2048, 128),
    ("q_heads", 32, 4),
    ("llm", 2048, 96),
    ("e_layers", 40, 2),
    ("e_heads", 16, 4),
    ("kv_heads", 4, 2),
    ("inter", 4096, 192),
    ("attn_mult", 0.0078125, 0.0625),
    ("layer_idx", [4, 8, 12, -1], [1, 2, 3, -1]),
]
SIZES = {
    kind: {name: row[k] for name, *row in SIZE_TABLE} for k, kind in enumerate(["full", "small"])
}


def make_config(z):
    config = json.loads(
        (DEV / "config.json").read_text()
    )  # same structure and constants, sizes replaced
    config["encoder_config"].update(
        num_layers=z["L"],
        hidden_dim=z["D"],
        num_heads=z["heads"],
        dim_head=z["dim_head"],
        output_dim=z["C"],
        context_size=z["context"],
        max_pos_emb=z["max_pos"],
        self_conditioning_layer=z["s"],
        bpe_output_dim=z["V"],
        blank_token_id=z["blank"],
    )
    config["projector_config"].update(
        encoder_dim=z["D"], hidden_size=z["H"], num_heads=z["q_heads"], llm_dim=z["llm"]
    )
    config["text_config"].update(
        vocab_size=z["V"],
        hidden_size=z["llm"],
        intermediate_size=z["inter"],
        num_hidden_layers=z["e_layers"],
        num_attention_heads=z["e_heads"],
        num_key_value_heads=z["kv_heads"],
        attention_multiplier=z["attn_mult"],
        bos_token_id=z["blank"],
        eos_token_id=z["blank"],
        pad_token_id=z["blank"] - 1,
    )
    config.update(encoder_layer_indices=z["layer_idx"], blank_token_id=z["blank"])
    return config


def weight_specs(c):
    """[(key, shape, how)] in checkpoint order. how: ("w", gain) normal std gain/sqrt(fan_in);
    ("n", std) normal; "norm" U(0.9, 1.1); "bias" normal std 0.05; "var" U(0.5, 1.5); "count" int64
    scalar."""
    e, p, t = c["encoder_config"], c["projector_config"], c["text_config"]
    D, C, E = e["hidden_dim"], e["output_dim"], e["hidden_dim"] * e["conv_expansion_factor"]
    inner, F, H = e["num_heads"] * e["dim_head"], D * e["feedforward_mult"], p["hidden_size"]
    h, I = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * h // t["num_attention_heads"]

    def lin(name, shape, gain=1.0, bias=True):  # shape (out, in) or conv (out, in/groups, kernel)
        return [(f"{name}.weight", shape, ("w", gain))] + (
            [(f"{name}.bias", shape[:1], "bias")] if bias else []
        )

    def norm(name, n, bias=True):
        return [(f"{name}.weight", (n,), "norm")] + (
            [(f"{name}.bias", (n,), "bias")] if bias else []
        )

    s = lin("encoder.input_linear", (D, e["input_dim"]))
    for x in (f"encoder.layers.{i}" for i in range(e["num_layers"])):
        for ff in (f"{x}.ff1", f"{x}.ff2"):
            s += (
                norm(f"{ff}.pre_norm", D)
                + lin(f"{ff}.up_proj", (F, D))
                + lin(f"{ff}.down_proj", (D, F))
            )
        s += norm(f"{x}.attn.pre_norm", D) + lin(f"{x}.attn.to_q", (inner, D), bias=False)
        s += lin(f"{x}.attn.to_kv", (2 * inner, D), bias=False) + lin(
            f"{x}.attn.to_out", (D, inner)
        )
        s += [
            (f"{x}.attn.rel_pos_emb.weight", (2 * e["max_pos_emb"] + 1, e["dim_head"]), ("n", 1.0))
        ]
        s += norm(f"{x}.conv.norm", D) + lin(f"{x}.conv.up_conv", (2 * E, D, 1))
        s += lin(f"{x}.conv.depth_conv.conv", (E, 1, e["conv_kernel_size"]), bias=False)
        bn = f"{x}.conv.batch_norm"
        s += norm(bn, E) + [
            (f"{bn}.running_mean", (E,), ("n", 0.1)),
            (f"{bn}.running_var", (E,), "var"),
        ]
        s += [(f"{bn}.num_batches_tracked", (), "count")] + lin(f"{x}.conv.down_conv", (D, E, 1))
        s += norm(f"{x}.post_norm", D)
    s += lin("encoder.out", (C, D)) + lin("encoder.out_mid", (D, C))
    s += lin("encoder.out_bpe", (e["bpe_output_dim"], D), gain=10.0)
    s += sum((norm(f"projector.layer_norms.{j}", D) for j in range(p["num_encoder_layers"])), [])
    s += lin("projector.layer_projector", (H, p["num_encoder_layers"] * D))
    s += [("projector.query", (1, p["block_size"] // p["downsample_rate"], H), ("n", 0.5))]
    s += [("projector.window_positions", (1, p["block_size"], H), ("n", 0.5))]
    for x in (f"projector.qformer.layers.{i}" for i in range(p["num_layers"])):
        s += norm(f"{x}.attn_norm", H)
        s += sum(
            (
                lin(f"{x}.cross_attention.{n}", (H, H))
                for n in ("q_proj", "k_proj", "v_proj", "o_proj")
            ),
            [],
        )
        s += norm(f"{x}.mlp_norm", H) + lin(f"{x}.mlp.fc1", (H * p["mlp_ratio"], H))
        s += lin(f"{x}.mlp.fc2", (H, H * p["mlp_ratio"]))
    # out_linear gain 24: audio rows reach the editor at the token rows' RMS
    # (embeddings std 2 x multiplier 12)
    s += norm("projector.out_norm", H) + lin("projector.out_linear", (p["llm_dim"], H), gain=24.0)
    m = "language_model.model"
    s += [(f"{m}.embed_tokens.weight", (t["vocab_size"], h), ("n", 2.0))]
    for x in (f"{m}.layers.{i}" for i in range(t["num_hidden_layers"])):
        s += norm(f"{x}.input_layernorm", h, bias=False) + lin(
            f"{x}.self_attn.q_proj", (h, h), bias=False
        )
        s += lin(f"{x}.self_attn.k_proj", (kv, h), bias=False) + lin(
            f"{x}.self_attn.v_proj", (kv, h), bias=False
        )
        s += lin(f"{x}.self_attn.o_proj", (h, h), gain=1.5, bias=False)
        s += norm(f"{x}.post_attention_layernorm", h, bias=False)
        s += lin(f"{x}.mlp.gate_proj", (I, h), bias=False) + lin(
            f"{x}.mlp.up_proj", (I, h), bias=False
        )
        s += lin(f"{x}.mlp.down_proj", (h, I), gain=1.5, bias=False)
    return s + norm(f"{m}.norm", h, bias=False)  # lm_head is tied to embed_tokens: not stored


def draw(key, shape, how, seed):
    """One tensor (bf16, or int64 for the BatchNorm counter), from a key derived from
    (seed, name)."""
    if how == "count":
        return mx.array(5001, dtype=mx.int64)
    k = mx.random.key((seed << 32) | zlib.crc32(key.encode()))
    if how in ("norm", "var"):
        lo = 0.9 if how == "norm" else 0.5
        return mx.random.uniform(lo, lo + 2 * (1 - lo), shape, key=k).astype(mx.bfloat16)
    std = (
        0.05
        if how == "bias"
        else how[1]
        if how[0] == "n"
        else how[1] / math.sqrt(math.prod(shape[1:]))
    )
    return mx.random.normal(shape, dtype=mx.bfloat16, scale=std, key=k)


def nbytes(shape, how):
    return math.prod(shape) * (8 if how == "count" else 2)


def make_tokenizer(vocab_size, pad_id):
    """Synthetic byte-level BPE: 256 bytes, then merged pairs/triples up to pad_id, then special
    tokens."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    alphabet = [chr(b) for b in printable] + [
        chr(256 + i) for i in range(256 - len(printable))
    ]  # GPT-2's, dev order
    pairs = ([a, b] for a in alphabet for b in alphabet)
    triples = (
        [a + b, c] for a in alphabet for b in alphabet for c in alphabet
    )  # after every pair is in the vocab
    merges = list(itertools.islice(itertools.chain(pairs, triples), pad_id - 256))
    vocab = {c: i for i, c in enumerate(alphabet)} | {
        a + b: 256 + i for i, (a, b) in enumerate(merges)
    }
    assert len(vocab) == pad_id, "synthetic tokens must be unique"
    names = ["<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|unk|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(vocab_size - pad_id - len(names))]
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    added = [dict(id=pad_id + i, content=name, **flags) for i, name in enumerate(names)]
    tok = json.loads((DEV / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = added
    tok["model"].update(vocab=vocab, merges=merges)
    tok_config = json.loads((DEV / "tokenizer_config.json").read_text())
    tok_config["added_tokens_decoder"] = {
        str(a["id"]): {k: a[k] for k in sorted(a) if k != "id"} for a in added
    }
    return tok, tok_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, help="output directory (replaced if it holds a checkpoint)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shard-gb", type=float, default=2.0, help="approximate shard size in GB (default 2)"
    )
    parser.add_argument(
        "--small", action="store_true", help="the dev fixture's tiny sizes instead of the real ones"
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / "model.safetensors.index.json").is_file():
        sys.exit(f"error: {out} exists and is not a checkpoint written by this script")
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit("terminated")
    )  # so `finally` removes the temporary directory
    start = time.time()
    config = make_config(SIZES["small" if args.small else "full"])
    specs = weight_specs(config)
    shards, size = [[]], 0  # greedy packing in checkpoint order
    for spec in specs:
        b = nbytes(spec[1], spec[2])
        if shards[-1] and size + b > args.shard_gb * 1e9:
            shards, size = shards + [[]], 0
        shards[-1].append(spec)
        size += b
    total = sum(nbytes(shape, how) for _, shape, how in specs)
    n_params = sum(nbytes(shape, how) // 2 for _, shape, how in specs if how != "count")
    print(
        f"{len(specs)} tensors, {n_params / 1e9:.3f} B parameters, {total / 1e9:.2f} GB,"
        f" {len(shards)} shards",
        file=sys.stderr,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            print(f"  drawing {name}: {len(shard)} tensors", file=sys.stderr)
            for key, shape, how in shard:
                tensors[key] = draw(key, shape, how, args.seed)
                mx.eval(tensors[key])
                weight_map[key] = name
            mx.save_safetensors(str(tmp / name), tensors, metadata={"format": "pt"})
            print(
                f"  wrote {name}: {len(tensors)} tensors,"
                f" {sum(v.nbytes for v in tensors.values()) / 1e9:.2f} GB"
                f" ({time.time() - start:.0f} s)",
                file=sys.stderr,
            )
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok, tok_config = make_tokenizer(
            config["text_config"]["vocab_size"], config["text_config"]["pad_token_id"]
        )
        (tmp / "tokenizer.json").write_text(json.dumps(tok, indent=1) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        shutil.copyfile(DEV / "preprocessor_config.json", tmp / "preprocessor_config.json")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
