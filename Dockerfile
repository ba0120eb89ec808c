# kdsearch API and worker image. GPU hosts: run with the NVIDIA container runtime (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 KDSEARCH_ARTIFACTS=/artifacts
WORKDIR /app

# torch first, from the CUDA index on GPU images (TORCH_INDEX=https://download.pytorch.org/whl/cu128) or CPU.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.4,<3"

COPY pyproject.toml README.md ./
COPY service ./service
COPY search_space ./search_space
COPY storage ./storage
COPY distill ./distill
COPY examples ./examples
RUN pip install ".[onnx,s3]"

VOLUME ["/artifacts"]
EXPOSE 8000
ENTRYPOINT ["kdsearch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
