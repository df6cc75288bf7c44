#!/usr/bin/env bash
# Rank candidates with plain curl over the KServe v2 HTTP/JSON protocol.
#   RANKSERVE_URL=http://127.0.0.1:8000 clients/curl/rank.sh [request.json]
set -euo pipefail
url="${RANKSERVE_URL:-http://127.0.0.1:8000}"
body="${1:-$(dirname "$0")/request.json}"
curl --silent --show-error --fail-with-body \
  -X POST "$url/v2/models/ranker/infer" \
  -H 'Content-Type: application/json' \
  --data-binary "@$body"
echo
