"""Granite Speech 4.1 2B NAR speech recognition in MLX, in one file.

    16 kHz audio -> log-mel (T, 160), 50 frames/s
      -> Conformer encoder -> pooled BPE CTC head -> greedy CTC collapse = first hypothesis
      -> windowed Q-Former over encoder layers [4, 8, 12, last] -> audio embeddings (T // 5 rows)
      -> bidirectional Granite editor over [audio | _ t1 _ t2 ... _] -> CTC collapse -> text

The editor rewrites every blank-interleaved slot of the hypothesis at once: a transcript costs
one encoder pass and one editor pass. The reference is IBM's released code (transformers
granite_speech_nar @032cc088).

    python granite_nar.py audio.wav [--model DIR|REPO]     (--help lists the options)
    model, tokenizer = granite_nar.load("granite_nar_mlx")
    text = granite_nar.transcribe(model, tokenizer, "audio.wav")
"""

__version__ = "1.1.0"

import os
import signal

if __name__ == "__main__":  # Ctrl-C during the imports below: exit at once, no traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import argparse
import ctypes
import ctypes.util
import functools
import io
import itertools
import json
import math
import queue
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import MISSING, dataclass, fields
from pathlib import Path


def _load_openblas():
    """MLX's Linux CPU wheel has a slow reference BLAS; OpenBLAS, loaded with RTLD_GLOBAL before
    MLX, provides the same symbols. Returns whether the BLAS is a fast one."""
    if sys.platform != "linux":
        return True
    for name in filter(None, (ctypes.util.find_library("openblas"), "libopenblas.so.0")):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if "mlx.core" not in sys.modules:
            return True
        warnings.warn(  # too late: MLX's matmuls are bound to its own BLAS
            "mlx was imported before granite_nar, so MLX's CPU matmuls keep its slow reference "
            "BLAS (about 3x slower here): import granite_nar first",
            stacklevel=3,
        )
        return False
    return False


HAS_OPENBLAS = _load_openblas()

import mlx.core as mx  # noqa: E402  (after OpenBLAS, on purpose)
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

# ---- config ----

SAMPLE_RATE = 16000
N_FFT = 512  # 257 one-sided bins
WIN_LENGTH = 400  # 25 ms periodic Hann, zero-padded to N_FFT
HOP_LENGTH = 160  # 10 ms: 100 STFT frames/s, stacked in pairs to 50 encoder frames/s
N_MELS = 80
SAMPLES_PER_FRAME = 2 * HOP_LENGTH  # one encoder frame: 320 samples, 20 ms


def _from_dict(cls, config, where):
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in config]
    if missing:
        raise ValueError(f"config.json: {where} lacks {', '.join(missing)}")
    return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


@dataclass
class EncoderArgs:
    input_dim: int
    num_layers: int
    hidden_dim: int
    num_heads: int
    dim_head: int
    feedforward_mult: int
    output_dim: int  # classes of the mid-layer (character) CTC head
    context_size: int  # attention block length, in frames
    max_pos_emb: int
    conv_kernel_size: int
    conv_expansion_factor: int
    self_conditioning_layer: int  # 1-based block after which the mid head feeds back
    bpe_output_dim: int
    bpe_pooling_window: int


@dataclass
class ProjectorArgs:
    encoder_dim: int
    num_encoder_layers: int
    hidden_size: int
    num_heads: int
    num_layers: int
    block_size: int  # encoder frames per Q-Former window
    downsample_rate: int  # frames per query: block_size // downsample_rate queries a window
    mlp_ratio: float
    llm_dim: int
    layernorm_eps: float
    attn_bias: bool = True
    mlp_bias: bool = True
    intermediate_size: int = 0  # given by transformers-native configs; else hidden x mlp_ratio


@dataclass
class EditorArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    attention_multiplier: float
    embedding_multiplier: float
    logits_scaling: float
    residual_multiplier: float
    max_position_embeddings: int = 4096


@dataclass
class ModelArgs:
    encoder: EncoderArgs
    projector: ProjectorArgs
    editor: EditorArgs
    encoder_layer_indices: list
    blank_token_id: int
    min_edit_sequence_length: int = 0
    scale_projected_embeddings: bool = True

    @classmethod
    def from_dict(cls, config):
        sections = {"encoder_config": EncoderArgs, "projector_config": ProjectorArgs}
        if missing := [k for k in (*sections, "text_config") if k not in config]:
            raise ValueError(
                f"config.json lacks {', '.join(missing)}: not a Granite Speech NAR config"
            )
        text = dict(config["text_config"])
        rope = text.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_type {rope['rope_type']!r} is not supported")
        text.setdefault("rope_theta", rope.get("rope_theta"))
        editor = _from_dict(EditorArgs, text, "text_config")
        parts = {
            k.removesuffix("_config"): _from_dict(c, config[k], k) for k, c in sections.items()
        }
        args = _from_dict(cls, {**config, **parts, "editor": editor}, "the top level")
        L = args.encoder.num_layers
        if bad := [i for i in args.encoder_layer_indices if not -L - 1 <= i <= L]:
            raise ValueError(
                f"config.json: encoder layers {bad} do not exist (hidden states 0..{L})"
            )
        return args


# ---- featurizer ----


def _mel_filters():
    """HTK mel filters without area normalization, (N_FFT // 2 + 1, N_MELS), built in float64."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    f_pts = 700.0 * (10.0 ** (np.linspace(mel(0.0), mel(SAMPLE_RATE / 2), N_MELS + 2) / 2595.0) - 1)
    bins = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)[:, None]
    rising = (bins - f_pts[:-2]) / (f_pts[1:-1] - f_pts[:-2])
    falling = (f_pts[2:] - bins) / (f_pts[2:] - f_pts[1:-1])
    return mx.array(np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32))


MEL_FILTERS = _mel_filters()
_HANN = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)  # periodic
WINDOW = mx.array(np.pad(_HANN, (N_FFT - WIN_LENGTH) // 2).astype(np.float32))  # centered


def stft_input(waveforms):
    """The featurizer's host work, apart so that it can run while the device is busy: a list of B
    16 kHz waveforms (n_b,) -> the batch the STFT reads (B, max n_b + N_FFT), on the device, and
    each one's encoder frames T_b = n_b // 320."""
    waveforms = [np.asarray(w, dtype=np.float32) for w in waveforms]
    for w in waveforms:
        if w.ndim != 1:
            raise ValueError(f"log_mel takes a list of mono waveforms (n,), got shape {w.shape}")
        if len(w) < SAMPLES_PER_FRAME:
            raise ValueError(f"audio too short: {len(w)} samples, at least 320 needed")
    pad = N_FFT // 2  # center=True: reflect padding (w[pad] .. w[1] | w | w[-2] ..), then zeros
    x = np.zeros((len(waveforms), max(map(len, waveforms)) + 2 * pad), np.float32)
    for row, w in zip(x, waveforms):  # written in place: np.pad would copy each waveform again
        n = len(w)
        row[:pad] = w[pad:0:-1]
        row[pad : pad + n] = w
        row[pad + n : 2 * pad + n] = w[-2 : -pad - 2 : -1]
    return mx.array(x), [len(w) // SAMPLES_PER_FRAME for w in waveforms]


def log_mel(waveforms):
    """A list of B 16 kHz waveforms (n_b,) -> features (B, max T_b, 160), zero past each
    T_b = n_b // 320, and the T_b. Frames 2t and 2t + 1 of the log-mel are stacked as frame t."""
    x, lengths = stft_input(waveforms)
    return _log_mel(x, mx.array(lengths)), lengths


@mx.compile  # its elementwise steps fused into few kernels; a trace per input shape (a few ops)
def _log_mel(x, lengths):  # (B, n + N_FFT) padded waveforms, (B,) frames -> (B, T, 160)
    B, n = x.shape
    n_frames = 2 * ((n - N_FFT) // SAMPLES_PER_FRAME)  # an even count of STFT frames
    frames = mx.as_strided(x, (B, n_frames, N_FFT), (n, HOP_LENGTH, 1))
    spectrum = mx.fft.rfft(frames * WINDOW)  # (B, 2T, 257)
    power = mx.square(spectrum.real) + mx.square(spectrum.imag)
    logmel = mx.log10(mx.maximum(power @ MEL_FILTERS, 1e-10))  # (B, 2T, 80)
    inside = (mx.arange(n_frames) < 2 * lengths[:, None])[..., None]
    top = mx.where(inside, logmel, -mx.inf).max(axis=(1, 2), keepdims=True)  # per utterance
    logmel = mx.where(inside, mx.maximum(logmel, top - 8.0) / 4 + 1, 0)
    return logmel.reshape(B, -1, 2 * N_MELS)


# ---- Conformer encoder ----


def pad_rows(x, n):
    """(B, T, ...) -> (B, n, ...) with zero rows after row T (mx.pad copies even when T == n)."""
    if n == x.shape[1]:
        return x
    return mx.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def zero_padding(x, mask):
    """(B, T, ...) with the rows of padded frames (mask (B, T) False; None: none) set to zero."""
    return x if mask is None else mx.where(mask.reshape(*mask.shape, *[1] * (x.ndim - 2)), x, 0)


class ConformerFeedForward(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        dim, inner = args.hidden_dim, args.hidden_dim * args.feedforward_mult
        self.pre_norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, inner)
        self.down_proj = nn.Linear(inner, dim)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.up_proj(self.pre_norm(x))))


class ConformerAttention(nn.Module):
    """Self-attention inside blocks of `context_size` frames, with Shaw relative positions."""

    def __init__(self, args: EncoderArgs):
        super().__init__()
        inner, C = args.num_heads * args.dim_head, args.context_size
        self.num_heads, self.context_size = args.num_heads, C
        self.scale = args.dim_head**-0.5
        self.pre_norm = nn.LayerNorm(args.hidden_dim)
        self.to_q = nn.Linear(args.hidden_dim, inner, bias=False)
        self.to_kv = nn.Linear(args.hidden_dim, 2 * inner, bias=False)  # rows: K, then V
        self.to_out = nn.Linear(inner, args.hidden_dim)
        self.rel_pos_emb = nn.Embedding(2 * args.max_pos_emb + 1, args.dim_head)
        # The table rows of the distances C - 1 down to -C, clipped to the table: the 2C - 1 that
        # occur and one more, so that each row of the Shaw matmul's output has an even length
        # (the fast matmul kernels need it; benchmarks/README.md)
        P = args.max_pos_emb
        self._distances = mx.array(np.clip(np.arange(C - 1, -C - 1, -1), -P, P) + P)

    def __call__(self, x, mask=None):  # (B, T, D), mask (B, T) True on real frames -> (B, T, D)
        B, T, _ = x.shape
        C, H, W = self.context_size, self.num_heads, 2 * self.context_size
        n = -(-T // C)  # blocks; the last is padded with zero rows after the norm, as upstream
        h = pad_rows(self.pre_norm(x), n * C)
        q, kv = self.to_q(h), self.to_kv(h)  # (B, nC, H * d), (B, nC, 2 * H * d)

        # Shaw term: scores[c, r] += scale * q_c . rel_pos_emb[c - r]. One matmul of q against
        # every distance puts it at [c, C - 1 - c + r]; a strided view that starts each row one
        # element further left lines the keys up (a gather would cost several times more)
        shaw = q.reshape(B, n * C, H, -1) @ self.rel_pos_emb.weight[self._distances].T
        strides = (n * C * H * W, C * H * W, W, H * W - 1, 1)  # (B, nC, H, W) as (B, n, H, C, C)
        bias = mx.as_strided(shaw, (B, n, H, C, C), strides, C - 1) * self.scale
        if mask is not None or n * C > T:  # padded frames: -max instead of the position term
            # (built from arrays: a number from a shape would become a new kernel per shape)
            real = pad_rows(mx.ones((B, T), mx.bool_) if mask is None else mask, n * C)
            real = real.reshape(-1, n, 1, C)
            bias = mx.where(real[..., :, None] & real[..., None, :], bias, mx.finfo(bias.dtype).min)

        blocks = lambda a: a.reshape(B, n, C, H, -1).transpose(0, 1, 3, 2, 4)  # (B, n, H, C, d)
        k, v = mx.split(kv, 2, axis=-1)
        q, k, v = (blocks(a).reshape(B * n, H, C, -1) for a in (q, k, v))
        mask = bias.reshape(B * n, H, C, C)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.reshape(B, n, H, C, -1).transpose(0, 1, 3, 2, 4).reshape(B, n * C, -1)
        return self.to_out(out[:, :T])


class ConformerConvModule(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        dim, inner = args.hidden_dim, args.hidden_dim * args.conv_expansion_factor
        K = args.conv_kernel_size
        self.norm = nn.LayerNorm(dim)
        self.up_conv = nn.Linear(dim, 2 * inner)  # the pointwise (kernel 1) convs are Linears
        # Upstream pads K // 2 before and K // 2 - 1 after for an even K: this pads K // 2 on
        # both sides and drops the one extra output
        self.depth_conv = nn.Conv1d(inner, inner, K, padding=K // 2, groups=inner, bias=False)
        self.batch_norm = nn.BatchNorm(inner)
        self.down_conv = nn.Linear(inner, dim)
        self.shifted = False  # depth_conv and batch_norm as shifted_sum: load() sets it on a CPU

    def __call__(self, x, mask=None):  # (B, T, D) -> (B, T, D), over the whole utterance
        h = zero_padding(nn.glu(self.up_conv(self.norm(x))), mask)  # zeros past each end
        if self.shifted:
            h = self.shifted_sum(h)
        else:
            h = self.batch_norm(self.depth_conv(h)[:, : x.shape[1]])
        return self.down_conv(nn.silu(h).astype(x.dtype))

    def shifted_sum(self, h):
        """depth_conv then batch_norm as K shifted multiply-adds in float32, the norm's scale
        folded into the taps: (B, T, C) -> (B, T, C) float32. On a CPU it is faster than MLX's
        grouped conv, on a GPU slower (benchmarks/README.md)."""
        bn, T = self.batch_norm, h.shape[1]
        scale = bn.weight.astype(mx.float32) * mx.rsqrt(bn.running_var.astype(mx.float32) + bn.eps)
        taps = self.depth_conv.weight[:, :, 0].T * scale  # (K, C)
        h = mx.pad(h, [(0, 0), (len(taps) // 2, len(taps) // 2), (0, 0)])  # as depth_conv
        y = bn.bias - bn.running_mean * scale  # (C,) float32
        for k, tap in enumerate(taps):
            y = y + h[:, k : k + T] * tap
        return y


class ConformerBlock(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.ff1 = ConformerFeedForward(args)
        self.attn = ConformerAttention(args)
        self.conv = ConformerConvModule(args)
        self.ff2 = ConformerFeedForward(args)
        self.post_norm = nn.LayerNorm(args.hidden_dim)

    def __call__(self, x, mask=None):
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, mask)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


class ConformerEncoder(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.args = args
        self.input_linear = nn.Linear(args.input_dim, args.hidden_dim)
        self.layers = [ConformerBlock(args) for _ in range(args.num_layers)]
        self.out = nn.Linear(args.hidden_dim, args.output_dim)  # mid-layer CTC head
        self.out_mid = nn.Linear(args.output_dim, args.hidden_dim)  # its feedback
        self.out_bpe = nn.Linear(args.hidden_dim, args.bpe_output_dim)

    def __call__(self, features, mask=None):
        """(B, T, 160), mask (B, T) True on real frames -> hidden states [input, block 1 ..
        block L] of (B, T, D) and BPE CTC logits (B, ceil(T / W), V)."""
        x = self.input_linear(features)
        hidden_states = [x]
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if i == self.args.self_conditioning_layer:
                posteriors = mx.softmax(self.out(x), axis=-1, precise=True)
                x = x + self.out_mid(posteriors)  # hidden_states[i] is the state after this
            hidden_states.append(x)
        importance = zero_padding(1 - posteriors[..., 0], mask)  # class 0 of the mid head
        return hidden_states, self.out_bpe(self.pool(x, importance))

    def pool(self, x, importance):
        """Average each window of W frames weighted by importance: (B, T, D), (B, T) ->
        (B, ceil(T / W), D)."""
        B, T, D = x.shape
        W = self.args.bpe_pooling_window
        n = -(-T // W) * W
        x = pad_rows(x, n).reshape(B, -1, W, D)
        importance = pad_rows(importance, n).reshape(B, -1, W, 1)
        return (importance / (importance.sum(axis=2, keepdims=True) + 1e-8) * x).sum(axis=2)


# ---- windowed Q-Former projector ----


class QFormerAttention(nn.Module):
    def __init__(self, args: ProjectorArgs):
        super().__init__()
        dim, bias = args.hidden_size, args.attn_bias
        self.num_heads = args.num_heads
        self.scale = (dim // args.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def __call__(self, query, kv):  # (N, q, H), (N, block, H) -> (N, q, H)
        N, Lq, _ = query.shape
        heads = lambda a: a.reshape(N, a.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        # Written out: on a window's few queries and keys, plain matmuls run faster than the
        # fused kernel, and a softmax of a few ops than MLX's (a thread block for a row of 15)
        scores = (q * self.scale) @ k.transpose(0, 1, 3, 2)  # (N, heads, q, block)
        scores = scores.astype(mx.float32)  # as a precise softmax
        weights = mx.exp(scores - scores.max(axis=-1, keepdims=True))
        out = (weights / weights.sum(axis=-1, keepdims=True)).astype(v.dtype) @ v
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(N, Lq, -1))


class QFormerMLP(nn.Module):
    def __init__(self, args: ProjectorArgs):
        super().__init__()
        hidden = args.intermediate_size or int(args.hidden_size * args.mlp_ratio)
        self.fc1 = nn.Linear(args.hidden_size, hidden, bias=args.mlp_bias)
        self.fc2 = nn.Linear(hidden, args.hidden_size, bias=args.mlp_bias)

    def __call__(self, x):
        return self.fc2(nn.silu(self.fc1(x)))


class QFormerLayer(nn.Module):
    def __init__(self, args: ProjectorArgs):
        super().__init__()
        self.attn_norm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.cross_attention = QFormerAttention(args)
        self.mlp_norm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.mlp = QFormerMLP(args)

    def __call__(self, query, kv):
        query = query + self.cross_attention(self.attn_norm(query), kv)  # kv is not normalized
        return query + self.mlp(self.mlp_norm(query))


class QFormer(nn.Module):
    def __init__(self, args: ProjectorArgs):
        super().__init__()
        self.layers = [QFormerLayer(args) for _ in range(args.num_layers)]

    def __call__(self, query, kv):
        for layer in self.layers:
            query = layer(query, kv)
        return query


class QFormerProjector(nn.Module):
    """Encoder layers -> windows of `block_size` frames -> `block_size // downsample_rate`
    vectors each, in the editor's width."""

    def __init__(self, args: ProjectorArgs):
        super().__init__()
        self.args = args
        dim, n_layers = args.encoder_dim, args.num_encoder_layers
        self.layer_norms = [nn.LayerNorm(dim, eps=args.layernorm_eps) for _ in range(n_layers)]
        self.layer_projector = nn.Linear(n_layers * dim, args.hidden_size)
        self.query = mx.zeros((1, args.block_size // args.downsample_rate, args.hidden_size))
        self.window_positions = mx.zeros((1, args.block_size, args.hidden_size))
        self.qformer = QFormer(args)
        self.out_norm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.out_linear = nn.Linear(args.hidden_size, args.llm_dim)

    def __call__(self, x, mask=None):
        """(B, T, k * D), mask (B, T) -> (B, ceil(T / block) * block // rate, llm_dim)."""
        B, T, _ = x.shape
        block, rate = self.args.block_size, self.args.downsample_rate
        slices = mx.split(x, len(self.layer_norms), axis=-1)
        x = mx.concatenate([norm(s) for norm, s in zip(self.layer_norms, slices)], axis=-1)
        x = zero_padding(nn.gelu(self.layer_projector(x)), mask)  # exact (erf) GELU
        n = -(-T // block)
        x = pad_rows(x, n * block).reshape(B * n, block, -1)  # zero rows after the GELU
        query = self.query + x.reshape(B * n, block // rate, rate, -1).mean(axis=2)  # (N, q, H)
        query = self.qformer(query, x + self.window_positions)  # padded rows too, unmasked
        return self.out_linear(self.out_norm(query)).reshape(B, n * query.shape[1], -1)


# ---- bidirectional Granite editor ----


class EditorAttention(nn.Module):
    def __init__(self, args: EditorArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        dim, self.head_dim = args.hidden_size, args.hidden_size // args.num_attention_heads
        self.scale = args.attention_multiplier  # Granite's, instead of 1 / sqrt(head_dim)
        # q_proj, k_proj and v_proj, stacked (sanitize): one matmul instead of three
        n_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(dim, n_out, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta)  # halves

    def __call__(self, x, mask=None):  # (B, S, hidden) -> (B, S, hidden)
        B, S, _ = x.shape
        H, H_kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [H * d, (H + H_kv) * d], axis=-1)
        q = q.reshape(B, S, H, d).transpose(0, 2, 1, 3)  # (B, H, S, d)
        k = k.reshape(B, S, H_kv, d).transpose(0, 2, 1, 3)  # (B, H_kv, S, d)
        v = v.reshape(B, S, H_kv, d).transpose(0, 2, 1, 3)
        q, k = self.rope(q), self.rope(k)  # positions 0..S-1 over [audio | text]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, S, -1))


class EditorMLP(nn.Module):
    def __init__(self, args: EditorArgs):
        super().__init__()
        dim, inner = args.hidden_size, args.intermediate_size
        self.gate_up_proj = nn.Linear(dim, 2 * inner, bias=False)  # gate_proj, up_proj (sanitize)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def __call__(self, x):
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class EditorLayer(nn.Module):
    def __init__(self, args: EditorArgs):
        super().__init__()
        self.residual_multiplier = args.residual_multiplier
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = EditorAttention(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = EditorMLP(args)

    def __call__(self, h, mask=None):
        h = h + self.residual_multiplier * self.self_attn(self.input_layernorm(h), mask)
        return h + self.residual_multiplier * self.mlp(self.post_attention_layernorm(h))


class GraniteEditor(nn.Module):
    """A Granite decoder run without a causal mask (upstream: language_model.model)."""

    def __init__(self, args: EditorArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [EditorLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs_embeds, mask=None):
        """(B, S, hidden) -> (B, S, hidden) after the final norm; mask (B, 1, 1, S), True on keys
        that may be read (None: all)."""
        h = inputs_embeds * self.args.embedding_multiplier
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h)

    def head(self, h):  # the tied output head: (..., hidden) -> (..., vocab)
        return self.embed_tokens.as_linear(h) / self.args.logits_scaling


# ---- the model ----


class Compiled:
    """mx.compile(fun): a pass traced once per input shape, then replayed without Python's per-op
    dispatch, elementwise chains fused. It keeps at most MAX_TRACES shapes' traces (mx.compile
    keeps all, and window after window of long audio brings new ones). Not `enabled`: fun."""

    MAX_TRACES = 32  # a pass over many clip lengths in batches of varied size comes to ~20

    def __init__(self, fun):
        self.fun, self.shapes, self.compiled = fun, set(), mx.compile(fun)
        self.enabled = True

    def __call__(self, *inputs):
        if not self.enabled:
            return self.fun(*inputs)
        shapes = tuple(None if a is None else a.shape for a in inputs)
        if shapes not in self.shapes and len(self.shapes) == self.MAX_TRACES:
            self.shapes, self.compiled = set(), mx.compile(self.fun)
        self.shapes.add(shapes)
        return self.compiled(*inputs)


class GraniteNAR(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.encoder = ConformerEncoder(args.encoder)
        self.projector = QFormerProjector(args.projector)
        self.editor = GraniteEditor(args.editor)
        self.compiled_encode, self.compiled_edit = Compiled(self.encode), Compiled(self.edit)

    @property
    def dtype(self):
        return self.editor.norm.weight.dtype  # norms are never quantized

    def encode(self, features, mask=None):
        """Features (B, T, 160), mask (B, T) True on real frames (None: all) -> BPE CTC logits
        (B, ceil(T / W), vocab) and audio embeddings (B, T // downsample_rate, llm_dim). A padded
        frame changes no real frame's outputs."""
        hidden_states, bpe_logits = self.encoder(features, mask)
        multilayer = mx.concatenate([hidden_states[i] for i in self.args.encoder_layer_indices], -1)
        n_audio = features.shape[1] // self.args.projector.downsample_rate  # whole queries only
        audio_embeds = self.projector(multilayer, mask)[:, :n_audio]
        if self.args.scale_projected_embeddings:
            audio_embeds = audio_embeds / self.args.editor.embedding_multiplier
        return bpe_logits, audio_embeds

    def edit(self, audio_embeds, text_ids, audio_lengths=None, text_lengths=None):
        """Audio embeddings (B, A, llm_dim), slot ids (B, L) (insert_slots) -> logits (B, L,
        vocab) of the text slots. In a padded batch, sample b has audio_lengths[b] audio rows and
        text_lengths[b] slots: it reads [audio_b | slots_b] at positions 0.. and no padding."""
        (B, A, _), L = audio_embeds.shape, text_ids.shape[1]
        audio_lengths = mx.full((B,), A) if audio_lengths is None else audio_lengths
        text_lengths = mx.full((B,), L) if text_lengths is None else text_lengths
        text_pos = mx.arange(A + L) - audio_lengths[:, None]  # (B, S): negative on audio rows
        # clipped to each row's last slot, not to L - 1: a number from a shape in a compiled
        # pass is built into a kernel, and each new L would build one more
        slot_ids = mx.take_along_axis(text_ids, mx.clip(text_pos, 0, text_lengths[:, None] - 1), 1)
        is_audio = (text_pos < 0)[..., None]
        inputs_embeds = mx.where(
            is_audio, pad_rows(audio_embeds, A + L), self.editor.embed_tokens(slot_ids)
        )
        mask = (text_pos < text_lengths[:, None])[:, None, None]  # keys: (B, 1, 1, S)
        hidden = self.editor(inputs_embeds, mask)
        rows = (audio_lengths[:, None] + mx.arange(L))[..., None]  # the head reads text rows only
        return self.editor.head(mx.take_along_axis(hidden, rows, axis=1))


# ---- decoding ----


def ctc_collapse(ids, blank_id):
    """Greedy CTC: merge consecutive repeats, then drop blanks (`a _ a` stays `a a`)."""
    ids = np.asarray(ids).tolist()
    return [t for i, t in enumerate(ids) if t != blank_id and (i == 0 or t != ids[i - 1])]


def insert_slots(ids, blank_id, min_len):
    """[a, b] -> [_, a, _, b, _], right-padded with blanks to min_len."""
    slots = [blank_id] * max(2 * len(ids) + 1, min_len)
    slots[1 : 2 * len(ids) : 2] = ids
    return slots


def slot_batch(hypotheses, blank_id, min_len, step=1):
    """Hypotheses -> their insert_slots, blank-padded to the longest (rounded up to a multiple of
    step) as ids (B, L), and their lengths (B,): the editor's text inputs."""
    slots = [insert_slots(ids, blank_id, min_len) for ids in hypotheses]
    text_ids = np.full((len(slots), -(-max(map(len, slots)) // step) * step), blank_id, np.int32)
    for row, s in zip(text_ids, slots):
        row[: len(s)] = s
    return mx.array(text_ids), mx.array([len(s) for s in slots])


def _bytes_to_unicode():
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for U+0100.."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class Tokenizer:
    """Decoder of the byte-level BPE tokenizer.json (transcription never encodes)."""

    CLEAN_UP = [(" " + p, p) for p in (".", "?", "!", ",", "n't", "'m", "'s", "'ve", "'re")]

    def __init__(self, path):
        try:
            data = json.loads((Path(path) / "tokenizer.json").read_text(encoding="utf-8"))
            self.tokens = {i: token for token, i in data["model"]["vocab"].items()}
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"{Path(path) / 'tokenizer.json'}: not a BPE tokenizer ({e})"
            ) from None
        added = data.get("added_tokens", [])
        self.tokens.update({t["id"]: t["content"] for t in added})
        self.special_ids = {t["id"] for t in added if t.get("special")}
        self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.bytes = {}  # token_bytes of the ids seen so far
        config = Path(path) / "tokenizer_config.json"
        config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        self.clean_up_tokenization_spaces = config.get("clean_up_tokenization_spaces", False)

    def token_bytes(self, i):
        """A token id -> its bytes (b"" for special and unknown ids), each worked out once."""
        if i not in self.bytes:
            token = "" if i in self.special_ids else self.tokens.get(i, "")
            if all(c in self.byte_of for c in token):
                self.bytes[i] = bytes(self.byte_of[c] for c in token)
            else:  # a token outside the byte alphabet stands for itself
                self.bytes[i] = token.encode("utf-8")
        return self.bytes[i]

    def decode(self, ids):
        """Token ids -> text, special tokens skipped, invalid UTF-8 replaced by U+FFFD."""
        text = b"".join(map(self.token_bytes, np.asarray(ids).tolist())).decode(errors="replace")
        if self.clean_up_tokenization_spaces:
            for before, after in [*self.CLEAN_UP, (" ' ", "'")]:
                text = text.replace(before, after)
        return text


# ---- word timestamps ----

SENTENCE_END = tuple(".?!…。？！")
CLOSERS = "\"')]}»”’」』"  # closing quotes and brackets after a sentence's end: 'end."'


def ctc_align(log_probs, ids, blank_id):
    """The (start, end) frames, end exclusive, of each id on a best-scoring CTC path of
    log-softmax scores (T, V) (numpy or MLX) that collapses to exactly ids; None when none fits
    (a token needs a frame, equal neighbours a blank between them). The path's frames are blank
    but for one run [a_k, b_k) per token, so it is a Viterbi over tokens (not over the 2n + 1
    blank-interleaved states), each step vectorised over frames with prefix sums and maxima."""
    n, T = len(ids), log_probs.shape[0]
    repeat = [a == b for a, b in zip(ids, ids[1:])]  # token k equals token k + 1
    m = T - n - sum(repeat)  # the frames to spare: token k starts at lo[k] + 0..m
    if n == 0 or m < 0:
        return [] if n == 0 else None
    columns = [blank_id, *ids]
    if isinstance(log_probs, mx.array):  # gather the n + 1 columns before leaving the device
        log_probs = log_probs[:, mx.array(columns)].astype(mx.float32)
        columns = slice(None)
    lp = np.maximum(np.asarray(log_probs)[:, columns], -1e6)  # (T, n + 1), not -inf
    # A run [a, b) of token k scores gain[k, b] - gain[k, a] more than blanks on its frames
    gain = np.zeros((n, T + 1))
    np.subtract(lp[:, 1:].T, lp[:, 0], out=gain[:, 1:], dtype=np.float64)
    np.cumsum(gain[:, 1:], axis=1, out=gain[:, 1:])
    # Token k's frames are lo[k] + 0..m: the tokens before it and their blanks come first, and
    # those after it last. Below, frame lo[k] + j of token k is its column j.
    lo = np.arange(n) + np.cumsum([0, *repeat])
    ends = np.empty((n, m + 2))  # [k, b]: best path with token k's run ending at b
    starts = np.empty((n, m + 2))  # [k, a]: best path before token k starts at a, minus gain
    ready = np.zeros(m + 2)  # [a]: best path with the tokens before k done by frame a
    best, ends[:, 0] = np.empty(m + 2), -np.inf  # no run ends where it starts
    for k in range(n):  # in place: each step a few calls over the frames, no new arrays
        gain_k = gain[k, lo[k] : lo[k] + m + 2]
        np.subtract(ready, gain_k, out=starts[k])
        np.maximum.accumulate(starts[k], out=best)
        np.add(gain_k[1:], best[:-1], out=ends[k, 1:])
        np.maximum.accumulate(ends[k], out=best)
        # the next token's columns start a frame later (two after a repeat, keeping a blank
        # between): its column a reads this token's runs ending by column a + 1
        ready[:-1], ready[-1] = best[1:], best[-1]
    spans = []
    b = ends[-1].argmax()  # then blanks to the end
    for k in range(n - 1, -1, -1):  # back: each run's start, then the run before's end
        a = starts[k, :b].argmax()
        spans.append((int(lo[k] + a), int(lo[k] + b)))
        b = ends[k - 1, : a + 2].argmax()  # the run before ends by its column a + 1
    return spans[::-1]


@functools.cache
def _punctuation(token):
    """Whether a token's bytes are punctuation only (spaces aside)."""
    text = token.decode(errors="replace").strip()
    return bool(text) and all(unicodedata.category(c)[0] == "P" for c in text)


def group_words(pieces):
    """(token bytes, start, end, confidence) pieces -> words {word, start, end, confidence}: a
    token beginning with a space starts a word, punctuation joins the word before, and a word's
    confidence is the mean of its tokens' (None: unaligned)."""
    groups = []
    for piece in pieces:
        if groups and (_punctuation(piece[0]) or not piece[0].startswith(b" ")):
            groups[-1].append(piece)
        else:
            groups.append([piece])
    words = []
    for group in groups:  # a character may be split across tokens: decode the joined bytes
        known = [p[3] for p in group if p[3] is not None]
        word = b"".join(p[0] for p in group).decode(errors="replace")
        confidence = sum(known) / len(known) if known else None
        words.append(
            {"word": word, "start": group[0][1], "end": group[-1][2], "confidence": confidence}
        )
    return words


def _wrap(text, width):
    """Greedy wrap at spaces; a word longer than width gets a line of its own."""
    lines = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def split_segments(words, max_line_width=42, max_line_count=2, max_seconds=7.0, pause=0.5):
    """Words -> segments {start, end, text, words}, each one subtitle cue: a new one begins after
    a pause of `pause` s, after sentence-final punctuation, or before the text would need more
    than max_line_count lines of max_line_width characters, or last over max_seconds."""
    segments, current = [], []
    for word in words:
        text = "".join(w["word"] for w in current) + word["word"]
        if current and (
            word["start"] - current[-1]["end"] >= pause
            or current[-1]["word"].strip().rstrip(CLOSERS).endswith(SENTENCE_END)
            or len(text.strip()) > max_line_width * max_line_count
            or len(_wrap(text, max_line_width)) > max_line_count
            or word["end"] - current[0]["start"] > max_seconds
        ):
            segments.append(current)
            current = []
        current.append(word)
    segments += [current] if current else []
    text = lambda ws: "".join(w["word"] for w in ws).strip()
    return [
        {"start": ws[0]["start"], "end": ws[-1]["end"], "text": text(ws), "words": ws}
        for ws in segments
    ]


def subtitles(segments, vtt=False, max_line_width=42, max_line_count=2):
    """SRT (numbered cues) or WebVTT text of segments; a cue lasts at least a millisecond."""

    def stamp(ms):  # HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT)
        hours, minutes, seconds = ms // 3600000, ms // 60000 % 60, ms // 1000 % 60
        return f"{hours:02d}:{minutes:02d}:{seconds:02d}{'.' if vtt else ','}{ms % 1000:03d}"

    cues = []
    for segment in segments:
        text = re.sub(r"--+>", "->", segment["text"])  # no false timing line
        if vtt:  # WebVTT reads < and & as markup
            text = text.replace("&", "&amp;").replace("<", "&lt;")
        lines = _wrap(text, max_line_width)
        if not lines:
            continue
        if len(lines) > max_line_count:  # the segments fit; text given by hand may not
            lines = lines[: max_line_count - 1] + [" ".join(lines[max_line_count - 1 :])]
        start = max(0, round(1000 * segment["start"]))
        end = max(round(1000 * segment["end"]), start + 1)
        number = "" if vtt else f"{len(cues) + 1}\n"
        cues.append(f"{number}{stamp(start)} --> {stamp(end)}\n" + "\n".join(lines) + "\n")
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


# ---- loading ----

# Checkpoint name prefixes -> this module's, the first match winning: the original hub layout,
# the transformers-native one and older transformers names (model.*), mlx-audio's (editor.*).
PREFIXES = (
    ("language_model.model.", "editor."),
    ("model.language_model.", "editor."),
    ("model.out_bpe.", "encoder.out_bpe."),
    ("model.encoder.", "encoder."),
    ("model.projector.proj.", "projector.layer_projector."),
    ("model.projector.qformer.linear.", "projector.out_linear."),
    ("model.projector.qformer.queries", "projector.query"),
    ("model.projector.qformer.pos_emb", "projector.window_positions"),
    ("model.projector.", "projector."),
)
RENAMES = ((".depth_conv.conv.", ".depth_conv."), (".conv.bn.", ".conv.batch_norm."))
RENAMES += ((".cross_attn.", ".cross_attention."),)
STACKED = (
    (".qkv_proj.", ".q_proj.", ".k_proj.", ".v_proj."),
    (".gate_up_proj.", ".gate_proj.", ".up_proj."),
)
NATIVE_KEYS = {  # the transformers-native config.json's keys -> the original layout's
    "encoder_config": {"vocabulary_size": "bpe_output_dim", "pooling_window": "bpe_pooling_window"},
    "projector_config": {
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "window_size": "block_size",
        "layer_norm_eps": "layernorm_eps",
        "attention_bias": "attn_bias",
    },
}


def from_native(config):
    """A transformers-native config.json -> the original layout's, or None for another layout.
    The native one lists cat_hidden_layers (the last layer always follows), has no
    min_edit_sequence_length (IBM's is 8), and its projector is as wide as the editor."""
    encoder = config.get("encoder_config") or {}
    native = {"vocabulary_size", "pooling_window"} & set(encoder)
    if "encoder_layer_indices" in config or not native:
        return None
    config = dict(config)
    for section, names in NATIVE_KEYS.items():
        config[section] = {names.get(k, k): v for k, v in config.get(section, {}).items()}
    layers = list(encoder.get("cat_hidden_layers", [4, 8, 12])) + [-1]
    projector = config["projector_config"]
    projector.update(encoder_dim=encoder.get("hidden_dim"), num_encoder_layers=len(layers))
    if "intermediate_size" not in projector:  # kept: it replaces mlp_ratio
        raise ValueError(
            "config.json (transformers-native layout): projector_config lacks intermediate_size"
        )
    projector.update(llm_dim=projector.get("hidden_size"), mlp_ratio=0)
    return {"min_edit_sequence_length": 8, **config, "encoder_layer_indices": layers}


def sanitize(weights):
    """Checkpoint tensors -> this module's names and MLX layouts."""
    out = {}
    for key, value in weights.items():
        if key.endswith(("num_batches_tracked", "lm_head.weight")):  # lm_head is tied
            continue
        key = next((new + key[len(old) :] for old, new in PREFIXES if key.startswith(old)), key)
        for old, new in RENAMES:
            key = key.replace(old, new)
        if key.endswith(("up_conv.weight", "down_conv.weight")) and value.ndim == 3:
            value = value.reshape(value.shape[0], -1)  # (out, in, 1) or MLX (out, 1, in): Linear
        elif key.endswith("depth_conv.weight"):
            value = value.reshape(value.shape[0], -1, 1)  # (C, 1, K) or MLX (C, K, 1): MLX
        out[key] = value
    # The editor's projections of one input, stacked along their outputs (quantized ones too):
    # one matmul instead of two or three, which pays at batch 1 on a GPU (benchmarks/README.md)
    for stacked, first, *rest in STACKED:
        for key in [k for k in out if k.startswith("editor.") and first in k]:
            parts = [key] + [key.replace(first, name) for name in rest]
            if missing := [part for part in parts if part not in out]:
                found = f"{len(missing)} missing: {', '.join(missing)}"
                raise ValueError(f"weights do not match config.json: {found}")
            if len({out[part].shape[1:] for part in parts}) > 1:
                shapes = ", ".join(f"{part} {tuple(out[part].shape)}" for part in parts)
                raise ValueError(f"weights do not match config.json: mis-shaped: {shapes}")
            out[key.replace(first, stacked)] = mx.concatenate([out.pop(p) for p in parts])
    return out


def check_weights(model, weights):
    """Raise a ValueError naming every unknown, missing or mis-shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    unknown, missing = weights.keys() - expected.keys(), expected.keys() - weights.keys()
    misshaped = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if weights.get(k, v).shape != v.shape
    ]
    found = (("unknown", unknown), ("missing", missing), ("mis-shaped", misshaped))
    problems = [
        f"{len(keys)} {label}: {', '.join(sorted(keys)[:8])}" + " ..." * (len(keys) > 8)
        for label, keys in found
        if keys
    ]
    if problems:
        raise ValueError("weights do not match config.json: " + "; ".join(problems))


def read_config(path):
    """config.json of a model directory, as stored."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from None
    if config.get("model_type", "granite_speech_nar") != "granite_speech_nar":
        raise ValueError(
            f"{config_file}: model_type is {config['model_type']!r}, not granite_speech_nar"
        )
    return config


def read_weights(path):
    """Every tensor of a model directory: model.safetensors, or shards (with an index or not)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = []
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
    files = files or sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    weights = {}
    for name in files:
        try:
            weights.update(mx.load(str(path / name)))
        except Exception as e:  # mlx raises RuntimeError or ValueError for a missing or bad file
            raise ValueError(f"{path / name}: cannot read ({e})") from None
    return weights


def read_checkpoint(path):
    """A model directory -> (config.json in the original layout's keys, an unloaded GraniteNAR of
    that config, the tensors in this module's names)."""
    stored_config = read_config(path)
    native = from_native(stored_config)
    config = native or stored_config
    model = GraniteNAR(ModelArgs.from_dict(config))
    weights = sanitize(read_weights(path))
    stored = weights.get("projector.layer_projector.weight")
    if native and stored is not None:  # the native layout drops the identity projector norms
        fresh = tree_flatten(model.projector.parameters())  # a fresh LayerNorm is the identity
        norms = {f"projector.{k}": v.astype(stored.dtype) for k, v in fresh if "norm" in k}
        weights = {**norms, **weights}
    return config, model, weights


DEFAULT_MODEL = "mlx-community/granite-speech-4.1-2b-nar-mlx-5bit"
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


def model_path(path_or_repo, files=HUB_FILES):
    """A local directory, or a Hugging Face Hub repo id ("owner/name") whose `files` (patterns)
    are downloaded once. A path that looks local (it starts with . / ~, or its folder exists
    here) is never looked up."""
    path, name = Path(path_or_repo), str(path_or_repo)
    if path.is_dir():
        return path
    looks_local = name.startswith((".", "/", "~")) or path.exists() or path.parent.is_dir()
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=files))
    except ImportError:
        raise ImportError(
            f"{name} is not a local directory; to download it from the Hugging Face Hub: "
            "pip install huggingface_hub"
        ) from None
    except Exception as e:  # no network, no such repo, ...: the Hub's errors vary
        raise OSError(
            f"{name} is neither a local directory nor a Hub repo that could be reached "
            f"({type(e).__name__}); check the name, or download it elsewhere and give its "
            "directory"
        ) from None


@functools.cache
def cpu_streams():
    """A CPU stream per core, made once (each stream runs its work on one thread)."""
    return [mx.new_stream(mx.cpu) for _ in range(os.cpu_count() or 1)]


def dequantize_weights(weights, dtype, quant):
    """Replace each quantized layer's tensors (weight, scales, biases) by its weight as the layer
    computes it: mx.dequantize, scales and biases in dtype. MLX's CPU dequantize runs on one
    core, so on a CPU the layers are shared among cpu_streams (benchmarks/README.md)."""
    on_cpu = mx.default_device() == mx.cpu
    streams = cpu_streams() if on_cpu else [mx.default_stream(mx.default_device())]
    names = [k.removesuffix(".scales") for k in weights if k.endswith(".scales")]
    for i in range(0, len(names), len(streams)):  # a layer per stream at a time: memory stays flat
        group = names[i : i + len(streams)]
        for stream, name in zip(streams, group):
            w, scales = weights.pop(f"{name}.weight"), weights.pop(f"{name}.scales")
            biases = weights.pop(f"{name}.biases", None)
            biases = biases if biases is None else biases.astype(dtype)
            with mx.stream(stream):
                weights[f"{name}.weight"] = mx.dequantize(w, scales.astype(dtype), biases, **quant)
        mx.eval([weights[f"{name}.weight"] for name in group])


def load(path, dtype=None, dequantize=None, compile=None):
    """A model directory or Hub repo id (a convert.py output, an upstream checkpoint in either
    layout, an mlx-audio conversion) -> (GraniteNAR, Tokenizer), computing in dtype (default:
    float32 on a CPU, bfloat16 on a GPU). With `dequantize` (default: where MLX's quantized
    matmuls are slower than dense ones, on a CPU or an NVIDIA GPU) a quantized editor is
    dequantized to dtype at load, computing exactly what its layers would. With `compile`
    (default: on a GPU) transcription runs the passes compiled (Compiled)."""
    path = model_path(path)
    config, model, weights = read_checkpoint(path)
    q = config.get("quantization")
    on_cpu = mx.default_device() == mx.cpu
    dtype = dtype or (mx.float32 if on_cpu else mx.bfloat16)  # MLX's CPU half matmuls are slow
    if bool(q) != any(k.endswith(".scales") for k in weights):
        found = "unquantized" if q else "quantized"
        raise ValueError(f"{path}: config.json's quantization is {q}, but the tensors are {found}")
    if dequantize is None:  # Apple GPUs are where quantized matmuls pay
        dequantize = on_cpu or mx.cuda.is_available()
    if q:
        quant = dict(group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
        if dequantize:
            dequantize_weights(weights, dtype, quant)
            warnings.warn(
                f"{path}: its {q['bits']}-bit layers are dequantized to {dtype} (MLX's quantized "
                "matmuls are slower here; load(..., dequantize=False) keeps them)"
            )
        else:  # rebuild exactly the layers stored quantized
            stored = lambda path, module: f"{path}.scales" in weights
            nn.quantize(model, **quant, class_predicate=stored)
    check_weights(model, weights)
    for key, value in weights.items():  # one tensor at a time: no second copy of the model
        if mx.issubdtype(value.dtype, mx.floating):
            weights[key] = value.astype(dtype)
            mx.eval(weights[key])
    model.load_weights(list(weights.items()), strict=True)
    model.eval()  # BatchNorm uses its running statistics
    for layer in model.encoder.layers:  # the faster depthwise conv here (benchmarks/README.md)
        layer.conv.shifted = on_cpu
    mx.eval(model.parameters())
    # On a CPU compiling the passes makes none faster, and a first run spends 19 s of a 30 s
    # file's 44 building their kernels with the C++ compiler (benchmarks/README.md)
    compile = not on_cpu if compile is None else compile
    model.compiled_encode.enabled = model.compiled_edit.enabled = compile
    return model, Tokenizer(path)


# ---- audio input ----

READ_SECONDS = 10  # read, mixed and resampled this much at a time: memory stays flat
AUDIO_EXTENSIONS = tuple(".wav .flac .ogg .oga .opus .mp3 .aif .aiff .au .caf .w64 .rf64".split())
# WAV (format tag, bits) -> numpy sample type: PCM (tag 1; 24-bit as 3 bytes) and float (tag 3)
WAV_SAMPLES = {
    (1, 8): "u1",
    (1, 16): "<i2",
    (1, 24): "3u1",
    (1, 32): "<i4",
    (3, 32): "<f4",
    (3, 64): "<f8",
}
UNKNOWN_LENGTH = (0, 0xFFFFFFFF)  # a WAV writer on a pipe cannot know the length


def audio_name(audio):
    """How messages name an input: its path, - for standard input, else its file's name."""
    name = getattr(audio, "name", "a file object") if hasattr(audio, "read") else audio
    return "-" if name in ("<stdin>", 0) else str(name)


def wav_header(f, name):
    """Read a WAV header from f (after its first 12 bytes: RIFF, size, WAVE), up to its samples:
    (sample rate, channels, sample type, bytes of samples or None when the header cannot know)."""
    fmt, kind = None, None
    while (chunk := f.read(8)) and len(chunk) == 8:
        kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        if kind == b"data":
            break
        body = f.read(size + size % 2)  # chunks are padded to even sizes
        fmt = body if kind == b"fmt " else fmt
    if fmt is None or len(fmt) < 16 or kind != b"data":
        raise ValueError(f"{name}: cannot read it as audio (a WAV without fmt or data)")
    tag, channels = int.from_bytes(fmt[:2], "little"), int.from_bytes(fmt[2:4], "little")
    rate, bits = int.from_bytes(fmt[4:8], "little"), fmt[14] + 256 * fmt[15]
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: its GUID opens with it
        tag = int.from_bytes(fmt[24:26], "little")
    if (tag, bits) not in WAV_SAMPLES or not channels or not rate:
        raise ValueError(
            f"{name}: cannot read a WAV of format {tag} ({bits} bits, {channels} channels, "
            f"{rate} Hz) as it arrives: give PCM or float samples"
        )
    return rate, channels, WAV_SAMPLES[tag, bits], None if size in UNKNOWN_LENGTH else size


def _pcm_to_float(x):
    """Integer PCM as libsndfile scales it: int16 / 2^15, int32 / 2^31, (uint8 - 128) / 2^7."""
    if x.dtype.kind not in "iu":
        return x
    full = 2.0 ** (8 * x.dtype.itemsize - 1)
    return (x - full if x.dtype.kind == "u" else x) / full


class PcmStream:
    """Samples read front to back from a file object, never seeking: standard input as it
    arrives (a WAV stream after wav_header, or headerless PCM), to the end or `size` bytes.
    Reads like a soundfile.SoundFile: samplerate, read(frames) -> float32 (frames, channels)."""

    format, name = "PCM", "-"  # as a SoundFile's: messages name it (audio_name)

    def __init__(self, f, samplerate, channels=1, dtype="<i2", size=None, close=False):
        self.f, self.close = f, close
        self.samplerate, self.channels, self.dtype = samplerate, channels, np.dtype(dtype)
        self.left = size  # bytes of samples yet to read (None: to the end)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.close:
            self.f.close()

    def read(self, frames, dtype="float32", always_2d=True):
        """Up to `frames` frames, fewer only at the end: float32 (n, channels)."""
        frame_bytes = self.dtype.itemsize * self.channels
        n = frames * frame_bytes if self.left is None else min(frames * frame_bytes, self.left)
        data = self.f.read(n)
        data = data[: len(data) - len(data) % frame_bytes]  # a partial frame at the end
        self.left = None if self.left is None else self.left - len(data)
        if self.dtype.itemsize == 3:  # 24-bit: the 3 bytes as an int32's top three
            b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.uint32)
            x = (b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24).view(np.int32)
        else:
            x = np.frombuffer(data, self.dtype)
        return _pcm_to_float(x).astype(np.float32).reshape(-1, self.channels)


def _open_audio(audio):
    """A path or a file object -> an open soundfile.SoundFile, or a PcmStream for a WAV whose
    header does not know its length or that cannot seek (a pipe); an error names the input."""
    name = audio_name(audio)
    is_file = hasattr(audio, "read")
    if isinstance(audio, PcmStream):
        return audio
    if not is_file and not Path(audio).is_file():
        raise FileNotFoundError(f"audio file not found: {audio}")
    f = audio if is_file else open(audio, "rb")
    seekable = f.seekable()
    start = f.tell() if seekable else 0
    head = f.read(12)
    if not head:
        if not is_file:
            f.close()
        raise ValueError(f"{name}: the file is empty (0 bytes)")
    if head[:4] == b"RIFF" and head[8:] == b"WAVE":  # PCM or float: read here if need be
        try:
            header = wav_header(f, name)
        except ValueError:
            if not seekable:
                raise
            header = None  # libsndfile reads more formats
        if header and (not seekable or header[3] is None):
            return PcmStream(f, *header, close=not is_file)
    if seekable:
        f.seek(start)
    source = f if seekable else io.BytesIO(head + f.read())  # other formats seek
    if not is_file:
        f.close()
        source = str(audio)
    try:
        return sf.SoundFile(source)
    except sf.LibsndfileError as e:  # a hint to convert only what libsndfile cannot read at all
        if is_file or Path(audio).suffix.lower() in AUDIO_EXTENSIONS:
            raise ValueError(f"{name}: cannot read it as audio ({e.error_string})") from None
        wav = shlex.quote(f"{Path(audio).stem}.wav")
        raise ValueError(
            f"{name}: cannot read it as audio ({e.error_string}) "
            f"(convert it: ffmpeg -i {shlex.quote(str(audio))} {wav})"
        ) from None


def _array_audio(audio, sample_rate):
    """A waveform (n,) or (n, channels), float or integer PCM, at sample_rate -> float32 mono."""
    x = np.asarray(audio)
    if x.dtype.kind not in "iuf" or x.ndim == 0:
        raise ValueError(
            f"expected a file path, a file object or a waveform array (n_samples,), "
            f"got {type(audio).__name__}"
        )
    x = _pcm_to_float(x)
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] > x.shape[0]):
        raise ValueError(
            f"expected a mono waveform (n_samples,) or (n_samples, channels), got shape {x.shape}"
        )
    rate = SAMPLE_RATE if sample_rate is None else sample_rate
    if not isinstance(rate, (int, float, np.number)) or not 0 < rate < math.inf or rate % 1:
        raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    if x.size == 0:
        raise ValueError("audio is empty (0 samples)")
    if not np.isfinite(x).all():
        at = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0] / rate
        raise ValueError(f"waveform has NaN or infinite samples at {at:.2f} s")
    mono = (x.mean(axis=1) if x.ndim == 2 else x).astype(np.float32, copy=False)
    return soxr.resample(mono, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else mono


def _audio_blocks(audio, sample_rate=None, block_seconds=READ_SECONDS):
    """A path, file object or array -> float32 mono 16 kHz blocks; files are read block_seconds
    at a time. A file with fewer frames than its header says gives those, with a warning."""
    if not isinstance(audio, (str, Path)) and not hasattr(audio, "read"):
        yield _array_audio(audio, sample_rate)
        return
    name = audio_name(audio)
    if sample_rate is not None:
        raise ValueError(f"{name}: sample_rate is for arrays; a file's rate is read from the file")
    with _open_audio(audio) as f:
        rate, resample = f.samplerate, None
        if rate != SAMPLE_RATE:  # soxr's high quality: linear phase, its delay removed
            resample = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32").resample_chunk
        size = max(1, round(block_seconds * rate))
        n_read, block = 0, None  # samples read so far; the block just read
        while block is None or len(block) == size:  # a short block is the last
            try:
                block = f.read(size, dtype="float32", always_2d=True)  # PCM16 reads as x / 32768
            except (sf.LibsndfileError, OSError) as e:
                reason = getattr(e, "error_string", None) or e.strerror or e
                raise ValueError(
                    f"{name}: unreadable after {n_read / rate:.1f} s ({reason})"
                ) from None
            if not np.isfinite(block).all():
                at = (n_read + np.flatnonzero(~np.isfinite(block).all(axis=1))[0]) / rate
                raise ValueError(f"{name}: NaN or infinite samples at {at:.2f} s")
            if n_read == len(block) == 0:
                raise ValueError(f"{name}: audio is empty (0 samples in a {f.format} file)")
            n_read += len(block)
            mono = block.mean(axis=1)
            yield resample(mono, len(block) < size) if resample else mono
        _warn_if_truncated(f, n_read, name)


def _warn_if_truncated(f, n_read, name):
    """Warn when a file gave fewer frames than its header announces (libsndfile's log)."""
    if isinstance(f, PcmStream):
        header = n_read + (f.left or 0) / (f.dtype.itemsize * f.channels)
    else:
        cut = re.search(r"data : (\d+) \(should be (\d+)\)", f.extra_info)
        if cut and int(cut[1]) in UNKNOWN_LENGTH:
            return
        header = f.frames * int(cut[1]) / int(cut[2]) if cut else f.frames
    if n_read < header - 1:
        warnings.warn(
            f"{name}: truncated: its header says {header / f.samplerate:.2f} s, but only "
            f"{n_read / f.samplerate:.2f} s could be read",
            stacklevel=3,
        )


def load_audio(audio, sample_rate=None):
    """A file (path or file object), or a waveform (n_samples,) or (n_samples, channels) at
    sample_rate Hz (default 16000; float, or integer PCM) -> float32 mono 16 kHz. Files: any
    format libsndfile reads (soundfile.available_formats()); channels averaged, rates resampled."""
    return np.concatenate(list(_audio_blocks(audio, sample_rate)))


# ---- transcription ----

MIN_SECONDS = 0.1  # shorter audio (or window) transcribes to ""
SILENCE_PEAK = 1e-4  # -80 dBFS, ~3 LSB of 16-bit audio: a quieter window is silence, ""
CHUNK_SECONDS = 30.0  # windows of about this length: one pass over minutes degrades badly
CUT_SEARCH_SECONDS = 5.0  # each cut goes to the quietest 20 ms this near the nominal end
BATCH_SIZE = 8  # windows transcribed together, at most
BATCH_SECONDS = 600  # audio in a batch, at most, counted padded to its longest window


def max_chunk_seconds(args):
    """The longest chunk_seconds whose windows always fit the editor's positions: a second of
    audio takes 50 / downsample_rate rows, and its hypothesis at most 2 x 50 / W slots."""
    per_second = 50 / args.projector.downsample_rate + 100 / args.encoder.bpe_pooling_window
    return math.floor((args.editor.max_position_embeddings - 1) / per_second - CUT_SEARCH_SECONDS)


def check_options(
    args, batch_size=1, chunk_seconds=1, editing_steps=1, batch_seconds=1, update_seconds=1
):
    """Raise a ValueError, its first word the option's name, for an option out of range for a
    model of ModelArgs args (config.json is enough: the CLI checks before it loads)."""
    for name, value in (("batch_size", batch_size), ("editing_steps", editing_steps)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    longest = max_chunk_seconds(args)
    if not 1 <= chunk_seconds <= longest:
        raise ValueError(
            f"chunk_seconds must be between 1 and {longest} (s that fit the editor's positions), "
            f"got {chunk_seconds:g}"
        )
    for name, value in (("batch_seconds", batch_seconds), ("update_seconds", update_seconds)):
        if not 0 < value <= math.inf:
            raise ValueError(f"{name} must be positive, got {value:g}")


def window_cut(buffer, chunk_seconds, at_end):
    """Where a window that starts a buffer of 16 kHz samples ends: at the middle of the quietest
    20 ms frame (least energy; on ties the nearest) within CUT_SEARCH_SECONDS (at most a quarter
    window) of chunk_seconds, so words are rarely cut. None while that cannot be decided: until
    the search range and a frame after it are here, and at the end while it fits one window."""
    chunk = round(chunk_seconds * SAMPLE_RATE)
    radius = min(round(CUT_SEARCH_SECONDS * SAMPLE_RATE), chunk // 4)
    frame = SAMPLES_PER_FRAME
    if len(buffer) < chunk + radius + frame and not (at_end and len(buffer) > chunk):
        return None
    cuts = np.arange(chunk - radius, min(chunk + radius, len(buffer) - frame) + 1, frame)
    frames = buffer[cuts[0] - frame // 2 : cuts[-1] + frame // 2].reshape(len(cuts), frame)
    energy = np.square(frames, dtype=np.float64).sum(axis=1)
    return int(cuts[np.lexsort((np.abs(cuts - chunk), energy))[0]])


def split_windows(blocks, chunk_seconds=CHUNK_SECONDS):
    """Cut a stream of 16 kHz blocks into consecutive windows at window_cut, holding at most one
    window and its margin: audio up to chunk_seconds (at least 1) is one window. Every sample is
    in exactly one window; every window has an encoder frame."""
    buffer = np.zeros(0, np.float32)
    for block in itertools.chain(blocks, [None]):  # None: the end
        if block is not None:  # a block after an empty buffer is taken as it is, not copied
            buffer = np.concatenate([buffer, block]) if len(buffer) else block
        while (cut := window_cut(buffer, chunk_seconds, block is None)) is not None:
            yield buffer[:cut]
            buffer = buffer[cut:]
    if len(buffer):
        yield buffer


def shape_steps(model):
    """(frame step, slot step) to which a batch's encoder frames and editor slots are padded.
    On a GPU a pass takes less time than tracing a new shape, so batches are padded (and masked:
    the results do not change) to shapes that recur: frames to multiples of 25 (half seconds),
    slots to multiples of 16. On a CPU a pass takes seconds and the padding would cost more."""
    return (25, 16) if mx.default_device() == mx.gpu else (1, 1)


def prepare_batch(waveforms):
    """A batch's host work, apart so that it can run while the device is busy: the indices of its
    waveforms neither short nor silent, and their stft_input (None: none)."""
    live = [i for i, w in enumerate(waveforms) if len(w) >= MIN_SECONDS * SAMPLE_RATE]
    live = [i for i in live if np.abs(waveforms[i]).max() >= SILENCE_PEAK]
    return live, stft_input([waveforms[i] for i in live]) if live else None


@dataclass
class Encoded:
    """A batch's encoder pass, queued on the device, for the waveforms `live` (indices in the
    batch) of B = len(live) that are neither short nor silent. Empty when none is."""

    live: list
    best: mx.array = None  # (B, F) the best BPE CTC id on each pooled frame
    bpe_logits: mx.array = None  # (B, F, vocab); None once edit_batch has read them
    frames: list = None  # each one's real pooled frames
    audio_embeds: mx.array = None  # (B, A, llm_dim)
    audio_lengths: mx.array = None  # (B,) each one's rows of them
    slot_step: int = 1  # the editor's slots are padded to a multiple of it


def encode_batch(model, prepared, steps=None):
    """prepare_batch's result -> its Encoded, queued on the device (mx.async_eval), not waited
    for. Frames and then slots are padded, masked, to multiples of steps (default shape_steps)."""
    live, stft = prepared
    if not live:
        return Encoded(live)
    (x, lengths), (frame_step, slot_step) = stft, steps or shape_steps(model)
    encoder_frames = mx.array(lengths)
    features = _log_mel(x, encoder_frames)
    T = -(-features.shape[1] // frame_step) * frame_step
    mask = None if min(lengths) == T else mx.arange(T) < encoder_frames[:, None]
    features = pad_rows(features, T).astype(model.dtype)
    bpe_logits, audio_embeds = model.compiled_encode(features, mask)
    best = mx.argmax(bpe_logits, axis=-1)
    mx.async_eval(best, audio_embeds)
    frames = [-(-n // model.args.encoder.bpe_pooling_window) for n in lengths]
    audio_lengths = mx.array([n // model.args.projector.downsample_rate for n in lengths])
    return Encoded(live, best, bpe_logits, frames, audio_embeds, audio_lengths, slot_step)


def collapse_rows(ids, lengths, blank_id):
    """ctc_collapse of each row's first lengths[b] ids: (B, L) -> B lists (waits for ids)."""
    return [ctc_collapse(row[:n], blank_id) for row, n in zip(np.array(ids), lengths)]


def edit_pass(model, audio_embeds, audio_lengths, hypotheses, slot_step=1):
    """One editor pass over a batch, queued on the device (mx.async_eval), not waited for: the
    editor's best token in each slot (B, S) and each hypothesis's count of slots. The CTC
    collapse of a row's slots is that hypothesis edited."""
    blank = model.args.blank_token_id
    ids, lengths = slot_batch(hypotheses, blank, model.args.min_edit_sequence_length, slot_step)
    # MLX's CUDA quantized matmul fails past 2^31 output elements: large batches go in parts
    part = max(1, (2**31 - 1) // (ids.shape[1] * model.args.editor.vocab_size))
    tokens = []
    for s in (slice(i, i + part) for i in range(0, len(hypotheses), part)):
        logits = model.compiled_edit(audio_embeds[s], ids[s], audio_lengths[s], lengths[s])
        tokens.append(mx.argmax(logits, axis=-1))
    tokens = mx.concatenate(tokens)
    mx.async_eval(tokens)
    return tokens, lengths.tolist()


def token_log_probs(bpe_logits, tokens, blank_id):
    """BPE CTC logits (B, F, vocab) and token ids (B, S) -> the log-softmax of the blank and of
    each token on each frame (B, F, 1 + S), queued on the device: the columns word_times reads.
    Queued with the editor's best tokens, it needs no second trip to the device."""
    index = mx.concatenate([mx.full((tokens.shape[0], 1), blank_id, tokens.dtype), tokens], 1)
    logits = bpe_logits.astype(mx.float32)
    log_probs = mx.take_along_axis(logits, index[:, None], axis=2)
    log_probs = log_probs - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.async_eval(log_probs)
    return log_probs


def edit_batch(model, encoded, editing_steps, word_timestamps):
    """Read a batch's hypotheses (waiting for its encoder pass) and run editing_steps editor
    passes, each reading the last one's output (upstream generate(num_editing_steps)); the last
    is queued, not waited for: (its tokens (B, S), each one's slot count, and with
    word_timestamps their token_log_probs (B, F, 1 + S), queued with them). None: no live one."""
    if not encoded.live:
        return None
    blank = model.args.blank_token_id
    hypotheses = collapse_rows(encoded.best, encoded.frames, blank)
    inputs = encoded.audio_embeds, encoded.audio_lengths
    tokens, slots = edit_pass(model, *inputs, hypotheses, encoded.slot_step)
    for _ in range(editing_steps - 1):  # the pass before is read: the next edits its output
        hypotheses = collapse_rows(tokens, slots, blank)
        tokens, slots = edit_pass(model, *inputs, hypotheses, encoded.slot_step)
    log_probs = token_log_probs(encoded.bpe_logits, tokens, blank) if word_timestamps else None
    # A batch's largest array (B, F, vocab) is read: freed now, not when the batch is finished
    # (transcribe_stream keeps two more batches' encoder passes queued)
    encoded.bpe_logits = None
    return tokens, slots, log_probs


def word_times(model, tokenizer, log_probs, tokens, frames, hypotheses):
    """token_log_probs (B, F, 1 + S) of tokens (B, S) among which are each window's final ids,
    each window's real frames and final ids -> each window's words, timed (seconds from its
    start) by aligning its ids to its frames; spread evenly, with confidence None, when no path
    fits."""
    seconds = model.args.encoder.bpe_pooling_window * SAMPLES_PER_FRAME / SAMPLE_RATE  # a frame
    words = []
    for window, row, n, ids in zip(np.asarray(log_probs), np.asarray(tokens), frames, hypotheses):
        if not ids:
            words.append([])
            continue
        column = {t: 1 + s for s, t in enumerate(row.tolist())}  # column 0 is the blank's
        id_columns = np.array([column[i] for i in ids])
        window = window[:n]
        spans = ctc_align(window, id_columns, 0)
        if spans is None:
            edges = np.linspace(0, n, len(ids) + 1)
            starts, ends, confidences = edges[:-1], edges[1:], [None] * len(ids)
        else:  # the mean posterior of each token on its run, over all runs at once
            starts, ends = np.array(spans).T
            path = np.full(n, -1)  # the token on each frame of the path, -1 on blanks
            for k, (a, b) in enumerate(spans):
                path[a:b] = k
            on_runs = np.flatnonzero(path >= 0)
            posteriors = np.exp(window[on_runs, id_columns[path[on_runs]]])
            confidences = np.bincount(path[on_runs], posteriors, len(ids)) / (ends - starts)
            confidences = confidences.tolist()
        times = zip((starts * seconds).round(3).tolist(), (ends * seconds).round(3).tolist())
        pieces = [
            (tokenizer.token_bytes(i), s, e, c) for i, (s, e), c in zip(ids, times, confidences)
        ]
        words.append(group_words([p for p in pieces if p[0]]))  # special tokens have no bytes
    return words


def finish_batch(model, tokenizer, n, encoded, edited, word_timestamps):
    """A batch of n waveforms' texts and words (None without word_timestamps), once its last
    editor pass is done (it waits for it): "" and [] for the short and silent ones."""
    texts, words = [""] * n, [[] if word_timestamps else None for _ in range(n)]
    if edited is None:
        return texts, words
    tokens, slots, log_probs = edited
    final = collapse_rows(tokens, slots, model.args.blank_token_id)
    for i, ids in zip(encoded.live, final):
        texts[i] = tokenizer.decode(ids)
    if word_timestamps:
        timed = word_times(model, tokenizer, log_probs, tokens, encoded.frames, final)
        for i, window in zip(encoded.live, timed):
            words[i] = window
    return texts, words


def transcribe_waveforms(model, tokenizer, waveforms, editing_steps=1, word_timestamps=False):
    """16 kHz waveforms -> their texts, as one padded batch, each as it would be alone; with
    word_timestamps, (texts, words): each one's word_times. The first editor pass reads the
    encoder's hypothesis, each further one the last pass's output, over the same audio
    embeddings. Short or silent audio: "", no words."""
    check_options(model.args, editing_steps=editing_steps)
    encoded = encode_batch(model, prepare_batch(waveforms))
    edited = edit_batch(model, encoded, editing_steps, word_timestamps)
    texts, words = finish_batch(model, tokenizer, len(waveforms), encoded, edited, word_timestamps)
    return (texts, words) if word_timestamps else texts


@dataclass
class Window:
    index: int  # the input it belongs to
    start: float  # seconds into the input
    seconds: float
    last: bool  # the input's last window
    text: str = ""
    elapsed: float = 0.0  # its share of its batch's processing seconds (by length)
    words: list = None  # with word_timestamps: {word, start, end, confidence}, in the input's time
    error: Exception = None  # the input failed to read here: this is its last window, empty


def duration(audio, sample_rate=None):
    """Seconds of audio, from the header for files (0 when unknown or unreadable: reading will
    say why; a file object's header is not read here, which would move its position)."""
    if hasattr(audio, "read"):
        return 0.0
    if not isinstance(audio, (str, Path)):
        return np.shape(audio)[0] / (sample_rate or SAMPLE_RATE) if np.ndim(audio) else 0.0
    try:
        info = sf.info(str(audio))
        return info.frames / info.samplerate
    except Exception:  # soundfile raises several kinds; reading will say what is wrong
        return 0.0


def read_windows(audios, sample_rate, chunk_seconds):
    """(Window, its 16 kHz samples) for every window of every input, the inputs shortest first (a
    batch of like lengths pads less), each input's in order. An input that fails to read ends
    with an empty Window carrying the error."""
    durations = [duration(audio, sample_rate) for audio in audios]
    for i in sorted(range(len(audios)), key=durations.__getitem__):
        start, pending = 0, np.zeros(0, np.float32)  # resampled to nothing: one empty window
        try:
            blocks = _audio_blocks(audios[i], sample_rate)
            for k, window in enumerate(split_windows(blocks, chunk_seconds)):
                if k:
                    yield Window(i, start / SAMPLE_RATE, len(pending) / SAMPLE_RATE, False), pending
                    start += len(pending)
                pending = window
        except (OSError, ValueError) as e:
            yield Window(i, start / SAMPLE_RATE, 0.0, True, error=e), np.zeros(0, np.float32)
            continue
        yield Window(i, start / SAMPLE_RATE, len(pending) / SAMPLE_RATE, True), pending


def batch_windows(windows, batch_size, batch_seconds):
    """(Window, samples) pairs -> batches of at most batch_size of them and batch_seconds of audio
    counted padded to the longest (a longer window goes alone), each with its prepare_batch."""
    batch, longest = [], 0
    for window, samples in windows:
        longest = max(longest, len(samples))
        too_long = (len(batch) + 1) * longest > batch_seconds * SAMPLE_RATE
        if batch and (len(batch) == batch_size or too_long):
            yield batch, prepare_batch([samples for _, samples in batch])
            batch, longest = [], len(samples)
        batch.append((window, samples))
    if batch:
        yield batch, prepare_batch([samples for _, samples in batch])


class Prefetch:
    """Iterate over `items` read in a thread, at most `size` ahead: the next batches are read
    and prepared while the device works, a live stream read while it is transcribed. An
    exception there is raised here."""

    END = object()

    def __init__(self, items, size=2):
        self.ready, self.stop = queue.Queue(size), threading.Event()
        threading.Thread(target=self._produce, args=(items,), daemon=True).start()

    def _produce(self, items):
        try:
            for item in items:
                self.ready.put(item)
                if self.stop.is_set():  # the consumer is gone
                    return
            self.ready.put(self.END)
        except BaseException as e:  # raised in the consumer's thread
            self.ready.put(e)

    def __iter__(self):
        try:
            while (item := self.ready.get()) is not self.END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # stopped early: free a place so that the thread can see the stop
            self.stop.set()
            while not self.ready.empty():
                self.ready.get_nowait()

    def waiting(self):
        """Whether the next item is here already."""
        return not self.ready.empty()


def finish_batches(model, tokenizer, handoff, word_timestamps):
    """The Windows of each batch (Window and samples pairs, Encoded, edit_batch's result) taken
    from the queue handoff until None, with their texts and words (in the input's time), each
    batch's once its last editor pass is done; the seconds since the batch before are shared
    among its windows by length."""
    since = time.perf_counter()
    for batch, encoded, edited in iter(handoff.get, None):
        texts, words = finish_batch(model, tokenizer, len(batch), encoded, edited, word_timestamps)
        seconds, since = time.perf_counter() - since, time.perf_counter()
        total = max(1, sum(len(samples) for _, samples in batch))
        for (window, samples), text, timed in zip(batch, texts, words):
            window.text, window.elapsed = text, seconds * len(samples) / total
            window.words = None if timed is None else _shift(timed, window.start, window.seconds)
        yield [window for window, _ in batch]


def _shift(words, start, seconds):
    """A window's words in the input's time: its last frame may end past the window; a window
    after the first begins a new word."""
    words = [
        {**x, "start": start + min(x["start"], seconds), "end": start + min(x["end"], seconds)}
        for x in words
    ]
    if start > 0 and words and not words[0]["word"].startswith(" "):
        words[0]["word"] = " " + words[0]["word"]
    return words


def transcribe_stream(
    model,
    tokenizer,
    audios,
    sample_rate=None,
    batch_size=BATCH_SIZE,
    chunk_seconds=CHUNK_SECONDS,
    editing_steps=1,
    word_timestamps=False,
    batch_seconds=BATCH_SECONDS,
):
    """Transcribe every window of every input (see transcribe), in batches of at most batch_size
    windows and batch_seconds of audio counted padded, reading as it goes. Yields each Window
    with its text (and words), a batch's once the next batch's passes are queued; an input's
    windows come in order, the last with last=True, or with `error` when it failed to read."""
    check_options(model.args, batch_size, chunk_seconds, editing_steps, batch_seconds)
    windows = read_windows(audios, sample_rate, chunk_seconds)
    batches = Prefetch(batch_windows(windows, batch_size, batch_seconds))
    # As mlx-lm's generate_step: next(queued) reads the next prepared batch and queues its
    # encoder pass, and one more is kept queued, so the device has work while the host reads a
    # batch's hypotheses and queues its editor (on CUDA, MLX 0.32 makes that read wait for all
    # that is queued: benchmarks/README.md, where the device still waits). Any other work here
    # would leave the device idle: a thread finishes the batches (reads their tokens, decodes,
    # aligns word times).
    queued = ((batch, encode_batch(model, prepared)) for batch, prepared in batches)
    handoff = queue.Queue()  # batches whose last pass is queued, for that thread; None: no more
    finished = iter(Prefetch(finish_batches(model, tokenizer, handoff, word_timestamps)))
    try:
        current, upcoming = next(queued, None), next(queued, None)
        handed = False
        while current:
            batch, encoded = current
            edited = edit_batch(model, encoded, editing_steps, word_timestamps)  # last pass queued
            current, upcoming = upcoming, next(queued, None)  # one more encoder pass, behind it
            handoff.put((batch, encoded, edited))
            if handed:  # the batch before, finished while this one's hypotheses were awaited
                yield from next(finished)
            handed = True
        if handed:  # the last batch
            yield from next(finished)
    finally:
        handoff.put(None)  # the finishing thread ends


def join_windows(texts):
    """One window's text as it is; several windows' texts stripped and joined by spaces."""
    return texts[0] if len(texts) == 1 else " ".join(t.strip() for t in texts if t.strip())


def transcribe(
    model,
    tokenizer,
    audio,
    sample_rate=None,
    batch_size=BATCH_SIZE,
    chunk_seconds=CHUNK_SECONDS,
    editing_steps=1,
    word_timestamps=False,
    batch_seconds=BATCH_SECONDS,
):
    """audio: a file (path or file object), or a waveform array (n_samples,) or (n_samples,
    channels) at sample_rate Hz (default 16000) -> its transcript; a list of those -> their
    transcripts. With word_timestamps, {"text", "segments": split_segments(words)} instead.
    Audio over chunk_seconds goes in windows cut at quiet points (split_windows), batch_size
    windows and batch_seconds of padded audio at a time (of one input or several). Under 0.1 s,
    or silent: "". An input that cannot be read raises its error (transcribe_stream goes on)."""
    audios = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    if audios and all(isinstance(x, (int, float, np.number)) for x in audios):
        raise ValueError("a waveform is an array: transcribe(model, tokenizer, np.array(samples))")
    windows = [[] for _ in audios]
    options = batch_size, chunk_seconds, editing_steps, word_timestamps, batch_seconds
    for w in transcribe_stream(model, tokenizer, audios, sample_rate, *options):
        if w.error:
            raise w.error
        windows[w.index].append(w)
    texts = [join_windows([w.text for w in ws]) for ws in windows]
    if word_timestamps:
        segments = [split_segments([x for w in ws for x in w.words]) for ws in windows]
        texts = [{"text": text, "segments": s} for text, s in zip(texts, segments)]
    return texts if isinstance(audio, (list, tuple)) else texts[0]


# ---- live transcription ----

LIVE_READ_SECONDS = 0.1  # a live stream is read this much at a time
# A live pass pads frames to 5 s and slots to 128 (masked: the same results), so that the
# window so far takes few shapes: no new compiled trace (nor GPU kernels) after the first ones
LIVE_STEPS = (250, 128)


@dataclass
class Event:
    """What transcribe_live yields: the text of the open window so far (a partial), or of a
    window that closed (final: never revised)."""

    start: float  # seconds into the stream
    end: float
    text: str
    final: bool
    words: list = None  # with word_timestamps: {word, start, end, confidence}, in stream time
    elapsed: float = 0.0  # seconds its pass took


def _live_event(model, tokenizer, samples, start, final, editing_steps, word_timestamps):
    """One pass over a window's samples (its first at sample `start` of the stream) -> Event:
    transcribe_waveforms([samples]), padded to LIVE_STEPS."""
    tic = time.perf_counter()
    t0, seconds = start / SAMPLE_RATE, len(samples) / SAMPLE_RATE
    encoded = encode_batch(model, prepare_batch([samples]), LIVE_STEPS)
    edited = edit_batch(model, encoded, editing_steps, word_timestamps)
    [text], [words] = finish_batch(model, tokenizer, 1, encoded, edited, word_timestamps)
    words = None if words is None else _shift(words, t0, seconds)
    return Event(t0, t0 + seconds, text, final, words, time.perf_counter() - tic)


def transcribe_live(
    model,
    tokenizer,
    blocks,
    chunk_seconds=CHUNK_SECONDS,
    update_seconds=1.0,
    editing_steps=1,
    word_timestamps=False,
):
    """Transcribe audio as it arrives. blocks: any iterable of float32 mono 16 kHz arrays of any
    size (a pipe, a microphone's queue), read in a thread. Windows close at window_cut; each
    closed window gives a final Event, exactly transcribe's for that window (the finals' texts
    joined by join_windows are transcribe's with the same chunk_seconds, their words its words).
    While a window is open, every update_seconds of new audio gives a partial Event of it so far,
    skipped when more audio is waiting already. The end of blocks, an error reading them or
    Ctrl-C (KeyboardInterrupt) closes the open window, then the error goes on."""
    check_options(model.args, 1, chunk_seconds, editing_steps, update_seconds=update_seconds)
    # glibc's M_MMAP_THRESHOLD: buffers of 64 KB or more mapped and unmapped when freed, not
    # taken from its heap, which hours of windows of every size fragment (the process grows)
    if sys.platform == "linux":
        ctypes.CDLL(None).mallopt(-3, 65536)
    step = round(update_seconds * SAMPLE_RATE)
    source = Prefetch(blocks, size=64)
    options = editing_steps, word_timestamps
    buffer, start, shown = np.zeros(0, np.float32), 0, 0  # the open window; samples of its partial
    error = None
    try:
        for block in itertools.chain(source, [None]):  # None: the end
            buffer = buffer if block is None else np.concatenate([buffer, block])
            while (cut := window_cut(buffer, chunk_seconds, block is None)) is not None:
                yield _live_event(model, tokenizer, buffer[:cut], start, True, *options)
                buffer, start, shown = buffer[cut:], start + cut, 0
                mx.clear_cache()  # MLX keeps freed buffers of every size: hours of it would grow
            if block is not None and len(buffer) - shown >= step and not source.waiting():
                yield _live_event(model, tokenizer, buffer, start, False, *options)
                shown = len(buffer)
    except (KeyboardInterrupt, OSError, ValueError) as e:  # raised once the window is closed
        error = e
    if len(buffer):
        yield _live_event(model, tokenizer, buffer, start, True, *options)
    if error:
        raise error


# ---- command line ----

EXAMPLES = """examples:
  python granite_nar.py audio.wav                  (downloads the default 5-bit model once)
  python granite_nar.py meeting.mp3 --model granite_nar_mlx
  python granite_nar.py calls/ --output-format json --output-dir out/
  ffmpeg -i talk.m4a -f wav - | python granite_nar.py -
  ffmpeg -f alsa -i default -ac 1 -ar 16000 -f wav - | python granite_nar.py - --live

Reads WAV, FLAC, OGG/Opus, MP3, AIFF, ... (what libsndfile reads; - is standard input) at any
rate and channel count. Audio longer than --chunk-seconds is read as it goes and transcribed in
windows, each cut moved to the quietest 20 ms within 5 s. Exit status: 0 if every file was
transcribed, 1 if any failed (each failure is reported on stderr), 2 for bad options."""
COLUMNS = ("file", "text", "audio_seconds", "processing_seconds", "speed")  # json keys, tsv columns
SUFFIXES = {
    "text": ".txt",
    "txt": ".txt",
    "json": ".json",
    "tsv": ".tsv",
    "srt": ".srt",
    "vtt": ".vtt",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the examples' lines and gives each option's default (not None or False)."""

    def _get_help_string(self, action):
        shown = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        return f"{action.help} (default: {action.default})" if shown else action.help


def _at_least_one(text):
    """argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=_HelpFormatter
    )
    add = parser.add_argument
    formats = f"json (a line each: {', '.join(COLUMNS)}), tsv, srt, vtt"
    seconds = dict(type=float, metavar="S")
    whole = dict(type=int, metavar="N")
    lines = dict(type=_at_least_one, metavar="N")
    add("audio", nargs="+", help="audio files, directories (their audio files, by name), or -")
    add("--model", default=DEFAULT_MODEL, metavar="DIR|REPO", help="model directory or Hub repo")
    add("--chunk-seconds", **seconds, default=CHUNK_SECONDS, help="window length (long audio)")
    add("--editing-steps", **whole, default=1, help="editor passes")
    add("--batch-size", **whole, default=BATCH_SIZE, help="windows a batch, at most")
    add("--batch-seconds", **seconds, default=BATCH_SECONDS, help="padded audio a batch, at most")
    add("--output-format", choices=SUFFIXES, default="text", help=f"text (or txt), {formats}")
    add("--output-dir", type=Path, metavar="DIR", help="also write DIR/<input path>.txt, ...")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="float32 on a CPU, else bf16")
    add("--verbose", action="store_true", help="also print the load time and a summary")
    add("--quiet", action="store_true", help="print only transcripts and errors")
    add("--word-timestamps", action="store_true", help="json: add segments with timed words")
    add("--skip-existing", action="store_true", help="skip files whose --output-dir output exists")
    add("--max-line-width", **lines, default=42, help="srt, vtt: characters a line")
    add("--max-line-count", **lines, default=2, help="srt, vtt: lines a cue")
    add("--live", action="store_true", help="one input: print text while the audio arrives")
    add("--update-seconds", **seconds, default=1.0, help="--live: new audio between partials")
    add("--pcm-rate", type=_at_least_one, metavar="HZ", help="- is headerless 16-bit PCM at HZ")
    add("--version", action="version", version=f"granite_nar {__version__}")
    args = parser.parse_args()
    args.output_format = "text" if args.output_format == "txt" else args.output_format
    args.word_timestamps |= args.output_format in ("srt", "vtt")  # subtitles are timed words
    _check_args(parser, args)
    return args


def _check_args(parser, args):
    """Exit 2 for options that exclude each other or that the model cannot take (its
    config.json is enough: nothing is loaded or downloaded but that)."""
    if args.verbose and args.quiet:
        parser.error("--verbose and --quiet exclude each other: give one")
    if args.audio.count("-") > 1:
        parser.error("- (standard input) can be given once")
    if args.skip_existing and not args.output_dir:
        parser.error("--skip-existing needs --output-dir: it skips the files whose outputs exist")
    if args.pcm_rate and "-" not in args.audio:
        parser.error("--pcm-rate is for - (standard input)")
    if args.live and (len(args.audio) > 1 or Path(args.audio[0]).is_dir()):
        parser.error("--live transcribes one input: a file or -")
    if args.live and (args.output_dir or args.output_format == "tsv"):
        parser.error("--live prints text, json, srt or vtt to standard output")
    try:
        config = read_config(model_path(args.model, ["config.json"]))
        model_args = ModelArgs.from_dict(from_native(config) or config)
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"error: --model {args.model}: {e}")
    options = args.batch_size, args.chunk_seconds, args.editing_steps, args.batch_seconds
    try:
        check_options(model_args, *options, args.update_seconds)
    except ValueError as e:  # its first word is the option's name
        name, rest = str(e).split(" ", 1)
        parser.error(f"--{name.replace('_', '-')} {rest}")


def _configure_messages(args):
    """Warnings as one stderr line each; notes that only --verbose shows."""
    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
    if not args.verbose:  # the default model is quantized: its dequantization is no news
        warnings.filterwarnings("ignore", ".*-bit layers are dequantized")
    if not HAS_OPENBLAS and mx.default_device() == mx.cpu and not args.quiet:
        print(
            "note: OpenBLAS not found, CPU matmuls will be slow "
            "(apt-get install -y libopenblas0-pthread)",
            file=sys.stderr,
        )
    if args.dtype == "float32":
        os.environ["MLX_ENABLE_TF32"] = "0"  # float32 means float32 on a GPU's tensor cores too


def _load_model(args):
    """load(args.model) in args.dtype; a failure exits with one line."""
    start = time.perf_counter()
    try:
        model, tokenizer = load(args.model, getattr(mx, args.dtype) if args.dtype else None)
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"error: --model {args.model}: {e}")
    if args.verbose:
        print(f"loaded {args.model} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return model, tokenizer


def _expand(names, pcm_rate):
    """CLI arguments -> (inputs: paths, or standard input for -; notes and errors to print)."""
    inputs, messages = [], []
    for name in names:
        path = Path(name)
        if name == "-" and pcm_rate is None:  # read as it arrives, whatever the audio format
            inputs.append(sys.stdin.buffer)
        elif name == "-":
            inputs.append(PcmStream(sys.stdin.buffer, pcm_rate))  # headerless 16-bit PCM
        elif path.is_dir():  # its audio files, not hidden ones (macOS leaves ._name.wav files)
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name[0] != ".")
            audio = [p for p in files if p.suffix.lower() in AUDIO_EXTENSIONS]
            if len(audio) < len(files):
                others = ", ".join(p.name for p in files if p not in audio)
                n = len(files) - len(audio)
                messages.append(f"note: {path}: skipped {n} other file(s): {others}")
            if not audio:
                messages.append(f"error: {path}: no audio files ({' '.join(AUDIO_EXTENSIONS)})")
            inputs += audio
        else:
            inputs.append(path)
    return inputs, messages


def _output_paths(inputs, output_dir, suffix):
    """Each input's output file (None without output_dir): output_dir/calls/a.wav.txt for
    calls/a.wav, its path relative to the working directory, or when some input is outside it,
    to the inputs' common folder; standard input's is output_dir/stdin.txt."""
    if output_dir is None:
        return [None] * len(inputs)
    paths = [Path("stdin") if hasattr(x, "read") else Path(x).resolve() for x in inputs]
    folders = [str(p.parent) for p in paths if p.is_absolute()]
    base = Path.cwd().resolve()
    if not all(Path(folder).is_relative_to(base) for folder in folders):
        base = Path(os.path.commonpath(folders))
    relative = [p.relative_to(base) if p.is_absolute() else p for p in paths]
    return [output_dir / p.parent / (p.name + suffix) for p in relative]


def _refuse(message):
    """Options that turn out to conflict once the inputs are known: one line, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _inputs(args, group):
    """The inputs, their outputs and the count of failures so far; notes printed by rank 0,
    a directory given has its files, and with --skip-existing those whose outputs exist go.
    Exits 2 when outputs would mix (subtitles of several inputs on stdout, two inputs to a file)."""
    if group.size() > 1 and "-" in args.audio:
        _refuse("- (standard input) reaches one process only: give files under mlx.launch")
    inputs, messages = _expand(args.audio, args.pcm_rate)
    outputs = _output_paths(inputs, args.output_dir, SUFFIXES[args.output_format])
    shared = [path for path, n in Counter(outputs).items() if path and n > 1]
    if args.output_format in ("srt", "vtt") and len(inputs) > 1 and not args.output_dir:
        _refuse(f"{args.output_format} of several inputs needs --output-dir")
    if shared:
        _refuse(f"two inputs would write {shared[0]}: give them in separate runs")
    if args.skip_existing:  # a stopped run resumes: done files keep their outputs
        keep = [i for i, path in enumerate(outputs) if not path.exists()]
        if len(keep) < len(inputs):
            messages.append(f"note: {len(inputs) - len(keep)} file(s) skipped: their outputs exist")
        inputs, outputs = [inputs[i] for i in keep], [outputs[i] for i in keep]
    for message in messages if group.rank() == 0 else []:
        print(message, file=sys.stderr)
    return inputs, outputs, sum(m.startswith("error") for m in messages)


def _records(model, tokenizer, inputs, args):
    """(index, record) per input in input order, each as soon as it and the inputs before it
    are done (all are transcribed together, in batches); a record is a dict, or the error that
    stopped its input. Progress of files longer than a window goes to stderr."""
    windows = [[] for _ in inputs]  # each input's, as they come
    n_out = 0  # inputs yielded so far
    names = [audio_name(x) for x in inputs]
    durations = [duration(x) for x in inputs]
    tty = sys.stderr.isatty()
    options = args.batch_size, args.chunk_seconds, args.editing_steps, args.word_timestamps
    for w in transcribe_stream(model, tokenizer, inputs, None, *options, args.batch_seconds):
        windows[w.index].append(w)
        if not args.quiet and durations[w.index] > args.chunk_seconds and not w.error:
            done = f"{names[w.index]}: {w.start + w.seconds:.0f} of {durations[w.index]:.0f} s"
            print(done, end="\n" if w.last or not tty else "\r", file=sys.stderr, flush=True)
        while n_out < len(inputs) and windows[n_out] and windows[n_out][-1].last:
            yield n_out, _record(names[n_out], windows[n_out], args)
            n_out += 1


def _record(name, windows, args):
    """An input's Windows -> its record ({file, text, audio_seconds, ...}), or its error."""
    if windows[-1].error:
        return windows[-1].error
    seconds, elapsed = sum(w.seconds for w in windows), sum(w.elapsed for w in windows)
    speed = round(seconds / elapsed, 3) if elapsed else 0.0  # a first GPU run can be < 0.05x
    text = join_windows([w.text for w in windows])
    record = dict(zip(COLUMNS, (name, text, round(seconds, 3), round(elapsed, 3), speed)))
    if windows[0].words is not None:
        words = [word for w in windows for word in w.words]
        record["segments"] = split_segments(words, args.max_line_width, args.max_line_count)
    return record


def _format(record, args):
    if args.output_format in ("srt", "vtt"):
        vtt = args.output_format == "vtt"
        return subtitles(record["segments"], vtt, args.max_line_width, args.max_line_count)
    if args.output_format == "json":
        return json.dumps(record, ensure_ascii=False)
    if args.output_format == "tsv":  # tabs and line breaks inside a field become spaces
        return "\t".join(" ".join(str(record[c]).splitlines()).replace("\t", " ") for c in COLUMNS)
    return record["text"]


def _write(path, text):
    """Write a file whole or not at all (a temporary name in its folder, then a rename);
    a failure is one error line. Returns whether it was written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return True
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}" if e.filename else e.strerror or e
        print(f"error: {path}: cannot write it ({reason})", file=sys.stderr)
        return False
    finally:
        if tmp.exists():  # False also when a folder on the way is a file
            tmp.unlink()


def main():
    args = _parse_args()
    _configure_messages(args)
    if args.live:
        return _live(*_load_model(args), args)
    group = _group()  # under mlx.launch: several ranks, each with its share
    inputs, outputs, failed = _inputs(args, group)
    model, tokenizer = _load_model(args)
    mine = _shard(inputs, group.size(), group.rank())
    header = "\t".join(COLUMNS) + "\n" if args.output_format == "tsv" else ""
    named = args.output_format == "text" and len(inputs) > 1  # as head names them
    shown = args.output_format not in ("srt", "vtt") or len(inputs) == 1  # else files only
    print(header if group.rank() == 0 else "", end="", flush=True)
    lines = {}  # input index: its text as printed
    seconds = 0.0
    start = time.perf_counter()
    for j, record in _records(model, tokenizer, [inputs[i] for i in mine], args):
        i = mine[j]
        if isinstance(record, Exception):
            print(f"error: {record}", file=sys.stderr)
            failed += 1
            continue
        text = _format(record, args)
        seconds += record["audio_seconds"]
        lines[i] = f"==> {record['file']} <==\n{text}" if named else text
        if group.size() == 1 and shown:  # as soon as it and those before are done
            print(("\n" if named and len(lines) > 1 else "") + lines[i], flush=True)
        if outputs[i] and not _write(outputs[i], header + text + "\n"):
            failed += 1
    if group.size() > 1:
        failed = _print_in_order(group, lines if shown else {}, named, failed)
    if args.verbose:
        total = time.perf_counter() - start
        summary = f"{len(mine)} file(s), {seconds:.1f} s of audio in {total:.2f} s"
        print(f"{summary} ({seconds / total:.1f}x real time)", file=sys.stderr)
    return 1 if failed else 0


def _live(model, tokenizer, args):
    """--live: one input transcribed as it arrives, each event printed as it comes: json, every
    event as a line; srt and vtt, a final's cues as its window closes; text on a terminal, the
    open window rewritten in place and each final as a line; text to a pipe, finals only. Says
    once when this machine is slower than real time. Returns the exit status."""
    [source], _ = _expand(args.audio, args.pcm_rate)  # a file or - (_check_args)
    blocks = _audio_blocks(source, block_seconds=LIVE_READ_SECONDS)
    options = args.chunk_seconds, args.update_seconds, args.editing_steps, args.word_timestamps
    width, count = args.max_line_width, args.max_line_count
    vtt = args.output_format == "vtt"
    segments, cues = [], ""  # srt, vtt: every final's segments, and their cues as printed
    tty = sys.stdout.isatty()
    slow = False  # said so already
    try:
        for n, event in enumerate(transcribe_live(model, tokenizer, blocks, *options)):
            text = event.text.strip()
            seconds = event.end - event.start
            if args.output_format == "json":
                record = {"start": round(event.start, 3), "end": round(event.end, 3)}
                record.update(text=event.text, final=event.final)
                if args.word_timestamps:
                    record["words"] = event.words
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif args.output_format in ("srt", "vtt") and event.final:
                segments += split_segments(event.words, width, count)
                printed = len(cues)
                cues = subtitles(segments, vtt, width, count)
                print(cues[printed:], end="", flush=True)  # numbered on from the last
            elif tty:  # \r: back to the line's start; \x1b[K: clear it
                columns = shutil.get_terminal_size().columns - 1
                text = text if event.final else text[-columns:]
                print(f"\r\x1b[K{text}", end="\n" if event.final else "", flush=True)
            elif event.final and text:
                print(text, flush=True)
            if n > 0 and event.elapsed > seconds and not slow:  # the first pass also compiles
                slow = True
                print(
                    f"warning: this machine transcribes at {seconds / event.elapsed:.2f}x real "
                    "time: finals will come late (nothing is dropped)",
                    file=sys.stderr,
                )
    except BrokenPipeError:  # stdout closed (| head): as anywhere else
        raise
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _group():
    """The processes mlx.launch (or mpirun) started, or this one alone: outside them MLX's
    backends are not tried (MPI would leave files behind)."""
    launched = "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ
    return mx.distributed.init() if launched else mx.distributed.init(backend="ring")


def _shard(inputs, size, rank):
    """The indices of the inputs one of `size` ranks transcribes: longest first, each to the
    least loaded rank by the headers' durations, the same on every rank."""
    if size == 1:
        return list(range(len(inputs)))
    seconds = [duration(x) + 1e-3 for x in inputs]  # unreadable files (0 s) are shared out too
    loads = [0.0] * size  # seconds given to each rank
    mine = []
    for i in sorted(range(len(inputs)), key=lambda i: -seconds[i]):
        r = loads.index(min(loads))
        loads[r] += seconds[i]
        mine += [i] if r == rank else []
    return sorted(mine)


def _print_in_order(group, lines, named, failed):
    """Rank 0 prints every rank's lines {input index: text}, in input order (gathered as UTF-8
    JSON through mx.distributed); returns the failures of all ranks on rank 0 (mlx.launch stops
    the others when a rank exits non-zero)."""
    data = np.frombuffer(json.dumps(lines).encode(), np.uint8)
    sizes = mx.distributed.all_gather(mx.array([len(data)]), group=group, stream=mx.cpu).tolist()
    padded = np.zeros(max(sizes), np.uint8)
    padded[: len(data)] = data
    rows = np.array(mx.distributed.all_gather(mx.array(padded), group=group, stream=mx.cpu))
    parts = [json.loads(bytes(row[:n])) for row, n in zip(rows.reshape(len(sizes), -1), sizes)]
    every = {int(i): line for part in parts for i, line in part.items()}
    if group.rank() == 0:
        blocks = [every[i] + "\n" for i in sorted(every)]
        print(("\n" if named else "").join(blocks), end="", flush=True)
    failed = int(mx.distributed.all_sum(mx.array(failed), group=group, stream=mx.cpu).item())
    return failed if group.rank() == 0 else 0


def _exit_now(status):
    """Exit at once, flushing what was printed: on Ctrl-C or a closed pipe, work may still be
    queued, and a normal exit can wait forever in OpenBLAS's thread shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the pipe is closed: nothing more to say there
            pass
    os._exit(status)


def _drop_empty_kernels():
    """Ctrl-C reaches the C++ compiler that MLX runs to build a new CPU kernel too, and MLX
    caches the killed compiler's empty output, which every later pass would fail to load:
    remove those."""
    for path in (Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "cpu").glob("lib*.so"):
        try:
            if path.stat().st_size == 0:
                path.unlink()
        except OSError:  # gone already
            pass


def _run():
    """main(), with MLX's errors (out of memory, a kernel it could not build or load) as one
    line. The Ctrl-C that killed a kernel's compiler can come after the error it caused."""
    try:
        return main()
    except RuntimeError as e:
        _drop_empty_kernels()  # the next run builds them again
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from now on
    try:  # no interpreter shutdown after the work: a Ctrl-C there would print a traceback
        _exit_now(_run())
    except KeyboardInterrupt:
        _drop_empty_kernels()
        _exit_now(130)
    except BrokenPipeError:  # stdout closed early (| head): no traceback, nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _exit_now(1)
