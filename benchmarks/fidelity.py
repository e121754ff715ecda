"""Per-stage error against the upstream reference (tests/fixtures/dev), for granite_nar and
mlx-audio.

    python benchmarks/fidelity.py            # mlx-audio too when it is importable

Both run in float32 on the same weights (mlx-audio in its own layout, written by
mlx_audio_layout.py). Each stage gets the reference's own input, so an error is that stage's own;
the last rows run the whole pipeline from the waveform. Error = max |ours - reference| / max
|reference|.
"""

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import granite_nar as g  # noqa: E402  (first: it loads OpenBLAS before MLX)

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_audio_layout import to_mlx_audio_dir  # noqa: E402

from convert import convert  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "dev"


def error(ours, ref):
    ours = np.array(mx.array(ours).astype(mx.float32))
    if ours.shape != ref.shape:
        return f"{ours.shape[0]} rows, reference {ref.shape[0]}"
    return f"{np.abs(ours - ref).max() / np.abs(ref).max():.1e}"


def granite_nar_stages(model, tokenizer, gold, wav):
    bpe_logits, audio_embeds = model.encode(mx.array(gold["input_features"])[None])
    text_ids = mx.array(gold["editor_input_ids"])[None]
    text_logits = model.edit(mx.array(gold["audio_embeds"])[None], text_ids)[0]
    return {
        "input_features": error(g.log_mel([g.load_audio(wav)])[0][0], gold["input_features"]),
        "encoder_bpe_logits": error(bpe_logits[0], gold["encoder_bpe_logits"]),
        "audio_embeds": error(audio_embeds[0], gold["audio_embeds"]),
        "editor_text_logits": error(text_logits, gold["editor_text_logits"]),
        "transcript": g.transcribe(model, tokenizer, wav),
    }


def mlx_audio_stages(model, gold, wav):
    from mlx_audio.stt.models.granite_speech_nar import granite_speech_nar as ma
    from mlx_audio.stt.models.granite_speech_nar.decoding import add_insertion_slots

    enc = model.encoder(mx.array(gold["input_features"])[None])
    audio_embeds = model.projector(mx.concatenate(enc.hidden_states_for_projector, axis=-1))[0]
    audio_embeds = audio_embeds / model.config.text.embedding_multiplier
    slots = add_insertion_slots(
        mx.array(gold["encoder_preds"]),
        model.config.blank_token_id,
        model.config.min_edit_sequence_length,
    )
    embeds = mx.concatenate([mx.array(gold["audio_embeds"]), model.editor.embed_tokens(slots)])[
        None
    ]
    a = gold["audio_embeds"].shape[0]
    text_logits = model.editor(
        inputs_embeds=embeds, position_ids=mx.arange(embeds.shape[1]), logits_start=a
    )[0]
    return {
        "input_features": error(
            ma._compute_features(ma._load_waveform(str(wav))), gold["input_features"]
        ),
        "encoder_bpe_logits": error(enc.bpe_logits[0], gold["encoder_bpe_logits"]),
        "audio_embeds": error(audio_embeds, gold["audio_embeds"]),
        "editor_text_logits": error(text_logits, gold["editor_text_logits"]),
        "transcript": model.generate(str(wav)).text,
    }


def main():
    with tempfile.TemporaryDirectory(prefix="fidelity_") as tmp:
        rows = compare(Path(tmp))
    print(
        "\n| clip | implementation | features | BPE logits | audio embeddings | editor logits"
        " | transcript |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case, impl, s in rows:
        values = [
            s[k]
            for k in ("input_features", "encoder_bpe_logits", "audio_embeds", "editor_text_logits")
        ]
        print(f"| {case} | {impl} | {' | '.join(values)} | {s['transcript']} |")


def compare(tmp):
    convert(FIXTURE / "checkpoint", tmp / "ours", dtype=mx.float32)
    model, tokenizer = g.load(tmp / "ours", dtype=mx.float32)
    peer = None
    try:
        from mlx_audio.stt import load as peer_load

        to_mlx_audio_dir(tmp / "ours", tmp / "mlx_audio")
        peer = peer_load(str(tmp / "mlx_audio"))
    except ImportError:
        print("mlx-audio is not installed: granite_nar only", file=sys.stderr)
    rows = []
    for case, wav in (("golden", "audio.wav"), ("golden_short", "audio_short.wav")):
        gold = dict(np.load(FIXTURE / f"{case}.npz"))
        text = json.loads((FIXTURE / f"{case}.json").read_text())["decoded_text"]
        results = {"granite_nar": granite_nar_stages(model, tokenizer, gold, FIXTURE / wav)}
        if peer is not None:
            results["mlx-audio"] = mlx_audio_stages(peer, gold, FIXTURE / wav)
        for impl, stages in results.items():
            stages["transcript"] = "identical" if stages["transcript"] == text else "differs"
            print(json.dumps({"case": case, "impl": impl, **stages}))
            rows.append((case, impl, stages))
    return rows


if __name__ == "__main__":
    main()
