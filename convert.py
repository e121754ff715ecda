"""Convert an upstream Granite Speech 4.1 NAR checkpoint to MLX.

    python convert.py --hf-path path/to/granite-speech-4.1-2b-nar --mlx-path granite_nar_mlx

Reads config.json, model.safetensors (or shards + model.safetensors.index.json) in the original hub
namespace (encoder.*, projector.*, language_model.model.*) or the transformers-native one (model.*,
lm_head.*), renames and re-lays the tensors for granite_nar.py, and writes model.safetensors,
config.json and the tokenizer files. The output directory appears complete or not at all.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from granite_nar import GraniteNAR, ModelArgs, check_weights, read_config, sanitize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")


def read_upstream_weights(hf_path):
    """All tensors of a checkpoint directory, single-file or sharded."""
    index_file = hf_path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index_file}: not a safetensors index ({e})") from None
    elif (hf_path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_path}: no model.safetensors or model.safetensors.index.json")
    weights = {}
    for shard in shards:
        try:
            weights.update(mx.load(str(hf_path / shard)))
        except Exception as e:  # mlx raises RuntimeError or ValueError for a missing or damaged file
            raise ValueError(f"{hf_path / shard}: cannot read ({e})") from None
    return weights


def convert(hf_path, mlx_path, dtype=None):
    """Write the MLX model directory; dtype None keeps the stored precision (bf16 upstream)."""
    hf_path, mlx_path = Path(hf_path), Path(mlx_path)
    if not hf_path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {hf_path}")
    if mlx_path.exists() and any(mlx_path.iterdir()) and not (mlx_path / "model.safetensors").is_file():
        raise FileExistsError(f"{mlx_path} exists and is not an MLX model directory: choose another --mlx-path")
    if not (hf_path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_path / 'tokenizer.json'} not found: the transcript cannot be decoded without it")
    config = read_config(hf_path)
    model = GraniteNAR(ModelArgs.from_dict(config))
    weights = sanitize(read_upstream_weights(hf_path))
    check_weights(model, weights)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}

    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{len(weights)} tensors, {n_params / 1e6:.1f} M parameters", file=sys.stderr)
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
    size = (mlx_path / "model.safetensors").stat().st_size
    print(f"wrote {mlx_path} ({size / 1e6:.1f} MB)", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description="Convert an upstream Granite Speech 4.1 NAR checkpoint to MLX.")
    parser.add_argument("--hf-path", required=True, help="upstream checkpoint directory")
    parser.add_argument("--mlx-path", default="granite_nar_mlx", help="output directory (default: granite_nar_mlx)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: as stored, bf16 upstream)"
    )
    args = parser.parse_args()
    try:
        convert(args.hf_path, args.mlx_path, getattr(mx, args.dtype) if args.dtype else None)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
