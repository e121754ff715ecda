"""Granite Speech 4.1 2B NAR speech recognition in MLX, in one file.

The model (ibm-granite/granite-speech-4.1-2b-nar) transcribes in two non-autoregressive passes:

    16 kHz audio -> log-mel (T, 160) at 50 frames/s
      -> Conformer encoder -> pooled BPE CTC head -> greedy CTC collapse = first hypothesis
      -> windowed Q-Former over encoder layers [4, 8, 12, last] -> audio embeddings (T // 5 rows)
      -> bidirectional Granite editor over [audio | _ t1 _ t2 ... _] -> CTC collapse -> text

The editor reads the hypothesis with a blank slot around every token and rewrites all slots at
once, so a transcript costs one encoder pass and one editor pass, whatever its length.

Audio of any length, rate and channel count is read in blocks, mixed to mono, resampled to 16 kHz and
cut into windows of about 30 s at quiet points; each window is transcribed on its own, several windows
(of one file or many) in one padded, masked batch.

Usage:
    python convert.py --hf-path ibm-granite/checkpoint-dir --mlx-path granite_nar_mlx
    python granite_nar.py meeting.mp3 calls/ --model granite_nar_mlx   (--help for the options)

Reference: the upstream PyTorch implementation (transformers `granite_speech_nar`); every stage
here is checked against its outputs in test_granite_nar.py.
"""

import argparse
import ctypes
import ctypes.util
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import MISSING, dataclass, fields
from pathlib import Path


def _load_fast_blas():
    """MLX's Linux CPU wheel computes float32 matmuls with a reference BLAS (~5 GFLOP/s). An
    OpenBLAS loaded with RTLD_GLOBAL before MLX supplies the same symbols ~40x faster."""
    if sys.platform != "linux":
        return True
    for name in (ctypes.util.find_library("openblas"), "libopenblas.so.0"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return True
        except (OSError, TypeError):
            continue
    return False


FAST_BLAS = _load_fast_blas()
os.environ.setdefault("MLX_ENABLE_TF32", "0")  # float32 means float32 on GPUs too (bfloat16 is unaffected)

import mlx.core as mx  # noqa: E402  (after the BLAS above, on purpose)
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

SAMPLE_RATE = 16000
N_FFT = 512  # 257 one-sided bins
WIN_LENGTH = 400  # 25 ms periodic Hann, zero-padded to N_FFT
HOP_LENGTH = 160  # 10 ms: 100 STFT frames/s, stacked in pairs to 50 encoder frames/s
N_MELS = 80
SAMPLES_PER_FRAME = 2 * HOP_LENGTH  # one encoder frame = 320 samples = 20 ms
LOG_MEL_RANGE = 8.0  # log10 values are clamped to 8 below the utterance's maximum

# Audio input
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64")
READ_SECONDS = 10  # files are read, mixed and resampled this much at a time: memory does not grow with length
RESAMPLE_PASSBAND, RESAMPLE_STOPBAND = 0.45, 0.5  # of the lower rate: 7.2 and 8 kHz when downsampling
RESAMPLE_ATTENUATION_DB = 80.0
RESAMPLE_GROUP = 256  # outputs per matrix product: bounds the matrices for rates with no small ratio to 16 kHz
MIN_SECONDS = 0.1  # shorter audio (or window) transcribes to ""
SILENCE_PEAK = 1e-4  # -80 dBFS, ~3 LSB of 16-bit audio: a window whose peak is below is silence, ""
CHUNK_SECONDS = 30.0  # windows of about this length; one pass over minutes of audio degrades badly
CUT_SEARCH_SECONDS = 5.0  # each cut goes to the quietest 20 ms within this much of the nominal window end
BATCH_SIZE = 8  # windows transcribed together
MAX_TRACES = 8  # compiled shapes kept per pass (ShapeCompiled); sorted batches reuse the latest ones
# On a GPU a pass takes ~25 ms and tracing a new shape for mx.compile ~100 ms, so inputs are padded (masked: the
# results do not change) and traces get reused: encoder frames to whole attention blocks (context_size, 4 s),
# which also spares every layer its block padding, editor rows to a multiple of GPU_ROW_STEP. On a CPU a pass
# takes seconds and padding would cost more than tracing.
GPU_ROW_STEP = 16
DEQUANTIZE_ROWS = 1024  # see linear()


# ---- config ----


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
    context_size: int  # attention block length in frames
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
    downsample_rate: int  # frames per query: block_size // downsample_rate queries per window
    mlp_ratio: float
    llm_dim: int
    layernorm_eps: float
    attn_bias: bool = True
    mlp_bias: bool = True


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


@dataclass
class ModelArgs:
    encoder: EncoderArgs
    projector: ProjectorArgs
    editor: EditorArgs
    encoder_layer_indices: list
    blank_token_id: int
    min_edit_sequence_length: int
    scale_projected_embeddings: bool = True

    @classmethod
    def from_dict(cls, config):
        sections = ("encoder_config", "projector_config", "text_config")
        missing = [s for s in sections + ("encoder_layer_indices", "blank_token_id") if s not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: not a Granite Speech NAR config")
        text = dict(config["text_config"])
        rope = text.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_type {rope['rope_type']!r} is not supported (only 'default')")
        text.setdefault("rope_theta", rope.get("rope_theta"))
        return cls(
            encoder=_from_dict(EncoderArgs, config["encoder_config"], "encoder_config"),
            projector=_from_dict(ProjectorArgs, config["projector_config"], "projector_config"),
            editor=_from_dict(EditorArgs, text, "text_config"),
            encoder_layer_indices=list(config["encoder_layer_indices"]),
            blank_token_id=config["blank_token_id"],
            min_edit_sequence_length=config.get("min_edit_sequence_length", 0),
            scale_projected_embeddings=config.get("scale_projected_embeddings", True),
        )


# ---- audio input ----


class Resampler:
    """Polyphase windowed-sinc resampler, `rate` -> 16 kHz at the exact rational ratio, fed block by block.
    Output n interpolates the input at time n * rate / 16000 (output 0 on input 0) with 2 fc sinc(2 fc t) times
    a Kaiser window (beta 7.86), each phase at unit DC gain. With f = min(rate, 16000): passband to 0.45 f
    (ripple < 0.01 dB), fc = 0.475 f, stopband from 0.5 f (8 kHz when downsampling) attenuated >= 80 dB."""

    def __init__(self, rate):
        g = math.gcd(rate, SAMPLE_RATE)
        low, up, down = min(rate, SAMPLE_RATE), SAMPLE_RATE // g, rate // g  # `up` outputs per `down` inputs
        transition = (RESAMPLE_STOPBAND - RESAMPLE_PASSBAND) * 2 * math.pi
        half = math.ceil((RESAMPLE_ATTENUATION_DB - 7.95) / (2.285 * transition) / 2 * rate / low)  # taps a side
        periods = -(-2 * half // down)  # periods per product row: a row spans at least the filter
        self.up, self.down, self.half = up * periods, down * periods, half
        n = np.arange(self.up)
        first = n * down // up  # output n reads padded inputs first .. first + 2 half - 1
        t = (n * down % up / up + half - 1)[:, None] - np.arange(2 * half)  # (up, 2 half): output - input time
        fc, beta = (RESAMPLE_PASSBAND + RESAMPLE_STOPBAND) / 2 * low / rate, 0.1102 * (RESAMPLE_ATTENUATION_DB - 8.7)
        taps = 2 * fc * np.sinc(2 * fc * t) * np.i0(beta * np.sqrt(np.maximum(0.0, 1 - (t / half) ** 2)))
        taps /= taps.sum(axis=1, keepdims=True)
        self.groups = []  # (first column, first input, band): periods @ band = those columns' outputs
        for col in range(0, self.up, RESAMPLE_GROUP):
            starts = first[col : col + RESAMPLE_GROUP] - first[col]
            band = np.zeros((starts[-1] + 2 * half, len(starts)), np.float32)
            for j, (s, phase) in enumerate(zip(starts, taps[col : col + RESAMPLE_GROUP])):
                band[s : s + 2 * half, j] = phase
            self.groups.append((col, first[col], band))
        self.span = first[-1] + 2 * half  # padded inputs one period reads
        self.pending = np.zeros(half - 1, np.float32)  # left zero padding, then the inputs not yet consumed
        self.n_in = self.n_out = 0

    def __call__(self, x, last=False):
        """(n,) float32 -> the 16 kHz samples it completes; last=True flushes the rest."""
        self.n_in += len(x)
        x = np.concatenate([self.pending, x, np.zeros(self.half + self.down if last else 0, np.float32)])
        n_periods = max(0, (len(x) - self.span) // self.down + 1)
        out = np.empty((n_periods, self.up), np.float32)
        step = x.strides[0]
        for col, start, band in self.groups:  # rows: the (overlapping) stretches of input each period reads
            rows = np.lib.stride_tricks.as_strided(x[start:], (n_periods, len(band)), (self.down * step, step))
            out[:, col : col + band.shape[1]] = np.ascontiguousarray(rows) @ band
        self.pending = x[n_periods * self.down :]
        out = out.reshape(-1)[: -(-self.n_in * self.up // self.down) - self.n_out if last else None]
        self.n_out += len(out)
        return out


def _open_audio(path):
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        return sf.SoundFile(str(path))
    except sf.LibsndfileError as e:
        raise ValueError(
            f"{path}: cannot read {path.suffix or 'this'} audio ({e.error_string}); libsndfile {sf.__libsndfile_version__} "
            f"reads {', '.join(sorted(sf.available_formats()))} (convert others: ffmpeg -i {path} {path.stem}.wav)"
        ) from None


def _audio_blocks(audio, sample_rate=None):
    """A file or an array -> float32 mono 16 kHz blocks; files are read READ_SECONDS at a time."""
    if not isinstance(audio, (str, Path)):
        x = np.asarray(audio)  # integer PCM (int16 from scipy.io.wavfile, ...) is scaled to [-1, 1) as files are
        x = (x / -np.iinfo(x.dtype).min if x.dtype.kind == "i" else x).astype(np.float32, copy=False)
        if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] > x.shape[0]):
            raise ValueError(f"expected a mono waveform (n_samples,) or (n_samples, channels), got shape {x.shape}")
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
        if rate != int(rate) or rate <= 0:
            raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate}")
        if x.size == 0 or not np.isfinite(x).all():
            raise ValueError("audio is empty (0 samples)" if x.size == 0 else "waveform contains NaN or infinite samples")
        mono = x.mean(axis=1) if x.ndim == 2 else x
        yield Resampler(int(rate))(mono, last=True) if rate != SAMPLE_RATE else mono
        return
    if sample_rate is not None:
        raise ValueError(f"{audio}: sample_rate is for arrays; a file's rate is read from the file")
    with _open_audio(Path(audio)) as f:
        resample = Resampler(f.samplerate) if f.samplerate != SAMPLE_RATE else None
        size, n_read, last = READ_SECONDS * f.samplerate, 0, False
        while not last:
            try:
                block = f.read(size, dtype="float32", always_2d=True)  # PCM16 reads as exactly x / 32768
            except sf.LibsndfileError as e:
                raise ValueError(f"{audio}: unreadable after {n_read / f.samplerate:.1f} s ({e.error_string})") from None
            if not np.isfinite(block).all():
                raise ValueError(f"{audio}: NaN or infinite samples after {n_read / f.samplerate:.1f} s")
            n_read, last = n_read + len(block), len(block) < size
            if n_read == 0:
                raise ValueError(f"{audio}: audio is empty (0 samples in a {f.format} file)")
            yield resample(block.mean(axis=1), last) if resample else block.mean(axis=1)


def load_audio(audio, sample_rate=None):
    """A file, or a waveform (n_samples,) or (n_samples, channels) at sample_rate Hz (default 16000; float, or
    integer PCM) -> float32 mono 16 kHz. Files: any format the installed libsndfile reads (WAV, FLAC, OGG/Opus, MP3,
    AIFF, ...: soundfile.available_formats()). Channels are averaged, other rates resampled."""
    return np.concatenate(list(_audio_blocks(audio, sample_rate)))


def split_windows(blocks, chunk_seconds=CHUNK_SECONDS):
    """Cut a stream of 16 kHz blocks into consecutive windows, holding at most one window and its margin.

    Audio up to chunk_seconds is one window. Longer, each window ends at the middle of the quietest 20 ms
    frame (least energy; on ties the nearest to the nominal end) within CUT_SEARCH_SECONDS (at most a
    quarter window) of chunk_seconds after its start, so words are rarely cut. Every sample is in exactly
    one window, and every window has at least one encoder frame.
    """
    if not chunk_seconds >= 1:
        raise ValueError(f"chunk_seconds must be at least 1, got {chunk_seconds}")
    chunk = round(chunk_seconds * SAMPLE_RATE)
    radius, frame = min(round(CUT_SEARCH_SECONDS * SAMPLE_RATE), chunk // 4), SAMPLES_PER_FRAME
    buffer = np.zeros(0, np.float32)
    for block in itertools.chain(blocks, [None]):  # None: the end
        buffer = buffer if block is None else np.concatenate([buffer, block])
        # cut once the whole search range and a frame after it are here; at the end, while over a window
        while len(buffer) >= chunk + radius + frame or (block is None and len(buffer) > chunk):
            cuts = np.arange(chunk - radius, min(chunk + radius, len(buffer) - frame) + 1, frame)
            frames = buffer[cuts[0] - frame // 2 : cuts[-1] + frame // 2].reshape(len(cuts), frame)
            energy = np.square(frames, dtype=np.float64).sum(axis=1)
            cut = cuts[np.lexsort((np.abs(cuts - chunk), energy))[0]]
            yield buffer[:cut]
            buffer = buffer[cut:]
    if len(buffer):
        yield buffer


# ---- compiled graphs ----


class ShapeCompiled:
    """mx.compile(fun), keeping the traces of up to MAX_TRACES input shapes. A pass is traced once per shape,
    then replayed without Python's per-op dispatch (most of a GPU run's time) with elementwise chains fused.
    mx.compile keeps every shape's trace while the function lives, and every window of long audio, every batch,
    brings new shapes: past MAX_TRACES the function is dropped with its traces. A trace holds the weights it read."""

    def __init__(self, fun):
        self.fun, self.shapes, self.compiled = fun, set(), mx.compile(fun)

    def __call__(self, *inputs):
        shapes = tuple(None if a is None else a.shape for a in inputs)
        if shapes not in self.shapes and len(self.shapes) == MAX_TRACES:
            self.shapes, self.compiled = set(), mx.compile(self.fun)
        self.shapes.add(shapes)
        return self.compiled(*inputs)


# ---- featurizer ----


def _mel_filterbank():
    """HTK mel filters without area normalization, (N_FFT // 2 + 1, N_MELS), built in float64."""
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    f_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    bins = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)[:, None]
    rising = (bins - f_pts[:-2]) / (f_pts[1:-1] - f_pts[:-2])
    falling = (f_pts[2:] - bins) / (f_pts[2:] - f_pts[1:-1])
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def _window():
    """Periodic Hann of WIN_LENGTH, centered in N_FFT zeros."""
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)
    side = (N_FFT - WIN_LENGTH) // 2
    return np.pad(hann, (side, N_FFT - WIN_LENGTH - side)).astype(np.float32)


MEL_FILTERS = mx.array(_mel_filterbank())
WINDOW = mx.array(_window())


def log_mel(waveform):
    """(n_samples,) float waveform at 16 kHz -> (n_samples // 320, 160) encoder features."""
    features, _ = log_mel_batch([waveform])
    return features[0]


def log_mel_batch(waveforms):
    """B waveforms (n_b,) at 16 kHz -> features (B, max T_b, 160), zero past each T_b = n_b // 320, and the T_b."""
    waveforms = [np.asarray(w, dtype=np.float32) for w in waveforms]
    for w in waveforms:
        if w.ndim != 1:
            raise ValueError(f"log_mel expects a mono waveform (n_samples,), got shape {w.shape}")
        if len(w) < SAMPLES_PER_FRAME:
            raise ValueError(f"audio too short: {len(w)} samples, at least {SAMPLES_PER_FRAME} needed")
    pad = N_FFT // 2  # center=True with reflect padding (w[pad] .. w[1] | w | w[-2] .. w[-pad-1]), then zeros
    x = np.zeros((len(waveforms), max(map(len, waveforms)) + 2 * pad), np.float32)
    for row, w in zip(x, waveforms):  # in place: np.pad would allocate and copy every row once more
        n = len(w)
        row[:pad], row[pad : pad + n], row[pad + n : n + 2 * pad] = w[pad:0:-1], w, w[-2 : -pad - 2 : -1]
    lengths = [len(w) // SAMPLES_PER_FRAME for w in waveforms]
    return _log_mel(mx.array(x), mx.array(lengths)), lengths


def _log_mel_graph(x, lengths):  # (B, n + N_FFT) padded waveforms, (B,) frames -> (B, n // 320, 160)
    B, n = x.shape
    n_frames = 2 * ((n - N_FFT) // SAMPLES_PER_FRAME)  # STFT frames kept: an even count
    frames = mx.as_strided(x, (B, n_frames, N_FFT), (n, HOP_LENGTH, 1))  # (B, 2T, 512)
    spectrum = mx.fft.rfft(frames * WINDOW)
    power = mx.square(spectrum.real) + mx.square(spectrum.imag)  # (B, 2T, 257)
    logmel = mx.log10(mx.maximum(power @ MEL_FILTERS, 1e-10))  # (B, 2T, 80)
    valid = (mx.arange(n_frames) < 2 * lengths[:, None])[..., None]
    top = mx.where(valid, logmel, -mx.inf).max(axis=(1, 2), keepdims=True)  # each utterance's maximum
    logmel = mx.where(valid, mx.maximum(logmel, top - LOG_MEL_RANGE) / 4 + 1, 0)
    return logmel.reshape(B, -1, 2 * N_MELS)  # (B, T, 160): frames 2t and 2t+1 side by side


_log_mel = ShapeCompiled(_log_mel_graph)


# ---- activations and attention ----
# MLX's CPU backend evaluates exp at ~13 ns an element, ~100x the cost of a multiply, which would make
# activations and softmax a third of a CPU run. On the CPU, float32 exp is built from arithmetic:
# e^x = 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f a degree-6 polynomial (relative error
# 3e-9, under float32's rounding) and 2^n written into the exponent bits; mx.compile fuses the chain
# into a few kernels, ~6x faster than mx.exp (traced once per shape: the bit view has no shapeless form).
# The polynomial is evaluated in Estrin's form, 4 operations deep instead of Horner's 12: mx.compile fuses at
# most 11 levels, and each cut writes a full-size intermediate (Horner: SiLU peaked at 4x its output, now 2x).
# GPUs keep MLX's own kernels.
EXP2_POLY = (0.99999999996, 0.69314720671, 0.24022651214, 0.055503272142, 0.0096180256029, 0.0013400432165, 0.00015469731979)


def _arith_exp(x):
    y = mx.clip(x * math.log2(math.e), -126.0, 126.0)
    n = mx.round(y)
    f = y - n
    c0, c1, c2, c3, c4, c5, c6 = EXP2_POLY
    f2 = f * f
    p = (c0 + c1 * f) + f2 * (c2 + c3 * f) + f2 * f2 * ((c4 + c5 * f) + f2 * c6)
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


_cpu_sigmoid = mx.compile(lambda x: 1 / (1 + _arith_exp(-x)))
_cpu_silu = mx.compile(lambda x: x / (1 + _arith_exp(-x)))


@mx.compile
def _cpu_softmax(x):
    e = _arith_exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _slow_exp(x):
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def sigmoid(x):
    return _cpu_sigmoid(x) if _slow_exp(x) else mx.sigmoid(x)


def silu(x):
    return _cpu_silu(x) if _slow_exp(x) else nn.silu(x)


def attention(q, k, v, scale, mask=None):
    """softmax(q k^T * scale + mask) v for (B, H, L, d) queries and (B, H_kv, S, d) keys/values
    (grouped heads: query head j reads key head j // (H / H_kv)); an additive mask broadcasts to (B, H, L, S).
    mx.fast's kernel, but on the CPU."""
    if not _slow_exp(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, d = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1], L, d)  # group the query heads of each kv head
    scores = (q * scale) @ k[:, :, None].swapaxes(-1, -2)  # (B, H_kv, H / H_kv, L, S)
    if mask is not None:
        scores = (scores.reshape(B, H, L, -1) + mask).reshape(scores.shape)
    return (_cpu_softmax(scores) @ v[:, :, None]).reshape(B, H, L, d)


def linear(layer, x):
    """layer(x). On a GPU a quantized layer over DEQUANTIZE_ROWS rows or more (batches) multiplies by its weight
    dequantized: there MLX's quantized matmul runs up to 4.5x slower than dequantize + bf16 matmul
    (benchmarks/quantized_matmul.py). Each copy is transient, but the host runs ahead of the GPU, so a pass can
    hold many at once (+2.7 GB for the 40 layers): below the threshold, memory comes first."""
    if isinstance(layer, nn.QuantizedLinear) and mx.default_device() == mx.gpu and x.size >= DEQUANTIZE_ROWS * x.shape[-1]:
        w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, mode=layer.mode)
        return x @ w.T + layer.bias if "bias" in layer else x @ w.T
    return layer(x)


def pad_rows(x, n):
    """(B, T, ...) -> (B, n, ...): zero rows after row T (x itself when T == n)."""
    return x if x.shape[1] == n else mx.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def zero_padding(x, mask):
    """(B, T, ...) -> rows past each sample's length set to zero; mask: (B, T), True on real rows (None: all)."""
    return x if mask is None else mx.where(mask.reshape(*mask.shape, *[1] * (x.ndim - 2)), x, 0)


# ---- Conformer encoder ----


class ConformerFeedForward(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        dim = args.hidden_dim
        self.pre_norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, dim * args.feedforward_mult)
        self.down_proj = nn.Linear(dim * args.feedforward_mult, dim)

    def __call__(self, x):
        return self.down_proj(silu(self.up_proj(self.pre_norm(x))))


class ConformerAttention(nn.Module):
    """Self-attention inside blocks of `context_size` frames, with Shaw relative positions."""

    def __init__(self, args: EncoderArgs):
        super().__init__()
        inner = args.num_heads * args.dim_head
        self.num_heads, self.context_size, self.max_pos_emb = args.num_heads, args.context_size, args.max_pos_emb
        self.scale = args.dim_head**-0.5
        self.pre_norm = nn.LayerNorm(args.hidden_dim)
        self.to_q = nn.Linear(args.hidden_dim, inner, bias=False)
        self.to_kv = nn.Linear(args.hidden_dim, 2 * inner, bias=False)  # rows: K then V
        self.to_out = nn.Linear(inner, args.hidden_dim)
        self.rel_pos_emb = nn.Embedding(2 * args.max_pos_emb + 1, args.dim_head)

    def __call__(self, x, mask=None):  # (B, T, D), mask (B, T) True on real frames -> (B, T, D)
        B, T, _ = x.shape
        C, H, M = self.context_size, self.num_heads, self.max_pos_emb
        n_blocks = -(-T // C)
        h = self.pre_norm(x)
        q, kv = self.to_q(h), self.to_kv(h)
        # upstream pads with zero rows after the norm; without biases they project to zeros
        q = pad_rows(q, n_blocks * C).reshape(B, n_blocks, C, H, -1)
        kv = pad_rows(kv, n_blocks * C).reshape(B, n_blocks, C, 2, H, -1)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]  # (B, n_blocks, C, H, d), as q

        # Shaw position term, scores[c, r] += scale * q_c . rel_pos_emb[c - r + M]: q against each distance
        # -(C-1)..C-1 in one matmul, then each (c, r) picks its distance
        distances = self.rel_pos_emb.weight[M - C + 1 : M + C]  # (2C - 1, d)
        by_distance = (q @ distances.T).transpose(0, 1, 3, 2, 4)  # (B, n_blocks, H, C, 2C - 1)
        pick = mx.array(np.subtract.outer(np.arange(C), np.arange(C)) + C - 1)  # (C, C): c - r + C - 1
        bias = mx.take_along_axis(by_distance, pick[None, None, None], axis=-1) * self.scale  # (B, n_blocks, H, C, C)
        if mask is not None or n_blocks * C > T:  # padded frames: the position term is -max (upstream: last block)
            real = mx.array(np.arange(n_blocks * C) < T)[None] if mask is None else pad_rows(mask, n_blocks * C)
            real = real.reshape(-1, n_blocks, 1, C)
            bias = mx.where(real[..., :, None] & real[..., None, :], bias, mx.finfo(bias.dtype).min)

        q, k, v = (a.transpose(0, 1, 3, 2, 4).reshape(B * n_blocks, H, C, -1) for a in (q, k, v))
        out = attention(q, k, v, self.scale, mask=bias.reshape(B * n_blocks, H, C, C))
        out = out.reshape(B, n_blocks, H, C, -1).transpose(0, 1, 3, 2, 4).reshape(B, n_blocks * C, -1)
        return self.to_out(out[:, :T])


class ConformerConvModule(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        dim, inner, K = args.hidden_dim, args.hidden_dim * args.conv_expansion_factor, args.conv_kernel_size
        self.padding = (K // 2, K // 2 - (K + 1) % 2)  # "same" length, also for even K
        self.norm = nn.LayerNorm(dim)
        self.up_conv = nn.Linear(dim, 2 * inner)  # kernel-1 convs are Linears
        self.depth_conv = nn.Conv1d(inner, inner, K, groups=inner, bias=False)  # its kernel, run by _depthwise_conv
        self.batch_norm = nn.BatchNorm(inner)
        self.down_conv = nn.Linear(inner, dim)

    def __call__(self, x, mask=None):  # (B, T, D) -> (B, T, D), over the whole utterance
        value, gate = mx.split(self.up_conv(self.norm(x)), 2, axis=-1)  # GLU over channels
        h = zero_padding(value * sigmoid(gate), mask)  # the convolution reads zeros past the end
        h = _depthwise_conv(h, self.depth_conv.weight, self.padding)
        return self.down_conv(silu(self.batch_norm(h)))


def _depthwise_conv(x, weight, padding):
    """(B, T, C) * (C, K, 1) with (left, right) zero padding -> (B, T, C). MLX's grouped conv on a GPU; on the CPU,
    where that is 4x slower, K shifted multiply-adds."""
    if mx.default_device() == mx.gpu:
        return mx.conv_general(x, weight, padding=([padding[0]], [padding[1]]), groups=x.shape[-1])
    return _shifted_sum(mx.pad(x, [(0, 0), padding, (0, 0)]), weight)


@mx.compile
def _shifted_sum(x, weight):  # (B, T + K - 1, C), (C, K, 1) -> (B, T, C)
    K = weight.shape[1]
    T = x.shape[1] - K + 1
    return sum(x[:, k : k + T] * weight[:, k, 0] for k in range(K))


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
        """(B, T, 160) -> hidden states [input, block 1 .. block L] of (B, T, D), BPE logits (B, ceil(T/W), V).
        mask (B, T): True on real frames; padded ones change no real frame's output."""
        x = self.input_linear(features)
        hidden_states = [x]
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if i == self.args.self_conditioning_layer:
                posteriors = mx.softmax(self.out(x), axis=-1, precise=True)
                x = x + self.out_mid(posteriors)  # hidden_states[i] is the state after this
            hidden_states.append(x)
        pooled = self.pool(x, importance=zero_padding(1 - posteriors[..., 0], mask))
        return hidden_states, self.out_bpe(pooled)

    def pool(self, x, importance):
        """Average each window of W frames, weighted by the mid head's non-blank posterior (class 0).
        (B, T, D), (B, T) -> (B, ceil(T/W), D); padded frames weigh 0."""
        B, T, D = x.shape
        W = self.args.bpe_pooling_window
        n = -(-T // W) * W
        x = pad_rows(x, n).reshape(B, -1, W, D)
        importance = pad_rows(importance, n).reshape(B, -1, W, 1)
        weights = importance / (importance.sum(axis=2, keepdims=True) + 1e-8)
        return (weights * x).sum(axis=2)


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

    def __call__(self, query, kv):  # (N, q, H), (N, B, H) -> (N, q, H)
        N, Lq, _ = query.shape
        heads = lambda a: a.reshape(N, a.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        out = attention(q, k, v, self.scale)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(N, Lq, -1))


class QFormerMLP(nn.Module):
    def __init__(self, args: ProjectorArgs):
        super().__init__()
        hidden = int(args.hidden_size * args.mlp_ratio)
        self.fc1 = nn.Linear(args.hidden_size, hidden, bias=args.mlp_bias)
        self.fc2 = nn.Linear(hidden, args.hidden_size, bias=args.mlp_bias)

    def __call__(self, x):
        return self.fc2(silu(self.fc1(x)))


class QFormerLayer(nn.Module):
    def __init__(self, args: ProjectorArgs):
        super().__init__()
        self.attn_norm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.cross_attention = QFormerAttention(args)
        self.mlp_norm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.mlp = QFormerMLP(args)

    def __call__(self, query, kv):
        query = query + self.cross_attention(self.attn_norm(query), kv)  # keys/values are not normalized
        return query + self.mlp(self.mlp_norm(query))


class QFormerProjector(nn.Module):
    """Encoder layers -> windows of `block_size` frames -> `block_size // downsample_rate` vectors each."""

    def __init__(self, args: ProjectorArgs):
        super().__init__()
        self.args = args
        n_queries = args.block_size // args.downsample_rate
        self.layer_norms = [nn.LayerNorm(args.encoder_dim, eps=args.layernorm_eps) for _ in range(args.num_encoder_layers)]
        self.layer_projector = nn.Linear(args.num_encoder_layers * args.encoder_dim, args.hidden_size)
        self.query = mx.zeros((1, n_queries, args.hidden_size))
        self.window_positions = mx.zeros((1, args.block_size, args.hidden_size))
        self.layers = [QFormerLayer(args) for _ in range(args.num_layers)]  # upstream: qformer.layers
        self.out_norm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.out_linear = nn.Linear(args.hidden_size, args.llm_dim)

    def __call__(self, x, mask=None):
        """(B, T, k * D), mask (B, T) of real frames -> (B, ceil(T / block) * n_queries, llm_dim)."""
        B, T, _ = x.shape
        block, rate = self.args.block_size, self.args.downsample_rate
        slices = mx.split(x, len(self.layer_norms), axis=-1)
        x = mx.concatenate([norm(s) for norm, s in zip(self.layer_norms, slices)], axis=-1)
        x = zero_padding(nn.gelu(self.layer_projector(x)), mask)  # exact (erf) GELU
        n_blocks = -(-T // block)
        x = pad_rows(x, n_blocks * block)  # padding: zero rows after the GELU
        x = x.reshape(B * n_blocks, block, -1)  # (N, block, H)
        query = self.query + x.reshape(B * n_blocks, block // rate, rate, -1).mean(axis=2)  # (N, q, H)
        kv = x + self.window_positions  # padded rows included, no mask
        for layer in self.layers:
            query = layer(query, kv)
        return self.out_linear(self.out_norm(query)).reshape(B, n_blocks * query.shape[1], -1)


# ---- bidirectional Granite editor ----


class EditorAttention(nn.Module):
    def __init__(self, args: EditorArgs):
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        head_dim = dim // self.n_heads
        self.scale = args.attention_multiplier  # Granite scales scores by this, not 1/sqrt(head_dim)
        self.qkv_proj = nn.Linear(dim, (self.n_heads + 2 * self.n_kv_heads) * head_dim, bias=False)  # q, k, v_proj
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)  # rotates halves

    def __call__(self, x, mask=None):  # (B, S, hidden) -> (B, S, hidden)
        B, S, _ = x.shape
        H, H_kv = self.n_heads, self.n_kv_heads
        qkv = linear(self.qkv_proj, x).reshape(B, S, H + 2 * H_kv, -1).transpose(0, 2, 1, 3)  # (B, H + 2 H_kv, S, d)
        qk = self.rope(qkv[:, : H + H_kv])  # queries and keys, positions 0..S-1 over [audio | text]
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + H_kv :]
        out = attention(q, k, v, self.scale, mask)  # bidirectional: the mask only hides padding
        return linear(self.o_proj, out.transpose(0, 2, 1, 3).reshape(B, S, -1))


class EditorMLP(nn.Module):
    def __init__(self, args: EditorArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)  # gate_proj, up_proj
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x):
        gate, up = mx.split(linear(self.gate_up_proj, x), 2, axis=-1)
        return linear(self.down_proj, silu(gate) * up)


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
    """A Granite decoder run without a causal mask. Upstream: language_model.model.*"""

    def __init__(self, args: EditorArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [EditorLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs_embeds, mask=None):
        """(B, S, hidden) -> (B, S, hidden), after the final norm; mask: additive, (B, 1, 1, S)."""
        h = inputs_embeds * self.args.embedding_multiplier
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h)

    def head(self, h):  # tied output head: (B, n, hidden) -> (B, n, vocab)
        return self.embed_tokens.as_linear(h) / self.args.logits_scaling


# ---- the model ----


def _step(gpu_step):
    return gpu_step if mx.default_device() == mx.gpu else 1


class GraniteNAR(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.encoder = ConformerEncoder(args.encoder)
        self.projector = QFormerProjector(args.projector)
        self.editor = GraniteEditor(args.editor)
        self._encode = ShapeCompiled(self._encode_graph)
        self._edit = ShapeCompiled(self._edit_graph)

    @property
    def dtype(self):
        return self.editor.norm.weight.dtype  # norms are never quantized

    def encode(self, features):
        """(T, 160) -> BPE CTC logits (ceil(T / W), vocab), audio embeddings (T // downsample_rate, llm_dim)."""
        T, W, rate = features.shape[0], self.args.encoder.bpe_pooling_window, self.args.projector.downsample_rate
        bpe_logits, audio_embeds = self.encode_batch(features[None], [T])
        return bpe_logits[0, : -(-T // W)], audio_embeds[0, : T // rate]

    def encode_batch(self, features, lengths):
        """(B, T, 160) features, real frames T_b per sample (the rest padding) -> BPE CTC logits (B, ceil(T / W),
        vocab) and audio embeddings (B, T // downsample_rate, llm_dim); sample b's are its first ceil(T_b / W)
        and T_b // downsample_rate rows, as encode() gives them for its features alone."""
        step = _step(self.args.encoder.context_size)  # whole attention blocks: no padding inside the layers
        features = pad_rows(features, -(-features.shape[1] // step) * step)
        T = features.shape[1]
        mask = None if min(lengths) == T else mx.arange(T) < mx.array(lengths)[:, None]
        return self._encode(features.astype(self.dtype), mask)

    def _encode_graph(self, features, mask):
        hidden_states, bpe_logits = self.encoder(features, mask)
        multilayer = mx.concatenate([hidden_states[i] for i in self.args.encoder_layer_indices], axis=-1)
        n_audio = features.shape[1] // self.args.projector.downsample_rate  # the projector's padded tail is dropped
        audio_embeds = self.projector(multilayer, mask)[:, :n_audio]
        if self.args.scale_projected_embeddings:
            audio_embeds = audio_embeds / self.args.editor.embedding_multiplier
        return bpe_logits, audio_embeds

    def edit(self, audio_embeds, hypothesis_ids):
        """(A, llm_dim), n token ids -> logits (max(2n + 1, min_edit_sequence_length), vocab) for the text slots."""
        return self.edit_batch(audio_embeds[None], [audio_embeds.shape[0]], [hypothesis_ids])[0]

    def edit_batch(self, audio_embeds, audio_lengths, hypotheses):
        """(B, A, llm_dim) audio embeddings with A_b real rows each, B token-id lists -> per sample the logits of
        its text slots, as edit() gives them. Sample b reads [audio_b | slots_b] at positions 0.., then padding
        that the attention mask hides."""
        blank = self.args.blank_token_id
        slots = [insert_slots(ids, blank, self.args.min_edit_sequence_length) for ids in hypotheses]
        lengths = [a + len(s) for a, s in zip(audio_lengths, slots)]
        B, S = len(slots), max(*lengths, audio_embeds.shape[1])
        S += -S % _step(GPU_ROW_STEP)
        token_ids = np.full((B, S), blank, np.int32)
        for b, (a, s) in enumerate(zip(audio_lengths, slots)):
            token_ids[b, a : a + len(s)] = s
        text_rows = np.concatenate([b * S + np.arange(a, n) for b, (a, n) in enumerate(zip(audio_lengths, lengths))])
        mask = None  # additive, over keys: (B, 1, 1, S)
        if min(lengths) < S:
            mask = mx.array(np.where(np.arange(S) < np.array(lengths)[:, None], 0, -np.inf)[:, None, None], self.dtype)
        inputs = (audio_embeds.astype(self.dtype), mx.array(token_ids), mx.array(audio_lengths), mask, mx.array(text_rows))
        logits = self._edit(*inputs)
        return mx.split(logits, np.cumsum([len(s) for s in slots])[:-1].tolist())

    def _edit_graph(self, audio_embeds, token_ids, audio_lengths, mask, text_rows):
        B, S = token_ids.shape
        audio = pad_rows(audio_embeds, S)
        is_audio = (mx.arange(S) < audio_lengths[:, None])[..., None]
        inputs_embeds = mx.where(is_audio, audio, self.editor.embed_tokens(token_ids))  # (B, S, hidden)
        hidden = self.editor(inputs_embeds, mask)
        return self.editor.head(hidden.reshape(B * S, -1)[text_rows])  # the head runs on text rows only


# ---- decoding ----


def ctc_collapse(ids, blank_id):
    """Greedy CTC: merge consecutive repeats, then drop blanks (`a _ a` stays `a a`)."""
    ids = np.asarray(ids).tolist()
    return [t for i, t in enumerate(ids) if t != blank_id and (i == 0 or t != ids[i - 1])]


def insert_slots(ids, blank_id, min_len):
    """[a, b] -> [_, a, _, b, _], right-padded with blanks to min_len."""
    ids = list(ids)
    slots = [blank_id] * max(2 * len(ids) + 1, min_len)
    slots[1 : 2 * len(ids) : 2] = ids
    return slots


def _bytes_to_unicode():
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """Decoder for the byte-level BPE tokenizer.json (encoding is never needed)."""

    def __init__(self, path):
        path = Path(path)
        try:
            data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = data["model"]["vocab"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path / 'tokenizer.json'}: not a readable BPE tokenizer ({e})") from None
        self.tokens = {i: token for token, i in vocab.items()}
        self.special_ids = set()
        for added in data.get("added_tokens", []):
            self.tokens[added["id"]] = added["content"]
            if added.get("special"):
                self.special_ids.add(added["id"])
        self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self.clean_up_tokenization_spaces = config.get("clean_up_tokenization_spaces", False)

    def _token_bytes(self, token):
        if all(c in self.byte_of for c in token):
            return bytes(self.byte_of[c] for c in token)
        return token.encode("utf-8")  # a token outside the byte alphabet stands for itself

    def decode(self, ids):
        """Token ids -> text, special tokens skipped, invalid UTF-8 replaced by U+FFFD."""
        tokens = [self.tokens[i] for i in np.asarray(ids).tolist() if i in self.tokens and i not in self.special_ids]
        text = b"".join(self._token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
        if self.clean_up_tokenization_spaces:
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(before, after)
        return text


# ---- loading ----

# Checkpoint names -> ours, applied in order: the original hub layout, the transformers-native one
# (model.*, lm_head.*) and mlx-audio's (editor.*, conv.bn, MLX conv layouts) all load.
RENAMES = (
    ("model.language_model.", "editor."),
    ("model.encoder.", "encoder."),
    ("model.projector.", "projector."),
    ("language_model.model.", "editor."),
    ("projector.qformer.layers.", "projector.layers."),
    (".depth_conv.conv.", ".depth_conv."),
    (".conv.bn.", ".conv.batch_norm."),
)
# Projections of one input run as one matmul (a GPU pass costs per kernel): their tensors are stacked along
# the output dimension, in this order, under the fused name.
FUSED = (
    (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.qkv_proj."),
    (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.gate_up_proj."),
)


def sanitize(weights):
    """Checkpoint tensors -> this module's names and MLX layouts."""
    out = {}
    for key, value in weights.items():
        if key.endswith("num_batches_tracked") or key.endswith("lm_head.weight"):  # lm_head is tied
            continue
        for old, new in RENAMES:
            key = key.replace(old, new)
        if key.endswith(("up_conv.weight", "down_conv.weight")) and value.ndim == 3:
            value = value.reshape(value.shape[0], -1)  # (out, in, 1) or MLX (out, 1, in) -> Linear (out, in)
        elif key.endswith("depth_conv.weight"):
            value = value.reshape(value.shape[0], -1, 1)  # (C, 1, K) or MLX (C, K, 1) -> MLX (C, K, 1)
        out[key] = value
    for *parts, fused in FUSED:  # stack the projections that read one input (quantized ones too: scales, biases)
        for key in [k for k in out if parts[0] in k]:
            names = [key.replace(parts[0], part) for part in parts]
            if all(name in out for name in names):
                out[key.replace(parts[0], fused)] = mx.concatenate([out.pop(name) for name in names])
    return out


def check_weights(model, weights):
    """Raise a ValueError naming every unknown, missing or mis-shaped tensor."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    problems = []
    for label, keys in (
        ("unknown", sorted(set(weights) - set(expected))),
        ("missing", sorted(set(expected) - set(weights))),
    ):
        if keys:
            problems.append(f"{len(keys)} {label}: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
    misshaped = [f"{k} {tuple(weights[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
                 if k in weights and tuple(weights[k].shape) != tuple(s)]  # fmt: skip
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: " + ", ".join(misshaped[:8]))
    if problems:
        raise ValueError("weights do not match config.json: " + "; ".join(problems))


def read_config(path):
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from None
    if config.get("model_type", "granite_speech_nar") != "granite_speech_nar":
        raise ValueError(f"{config_file}: model_type is {config['model_type']!r}, expected 'granite_speech_nar'")
    return config


def read_weights(path):
    """Every tensor of a model directory: model.safetensors, or shards (listed by an index or not)."""
    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index_file}: not a safetensors index ({e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    weights = {}
    for name in files:
        try:
            weights.update(mx.load(str(path / name)))
        except Exception as e:  # mlx raises RuntimeError or ValueError for a missing or damaged file
            raise ValueError(f"{path / name}: cannot read ({e})") from None
    return weights


def default_dtype():
    """float32 on the CPU (MLX's CPU half-precision matmuls are slow), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


DEFAULT_MODEL = "mlx-community/granite-speech-4.1-2b-nar-mlx-5bit"
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


def model_path(path_or_repo):
    """A local directory, or a Hugging Face Hub repo id ("owner/name") downloaded once into the Hub cache."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(
            f"{name} is not a local directory; to download it from the Hugging Face Hub, pip install huggingface_hub "
            f"(or fetch it by hand: huggingface-cli download {name} --local-dir DIR, then pass DIR)"
        ) from None
    return Path(snapshot_download(name, allow_patterns=HUB_FILES))


def load(path, dtype=None):
    """Load a model -> (GraniteNAR, Tokenizer). `path`: a local directory or a Hub repo id holding a
    convert.py output, an upstream checkpoint (converted in memory) or an mlx-audio conversion."""
    path = model_path(path)
    config = read_config(path)
    model = GraniteNAR(ModelArgs.from_dict(config))
    weights = read_weights(path)
    if any(k.startswith(("language_model.", "model.")) for k in weights):
        warnings.warn(f"{path} is an upstream checkpoint, converted at every load: python convert.py makes loading faster")
    weights = sanitize(weights)
    quantization = config.get("quantization")
    stored_quantized = any(k.endswith(".scales") for k in weights)
    if bool(quantization) != stored_quantized:
        found = "quantized" if stored_quantized else "unquantized"
        raise ValueError(f"{path}: config.json quantization is {quantization}, but the tensors are {found}")
    if quantization:  # rebuild exactly the layers stored quantized, then their shapes must match the bits
        is_quantized = lambda p, m: f"{p}.scales" in weights  # noqa: E731
        q = quantization
        nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"), class_predicate=is_quantized)
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(dtype or default_dtype())
    model.eval()  # BatchNorm uses its running statistics
    mx.eval(model.parameters())
    return model, Tokenizer(path)


# ---- transcription ----


def transcribe_waveforms(model, tokenizer, waveforms, editing_steps=1, timings=None):
    """16 kHz waveforms -> their texts, transcribed as one batch, each as it would be alone. The first editor
    pass reads the encoder's hypothesis, each further one the previous pass's CTC-collapsed output, over the
    same audio embeddings (upstream generate(num_editing_steps)). Waveforms under MIN_SECONDS, or silent, give "".
    Adds the seconds spent encoding (featurizer included) and editing to `timings`."""
    texts = [""] * len(waveforms)
    live = [i for i, w in enumerate(waveforms) if len(w) >= MIN_SECONDS * SAMPLE_RATE and np.abs(w).max() >= SILENCE_PEAK]
    if not live:
        return texts
    blank, timings = model.args.blank_token_id, Counter() if timings is None else timings
    start = time.perf_counter()
    features, lengths = log_mel_batch([waveforms[i] for i in live])
    bpe_logits, audio_embeds = model.encode_batch(features, lengths)
    best = np.array(mx.argmax(bpe_logits, axis=-1))  # (B, ceil(T / W)); waits for the encoder
    W, rate = model.args.encoder.bpe_pooling_window, model.args.projector.downsample_rate
    hypotheses = [ctc_collapse(row[: -(-T // W)], blank) for row, T in zip(best, lengths)]
    encoded = time.perf_counter()
    for _ in range(editing_steps):
        best = [mx.argmax(logits, axis=-1) for logits in model.edit_batch(audio_embeds, [T // rate for T in lengths], hypotheses)]
        mx.eval(best)
        hypotheses = [ctc_collapse(ids, blank) for ids in best]
    timings["encode"] += encoded - start
    timings["edit"] += time.perf_counter() - encoded
    for i, ids in zip(live, hypotheses):
        texts[i] = tokenizer.decode(ids)
    return texts


@dataclass
class WindowText:
    index: int  # the audio it belongs to
    seconds: float  # its length
    text: str
    last: bool  # the audio's last window
    elapsed: float  # its share of its batch's processing seconds (by length)
    audio_seconds: float  # the whole audio's length (for files: the header's, before resampling)


def _duration(audio, sample_rate):
    """Seconds of audio, from the header for files (0 when it cannot be opened: reading it will say why)."""
    if not isinstance(audio, (str, Path)):
        return len(audio) / (sample_rate or SAMPLE_RATE)
    try:
        info = sf.info(str(audio))
    except (OSError, RuntimeError):  # soundfile's LibsndfileError is a RuntimeError
        return 0.0
    return info.frames / info.samplerate


def _all_windows(audios, order, sample_rate, chunk_seconds, errors):
    """(index, window, last) for every window of every audio, in `order`, read as it goes. A reading error
    raises, or with an `errors` dict is stored there by index (windows already read still come)."""
    for i in order:
        try:
            previous = None
            for window in split_windows(_audio_blocks(audios[i], sample_rate), chunk_seconds):
                if previous is not None:
                    yield i, previous, False
                previous = window
            yield i, previous, True
        except (OSError, ValueError) as e:
            if errors is None:
                raise
            errors[i] = e


def transcribe_stream(model, tokenizer, audios, sample_rate=None, batch_size=BATCH_SIZE, chunk_seconds=CHUNK_SECONDS,
                      editing_steps=1, timings=None, errors=None):  # fmt: skip
    """Transcribe every window of every audio (see transcribe), batch_size windows at a time, the audios taken
    shortest first (a batch of similar lengths pads less). Yields a WindowText per window as its batch
    finishes; an audio's windows come in order. Reading errors raise, or are stored in `errors` by index."""
    if editing_steps < 1 or batch_size < 1:
        raise ValueError(f"editing_steps and batch_size must be at least 1, got {editing_steps} and {batch_size}")
    durations = [_duration(audio, sample_rate) for audio in audios]
    order = sorted(range(len(audios)), key=durations.__getitem__)
    windows = _all_windows(audios, order, sample_rate, chunk_seconds, errors)
    while batch := list(itertools.islice(windows, batch_size)):
        start = time.perf_counter()
        texts = transcribe_waveforms(model, tokenizer, [w for _, w, _ in batch], editing_steps, timings)
        share = (time.perf_counter() - start) / sum(len(w) for _, w, _ in batch)
        for (i, window, last), text in zip(batch, texts):
            yield WindowText(i, len(window) / SAMPLE_RATE, text, last, share * len(window), durations[i])


def join_windows(texts):
    """One window's text as it is; several windows' texts stripped and joined by single spaces."""
    return texts[0] if len(texts) == 1 else " ".join(t.strip() for t in texts if t.strip())


def transcribe_batch(model, tokenizer, audios, sample_rate=None, batch_size=BATCH_SIZE, chunk_seconds=CHUNK_SECONDS, editing_steps=1):
    """Several audios, each as transcribe() takes it -> their transcripts, in order: the same texts as one by
    one, computed batch_size windows at a time (transcribe_stream)."""
    texts = [[] for _ in audios]
    for window in transcribe_stream(model, tokenizer, audios, sample_rate, batch_size, chunk_seconds, editing_steps):
        texts[window.index].append(window.text)
    return [join_windows(t) for t in texts]


def transcribe(model, tokenizer, audio, sample_rate=None, chunk_seconds=CHUNK_SECONDS, editing_steps=1, batch_size=BATCH_SIZE):
    """audio: a file path, or a waveform (n_samples,) or (n_samples, channels) at sample_rate Hz
    (default 16000) -> transcript. Longer than chunk_seconds, it is transcribed in windows cut at
    quiet points (split_windows), batch_size at a time. Audio under 0.1 s, or silent, gives ""."""
    return transcribe_batch(model, tokenizer, [audio], sample_rate, batch_size, chunk_seconds, editing_steps)[0]


# ---- command line ----

EXAMPLES = """examples:
  python granite_nar.py audio.wav                        (downloads the default 5-bit model once)
  python granite_nar.py meeting.mp3 --model granite_nar_mlx
  python granite_nar.py calls/ --model granite_nar_mlx --output-format json --output-dir transcripts/
  python granite_nar.py talk.flac --model granite_nar_mlx --chunk-seconds 20 --editing-steps 2 --verbose

Reads WAV, FLAC, OGG/Opus, MP3, AIFF, ... (what the installed libsndfile reads) at any sample rate and
channel count. Audio longer than --chunk-seconds is read as it goes and transcribed in windows, each cut
moved to the quietest 20 ms within 5 s (windows over ~4 minutes outgrow the editor's 4096 positions).
Exit status: 0 if every file was transcribed, 1 if any failed (each failure is reported on stderr)."""
COLUMNS = ("file", "text", "audio_seconds", "processing_seconds", "real_time_factor")  # json keys, tsv columns
SUFFIXES = {"text": ".txt", "json": ".json", "tsv": ".tsv"}


def _transcribe_files(model, tokenizer, paths, args):
    """Yield (path, record (COLUMNS) or the error it raised) per file, in input order, as soon as it and the files
    before it are done. All are transcribed together, in batches; progress for long files on stderr."""
    errors, timings, start, tty = {}, Counter(), time.perf_counter(), sys.stderr.isatty()
    windows, n_out = [[] for _ in paths], 0  # each file's WindowTexts so far; records yielded

    def record(i):
        if i in errors:
            return errors[i]
        seconds, elapsed = sum(w.seconds for w in windows[i]), sum(w.elapsed for w in windows[i])
        text = join_windows([w.text for w in windows[i]])
        return dict(zip(COLUMNS, (str(paths[i]), text, round(seconds, 3), round(elapsed, 3), round(elapsed / seconds, 4))))

    for window in transcribe_stream(model, tokenizer, paths, None, args.batch_size, args.chunk_seconds,
                                    args.editing_steps, timings, errors):  # fmt: skip
        i = window.index
        windows[i].append(window)
        if not args.quiet and window.audio_seconds > args.chunk_seconds:  # a line per window, rewritten in a terminal
            done = sum(w.seconds for w in windows[i])
            end = "\n" if window.last or not tty else "\r"
            print(f"{paths[i]}: {done:.0f} of {window.audio_seconds:.0f} s", end=end, file=sys.stderr, flush=True)
        while n_out < len(paths) and (n_out in errors or windows[n_out] and windows[n_out][-1].last):
            yield paths[n_out], record(n_out)
            n_out += 1
    for i in range(n_out, len(paths)):  # files that failed after the last window came
        yield paths[i], record(i)
    if args.verbose:
        total = time.perf_counter() - start
        timings["audio and decoding"] = total - sum(timings.values())
        stages = ", ".join(f"{stage} {t:.2f} s" for stage, t in timings.items())
        batches = f"{sum(map(len, windows))} window(s) in batches of up to {args.batch_size}"
        print(f"{len(paths)} file(s), {batches}; {stages}; total {total:.2f} s", file=sys.stderr)


def _format(record, output_format):
    if output_format == "json":
        return json.dumps(record, ensure_ascii=False)
    if output_format == "tsv":  # tabs and line breaks inside a field become spaces
        return "\t".join(" ".join(str(record[c]).splitlines()).replace("\t", " ") for c in COLUMNS)
    return record["text"]


def main():
    parser = argparse.ArgumentParser(
        description="Transcribe speech with Granite Speech 4.1 2B NAR (MLX): one transcript per audio file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("audio", nargs="+", help="audio files, or directories (their audio files, sorted by name)")
    add("--model", default=DEFAULT_MODEL, metavar="DIR|REPO",
        help=f"convert.py output, upstream checkpoint or mlx-audio conversion: a directory or Hub repo id (default: {DEFAULT_MODEL})")
    add("--chunk-seconds", type=float, default=CHUNK_SECONDS, metavar="S", help="windows of about S >= 1 s (default: 30)")
    add("--editing-steps", type=int, default=1, metavar="N", help="editor passes, each on the last one's output (default: 1)")
    add("--batch-size", type=int, default=BATCH_SIZE, metavar="N", help=f"windows (of one file or several) transcribed together (default: {BATCH_SIZE})")
    add("--output-format", choices=SUFFIXES, default="text", help=f"text, json (a line each: {', '.join(COLUMNS)}) or tsv")
    add("--output-dir", type=Path, metavar="DIR", help="also write one file per input there (name.txt, .json or .tsv)")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    add("--verbose", action="store_true", help="also print the load time and per-stage timings to stderr")
    add("--quiet", action="store_true", help="print only transcripts and errors (no progress, no notes)")
    args = parser.parse_args()
    if args.chunk_seconds < 1 or args.editing_steps < 1 or args.batch_size < 1 or (args.verbose and args.quiet):
        parser.error("--chunk-seconds, --editing-steps and --batch-size must be at least 1; --verbose and --quiet exclude each other")
    if not FAST_BLAS and mx.default_device() == mx.cpu and not args.quiet:
        print("note: OpenBLAS not found, CPU matmuls will be slow (apt-get install libopenblas0-pthread)", file=sys.stderr)
    start = time.perf_counter()
    try:
        model, tokenizer = load(args.model, getattr(mx, args.dtype) if args.dtype else None)
        if args.output_dir:
            args.output_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    if args.verbose:
        print(f"loaded {args.model} in {time.perf_counter() - start:.2f} s", file=sys.stderr)

    header = "\t".join(COLUMNS) + "\n" if args.output_format == "tsv" else ""
    print(header, end="", flush=True)
    failed, paths, owners = 0, [], {}  # owners: output file -> its input
    for path in map(Path, args.audio):
        found = [path]
        if path.is_dir():  # its audio files, not hidden ones (macOS leaves ._name.wav beside name.wav)
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS and p.name[0] != ".")
        if not found:
            print(f"error: {path}: no audio files ({' '.join(AUDIO_EXTENSIONS)})", file=sys.stderr)
            failed += 1
        for path in found:
            out = args.output_dir / (path.stem + SUFFIXES[args.output_format]) if args.output_dir else None
            if out in owners:
                print(f"error: {path}: {out} is already the output of {owners[out]}: rename one of them", file=sys.stderr)
                failed += 1
                continue
            if out:
                owners[out] = path
            paths.append(path)
    for path, record in _transcribe_files(model, tokenizer, paths, args):
        if isinstance(record, Exception):
            print(f"error: {record}", file=sys.stderr)
            failed += 1
            continue
        line = _format(record, args.output_format)
        print(line, flush=True)
        if args.output_dir:
            (args.output_dir / (path.stem + SUFFIXES[args.output_format])).write_text(header + line + "\n", encoding="utf-8")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
