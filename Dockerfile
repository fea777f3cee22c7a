# Production image: NVIDIA's PyTorch container (CUDA, NCCL, and Apex + Transformer Engine built for it),
# our pinned CPU-tested requirements, the GPU extras (Megatron-Core, flash-attn, SGLang, Ray), the project.
#   docker build -t megatron-guided .
# Needs PyPI during the build, never a model hub: models are mounted at run time (slurm/*.sh: MODEL_PATH).
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
WORKDIR /opt/megatron-guided
COPY requirements.txt requirements-gpu.txt ./
# The base image ships a CUDA torch (and Apex, Transformer Engine): keep it, drop the CPU pin.
RUN grep -v '^torch==' requirements.txt > /tmp/requirements-nontorch.txt \
 && pip install --no-cache-dir -r /tmp/requirements-nontorch.txt \
 && pip install --no-cache-dir --no-build-isolation -r requirements-gpu.txt \
 && python -c "import apex, transformer_engine, megatron.core, sglang, ray"
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
CMD ["python3", "-m", "megatron_guided.train", "config=examples/tiny_cpu.yaml"]
