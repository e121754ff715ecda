"""Convert an upstream Granite Speech 4.1 NAR checkpoint to MLX.

    python convert.py --hf-path ibm-granite/granite-speech-4.1-2b-nar --mlx-path granite_nar_mlx

    python convert.py --hf-path ... --mlx-path granite_nar_mlx_5bit -q        # 5-bit editor

--hf-path is a local directory or a Hugging Face Hub repo id, downloaded as granite_nar.load()
downloads one (granite_nar.model_path). Reads config.json, model.safetensors (or shards +
model.safetensors.index.json) in the original hub layout (encoder.*, projector.*,
language_model.model.*) or a transformers one (model.*), renames and re-lays the tensors for
granite_nar.py, optionally quantizes them, and writes model.safetensors, config.json (in the
original layout's keys) and the tokenizer files. The output directory appears complete or not at
all.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from granite_nar import check_weights, model_path, read_checkpoint  # first: OpenBLAS, then MLX

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
)


def quantize(model, bits, group_size, scope):
    """Affine-quantize in place: every editor Linear and the tied embedding (its as_linear is the
    output head); with scope "all" also the encoder/projector Linears whose input the group
    divides."""

    def predicate(path, module):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        fits = module.weight.shape[-1] % group_size == 0
        if path.startswith("editor."):
            if not fits:
                raise ValueError(
                    f"--q-group-size {group_size} does not divide {path}'s input size"
                    f" {module.weight.shape[-1]}: choose a smaller one"
                )
            return True
        return scope == "all" and isinstance(module, nn.Linear) and fits

    nn.quantize(model, group_size, bits, class_predicate=predicate)


def checkpoint_dir(hf_path, mlx_path):
    """The checkpoint's directory: hf_path itself, or the Hub repo id hf_path downloaded by
    granite_nar.model_path (a path that looks local is never looked up). mlx_path is checked
    first, so that a busy one fails before any download."""
    mlx_path = Path(mlx_path)
    if (
        mlx_path.exists()
        and any(mlx_path.iterdir())
        and not (mlx_path / "model.safetensors").is_file()
    ):
        raise FileExistsError(
            f"{mlx_path} exists and is not an MLX model directory: choose another --mlx-path"
        )
    try:
        hf_path = model_path(hf_path)
    except FileNotFoundError:  # model_path's only one: a missing local directory
        raise FileNotFoundError(f"checkpoint directory not found: {Path(hf_path)}") from None
    if not (hf_path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{hf_path / 'tokenizer.json'} not found: the transcript cannot be decoded without it"
        )
    return hf_path


def write_model_dir(hf_path, mlx_path, config, weights):
    """Write mlx_path whole or not at all: into a temporary sibling, renamed over it at the end."""
    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mlx_path.name}.", dir=mlx_path.parent))
    tmp.chmod(0o755)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (hf_path / name).is_file():
                shutil.copyfile(hf_path / name, tmp / name)
        if mlx_path.exists():
            shutil.rmtree(mlx_path)
        tmp.rename(mlx_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(hf_path, mlx_path, dtype=None, quantization=None):
    """Write the MLX model directory from hf_path, a checkpoint directory or Hub repo id. dtype
    None keeps the stored precision (bf16 upstream); quantization: None or {"bits": 4|5|6|8,
    "group_size": 32|64|128, "scope": "editor"|"all"}."""
    hf_path, mlx_path = checkpoint_dir(hf_path, mlx_path), Path(mlx_path)
    config, model, weights = read_checkpoint(hf_path)  # any layout, in granite_nar's names
    check_weights(model, weights)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    n_params = {
        name: sum(v.size for _, v in tree_flatten(part.parameters()))
        for name, part in model.children().items()
    }
    if quantization:
        quantize(model, **quantization)
        config["quantization"] = quantization
    weights = dict(tree_flatten(model.parameters()))

    for name, part in model.children().items():
        n_bytes = sum(v.nbytes for _, v in tree_flatten(part.parameters()))
        print(
            f"{name:9s} {n_params[name] / 1e6:9.1f} M parameters {n_bytes / 1e6:9.1f} MB",
            file=sys.stderr,
        )
    write_model_dir(hf_path, mlx_path, config, weights)
    size = (mlx_path / "model.safetensors").stat().st_size
    print(f"wrote {mlx_path}: model.safetensors {size / 1e6:.1f} MB", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(
        description="Convert an upstream Granite Speech 4.1 NAR checkpoint to MLX."
    )
    parser.add_argument(
        "--hf-path", required=True, help="upstream checkpoint directory or Hugging Face Hub repo id"
    )
    parser.add_argument(
        "--mlx-path", default="granite_nar_mlx", help="output directory (default: granite_nar_mlx)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype (default: as stored, bf16 upstream)",
    )
    parser.add_argument(
        "-q", "--quantize", action="store_true", help="quantize (affine, see --q-*)"
    )
    parser.add_argument(
        "--q-bits", type=int, choices=[4, 5, 6, 8], default=5, help="bits per weight (default: 5)"
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        choices=[32, 64, 128],
        default=64,
        help="group size (default: 64)",
    )
    parser.add_argument(
        "--q-scope",
        choices=["editor", "all"],
        default="editor",
        help="editor: its Linears and tied embedding (default);"
        " all: also encoder/projector Linears",
    )
    args = parser.parse_args()
    quantization = (
        {"bits": args.q_bits, "group_size": args.q_group_size, "scope": args.q_scope}
        if args.quantize
        else None
    )
    try:
        convert(
            args.hf_path,
            args.mlx_path,
            getattr(mx, args.dtype) if args.dtype else None,
            quantization,
        )
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
