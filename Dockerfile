# ssd-megatron on a CUDA PyTorch base image (torch, CUDA, NCCL, triton come with the base).
#   docker build -t ssd-megatron .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/ssd-megatron/runs ssd-megatron \
#       torchrun --standalone --nproc_per_node 8 -m ssd_megatron.cli train configs/gpt_base_ssd.yaml
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace/ssd-megatron
COPY setup.py README.md ./
COPY ssd_megatron ssd_megatron
RUN pip install --no-cache-dir -e ".[dev,faiss,wandb]"
COPY . .
# Optional MegaBlocks backend (builds CUDA extensions; ~3 min): docker build --build-arg MEGABLOCKS=1 .
ARG MEGABLOCKS=0
RUN if [ "$MEGABLOCKS" = "1" ]; then bash tools/build_megablocks.sh; fi
CMD ["ssd-train", "--help"]
