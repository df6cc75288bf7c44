# The built model repository as an image, for clusters: the publish Job publishes /bundle as a
# release on the shared volume (rankserve-publish: deploy/docker/publish.sh). Build after `make build`,
# tagged with the release name: `docker build -f deploy/docker/models.Dockerfile -t <registry>/rankserve/models:0.1.0 .`
# and after `rankserve publish --stamp-only --model-repository model_repository`: the publish Job
# refuses a repository without the stamp it writes once the accuracy gate passed.
# It carries the ONNX variants and held-out data too: the GPU engines Job builds from them.
FROM busybox:1.37

COPY model_repository /bundle/model_repository
COPY artifacts/variants /bundle/artifacts/variants
COPY artifacts/data /bundle/artifacts/data
COPY --chmod=0755 deploy/docker/publish.sh /usr/local/bin/rankserve-publish

RUN adduser -D -u 10001 rankserve
USER rankserve
# data only: the publish Job copies it and exits
HEALTHCHECK NONE
