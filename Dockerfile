# hvdllm image for clusters: Horovod 0.28.1 (patched build) with PyTorch 2.13 (CPU) and TF 2.21,
# Open MPI and sshd for multi-node `horovodrun`/`mpirun` (Kubernetes MPIJob launchers ssh into workers).
# It runs the same launch/install.sh as README and CI, so the three cannot drift.
# GPU images: start FROM an nvidia/cuda base with python3.11, and build with
#   --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" \
#   --build-arg HOROVOD_GPU_OPERATIONS=NCCL   (needs NCCL headers in the image)
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC=torch==2.13.0
ARG HOROVOD_GPU_OPERATIONS=
ENV HVDLLM_VENV=/opt/hvdllm/venv \
    HVDLLM_TORCH_SPEC=${TORCH_SPEC} \
    HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS} \
    PATH=/opt/hvdllm/venv/bin:$PATH \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        openssh-server openssh-client libopenmpi-dev openmpi-bin cmake g++ make git \
    && mkdir -p /var/run/sshd /root/.ssh \
    && sed -i 's/#\?StrictHostKeyChecking.*/StrictHostKeyChecking no/' /etc/ssh/ssh_config \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/hvdllm/src
COPY . .
RUN bash launch/install.sh && rm -rf /root/.cache/pip

# Workers run sshd (MPIJob launchers connect to it); the launcher overrides the command.
EXPOSE 22
CMD ["/usr/sbin/sshd", "-D"]
