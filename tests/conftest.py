import hashlib
import os
import sys
import tempfile

# Triton kernels run on CPU tensors in the interpreter.  rezero_kernels probes its backends when
# first imported, so this must be set before any test module imports it.
# On a GPU machine Triton compiles for the GPU instead (torch itself does not import triton).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches do not hash the schemas of custom ops: a graph cached before a
# schema changed would call the op with the old arguments.  Key the cache on csrc/ops.cpp.
_SCHEMAS = os.path.join(os.path.dirname(__file__), os.pardir, "csrc", "ops.cpp")
with open(_SCHEMAS, "rb") as f:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), "torchinductor-rezero-" + hashlib.sha256(f.read()).hexdigest()[:12]))

# the test helpers (parity.py) import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
