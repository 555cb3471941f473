"""The portable CPU build: kernels compiled once per instruction-set variant, one picked at run
time (csrc/cpu/kernels.h).  The CPU parity and dropout tests pass on every variant below the one
this CPU picks (forced with REZERO_CPU_CAPABILITY, in a subprocess: the choice is made once per
process); the environment variables pick as documented; and no instruction wider than a
variant's own runs outside its kernels (the reason for the link order in setup.py)."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rezero_kernels as rzk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")


SWITCHES = ("REZERO_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")


def _environment(**env):
    """This process's environment without the switches, plus env."""
    return {**{k: v for k, v in os.environ.items() if k not in SWITCHES}, **env}


def _python(code, **env):
    """Runs code in a fresh interpreter with env; returns the completed process."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=_environment(**env), timeout=120)


def _capability(**env):
    out = _python("import rezero_kernels; print(rezero_kernels.cpu_capability())", **env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


if rzk.backends()["cpu"]:
    VARIANTS = list(torch.ops.rezero_kernels.cpu_capabilities())  # lowest first
    BEST = _capability() if len(VARIANTS) > 1 else VARIANTS[0]  # what this CPU picks unforced
else:
    VARIANTS, BEST = [], None
dispatch_build = pytest.mark.skipif(
    len(VARIANTS) < 2, reason="a REZERO_CPU_ARCH build has one variant: nothing to dispatch")


@dispatch_build
def test_environment_picks_the_variant():
    assert BEST in VARIANTS
    lowest = VARIANTS[0]
    assert _capability(REZERO_CPU_CAPABILITY=lowest.lower()) == lowest
    # ATen's variable forces ours too; ours wins over it
    assert _capability(ATEN_CPU_CAPABILITY=lowest.lower()) == lowest
    assert _capability(ATEN_CPU_CAPABILITY=lowest, REZERO_CPU_CAPABILITY=BEST) == BEST
    # ATen values that name no variant of ours are ignored; never above what the CPU runs
    assert _capability(ATEN_CPU_CAPABILITY="zvector") == BEST
    assert _capability(REZERO_CPU_CAPABILITY=VARIANTS[-1]) == BEST


@dispatch_build
def test_unknown_variant_is_a_clear_error():
    out = _python("import torch, rezero_kernels as r\n"
                  "r.functional.rezero_residual(torch.ones(4), torch.ones(4), torch.ones(1))",
                  REZERO_CPU_CAPABILITY="avx9000")
    assert out.returncode != 0
    assert "REZERO_CPU_CAPABILITY=avx9000 is not a CPU variant of this build" in out.stderr


@dispatch_build
@pytest.mark.parametrize("variant", VARIANTS[:VARIANTS.index(BEST)] if BEST else [])
def test_parity_on_lower_variant(variant):
    """The CPU op parity and dropout-rule tests, run on a lower variant than this CPU picks."""
    env = _environment(REZERO_CPU_CAPABILITY=variant)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_parity.py", "tests/test_dropout.py", "-k", "cpu-cpu or test_dropout"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


# %zmm, AVX-512 mask registers, and x/ymm16-31 (EVEX only); any VEX instruction (v...) or %ymm
_AVX512_OPERAND = re.compile(r"%zmm|%k[1-7]\b|%[xy]mm(?:1[6-9]|2[0-9]|3[01])\b")
_AVX_INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\s+v[a-z0-9]+\s|%ymm")


@dispatch_build
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.skipif("AVX2" not in VARIANTS, reason="x86-64 variants only")
def test_wide_instructions_stay_inside_their_variant():
    """Every function that uses an AVX-512 operand belongs to the AVX512 variant (its name
    contains the variant's namespace), and every function using AVX belongs to AVX2 or AVX512:
    shared inline functions and static initialisers run on any CPU."""
    import rezero_kernels._C as lib

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", lib.__file__],
                             capture_output=True, text=True, check=True).stdout
    bad, function = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function is not None:
            if _AVX512_OPERAND.search(line) and "AVX512" not in function:
                bad.setdefault(function, line.strip())
            elif (_AVX_INSTRUCTION.search(line) and "AVX512" not in function
                  and "AVX2" not in function):
                bad.setdefault(function, line.strip())
    assert not bad, "wide instructions outside their variant:\n" + "\n".join(
        f"{f[:200]}: {i}" for f, i in list(bad.items())[:20])
