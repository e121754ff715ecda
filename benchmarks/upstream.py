"""Speed of the upstream PyTorch model (transformers granite_speech_nar, IBM's code as ported at
032cc088) on bench.py's cases, so that the two are compared in the same sitting.

    python benchmarks/upstream.py --checkpoint DIR --seconds 5 24.9 60 --reps 20
    python benchmarks/upstream.py --checkpoint DIR --clips 1024 --batch-sizes 32 128

DIR is a checkpoint in IBM's original layout (make_random_checkpoint.py). Needs torch, torchaudio
and a transformers that has granite_speech_nar, which no release has (5.24): `--models DIR` adds
a folder holding granite_speech_nar/ to transformers' models. bf16 weights (--dtype), sdpa
attention, on the GPU when there is one. One JSON line per case, as bench.py's.

The same waveforms, clip lengths and fixed hypotheses as bench.py: generate() computes the
encoder's hypothesis, which is then replaced by round(2.8 x seconds) fixed tokens. Batch 1
(--seconds): features, generate() and decoding, median of --reps after a warm-up. Throughput
(--clips N): the clips sorted by length in batches of --batch-sizes (the model takes a padded
batch as it is), the second of two passes, and the peak memory.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from clips import fixed_hypothesis, librispeech_like_lengths, synthetic_audio  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

# IBM's original layout -> the module names of transformers' GraniteSpeechNarForCTC
RENAMES = [
    ("encoder.", "model.encoder."),
    ("projector.", "model.projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
]


class FixedHypotheses:
    """Stands in for the model's _ctc_collapse_decode: runs it (upstream's own work), then
    returns fixed hypotheses for the batch's audio, as bench.py's FixedEditor does."""

    def __init__(self, model):
        self.collapse, self.seconds = model.model._ctc_collapse_decode, []
        self.vocab = model.config.text_config.vocab_size
        model.model._ctc_collapse_decode = self

    def __call__(self, bpe_logits, bpe_lengths):
        self.collapse(bpe_logits, bpe_lengths)
        ids = [fixed_hypothesis(s, vocab=self.vocab) for s in self.seconds]
        return [torch.tensor(i, device=bpe_logits.device) for i in ids]


class Upstream:
    def __init__(self, checkpoint, device, dtype=torch.bfloat16):
        from transformers.models.granite_speech_nar import (
            configuration_granite_speech_nar as configuration,
        )
        from transformers.models.granite_speech_nar import (
            feature_extraction_granite_speech_nar as feature_extraction,
        )
        from transformers.models.granite_speech_nar import modeling_granite_speech_nar as modeling

        config = configuration.GraniteSpeechNarConfig.from_dict(
            json.loads((checkpoint / "config.json").read_text())
        )
        config._attn_implementation = config.text_config._attn_implementation = "sdpa"
        torch.set_default_dtype(dtype)  # as from_pretrained(dtype=dtype)
        with torch.device(device):
            self.model = modeling.GraniteSpeechNarForCTC(config).eval()
        torch.set_default_dtype(torch.float32)
        weights = {}
        for path in sorted(checkpoint.glob("*.safetensors")):
            for key, tensor in load_file(path).items():
                old, new = next(((o, n) for o, n in RENAMES if key.startswith(o)), ("", ""))
                weights[new + key[len(old) :]] = tensor
        embeddings = "model.language_model.embed_tokens.weight"
        weights.setdefault("lm_head.weight", weights.get(embeddings))  # tied, usually not stored
        try:
            self.model.load_state_dict(weights)
        except (RuntimeError, TypeError) as error:
            sys.exit(f"upstream.py: {checkpoint} does not fit the model: {error}")
        self.model.lm_head.weight = self.model.model.language_model.embed_tokens.weight
        self.fixed = FixedHypotheses(self.model)
        self.features = feature_extraction.GraniteSpeechNarFeatureExtractor(
            **json.loads((checkpoint / "preprocessor_config.json").read_text())
        )
        self.tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        self.device = device

    def transcribe(self, waveforms):
        """16 kHz waveforms (numpy) -> texts, as one padded batch, with fixed hypotheses."""
        rate = self.model.config.projector_config.downsample_rate  # bench.py's editor rows
        self.fixed.seconds = [len(w) // 320 // rate / 10 for w in waveforms]
        inputs = self.features([torch.from_numpy(w) for w in waveforms], device=self.device)
        out = self.model.generate(inputs["input_features"], inputs["attention_mask"])
        return [self.tokenizer.decode(p.tolist(), skip_special_tokens=True) for p in out.preds]


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run):
    tic = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - tic


def peak_gb():
    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--checkpoint", type=Path, required=True, help="checkpoint in IBM's original layout")
    add("--models", type=Path, help="a folder holding granite_speech_nar/, added to transformers")
    add("--seconds", type=float, nargs="+", default=[5.0, 24.9], help="clip lengths, batch 1")
    add("--reps", type=int, default=5, help="timed repetitions per case (median reported)")
    add("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights' dtype")
    add("--clips", type=int, help="time throughput instead, over this many LibriSpeech-like clips")
    add("--batch-sizes", type=int, nargs="+", default=[32, 128], help="throughput: batch sizes")
    args = parser.parse_args()

    import transformers.models

    if args.models:
        transformers.models.__path__.append(str(args.models.resolve()))
    try:
        import transformers.models.granite_speech_nar  # noqa: F401
    except ImportError:
        sys.exit(
            f"upstream.py: transformers {transformers.__version__} has no granite_speech_nar; "
            "pass --models with a folder that holds it"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    upstream = Upstream(args.checkpoint, device, getattr(torch, args.dtype))
    common = {
        "impl": "upstream-pytorch",
        "backend": "gpu" if device == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attention": "sdpa",
    }
    if not args.clips:
        for seconds in args.seconds:
            waveform = synthetic_audio(seconds)
            upstream.transcribe([waveform])  # warm-up
            reset_peak()
            median = statistics.median(
                timed(lambda: upstream.transcribe([waveform])) for _ in range(args.reps)
            )
            row = {
                **common,
                "seconds_audio": seconds,
                "hyp_tokens": round(2.8 * seconds),
                "median_ms": round(1000 * median, 2),
                "speed": round(seconds / median, 1),
                "peak_mem_gb": peak_gb(),
            }
            print(json.dumps(row), flush=True)
        return
    lengths = librispeech_like_lengths(args.clips)
    waveforms = sorted(
        (synthetic_audio(seconds, seed=i) for i, seconds in enumerate(lengths)), key=len
    )
    seconds = float(lengths.sum())
    for batch_size in args.batch_sizes:
        batches = [waveforms[i : i + batch_size] for i in range(0, len(waveforms), batch_size)]
        reset_peak()
        walls = [timed(lambda: [upstream.transcribe(b) for b in batches]) for _ in range(2)]
        row = {
            **common,
            "batch_size": batch_size,
            "clips": args.clips,
            "seconds_audio": round(seconds, 1),
            "wall_s": round(walls[1], 3),
            "speed": round(seconds / walls[1], 1),
            "first_pass_speed": round(seconds / walls[0], 1),
            "peak_mem_gb": peak_gb(),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
