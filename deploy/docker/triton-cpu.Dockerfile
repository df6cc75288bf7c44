# NVIDIA's Triton image plus what the rankserve Python-backend stages import.
# TRITON_IMAGE is pinned in docker-compose.yml (24.10 = Triton 2.51, the version the embedded server runs).
ARG TRITON_IMAGE
FROM ${TRITON_IMAGE}

COPY pyproject.toml README.md /opt/rankserve/
COPY src /opt/rankserve/src
# The stages need onnxruntime, tokenizers and numpy; the image already has tritonserver itself.
RUN pip install --no-cache-dir "onnxruntime>=1.18" "tokenizers>=0.19" "numpy>=1.24,<2" \
 && pip install --no-cache-dir --no-deps /opt/rankserve

RUN useradd --create-home --uid 1000 rankserve
USER rankserve
