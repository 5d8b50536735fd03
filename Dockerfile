# GPU image: NGC PyTorch (CUDA, Transformer Engine, apex) + this package.
# Grows with the launch issue (non-root user, entry point, recipes).
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/salm-megatron
COPY pyproject.toml README.md ./
COPY salm_megatron ./salm_megatron
# torch and Transformer Engine come with the base image; do not let pip replace them.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "megatron-core>=0.16,<0.17" webdataset sentencepiece tensorboard soundfile psutil pyyaml

ENTRYPOINT ["salm"]
