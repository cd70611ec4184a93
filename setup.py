"""Builds the kernel extensions with CMake.

`pyserve._C` (CPU kernels) always builds. `pyserve._C_cuda` builds when nvcc is found;
PYSERVE_CUDA=0 skips it and PYSERVE_CUDA=1 makes a missing CUDA compiler an error.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def build_cuda() -> bool:
    mode = os.environ.get("PYSERVE_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False
    found = shutil.which("nvcc") is not None or Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin/nvcc").exists()
    if mode in ("1", "on", "true", "yes") and not found:
        sys.exit("PYSERVE_CUDA=1 but no nvcc was found (set CUDA_HOME or PATH)")
    return found


class CMakeBuild(build_ext):
    """One CMake build produces every extension; later extensions find their file already built."""

    def build_extension(self, ext: CMakeExtension) -> None:
        if getattr(self, "_cmake_done", False):
            return
        self._cmake_done = True
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPYSERVE_CUDA={'ON' if build_cuda() else 'OFF'}",
        ]
        if os.environ.get("PYSERVE_CUDA_ARCHS"):  # e.g. "90-real" for a quicker build on an H100/H200
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['PYSERVE_CUDA_ARCHS']}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


extensions = [CMakeExtension("pyserve._C")]
if build_cuda():
    extensions.append(CMakeExtension("pyserve._C_cuda"))
# The first-party plugins live in plugins/ but install as `pyserve_plugins`: a top-level package
# called `plugins` would collide with anybody else's.
packages = find_packages(include=["pyserve", "pyserve.*"])
packages += ["pyserve_plugins" + name.removeprefix("plugins") for name in find_packages(include=["plugins", "plugins.*"])]
setup(packages=packages, package_dir={"pyserve_plugins": "plugins"}, ext_modules=extensions,
      package_data={"pyserve.demo": ["models/**/*"]}, cmdclass={"build_ext": CMakeBuild})
