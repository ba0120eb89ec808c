# kdsearch API and worker image (runs as the unprivileged user kdsearch). GPU hosts: run with the NVIDIA container
# runtime (docker-compose.yml's gpu profile builds it with TORCH_INDEX set to a CUDA index).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 KDSEARCH_ARTIFACTS=/artifacts
WORKDIR /app

# torch first, from the CUDA index on GPU images (TORCH_INDEX=https://download.pytorch.org/whl/cu128) or CPU.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.4,<3"

COPY pyproject.toml README.md ./
COPY kdsearch ./kdsearch
COPY service ./service
COPY search_space ./search_space
COPY storage ./storage
COPY distill ./distill
COPY examples ./examples
RUN pip install ".[onnx,s3]"

# An unprivileged user owns the artifacts folder (a new named volume takes this ownership) and nothing else.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /app kdsearch \
    && mkdir -p /artifacts /shared && chown kdsearch:kdsearch /artifacts
USER 10001:10001

VOLUME ["/artifacts"]
EXPOSE 8000
ENTRYPOINT ["kdsearch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
