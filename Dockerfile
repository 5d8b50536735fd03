# GPU image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine, apex) + this package.
#   docker build -t salm-megatron:0.1 .
#   docker run --gpus all --ipc=host -v /data:/data salm-megatron:0.1 train /data/run.yaml
# On SLURM with pyxis: SALM_CONTAINER_IMAGE=salm-megatron:0.1 sbatch slurm/train_salm.sbatch ...
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/salm-megatron
COPY pyproject.toml README.md ./
COPY salm_megatron ./salm_megatron
COPY recipes ./recipes
COPY slurm ./slurm
COPY tools ./tools

# torch, Transformer Engine and apex come with the base image: pip must not replace them, so the
# package goes in without dependencies and the rest are listed here (from pyproject.toml).
RUN pip install --no-deps -e . \
 && pip install "megatron-core>=0.16,<0.17" "webdataset>=1.0,<2" "braceexpand>=0.1.7" \
      "sentencepiece>=0.2,<0.3" "tensorboard>=2.16,<3" "soundfile>=0.12,<1" "psutil>=5.9" \
      "pyyaml>=6,<7" "scipy>=1.11,<2" "tokenizers>=0.19,<1" "jiwer>=3.0,<5" \
      "sacrebleu>=2.4,<3" "matplotlib>=3.7,<4" "nemo-run==0.11.1" "leptonai<0.47" \
 && useradd --create-home --uid 1000 salm \
 && chown -R salm:salm /opt/salm-megatron

USER 1000:1000
ENV PYTHONPATH=/opt/salm-megatron
ENTRYPOINT ["salm"]
CMD ["--help"]
