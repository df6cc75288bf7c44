# NVIDIA's Triton image plus what the rankserve Python-backend stages import. The same image serves
# GPU hosts (TensorRT plans through Triton's TensorRT backend) and CPU hosts (the Python stages).
# NGC_RELEASE is pinned in .env (24.10 = Triton 2.51, the version the embedded server runs).
ARG NGC_RELEASE
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3

COPY pyproject.toml setup.py README.md /opt/rankserve/
COPY src /opt/rankserve/src
# the stage adapters, package data of the wheel (.dockerignore lets only them through)
COPY model_repository /opt/rankserve/model_repository
# The `stages` extra of pyproject.toml (ONNX Runtime, OpenVINO, tokenizers, numpy) and what
# `rankserve check-engines` reads the manifest with; the image already has tritonserver.
RUN pip install --no-cache-dir "/opt/rankserve[stages]" "tritonclient[grpc]>=2.51"

RUN useradd --create-home --uid 10001 rankserve
USER rankserve
# The server is live and every Python-backend stub runs (Triton 2.51 keeps a model ready after its stub died).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s CMD ["rankserve", "health", "--url", "http://127.0.0.1:8000", "--model-repository", "/models"]
