# GPU dev container: PyTorch's official CUDA *devel* image (nvcc inside), mltoolkit built for Ampere and Hopper.
#   make docker                                   # docker build -t mltoolkit:dev .
#   docker run --rm --gpus all mltoolkit:dev      # runs the tests (CUDA tests included)
#   docker run --rm --gpus all mltoolkit:dev make bench-quick
#   docker run --rm -it --gpus all -v "$PWD":/workspace/mltoolkit mltoolkit:dev bash   # develop on your checkout
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda13.0-cudnn9-devel
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MAX_JOBS=8 \
    PYTHONUNBUFFERED=1

RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m pip install --no-cache-dir pybind11 ninja pytest pytest-xdist matplotlib safetensors scikit-learn \
    tqdm rich tensorboard mlflow-skinny wandb tokenizers sentencepiece protobuf transformers keras h5py \
    && python3 -m pip install --no-cache-dir --no-deps timm

WORKDIR /workspace/mltoolkit
COPY . .
# The image's torch is importable, so the Makefile makes a venv with system site packages and installs
# mltoolkit with --no-build-isolation --no-deps: nothing else is downloaded.
RUN make install

CMD ["make", "test"]
