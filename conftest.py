import os

# The tests compare float32 with the reference: on a GPU, float32 matmuls must not run as TF32.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
