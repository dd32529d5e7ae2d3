# hvdllm image for clusters: Horovod 0.28.1 (patched build) with PyTorch 2.13 and TF 2.21, Open MPI,
# and an sshd for multi-node `horovodrun`/`mpirun` launches (Kubernetes MPIJob launchers ssh into workers).
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t hvdllm .
# Two stages: the builder runs the same launch/install.sh as README and CI (so they cannot drift) for the
# dependencies only; the runtime stage gets the venv, Open MPI's runtime, sshd and then the sources, so a
# source edit rebuilds only the last layers. A Horovod wheel cached by install.sh can be passed in the
# build context as .hvdllm-cache/horovod-0.28.1-<key>/ (and wheels for pip under .hvdllm-cache/wheels/
# with --build-arg PIP_ARGS="--no-index --find-links /root/.cache/hvdllm/wheels"); nothing else needed.
# GPU images: a CUDA base image with python3.11 and NCCL (e.g. nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04
# plus python3.11), and
#   --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" \
#   --build-arg HOROVOD_GPU_OPERATIONS=NCCL
# (TORCH_SPEC and PIP_ARGS are split on blanks by install.sh: a requirement, then pip options.)
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG PIP_ARGS=
ARG HOROVOD_GPU_OPERATIONS=
ENV HVDLLM_VENV=/opt/hvdllm/venv \
    HVDLLM_TORCH_SPEC=${TORCH_SPEC} \
    HVDLLM_PIP_ARGS=${PIP_ARGS} \
    HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS} \
    PIP_NO_CACHE_DIR=1
WORKDIR /opt/hvdllm/src
# Only what the dependency install reads: a source edit does not rebuild Horovod.
COPY launch/install.sh launch/apt.sh launch/requirements.txt launch/
COPY launch/requirements.txt .hvdllm-cach[e] /root/.cache/hvdllm/
RUN bash launch/install.sh --deps-only && rm -rf /root/.cache/hvdllm /var/lib/apt/lists/*

FROM ${BASE_IMAGE}
ARG HOROVOD_GPU_OPERATIONS=
ENV PATH=/opt/hvdllm/venv/bin:$PATH \
    HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS} \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Open MPI's runtime and ssh; the ssh client never asks about host keys (the line Debian ships is only a
# comment, so the setting goes into ssh_config.d, which ssh_config includes first) and talks to port 2222.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openmpi-bin openssh-server openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && printf '%s\n' 'Host *' '    StrictHostKeyChecking no' '    UserKnownHostsFile /dev/null' \
        '    Port 2222' '    LogLevel ERROR' > /etc/ssh/ssh_config.d/hvdllm.conf \
    && printf '%s\n' 'Port 2222' 'PasswordAuthentication no' 'KbdInteractiveAuthentication no' 'UsePAM no' \
        'StrictModes no' 'PermitRootLogin prohibit-password' 'AuthorizedKeysFile .ssh/authorized_keys' \
        'PrintMotd no' 'LogLevel ERROR' > /etc/ssh/hvdllm_sshd_config \
    && useradd --create-home --uid 1000 --shell /bin/bash hvdllm \
    && mkdir -p /runs && chown hvdllm:hvdllm /runs
COPY --from=builder /opt/hvdllm/venv /opt/hvdllm/venv
COPY launch/hvdllm-sshd /usr/local/bin/hvdllm-sshd
COPY --chown=hvdllm:hvdllm . /opt/hvdllm/src
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/hvdllm/src
USER 1000:1000
WORKDIR /home/hvdllm
# Workers serve ssh launches with the keys mounted at ~/.ssh (authorized_keys); launchers override the command.
EXPOSE 2222
CMD ["hvdllm-sshd"]
