"""Build rezero_kernels and its compiled extension ``rezero_kernels._C``.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the build uses the torch that
is already installed and never installs or replaces one.

Environment switches:
  REZERO_CUDA       auto (default): build the CUDA kernels when torch has CUDA and CUDA_HOME is
                    set; 1: require them (error if impossible); 0: CPU-only extension.
  REZERO_CUDA_ARCH  CUDA architectures, default "80;90" (sm_80, sm_90).
  REZERO_CPU_ARCH   value for g++ -march, default "native"; "" leaves it out (portable build).
  REZERO_NO_EXT     1: install the pure-Python package only (backend "auto" then warns and uses
                    the reference).
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda(torch_cuda: bool, cuda_home) -> bool:
    mode = os.environ.get("REZERO_CUDA", "auto").lower()
    if mode in ("0", "off", "no"):
        return False
    possible = torch_cuda and cuda_home is not None
    if mode in ("1", "on", "yes") and not possible:
        raise RuntimeError("REZERO_CUDA=1 but torch has no CUDA or CUDA_HOME is not set "
                           f"(torch.version.cuda={torch_cuda}, CUDA_HOME={cuda_home})")
    return possible


def extensions():
    if os.environ.get("REZERO_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    march = os.environ.get("REZERO_CPU_ARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + ([f"-march={march}"] if march else [])
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    use_cuda = _want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME)
    if not use_cuda:
        ext = cpp_extension.CppExtension("rezero_kernels._C", sources,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        return [ext], {"build_ext": cpp_extension.BuildExtension}
    archs = os.environ.get("REZERO_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    ext = cpp_extension.CUDAExtension(
        "rezero_kernels._C", sources, define_macros=[("REZERO_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", *gencode]},
        extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="rezero-kernels",
    version="0.1.0",
    description="Fused kernels and drop-in layers for ReZero residual networks",
    packages=find_packages(include=["rezero_kernels", "rezero_kernels.*", "python_ref"]),
    python_requires=">=3.10",
    # torch is deliberately not listed: an unpinned torch requirement makes pip fetch the newest
    # CUDA build and replace the installed one.  Install torch first (README).
    install_requires=["numpy"],
    extras_require={"triton": ["triton>=3.6"],
                    "plot": ["matplotlib"],
                    "bench": ["scikit-learn", "gensim", "matplotlib"],
                    "test": ["pytest", "pytest-benchmark", "expecttest", "rezero==0.1.0",
                             "scikit-learn", "gensim", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
