# Production image: CUDA + PyTorch, then our pinned CPU-tested requirements, then the GPU extras
# (Megatron-Core, Transformer Engine, flash-attn, SGLang, Ray).
#   docker build -t megatron-guided .
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/megatron-guided
COPY requirements.txt requirements-gpu.txt ./
# The base image ships a CUDA torch; keep it (drop the CPU pin) and install the rest.
RUN grep -v '^torch==' requirements.txt > /tmp/requirements-nontorch.txt \
 && pip install --no-cache-dir -r /tmp/requirements-nontorch.txt \
 && pip install --no-cache-dir --no-build-isolation -r requirements-gpu.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
CMD ["python3", "-m", "megatron_guided.train", "config=examples/tiny_cpu.yaml"]
