# NVIDIA's Triton image plus what the rankserve Python-backend stages import.
# TRITON_IMAGE is pinned in docker-compose.yml (24.10 = Triton 2.51, the version the embedded server runs).
ARG TRITON_IMAGE
FROM ${TRITON_IMAGE}

COPY pyproject.toml README.md /opt/rankserve/
COPY src /opt/rankserve/src
# The `stages` extra of pyproject.toml (ONNX Runtime, OpenVINO, tokenizers, numpy): the image already
# has tritonserver and its Python backend.
RUN pip install --no-cache-dir "/opt/rankserve[stages]"

RUN useradd --create-home --uid 1000 rankserve
USER rankserve
