"""setup.py helper: the CUDA extension vllm_pedro._C, when this machine can build it.

    sys.path.insert(0, "csrc"); from build import cuda_extensions
    exts = cuda_extensions()
    setup(..., ext_modules=exts,
          cmdclass={"build_ext": BuildExtension} if exts else {})  # torch.utils.cpp_extension

Without a CUDA torch or nvcc it returns [] and the package installs without the op
(vllm_pedro.ops then uses Triton, or JIT-builds csrc/ at first use, or torch).
"""

from __future__ import annotations

import os
import shutil

SOURCES = ["csrc/pedro_kernels.cu", "csrc/torch_bindings.cpp"]  # relative to setup.py


def cuda_extensions() -> list:
    if os.environ.get("VLLM_PEDRO_SKIP_CUDA_BUILD", "0") == "1":
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return []
    if torch.version.cuda is None:
        return []
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if not (nvcc and os.path.exists(nvcc)) and shutil.which("nvcc") is None:
        return []
    return [CUDAExtension(
        name="vllm_pedro._C",
        sources=SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )]
