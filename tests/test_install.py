"""Installing the package as the README says, in fresh virtual environments.

* the venv's own pip with the setuptools that torch pulls in (pip 23 with setuptools >= 80 is the
  combination whose legacy `develop` path re-ran pip with build isolation before
  pyproject.toml existed): `pip install --no-build-isolation -e .`, then `... .`;
* the same with the venv's own setuptools, and with the newest pip and setuptools;
* `python -m build --wheel --no-isolation`, and the wheel installed into a fresh venv.

Each time the package must import from where it was installed, with the compiled CPU backend,
and run the ops.  The venvs are made with --system-site-packages, so they inherit the installed
torch rather than install one.  Every case builds in one copy of the source tree, in venvs at one
path: the compile commands are then identical and ninja compiles the extension once (the first
case); later cases only link.  Needs PyPI (wheel, pip, setuptools and build go into the venvs);
skipped where it cannot be reached.

And, without a venv, setup.py's check of the CUDA toolkit it would build the CUDA kernels with.
"""
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900

# Run in the venv from outside the source tree: import, find the CPU backend, run the ops.
CHECK = r"""
import json, torch
import rezero_kernels as rzk
F = rzk.functional
x, fx = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
alpha = torch.tensor([0.5], requires_grad=True)
y = F.rezero_residual(x, fx, alpha, backend="cpu")
torch.testing.assert_close(y, x + 0.5 * fx)
y.sum().backward()
torch.testing.assert_close(alpha.grad, fx.detach().sum().reshape(1))
h, b = torch.randn(4, 8), torch.randn(8)
torch.testing.assert_close(F.bias_act_dropout(h, b, "gelu", backend="cpu"),
                           torch.nn.functional.gelu(h + b))
print(json.dumps({"file": rzk.__file__, "cpu": rzk.backends()["cpu"],
                  "capability": rzk.cpu_capability()}))
"""


def _run(cmd, cwd, what):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert out.returncode == 0, f"{what} failed:\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
    return out.stdout


def _copy_source(dest):
    """The checkout's files as a clean clone has them (no build products)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.split("\0")):
            src = os.path.join(REPO, rel)
            if os.path.isfile(src):
                os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
                shutil.copy2(src, os.path.join(dest, rel))
    else:
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.so", "__pycache__", "*.egg-info", "bench_results"))


class Workspace:
    def __init__(self, root):
        self.root = root
        self.src = os.path.join(root, "src")
        self.venv = os.path.join(root, "venv")  # one path for every venv: see the docstring
        self.elsewhere = os.path.join(root, "elsewhere")
        os.makedirs(self.elsewhere)
        _copy_source(self.src)

    @property
    def python(self):
        return os.path.join(self.venv, "bin", "python")

    def fresh_venv(self, *packages):
        """A new venv at self.venv with `packages` pip-installed into it; skips without PyPI."""
        shutil.rmtree(self.venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", "--system-site-packages", self.venv], self.root,
             "python -m venv")
        if sys.prefix != sys.base_prefix:
            # run from a venv (./dev.sh oldest), whose torch is its own, not the system's: a
            # venv made from it inherits the system's site-packages, so add the venv's first
            pth = os.path.join(self.venv, "lib", "python%d.%d" % sys.version_info[:2],
                               "site-packages", "inherited.pth")
            with open(pth, "w") as f:
                f.write("\n".join(site.getsitepackages()) + "\n")
        if packages:
            out = subprocess.run([self.python, "-m", "pip", "install", "-q", *packages],
                                 cwd=self.root, capture_output=True, text=True, timeout=TIMEOUT_S)
            if out.returncode != 0:
                pytest.skip(f"cannot install {packages} from the package index: "
                            f"{out.stderr.strip().splitlines()[-1:]}")
        return _run([self.python, "-c", "from importlib.metadata import version as v; "
                     "print(f'pip {v(\"pip\")}, setuptools {v(\"setuptools\")}')"],
                    self.root, "version check").strip()

    def pip_install(self, *args):
        start = time.monotonic()
        _run([self.python, "-m", "pip", "install", "--no-build-isolation", *args], self.src,
             f"pip install --no-build-isolation {' '.join(args)}")
        return time.monotonic() - start

    def check(self, expect_under):
        """Imports the installed package outside the source tree; runs the ops."""
        info = json.loads(_run([self.python, "-c", CHECK], self.elsewhere, "import check")
                          .strip().splitlines()[-1])
        assert info["cpu"], info
        assert os.path.realpath(info["file"]).startswith(os.path.realpath(expect_under)), info
        return info


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler")
    return Workspace(str(tmp_path_factory.mktemp("install")))


def _site_packages(ws):
    return os.path.join(ws.venv, "lib")


def _report(label, versions, seconds, info):
    print(f"{label}: {versions}: {seconds:.0f} s, {info['capability']}, {info['file']}")


# torch itself requires setuptools >= 77.0.3, so a venv where torch was installed has a newest
# setuptools beside the venv's own (older) pip; a venv's own setuptools (65.5 with Python 3.11,
# none from 3.12 on) needs the wheel package, a build requirement --no-build-isolation leaves to
# the caller
VENV_PIP = ["wheel", "setuptools>=77.0.3"]
VENV_OWN = ["wheel"]
NEWEST = ["--upgrade", "pip", "setuptools", "wheel"]


@pytest.mark.parametrize("packages", [VENV_PIP, VENV_OWN, NEWEST],
                         ids=["venv-pip", "venv-pip-and-setuptools", "newest-pip"])
def test_editable_then_regular_install(ws, packages):
    versions = ws.fresh_venv(*packages)
    seconds = ws.pip_install("-e", ".")
    _report("editable", versions, seconds, ws.check(expect_under=ws.src))
    seconds = ws.pip_install(".")
    _report("regular", versions, seconds, ws.check(expect_under=_site_packages(ws)))


def test_wheel_installs_into_a_fresh_venv(ws):
    versions = ws.fresh_venv(*NEWEST, "build")
    dist = os.path.join(ws.root, "dist")
    start = time.monotonic()
    _run([ws.python, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist], ws.src,
         "python -m build --wheel --no-isolation")
    seconds = time.monotonic() - start
    (wheel,) = [os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl")]
    plain = ws.fresh_venv()  # the venv's own pip, nothing added
    _run([ws.python, "-m", "pip", "install", wheel], ws.elsewhere, "pip install <wheel>")
    _report(f"wheel (built with {versions}, installed with)", plain, seconds,
            ws.check(expect_under=_site_packages(ws)))


@pytest.fixture
def want_cuda(monkeypatch):
    """setup.py's _want_cuda, read from setup.py run with setuptools.setup a no-op."""
    import runpy
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("REZERO_NO_EXT", "1")
    monkeypatch.delenv("REZERO_CUDA", raising=False)
    return runpy.run_path(os.path.join(REPO, "setup.py"))["_want_cuda"]


def test_setup_names_a_cuda_home_without_the_cuda_headers(want_cuda, tmp_path, monkeypatch):
    """torch guesses CUDA_HOME from the nvcc on PATH; where that is a wrapper script outside the
    toolkit (/usr/local/bin/nvcc), the guess has no headers: setup.py says so before building."""
    missing = re.escape(f"CUDA_HOME={tmp_path} has no include/cuda_runtime.h")
    with pytest.raises(RuntimeError, match=missing):
        want_cuda(True, str(tmp_path))
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").touch()
    assert want_cuda(True, str(tmp_path))
    assert not want_cuda(False, str(tmp_path)) and not want_cuda(True, None)
    monkeypatch.setenv("REZERO_CUDA", "0")
    assert not want_cuda(True, str(tmp_path / "missing"))
    monkeypatch.setenv("REZERO_CUDA", "1")
    with pytest.raises(RuntimeError, match="REZERO_CUDA=1 but torch has no CUDA"):
        want_cuda(False, str(tmp_path))


def test_setup_pins_no_cpp_standard_older_than_torchs(monkeypatch):
    """setup.py leaves the C++ standard to torch's BuildExtension (torch 2.15's headers need
    C++20, and a pinned -std=c++17 broke its build); any -std flag it passes must be at least
    the installed torch's."""
    import runpy
    import setuptools
    from test_cuda_compile import torch_cpp_standard
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("REZERO_CUDA", "0")
    monkeypatch.delenv("REZERO_NO_EXT", raising=False)
    (ext,) = runpy.run_path(os.path.join(REPO, "setup.py"))["ext_modules"]
    args = ext.extra_compile_args
    flags = [f for group in (args.values() if isinstance(args, dict) else [args]) for f in group]
    need = int(torch_cpp_standard()[len("-std=c++"):])
    pinned = [f for f in flags if f.startswith("-std=")]
    assert all(int(f.rsplit("+", 1)[1]) >= need for f in pinned), (pinned, need)
