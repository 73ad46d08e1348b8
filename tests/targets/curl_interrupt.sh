#!/usr/bin/env bash
# A user's script, unmodified by tracer: curl streaming Ollama, cut after 0.3 s (--max-time),
# then asked again. $1: "api" (/api/generate, NDJSON) or "openai" (/v1/chat/completions, SSE);
# $2: the model. OLLAMA_HOST and TARGET_ITERATIONS as for the other targets.
set -u
api=${1:-api}
model=${2:-tracer-llama:test}
host=${OLLAMA_HOST:-http://127.0.0.1:11434}
case "$host" in *://*) ;; *) host="http://$host" ;; esac
if [ "$api" = openai ]; then
  path=/v1/chat/completions
  long="{\"model\":\"$model\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"tell me a long story\"}]}"
  short="{\"model\":\"$model\",\"stream\":true,\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":\"and another\"}]}"
else
  path=/api/generate
  long="{\"model\":\"$model\",\"prompt\":\"tell me a long story\"}"
  short="{\"model\":\"$model\",\"prompt\":\"and another\",\"options\":{\"num_predict\":4}}"
fi
for _ in $(seq "${TARGET_ITERATIONS:-3}"); do
  # exit 28: the time limit, the interrupt we asked for
  curl -sN --max-time 0.3 "$host$path" -d "$long" >/dev/null
  status=$?
  if [ "$status" -ne 28 ] && [ "$status" -ne 0 ]; then echo "target: curl failed ($status)" >&2; exit "$status"; fi
  curl -sSN --fail --max-time "${TARGET_TIMEOUT_S:-60}" "$host$path" -d "$short" >/dev/null || exit $?
done
