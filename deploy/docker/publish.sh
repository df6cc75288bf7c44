#!/bin/sh
# rankserve-publish: put a model release on the shared volume, whole or not at all, never over
# another one (POSIX sh + busybox/coreutils: it runs in the models image and the TensorRT image).
#
#   rankserve-publish NAME SOURCE ROOT [-- COMMAND ...]
#
# Copies SOURCE (a bundle: model_repository/ with its manifest.json, artifacts/ ...) into a staging
# folder under ROOT/releases, runs COMMAND there if one is given (the GPU engines Job builds the
# TensorRT engines of a release this way, from relative paths), checks the result, and renames the
# staging folder to ROOT/releases/NAME in one step, so a replica sees a release complete or not at
# all. A release is never overwritten: publishing NAME again with the same manifest does nothing
# (a Job re-run by `kubectl apply` or a GitOps sync is harmless); with another manifest it fails.
# RANKSERVE_WAIT_S (default 0): how long to wait for SOURCE's manifest to appear (the engines Job
# starts from the release the publish Job writes, and may be scheduled first).
# Only a repository whose accuracy gate passed is published: SOURCE/model_repository/gate.sha256,
# written by `rankserve publish --stamp-only` (or `rankserve publish`) after it checked the gate,
# must hold the SHA-256 of manifest.json (`sha256sum -c`); the gate results are in that manifest.
# In a derived release the stamp names source.json, the gated manifest it was made from.
# Exit status: 0 published (or already there), 1 failed, 2 wrong usage.
set -eu

fail() { echo "rankserve-publish: $*" >&2; exit 1; }

[ $# -ge 3 ] || { echo "usage: rankserve-publish NAME SOURCE ROOT [-- COMMAND ...]" >&2; exit 2; }
name=$1 source=$2 root=$3
shift 3
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || { echo "rankserve-publish: expected -- before the command, got $1" >&2; exit 2; }
    shift
fi
case $name in
    "" | [.-]* | *[!a-z0-9.-]*) echo "rankserve-publish: release name '$name': use lowercase letters, digits, '.' and '-', not first" >&2; exit 2 ;;
esac
[ ${#name} -le 40 ] || { echo "rankserve-publish: release name '$name' is longer than 40 characters" >&2; exit 2; }

manifest=model_repository/manifest.json
stamp=model_repository/gate.sha256
releases=$root/releases
dest=$releases/$name

waited=0
wait_s=${RANKSERVE_WAIT_S:-0}
while [ ! -f "$source/$manifest" ]; do
    [ "$waited" -lt "$wait_s" ] || fail "no $source/$manifest (waited ${waited} s): not a published release or bundle"
    [ $((waited % 60)) -eq 0 ] && echo "waiting for $source/$manifest (${waited} of ${wait_s} s)"
    sleep 5
    waited=$((waited + 5))
done

[ -f "$source/$stamp" ] \
    || fail "no $source/$stamp: the accuracy gate of this repository was not checked; run \`rankserve publish --stamp-only --model-repository model_repository\` before building the models image (it refuses a repository whose gate failed)"
(cd "$source/model_repository" && sha256sum -c "${stamp#model_repository/}" >/dev/null 2>&1) \
    || fail "$source/$stamp does not match its manifest: the repository changed after its gate was checked; run \`rankserve publish --stamp-only\` again"

if [ -e "$dest" ]; then
    cmp -s "$source/$manifest" "$dest/$manifest" 2>/dev/null \
        && { echo "release $name is already published at $dest: nothing to do"; exit 0; }
    if [ $# -eq 0 ]; then
        fail "$dest exists and holds another model: releases are never overwritten; publish under a new name"
    fi
    # a derived release (COMMAND given) rewrites its manifest: there, the source's manifest is kept as source.json
    cmp -s "$source/$manifest" "$dest/model_repository/source.json" 2>/dev/null \
        && { echo "release $name (from $source) is already published at $dest: nothing to do"; exit 0; }
    fail "$dest exists and was not made from $source: releases are never overwritten; publish under a new name"
fi

mkdir -p "$releases" 2>/dev/null && [ -w "$releases" ] \
    || fail "cannot write $releases as uid $(id -u) gid $(id -g): the volume's storage class must let this user write (README, \"Storage\")"

stage=$releases/.staging-$name-$(hostname)-$$
trap 'rm -rf "$stage"' EXIT
echo "copying $source to $stage"
mkdir "$stage" && cp -a "$source/." "$stage/" || fail "could not copy $source to $stage"
diff -r "$source" "$stage" >/dev/null || fail "the copy in $stage differs from $source (disk full?)"
if [ $# -gt 0 ]; then
    cp "$source/$manifest" "$stage/model_repository/source.json"
    echo "running in $stage: $*"
    (cd "$stage" && "$@") || fail "the command failed in $stage: release $name not published"
    [ -f "$stage/$manifest" ] || fail "the command removed $stage/$manifest: release $name not published"
    sed -i 's/  manifest\.json$/  source.json/' "$stage/$stamp" || fail "could not rewrite $stage/$stamp"
fi
chmod -R a+rX,go-w "$stage"
mv -T "$stage" "$dest" 2>/dev/null || fail "$dest appeared while publishing (another publisher?): left as it is"
trap - EXIT
echo "published release $name at $dest"
