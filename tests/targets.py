"""The (backend, device) targets every device-generic test runs on, and their fixture.

  cpu-cpu      the compiled C++ kernels
  triton-cpu   the Triton kernels in Triton's interpreter (CPU machines; TRITON_INTERPRET=1 is set
               by conftest.py before rezero_kernels is imported)
  triton-cuda  the Triton kernels compiled for the GPU
  cuda-cuda    the compiled CUDA kernels

A target that cannot run here is collected and skipped with the reason, so a CPU machine and a
GPU machine run the very same tests.  A test module takes the fixture with
``from targets import target``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import rezero_kernels as rzk


@dataclass(frozen=True)
class Target:
    backend: str
    device: str

    def __str__(self):
        return f"{self.backend}-{self.device}"

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"

    def skip_reason(self):
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU visible"
        if self.interpreted and os.environ.get("TRITON_INTERPRET") != "1":
            return "the Triton interpreter runs only on machines without a GPU (TRITON_INTERPRET=1)"
        if not rzk.backends()[self.backend]:
            return (f"backend {self.backend!r} is not available here: "
                    f"{rzk.dispatch._UNAVAILABLE[self.backend]}")
        return None


TARGETS = [Target("cpu", "cpu"), Target("triton", "cpu"), Target("triton", "cuda"),
           Target("cuda", "cuda")]


@pytest.fixture(params=[pytest.param(t, id=str(t), marks=pytest.mark.skipif(
    t.skip_reason() is not None, reason=str(t.skip_reason()))) for t in TARGETS])
def target(request) -> Target:
    return request.param
