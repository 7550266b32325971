"""Build dps_fast and its extension dps_fast._C.

    pip install --no-build-isolation .

Always builds the C++ ops (schemas + fused CPU kernels). Adds the CUDA kernels
when torch is a CUDA build (torch.version.cuda) and nvcc is found
(CUDA_HOME, default /usr/local/cuda). DPS_FAST_NO_CUDA=1 skips them.
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension as ext
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


cxx_flags = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-DNDEBUG"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # The at::vec AVX2 path: not -march=native (the wheel must run on other CPUs), not -ffast-math (it breaks the NaN policy).
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
link_flags = ["-fopenmp", "-g0"]

sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
use_cuda = (
    torch.version.cuda is not None
    and os.environ.get("DPS_FAST_NO_CUDA", "0") != "1"
    and ext.CUDA_HOME is not None
)
if use_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0;10.0+PTX")
    sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    module = ext.CUDAExtension(
        "dps_fast._C",
        sources,
        extra_compile_args={
            "cxx": cxx_flags + ["-DDPS_FAST_WITH_CUDA"],
            "nvcc": ["-O3", "-g0", "-std=c++17", "--use_fast_math", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )
else:
    module = ext.CppExtension("dps_fast._C", sources, extra_compile_args={"cxx": cxx_flags},
                              extra_link_args=link_flags)

setup(
    name="dps_fast",
    version="0.1.0",
    description="Deep Probabilistic Supervision with fused CPU/Triton/CUDA kernels",
    packages=["dps_fast", "dps_fast.banks", "dps_fast.ops", "dps_fast.kernels", "dps_fast.train"],
    package_dir={"dps_fast.kernels": "kernels"},
    ext_modules=[module],
    cmdclass={"build_ext": ext.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "train": ["tqdm", "matplotlib", "scikit-learn"]},
    entry_points={"console_scripts": ["dps-train=dps_fast.train.cli:main"]},
)
