# Builds the TensorRT engines on the GPU host: NVIDIA's TensorRT image of the same NGC release as
# the Triton image (NGC_RELEASE in .env), so the engines load in that Triton's TensorRT.
ARG NGC_RELEASE
FROM nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3

COPY pyproject.toml setup.py README.md /opt/rankserve/
COPY src /opt/rankserve/src
# the stage adapters, package data of the wheel (.dockerignore lets only them through)
COPY model_repository /opt/rankserve/model_repository
# the GPU tests run here, on the build's ONNX files (`make gpu-check`): tensorrt is in this image, torch is not needed
COPY tests/gpu /opt/rankserve/tests/gpu
RUN pip install --no-cache-dir "/opt/rankserve[gpu-build]"
# the engines Job builds a release's engines in a staging copy and publishes it whole
COPY --chmod=0755 deploy/docker/publish.sh /usr/local/bin/rankserve-publish

RUN useradd --create-home --uid 10001 rankserve
USER rankserve
# a build job that runs to completion: nothing to probe
HEALTHCHECK NONE
ENTRYPOINT ["rankserve", "build", "--target", "gpu"]
