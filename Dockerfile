# GPU image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine, apex) + this package.
#   docker build -t salm-megatron:0.1 .
#   docker run --gpus all --ipc=host -v /data:/data salm-megatron:0.1 train /data/run.yaml
# On SLURM with pyxis: SALM_CONTAINER_IMAGE=salm-megatron:0.1 sbatch slurm/train_salm.sbatch ...
FROM nvcr.io/nvidia/pytorch:25.09-py3

# CUDA_DEVICE_MAX_CONNECTIONS=1: kernels launch in issue order (Megatron's TP/SP overlap).
ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/salm-megatron
COPY pyproject.toml README.md ./
COPY salm_megatron ./salm_megatron
COPY recipes ./recipes
COPY slurm ./slurm
COPY tools ./tools

# torch, Transformer Engine and apex come with the base image: pip must not replace them, so the
# package goes in without dependencies, then its dependencies and the launch extra as
# pyproject.toml declares them.
RUN pip install --no-deps -e . \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['launch']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && useradd --create-home --uid 1000 salm \
 && chown -R salm:salm /opt/salm-megatron

USER 1000:1000
ENV PYTHONPATH=/opt/salm-megatron
ENTRYPOINT ["salm"]
CMD ["--help"]
