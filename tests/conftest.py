import os
import sys

# Triton kernels run on CPU tensors in the interpreter.  rezero_kernels probes its backends when
# first imported, so this must be set before any test module imports it.
# On a GPU machine Triton compiles for the GPU instead (torch itself does not import triton).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the test helpers (parity.py) import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
