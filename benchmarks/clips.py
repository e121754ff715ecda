"""The audio and hypotheses every benchmark here uses (numpy only: the PyTorch peer reads them)."""

import numpy as np

SAMPLE_RATE = 16000


def synthetic_audio(seconds, seed=0):
    """Noise bursts at a syllable rate: deterministic, speech-like in level, 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.1 * envelope * rng.standard_normal(t.size)).astype(np.float32)


def fixed_hypothesis(seconds, n_tokens=None, vocab=100352):
    """round(2.8 x seconds) (or n_tokens) token ids, the same for every run (below vocab)."""
    n = round(2.8 * seconds) if n_tokens is None else n_tokens
    return [(1000 + 7 * i % 5000) % vocab for i in range(n)]


def librispeech_like_lengths(n, seed=0):
    """n clip lengths in seconds, log-normal like LibriSpeech utterances: 2 to 35 s, mean ~7 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(5.5), 0.65, n), 2.0, 35.0).round(2)
