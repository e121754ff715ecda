"""Every stage of granite_nar.py against the upstream PyTorch model's outputs (tests/fixtures/dev).

The fixture is a random-weight checkpoint in the original hub layout plus every intermediate the
reference computed in float32 (see tests/fixtures/README.md). Float stages must match to
1e-4 of the array's largest magnitude, ids and text exactly.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import granite_nar as g
from convert import convert

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
from mlx_audio_layout import to_mlx_audio_dir  # noqa: E402

HERE = Path(__file__).parent
FIXTURE = HERE / "tests" / "fixtures" / "dev"
CHECKPOINT = FIXTURE / "checkpoint"
CASES = {"golden": "audio.wav", "golden_short": "audio_short.wav"}
TOL = 1e-4  # float32: max |ours - ref| <= TOL * max |ref|
# bfloat16 keeps 8 significant bits (unit roundoff 2**-9 ~ 0.2 %). Computed in bfloat16 from
# inputs in bfloat16, as transcription does, the fixture's stages measured 0.61-1.44 % of each
# array's max on a CPU (BPE logits 0.61 / 1.30 %, audio embeddings 1.06 / 1.08 %, editor logits
# 0.90 / 1.44 %): 3 % is about twice that.
TOL_BF16 = 3e-2
# The change in the reference's top-1 minus top-2 logit measured <= 0.81 % of the max (0.72-0.81 %):
# ids may differ only where that gap is within 2 %.
GAP_BF16 = 2e-2


def log_mel1(waveform):
    return g.log_mel([waveform])[0][0]


def encode1(model, features):
    bpe_logits, audio_embeds = model.encode(mx.array(features)[None])
    return bpe_logits[0], audio_embeds[0]


def edit1(model, audio_embeds, hypothesis):
    """The editor's text logits for one utterance, as the reference computes them."""
    args = model.args
    slots = g.insert_slots(hypothesis, args.blank_token_id, args.min_edit_sequence_length)
    return model.edit(mx.array(audio_embeds)[None], mx.array([slots]))[0]


def assert_close(ours, ref, tol=TOL):
    ours = np.array(ours.astype(mx.float32)) if isinstance(ours, mx.array) else np.asarray(ours)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= tol, f"max |diff| = {err:.2e} x max |ref|"


@pytest.fixture(params=list(CASES), scope="session")
def case(request):
    name = request.param
    golden = dict(np.load(FIXTURE / f"{name}.npz"))
    golden.update(json.loads((FIXTURE / f"{name}.json").read_text()))
    golden["audio_path"] = FIXTURE / CASES[name]
    return golden


# ---- featurizer ----


def test_load_audio(case):
    np.testing.assert_array_equal(g.load_audio(case["audio_path"]), case["waveform"])


def test_log_mel(case):
    # The residual (~1.6e-5 x max) is the reference's own float32 FFT rounding in low-energy bins:
    # a float64 STFT lands as far from the reference as this one does.
    features = log_mel1(case["waveform"])
    assert features.shape == (case["n_samples"] // 320, 160)
    assert_close(features, case["input_features"])


# ---- encoder ----


@pytest.mark.parametrize("shifted", [False, True])  # load() picks one per backend
def test_encoder_hidden_states_and_bpe_logits(loaded, case, shifted, monkeypatch):
    model, _ = loaded
    for layer in model.encoder.layers:
        monkeypatch.setattr(layer.conv, "shifted", shifted)
    hidden_states, bpe_logits = model.encoder(mx.array(case["input_features"])[None])
    assert len(hidden_states) == model.args.encoder.num_layers + 1
    for ours, ref in zip(hidden_states, case["encoder_hidden_states"]):
        assert_close(ours[0], ref)
    assert_close(bpe_logits[0], case["encoder_bpe_logits"])
    np.testing.assert_array_equal(
        np.array(mx.argmax(bpe_logits[0], axis=-1)), case["encoder_bpe_argmax"]
    )


def test_self_conditioning_stage(loaded, case):
    model, _ = loaded
    s = model.args.encoder.self_conditioning_layer
    before = model.encoder.layers[s - 1](mx.array(case["encoder_hidden_states"][s - 1])[None])[0]
    assert_close(before, case["encoder_selfcond_input"])
    assert_close(
        model.encoder.out(mx.array(case["encoder_selfcond_input"])), case["encoder_mid_logits"]
    )


def test_bpe_pooling(loaded, case):
    model, _ = loaded
    importance = 1 - mx.softmax(mx.array(case["encoder_mid_logits"]), axis=-1)[:, 0]
    pooled = model.encoder.pool(
        mx.array(case["encoder_hidden_states"][-1])[None], importance[None]
    )[0]
    assert pooled.shape[0] == case["n_windows"]
    assert_close(pooled, case["encoder_bpe_pooled"])


def test_encoder_hypothesis(case):
    preds = g.ctc_collapse(case["encoder_bpe_argmax"], case["blank_token_id"])
    assert preds == case["encoder_preds"].tolist()


# ---- projector ----


def spy(monkeypatch, cls):
    """The first argument of each call of cls's instances, while the test runs."""
    seen, call = [], cls.__call__

    def spied(self, x, *args, **kwargs):
        seen.append(x)
        return call(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spied)
    return seen


def test_multilayer_features(loaded, case, monkeypatch):
    """The encoder's hidden states that encode hands the projector: the selected layers."""
    model, _ = loaded
    seen = spy(monkeypatch, g.QFormerProjector)
    encode1(model, case["input_features"])
    assert len(seen) == 1
    assert_close(seen[0][0], case["multilayer_features"])


def test_projector(loaded, case):
    model, _ = loaded
    assert_close(
        model.projector(mx.array(case["multilayer_features"])[None])[0], case["projector_out"]
    )


def test_encode(loaded, case):
    model, _ = loaded
    bpe_logits, audio_embeds = encode1(model, case["input_features"])
    assert audio_embeds.shape[0] == case["audio_len"] == case["T_enc"] // 5
    assert_close(bpe_logits, case["encoder_bpe_logits"])
    assert_close(audio_embeds, case["audio_embeds"])


# ---- editor ----


def test_insert_slots_matches_reference(case):
    slots = g.insert_slots(
        case["encoder_preds"], case["blank_token_id"], case["min_edit_sequence_length"]
    )
    assert slots == case["editor_input_ids"].tolist()


def test_editor_embeddings(loaded, case, monkeypatch):
    """The rows that edit hands the editor: the audio embeddings, then the slots' embeddings."""
    model, _ = loaded
    seen = spy(monkeypatch, g.GraniteEditor)
    edit1(model, case["audio_embeds"], case["encoder_preds"].tolist())
    assert len(seen) == 1
    assert_close(seen[0][0], case["editor_inputs_embeds"])


def test_editor_last_hidden(loaded, case):
    # The reference's positions are 0..S-1 over [audio | slots] (editor_position_ids): rotary
    # embeddings read their differences, which edit's logits show (test_edit, batch tests).
    model, _ = loaded
    assert_close(
        model.editor(mx.array(case["editor_inputs_embeds"])[None])[0], case["editor_last_hidden"]
    )


def test_edit(loaded, case):
    model, tokenizer = loaded
    text_logits = edit1(model, case["audio_embeds"], case["encoder_preds"].tolist())
    assert_close(text_logits, case["editor_text_logits"])
    argmax = np.array(mx.argmax(text_logits, axis=-1))
    np.testing.assert_array_equal(argmax, case["editor_argmax"])
    pred_ids = g.ctc_collapse(argmax, case["blank_token_id"])
    assert pred_ids == case["pred_ids"].tolist()
    assert tokenizer.decode(pred_ids) == case["decoded_text"]
    assert tokenizer.decode(case["encoder_preds"]) == case["decoded_encoder_hypothesis"]


def test_transcribe_path_and_waveform(loaded, case):
    model, tokenizer = loaded
    assert g.transcribe(model, tokenizer, case["audio_path"]) == case["decoded_text"]
    assert g.transcribe(model, tokenizer, str(case["audio_path"])) == case["decoded_text"]
    assert g.transcribe(model, tokenizer, case["waveform"]) == case["decoded_text"]


# ---- batches ----
# Frame counts of the cuts (context 50, conv kernel 15, pooling 4, projector blocks of 15): under
# one block, exactly one, a partial second, one frame into a third, the whole clip; plus the short
# clip.
CUTS = (5000, 16000, 21937, 32320, None)
TOL_BATCH = (
    1e-5  # a batch changes matrix shapes, so float32 sums may round differently, nothing more
)


def _batch_equals_each_alone(model, tokenizer, frame_step=1, slot_step=1):
    args = model.args
    blank, W, rate = (
        args.blank_token_id,
        args.encoder.bpe_pooling_window,
        args.projector.downsample_rate,
    )
    full = g.load_audio(FIXTURE / "audio.wav")
    clips = [full[:n] for n in CUTS] + [g.load_audio(FIXTURE / "audio_short.wav")]
    features, lengths = g.log_mel(clips)
    T = -(-features.shape[1] // frame_step) * frame_step
    bpe, audio = model.encode(g.pad_rows(features, T), mx.arange(T) < mx.array(lengths)[:, None])
    alone = [encode1(model, log_mel1(clip)) for clip in clips]
    assert lengths == [len(clip) // 320 for clip in clips] and len(set(lengths)) == len(clips)
    hypotheses = []
    for b, (clip, (bpe1, audio1)) in enumerate(zip(clips, alone)):
        n = lengths[b]
        assert_close(features[b, :n], np.array(log_mel1(clip)), TOL_BATCH)
        assert not np.array(features[b, n:]).any()  # padding is zeros
        assert_close(bpe[b, : -(-n // W)], np.array(bpe1), TOL_BATCH)
        assert_close(audio[b, : n // rate], np.array(audio1), TOL_BATCH)
        hypotheses.append(g.ctc_collapse(mx.argmax(bpe1, axis=-1), blank))
        assert g.ctc_collapse(mx.argmax(bpe[b, : -(-n // W)], axis=-1), blank) == hypotheses[-1]
    assert (
        len({len(h) for h in hypotheses}) > 2
    )  # texts of several lengths: editor padding of several sizes
    text_ids, text_lengths = g.slot_batch(
        hypotheses, blank, args.min_edit_sequence_length, slot_step
    )
    logits = model.edit(audio, text_ids, mx.array([n // rate for n in lengths]), text_lengths)
    for b, (hypothesis, (_, audio1)) in enumerate(zip(hypotheses, alone)):
        logits1 = edit1(model, audio1, hypothesis)
        assert_close(logits[b, : len(logits1)], np.array(logits1), TOL_BATCH)
        ids = g.ctc_collapse(mx.argmax(logits[b, : len(logits1)], axis=-1), blank)
        assert ids == g.ctc_collapse(mx.argmax(logits1, axis=-1), blank)
        assert tokenizer.decode(ids) == g.transcribe(model, tokenizer, clips[b])


def test_batch_stages_equal_each_alone(loaded):
    _batch_equals_each_alone(*loaded)


def test_padding_for_trace_reuse(loaded, case, monkeypatch):
    """The padding shape_steps asks for on a GPU (frames to whole attention blocks, editor slots to
    multiples of 16) leaves every sample's stages and transcript as they are."""
    model, tokenizer = loaded
    _batch_equals_each_alone(model, tokenizer, model.args.encoder.context_size, 16)
    monkeypatch.setattr(g, "shape_steps", lambda model: (model.args.encoder.context_size, 16))
    assert g.transcribe(model, tokenizer, case["waveform"]) == case["decoded_text"]


def test_transcribe_many_equals_one_by_one(loaded):
    model, tokenizer = loaded
    full = g.load_audio(FIXTURE / "audio.wav")
    audios = [full[:n] for n in CUTS] + [
        FIXTURE / "audio_short.wav",
        np.zeros(8000, np.float32),
        full[:1000],
    ]
    audios.append(np.concatenate([full, full[::-1], full]))  # 10.3 s: 3 windows of ~4 s below
    expected = [g.transcribe(model, tokenizer, a, chunk_seconds=4, batch_size=1) for a in audios]
    assert (
        expected[-3:-1] == ["", ""] and len(set(expected)) >= 6
    )  # silent, too short; the others differ
    for batch_size in (3, 16):
        assert (
            g.transcribe(model, tokenizer, audios, batch_size=batch_size, chunk_seconds=4)
            == expected
        )
    windows = list(g.transcribe_stream(model, tokenizer, audios, batch_size=4, chunk_seconds=4))
    assert [w.index for w in windows][:4] == [
        7,
        0,
        5,
        6,
    ]  # shortest first: 1000, 5000, 6815, 8000 samples
    assert sum(w.last for w in windows) == len(audios) and len(windows) == len(audios) + 2
    long = [w for w in windows if w.index == 8]
    assert sum(w.seconds for w in long) == pytest.approx(3 * len(full) / 16000)
    assert [w.start for w in long] == pytest.approx(np.cumsum([0] + [w.seconds for w in long[:-1]]))


# ---- reduced precision ----


def test_bfloat16_stages(model_dir, case):
    """Each stage in bfloat16, from its inputs in bfloat16 as transcription hands them over (a
    float32 input would make it compute in float32), against the float32 reference."""
    model, _ = g.load(model_dir, dtype=mx.bfloat16)
    assert model.editor.layers[0].mlp.gate_up_proj.weight.dtype == mx.bfloat16
    bf16 = lambda name: mx.array(case[name])[None].astype(mx.bfloat16)
    bpe_logits, audio_embeds = model.encode(bf16("input_features"))
    slots = g.insert_slots(
        case["encoder_preds"].tolist(), case["blank_token_id"], case["min_edit_sequence_length"]
    )
    text_logits = model.edit(bf16("audio_embeds"), mx.array([slots]))[0]
    bpe_logits, audio_embeds = bpe_logits[0], audio_embeds[0]
    for ours, name in (
        (bpe_logits, "encoder_bpe_logits"),
        (audio_embeds, "audio_embeds"),
        (text_logits, "editor_text_logits"),
    ):
        assert ours.dtype == mx.bfloat16, name
        assert_close(ours, case[name], TOL_BF16)
    # The reference's top-1 minus top-2 gap moves by at most GAP_BF16: an id may differ only where
    # the gap is within that, and most are not.
    for ours, name in ((bpe_logits, "encoder_bpe_logits"), (text_logits, "editor_text_logits")):
        ours, ref = np.array(ours.astype(mx.float32)), case[name]
        rows, scale = np.arange(len(ref)), np.abs(ref).max()
        top2 = np.argsort(ref, axis=-1)[:, -2:]
        gap = lambda x: x[rows, top2[:, 1]] - x[rows, top2[:, 0]]
        assert np.abs(gap(ours) - gap(ref)).max() <= GAP_BF16 * scale, name
        decided = gap(ref) > GAP_BF16 * scale
        assert decided.mean() > 0.6, (name, decided.sum(), len(decided))
        np.testing.assert_array_equal(ours.argmax(-1)[decided], ref.argmax(-1)[decided], name)


# ---- decoding units ----


def test_ctc_collapse_merges_before_dropping_blanks():
    assert g.ctc_collapse([5, 5, 0, 5, 7, 7, 0, 0], blank_id=0) == [5, 5, 7]
    assert g.ctc_collapse([0, 0, 0], blank_id=0) == []
    assert g.ctc_collapse([], blank_id=0) == []
    assert g.ctc_collapse(mx.array([3, 3, 4]), blank_id=9) == [3, 4]


def test_insert_slots():
    assert g.insert_slots([1, 2], blank_id=0, min_len=0) == [0, 1, 0, 2, 0]
    assert g.insert_slots([1, 2], blank_id=0, min_len=8) == [0, 1, 0, 2, 0, 0, 0, 0]
    assert g.insert_slots([], blank_id=7, min_len=3) == [7, 7, 7]
    assert g.insert_slots([], blank_id=7, min_len=0) == [7]


@pytest.fixture(scope="module")
def tokenizer():
    return g.Tokenizer(CHECKPOINT)


def test_detokenizer_multibyte_split_across_tokens(tokenizer):
    vocab = json.loads((CHECKPOINT / "tokenizer.json").read_text())["model"]["vocab"]
    # GPT-2 byte alphabet: 0xC3 -> 'Ã', 0xA9 -> '©', 0xBC -> '¼' (printable, themselves),
    # space -> 'Ġ'
    e_acute = [vocab["Ã"], vocab["©"]]  # "é" = C3 A9
    assert tokenizer.decode(e_acute) == "é"
    assert tokenizer.decode([vocab["Ġ"], *e_acute, vocab["Ã"], vocab["¼"]]) == " éü"
    assert tokenizer.decode([vocab["Ã"]]) == "\ufffd"  # truncated sequence
    assert tokenizer.decode([vocab["©"], vocab["a"]]) == "\ufffda"  # lone continuation byte
    assert tokenizer.decode([vocab["Ċ"]]) == "\n"


def test_detokenizer_skips_special_tokens(tokenizer):
    vocab = json.loads((CHECKPOINT / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokenizer.decode([352, vocab["a"], 353, vocab["b"], 356]) == "ab"
    assert tokenizer.decode([]) == ""


def test_detokenizer_clean_up_tokenization_spaces(tmp_path):
    vocab = json.loads((CHECKPOINT / "tokenizer.json").read_text())["model"]["vocab"]
    ids = [vocab["a"], vocab["Ġ"], vocab["."]]
    shutil.copy(CHECKPOINT / "tokenizer.json", tmp_path)
    config = json.loads((CHECKPOINT / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**config, "clean_up_tokenization_spaces": True})
    )
    assert g.Tokenizer(CHECKPOINT).decode(ids) == "a ."
    assert g.Tokenizer(tmp_path).decode(ids) == "a."


# ---- inputs ----


def test_short_silent_and_invalid_audio(loaded, tmp_path):
    model, tokenizer = loaded
    assert g.transcribe(model, tokenizer, np.zeros(319, np.float32)) == ""
    silent = np.zeros(16000, np.float32)
    assert g.transcribe(model, tokenizer, silent) == ""
    assert g.transcribe(model, tokenizer, [silent, FIXTURE / "audio_short.wav"]) == [
        "",
        json.loads((FIXTURE / "golden_short.json").read_text())["decoded_text"],
    ]
    with pytest.raises(ValueError, match="NaN"):
        g.transcribe(model, tokenizer, np.full(16000, np.nan, np.float32))
    with pytest.raises(ValueError, match="mono"):
        g.transcribe(model, tokenizer, np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="too short"):
        g.log_mel([np.zeros(100, np.float32)])
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        g.load_audio(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="bad.wav"):
        g.load_audio(tmp_path / "bad.wav")


def _write_wav(path, samples, rate=16000, channels=1):
    import wave

    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.astype(np.int16).tobytes())


def test_load_audio_rate_and_channels(tmp_path):
    tone = lambda rate: 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate // 10) / rate)  # 0.1 s
    _write_wav(tmp_path / "44k.wav", 32767 * tone(44100), rate=44100)
    resampled = g.load_audio(tmp_path / "44k.wav")
    assert resampled.shape == (1600,)  # tests/test_audio_cli.py checks the resampling further
    # the tone at 16 kHz, but for the filter's edge effects in the first and last 2 ms
    np.testing.assert_allclose(resampled[32:-32], tone(16000)[32:-32], atol=3e-4)
    stereo = np.stack(
        [np.full(10, 1000), np.full(10, 3000)], axis=1
    )  # (frames, channels), interleaved
    _write_wav(tmp_path / "stereo.wav", stereo, channels=2)
    np.testing.assert_array_equal(
        g.load_audio(tmp_path / "stereo.wav"), np.full(10, 2000 / 32768, np.float32)
    )


# ---- loading and conversion ----


def _upstream_copy(tmp_path, edit_weights=None, edit_config=None):
    """A copy of the fixture checkpoint, single-file, with its tensors or config edited."""
    src = tmp_path / "upstream"
    src.mkdir()
    weights = {}
    for shard in sorted(CHECKPOINT.glob("*.safetensors")):
        weights.update(mx.load(str(shard)))
    config = json.loads((CHECKPOINT / "config.json").read_text())
    if edit_weights:
        edit_weights(weights)
    if edit_config:
        edit_config(config)
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    (src / "config.json").write_text(json.dumps(config))
    shutil.copy(CHECKPOINT / "tokenizer.json", src)
    return src


def test_convert_layouts_and_dtype(model_dir, tmp_path):
    ours = mx.load(str(model_dir / "model.safetensors"))
    assert not any(k.endswith("num_batches_tracked") for k in ours)
    assert ours["encoder.layers.0.conv.depth_conv.weight"].shape == (128, 15, 1)  # (C, K, 1)
    assert ours["encoder.layers.0.conv.up_conv.weight"].shape == (256, 64)
    assert ours["editor.embed_tokens.weight"].dtype == mx.bfloat16

    def to_native(weights):  # the transformers-native namespace, with its tied lm_head stored
        for key in list(weights):
            new = key.replace("language_model.model.", "language_model.")
            weights["model." + new] = weights.pop(key)
        weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]

    convert(_upstream_copy(tmp_path, to_native), tmp_path / "native", dtype=mx.float32)
    native = mx.load(str(tmp_path / "native" / "model.safetensors"))
    assert sorted(native) == sorted(ours)
    for key in ours:
        assert native[key].dtype == mx.float32
        np.testing.assert_array_equal(np.array(native[key]), np.array(ours[key].astype(mx.float32)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda w: w.pop("encoder.layers.1.attn.to_q.weight"),
            "missing: encoder.layers.1.attn.to_q.weight",
        ),
        (
            lambda w: w.update({"encoder.extra.weight": mx.zeros((2,))}),
            "unknown: encoder.extra.weight",
        ),
        (
            lambda w: w.update({"projector.query": mx.zeros((1, 4, 128))}),
            r"mis-shaped: projector.query \(1, 4, 128\)",
        ),
    ],
)
def test_convert_rejects_bad_tensors_and_writes_nothing(tmp_path, edit, message):
    src = _upstream_copy(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [
        "upstream"
    ]  # no temporary directory left either


def test_convert_rejects_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert(tmp_path / "missing", tmp_path / "out")
    src = _upstream_copy(tmp_path, edit_config=lambda c: c.pop("encoder_config"))
    with pytest.raises(ValueError, match="encoder_config"):
        convert(src, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        convert(CHECKPOINT, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_load_rejects_bad_directories(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        g.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    shutil.copy(model_dir / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        g.load(tmp_path / "empty")
    whisper = tmp_path / "whisper"
    shutil.copytree(model_dir, whisper)
    (whisper / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match="model_type is 'whisper'"):
        g.load(whisper)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(model_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["encoder_config"]["num_layers"] = 3
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown: encoder.layers.3"):
        g.load(mismatched)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read"):
        g.load(corrupt)


# ---- command line ----


def _run(*args):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=HERE,
    )


def test_cli_convert_then_transcribe(tmp_path):
    out = tmp_path / "m"
    result = _run("convert.py", "--hf-path", CHECKPOINT, "--mlx-path", out)
    assert result.returncode == 0, result.stderr
    result = _run(
        "granite_nar.py", FIXTURE / "audio.wav", FIXTURE / "audio_short.wav", "--model", out
    )
    assert result.returncode == 0, result.stderr
    expected = [
        json.loads((FIXTURE / f"{name}.json").read_text())["decoded_text"] for name in CASES
    ]
    files = [FIXTURE / "audio.wav", FIXTURE / "audio_short.wav"]  # named as head names them
    blocks = [f"==> {path} <==\n{text}\n" for path, text in zip(files, expected)]
    assert result.stdout == "\n".join(blocks)


def test_cli_reports_bad_files_and_keeps_going(model_dir, tmp_path):
    result = _run(
        "granite_nar.py",
        tmp_path / "missing.wav",
        FIXTURE / "audio_short.wav",
        "--model",
        model_dir,
    )
    assert result.returncode == 1
    assert "missing.wav" in result.stderr
    text = json.loads((FIXTURE / "golden_short.json").read_text())["decoded_text"]
    assert result.stdout == f"==> {FIXTURE / 'audio_short.wav'} <==\n{text}\n"
    result = _run("granite_nar.py", FIXTURE / "audio.wav", "--model", tmp_path / "nowhere")
    assert result.returncode == 1 and "model directory not found" in result.stderr


# ---- quantization ----

Q_GROUP = 32  # the fixture editor is 96 wide: 64 does not divide it


@pytest.fixture(scope="session", params=[4, 5, 6, 8])
def quantized(request, tmp_path_factory):
    bits = request.param
    out = tmp_path_factory.mktemp(f"q{bits}") / "mlx"
    convert(CHECKPOINT, out, quantization={"bits": bits, "group_size": Q_GROUP, "scope": "editor"})
    return bits, out


def _dequantized_editor_model(model_dir, bits):
    """The float model whose editor weights went through convert's quantization and back."""
    model, _ = g.load(model_dir, dtype=mx.float32)
    for path, module in model.editor.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w, scales, biases = mx.quantize(
                module.weight.astype(mx.bfloat16), Q_GROUP, bits
            )  # stored bf16
            module.weight = mx.dequantize(
                w, scales.astype(mx.float32), biases.astype(mx.float32), Q_GROUP, bits
            )
    return model


@pytest.mark.parametrize("dequantize", [False, True])
def test_quantized_editor_equals_dequantized_weights(model_dir, quantized, case, dequantize):
    """Quantized layers, or (the default on a CPU) their weights dequantized at load: the same."""
    bits, q_dir = quantized
    q_model, _ = g.load(q_dir, dtype=mx.float32, dequantize=dequantize)
    assert isinstance(q_model.editor.layers[0].mlp.gate_up_proj, nn.QuantizedLinear) != dequantize
    reference = _dequantized_editor_model(model_dir, bits)
    audio_embeds, hypothesis = case["audio_embeds"], case["encoder_preds"].tolist()
    ours, ref = edit1(q_model, audio_embeds, hypothesis), edit1(reference, audio_embeds, hypothesis)
    assert_close(ours, np.array(ref), tol=1e-5)
    assert not np.allclose(
        np.array(ref), case["editor_text_logits"], atol=1e-3
    )  # quantization did change it
    bpe_logits, q_embeds = encode1(q_model, case["input_features"])  # encoder/projector untouched
    assert_close(bpe_logits, case["encoder_bpe_logits"])
    assert_close(q_embeds, case["audio_embeds"])


def test_quantized_module_types_config_and_size(model_dir, quantized):
    bits, q_dir = quantized
    model, _ = g.load(q_dir, dequantize=False)
    assert json.loads((q_dir / "config.json").read_text())["quantization"] == {
        "bits": bits,
        "group_size": Q_GROUP,
        "scope": "editor",
    }
    assert isinstance(model.editor.embed_tokens, nn.QuantizedEmbedding)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            assert isinstance(module, nn.QuantizedLinear) == name.startswith("editor."), name
    stored = mx.load(str(q_dir / "model.safetensors"))
    float_stored = mx.load(str(model_dir / "model.safetensors"))
    editor_bytes = lambda w: sum(v.nbytes for k, v in w.items() if k.startswith("editor."))
    # bf16 is 16 bits a weight; affine adds a bf16 scale and bias per group of 32 (1 bit a weight)
    assert editor_bytes(stored) < editor_bytes(float_stored) * (bits + 1.05) / 16
    assert (q_dir / "model.safetensors").stat().st_size < (
        model_dir / "model.safetensors"
    ).stat().st_size


def test_quantized_cli_transcribes(model_dir, quantized):
    bits, q_dir = quantized
    reference = _dequantized_editor_model(model_dir, bits)
    expected = g.transcribe(reference, g.Tokenizer(model_dir), FIXTURE / "audio.wav")
    # float32 as the reference (a GPU's default is bfloat16)
    result = _run("granite_nar.py", FIXTURE / "audio.wav", "--model", q_dir, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    # where the layers are dequantized (a CPU, an NVIDIA GPU), only --verbose says so
    assert "dequantized" not in result.stderr
    verbose = _run("granite_nar.py", FIXTURE / "audio.wav", "--model", q_dir, "--verbose")
    dequantized = mx.default_device() == mx.cpu or mx.cuda.is_available()
    assert verbose.returncode == 0
    assert (f"{bits}-bit layers are dequantized" in verbose.stderr) == dequantized


def test_quantize_scope_all(tmp_path):
    out = tmp_path / "all"
    result = _run(
        "convert.py",
        "--hf-path",
        CHECKPOINT,
        "--mlx-path",
        out,
        "-q",
        "--q-bits",
        "4",
        "--q-group-size",
        "32",
        "--q-scope",
        "all",
    )
    assert result.returncode == 0, result.stderr
    assert "editor" in result.stderr and "MB" in result.stderr  # the per-component size table
    model, _ = g.load(out, dequantize=False)
    assert isinstance(model.encoder.layers[0].ff1.up_proj, nn.QuantizedLinear)  # input 64
    assert isinstance(model.encoder.input_linear, nn.QuantizedLinear)  # input 160 = 5 x 32
    assert isinstance(model.encoder.out_mid, nn.Linear)  # input 12: not divisible, stays float
    assert isinstance(model.projector.layer_projector, nn.QuantizedLinear)


def test_quantization_errors(quantized, tmp_path):
    bits, q_dir = quantized
    result = _run(
        "convert.py",
        "--hf-path",
        CHECKPOINT,
        "--mlx-path",
        tmp_path / "x",
        "-q",
        "--q-group-size",
        "64",
    )
    assert result.returncode == 1 and "does not divide" in result.stderr
    assert not (tmp_path / "x").exists()
    wrong_bits = tmp_path / "wrong_bits"
    shutil.copytree(q_dir, wrong_bits)
    config = json.loads((wrong_bits / "config.json").read_text())
    config["quantization"]["bits"] = 8 if bits != 8 else 4
    (wrong_bits / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mis-shaped: editor"):
        g.load(wrong_bits, dequantize=False)
    del config["quantization"]
    (wrong_bits / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tensors are quantized"):
        g.load(wrong_bits, dequantize=False)


# ---- other layouts and the Hub ----


def test_load_upstream_and_mlx_audio_layouts(model_dir, tmp_path):
    golden = json.loads((FIXTURE / "golden.json").read_text())["decoded_text"]
    features = log_mel1(g.load_audio(FIXTURE / "audio.wav"))
    reference = encode1(g.load(model_dir)[0], features)
    upstream = g.load(CHECKPOINT)  # sharded bf16, original hub names, renamed in memory
    to_mlx_audio_dir(model_dir, tmp_path / "mlx_audio")
    mlx_audio = g.load(tmp_path / "mlx_audio")
    for model, tokenizer in (upstream, mlx_audio):
        assert g.transcribe(model, tokenizer, FIXTURE / "audio.wav") == golden
        for ours, ref in zip(encode1(model, features), reference):
            np.testing.assert_array_equal(np.array(ours), np.array(ref))


def test_load_mlx_audio_quantized_layout(quantized, tmp_path):
    bits, q_dir = quantized
    to_mlx_audio_dir(q_dir, tmp_path / "mlx_audio_q")
    config = json.loads((tmp_path / "mlx_audio_q" / "config.json").read_text())
    assert (
        config["quantization"]
        == config["quantization_config"]
        == {"group_size": Q_GROUP, "bits": bits, "mode": "affine"}
    )
    ours = g.load(q_dir, dequantize=False)[0]
    theirs = g.load(tmp_path / "mlx_audio_q", dequantize=False)[0]
    assert isinstance(theirs.editor.embed_tokens, nn.QuantizedEmbedding)
    audio_embeds, hypothesis = mx.random.normal((7, 96)), [5, 9, 5, 300]
    np.testing.assert_array_equal(
        np.array(edit1(theirs, audio_embeds, hypothesis)),
        np.array(edit1(ours, audio_embeds, hypothesis)),
    )


def test_load_hub_repo_id(model_dir, tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, allow_patterns):  # the download, mocked at its boundary
        calls.append((repo_id, allow_patterns))
        local = tmp_path / "hub" / repo_id.replace("/", "--")
        shutil.copytree(model_dir, local)
        return str(local)

    monkeypatch.setitem(sys.modules, "huggingface_hub", type(sys)("huggingface_hub"))
    monkeypatch.setattr(
        sys.modules["huggingface_hub"], "snapshot_download", snapshot_download, raising=False
    )
    monkeypatch.chdir(tmp_path)
    model, tokenizer = g.load("someone/granite-nar-test")
    assert calls == [("someone/granite-nar-test", g.HUB_FILES)]
    assert "*.safetensors" in g.HUB_FILES and "*.json" in g.HUB_FILES
    golden = json.loads((FIXTURE / "golden_short.json").read_text())["decoded_text"]
    assert g.transcribe(model, tokenizer, FIXTURE / "audio_short.wav") == golden
    for local_looking in ("./someone/model", "/no/such/dir", "nested/too/deep", "plain-name"):
        with pytest.raises(FileNotFoundError, match="model directory not found"):
            g.load(local_looking)
    assert len(calls) == 1  # a local path is never looked up on the Hub
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        g.load("someone/other-model")


def test_cli_default_model_is_the_5bit_conversion():
    result = _run("granite_nar.py", "--help")
    assert result.returncode == 0 and g.DEFAULT_MODEL in "".join(
        result.stdout.split()
    )  # help wraps lines
    assert g.DEFAULT_MODEL == "mlx-community/granite-speech-4.1-2b-nar-mlx-5bit"


def test_readme_quickstart_prints_what_it_says(tmp_path):
    """The README's fixture commands, run as written, print its "This should print" block: with
    this Python for `python` (whatever PATH holds), the paths it gives in /tmp in tmp_path."""
    readme = (HERE / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart") : readme.index("## Python")]
    commands, expected = re.findall(r"```\n(.*?)```", quickstart, re.S)[1:3]
    in_tmp = lambda arg: (
        tmp_path / Path(arg).relative_to("/tmp") if arg.startswith("/tmp/") else arg
    )
    for command in commands.strip().splitlines():
        program, *args = shlex.split(command)
        assert program == "python", command
        result = subprocess.run(
            [sys.executable, *map(str, map(in_tmp, args))], capture_output=True, text=True, cwd=HERE
        )
        assert result.returncode == 0, (command, result.stderr)
    assert result.stdout == expected


def test_openblas_absent_is_detected(monkeypatch):
    """Without OpenBLAS, find_library gives None, and CDLL(None), the process itself, succeeds."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(g.ctypes.util, "find_library", lambda name: None)

    def cdll(name, mode=0):
        if name is None:
            return object()
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(g.ctypes, "CDLL", cdll)
    assert g._load_openblas() is False
