"""Build dps_fast (README "Install").

    pip install .                        # build isolation: no torch here, so the wheel
                                         # carries the C++/CUDA sources; the first
                                         # `import dps_fast` compiles them (cached)
    pip install --no-build-isolation .   # torch importable: compiles dps_fast._C now

With torch importable this builds the C++ ops (schemas + fused CPU kernels) as
dps_fast._C, plus the CUDA kernels when torch is a CUDA build and nvcc is found
(CUDA_HOME, default /usr/local/cuda); DPS_FAST_NO_CUDA=1 skips them. Flags and
source lists live in dps_fast/_build.py, shared with the first-import build.
"""
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def load_build_settings():
    """dps_fast/_build.py by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_dps_fast_build", os.path.join(HERE, "dps_fast", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Also installs csrc/ as dps_fast/csrc, the sources of the first-import build."""

    def run(self):
        super().run()
        if not self.dry_run:
            target = os.path.join(self.build_lib, "dps_fast", "csrc")
            self.copy_tree(os.path.join(HERE, "csrc"), target)


def extension_and_cmdclass(build):
    """The dps_fast._C extension when torch is importable here, else none."""
    try:
        import torch
        from torch.utils import cpp_extension as ext
    except ImportError:
        return [], {"build_py": BuildPyWithSources}
    link_flags = list(build.LINK_FLAGS)
    if build.cuda_skip_reason(torch, ext.CUDA_HOME) is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
        module = ext.CUDAExtension(
            "dps_fast._C",
            build.source_files("csrc", cuda=True, python_module=True),
            extra_compile_args={"cxx": build.cxx_flags() + [build.CUDA_DEFINE], "nvcc": list(build.NVCC_FLAGS)},
            extra_link_args=link_flags,
        )
    else:
        module = ext.CppExtension("dps_fast._C", build.source_files("csrc", cuda=False, python_module=True),
                                  extra_compile_args={"cxx": build.cxx_flags()}, extra_link_args=link_flags)
    cmdclass = {"build_py": BuildPyWithSources, "build_ext": ext.BuildExtension.with_options(use_ninja=True)}
    return [module], cmdclass


ext_modules, cmdclass = extension_and_cmdclass(load_build_settings())

setup(
    name="dps_fast",
    version="0.1.0",
    description="Deep Probabilistic Supervision with fused CPU/Triton/CUDA kernels",
    packages=["dps_fast", "dps_fast.banks", "dps_fast.ops", "dps_fast.kernels", "dps_fast.train"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # ninja: the first-import build of the ops (wheels built without torch at hand).
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={"triton": ["triton>=3.0"], "train": ["tqdm", "matplotlib", "scikit-learn"]},
    entry_points={"console_scripts": ["dps-train=dps_fast.train.cli:main"]},
)
