# syntax=docker/dockerfile:1
# megatron-ace training image: Megatron-Core trainer (SFT + GRPO) with Transformer Engine, apex and
# flash-attn from the NGC PyTorch base, a vLLM rollout engine in its own venv, and the nemo-run
# launcher in a third, light venv. Build from the repository root:
#   docker build -t megatron-ace:dev .
# On Slurm with pyxis, import it once (enroot import dockerd://megatron-ace:dev) and pass the
# .sqsh file to `python -m launch.submit ... --container-image`.
# With plain docker, give the container the host's /dev/shm (as NVIDIA asks for NCCL anyway):
#   docker run --gpus all --ipc=host megatron-ace:dev ...    (or --shm-size=32g)
# The shared-memory weight sync (rollout.weight_sync_transport=shared_memory, the default on
# CPU) passes buckets of rollout.bucket_mb (256 MiB, two in flight) through tmpfs files, and
# docker's default 64 MiB /dev/shm fails that with ENOSPC. Under pyxis/enroot the container
# sees the node's /dev/shm.
#
# Base image: NGC PyTorch 26.07 ships torch 2.13.0a0 (an NVIDIA build of the 2.13 branch), CUDA 13,
# Python 3.12, and Transformer Engine, apex and flash-attn compiled against that torch. 2.13 is the
# torch series the project pins (setup.py: torch==2.13.0), so the CPU test environment and the
# GPU image run the same torch API; 26.07 is the first monthly release on the 2.13 branch
# (26.04/26.05 carry 2.12). Moving to a newer tag means moving the torch pin in setup.py too.
FROM nvcr.io/nvidia/pytorch:26.07-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Versions; tests/test_launch_docker.py checks they agree with setup.py and the requirements.
ARG MEGATRON_CORE_VERSION=0.19.2
ARG VLLM_VERSION=0.32.0
ARG NEMO_RUN_VERSION=0.11.1
# nemo-run 0.11.1 imports leptonai at start-up; leptonai 0.47.x breaks that import.
ARG LEPTONAI_VERSION=0.27.3
ARG FLASH_ATTN_VERSION=2.8.3.post2

# CUDA_DEVICE_MAX_CONNECTIONS=1: Megatron's TP communication overlap needs in-order kernel issue
# (one hardware queue). ACE_VLLM_PYTHON: the interpreter the rollout engine starts vLLM with (see
# the vLLM venv below).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    ACE_VLLM_PYTHON=/opt/vllm/bin/python \
    ACE_LAUNCH_PYTHON=/opt/launch/bin/python

# 1) The fused kernels come from the base image, built against its torch. Fail the build here,
#    not at the first training step, if a future tag drops one. flash-attn is the one NGC has
#    shipped inconsistently: build it against the image's torch only when it is missing.
RUN python -c "import torch; assert torch.__version__.startswith('2.13'), torch.__version__" \
 && python -c "import transformer_engine.pytorch, apex" \
 && { python -c "import flash_attn" 2>/dev/null \
      || MAX_JOBS=8 pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; } \
 && python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"

WORKDIR /opt/megatron-ace

# 2) Trainer dependencies go into the image's own Python UNDER the NGC pip constraint file
#    (/etc/pip/constraint.txt, active through PIP_CONSTRAINT in the base image): it pins torch and
#    everything TE/apex/flash-attn were built with, so a dependency that wants a different torch
#    fails the build loudly instead of silently replacing the CUDA stack. torch itself is taken
#    from the image (the torch==2.13.0 line of requirements/core.txt is for the CPU environment,
#    the image's 2.13.0a0 build stands in for it), and so are the test-only packages.
COPY requirements/core.txt requirements/core.txt
RUN grep -vE '^(torch|pytest|pytest-timeout)([=<>! ]|$)' requirements/core.txt > /tmp/trainer-req.txt \
 && pip install -r /tmp/trainer-req.txt \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
        "transformers>=5.16.1,<5.20" \
 && python -c "import megatron.core, transformers, math_verify"

# 3) vLLM in its OWN venv, not against the image's torch. A vLLM release wheel is compiled for
#    one exact upstream torch release (vllm 0.32.0 requires torch==2.13.0 and its CUDA wheels);
#    the image's 2.13.0a0 is a different build, so installing vLLM here would either replace the
#    image's torch (breaking TE/apex/flash-attn, and refused by the constraint file) or need a
#    source build of vLLM against it (an hour per image, and every vLLM upgrade waits for a
#    matching NGC tag). The rollout engine is a separate process anyway: it runs under
#    $ACE_VLLM_PYTHON and receives weights through CUDA IPC handles / NCCL, which work across
#    the two torch builds because both talk to the same driver. The constraint file is switched
#    off for this venv only.
RUN python -m venv /opt/vllm \
 && PIP_CONSTRAINT="" /opt/vllm/bin/pip install "vllm==${VLLM_VERSION}" \
 && /opt/vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"

# 4) The launcher's light venv (nemo-run, no torch), as on a login node: jobs can be submitted
#    from inside the container too.
RUN python -m venv /opt/launch \
 && PIP_CONSTRAINT="" /opt/launch/bin/pip install \
        "nemo-run==${NEMO_RUN_VERSION}" "leptonai==${LEPTONAI_VERSION}" \
 && /opt/launch/bin/python -c "import nemo_run"

# 5) The package itself, last so that code edits rebuild only this layer. Only the sources are
#    copied (never local venvs or run outputs). --no-deps: every dependency is installed above,
#    each into the environment that needs it. The vLLM venv gets the package too because vLLM
#    imports megatron-ace's worker extension (weight reload) inside its worker processes.
COPY setup.py ./
COPY megatron_ace ./megatron_ace
COPY launch ./launch
COPY tools ./tools
RUN pip install --no-deps . \
 && PIP_CONSTRAINT="" /opt/vllm/bin/pip install --no-deps . \
 && PIP_CONSTRAINT="" /opt/launch/bin/pip install --no-deps . \
 && python -c "import megatron_ace.cli"

CMD ["bash"]
