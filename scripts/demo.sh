#!/usr/bin/env bash
# Demo: set up, build the tiny random DeepSeek-V3.2 model, serve it with
# round-robin context parallelism over 2 ranks, ask one question, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
TP=${TP:-2}
mkdir -p .tiny
.venv/bin/python eval/make_tiny_model.py .tiny/demo-v32 >/dev/null
.venv/bin/python - "$TP" <<'PY'
import sys
sys.path.insert(0, "eval")
from server import start_server

tp = int(sys.argv[1])
with start_server(".tiny/demo-v32", tp=tp, dtype="float32", cp_nsa={"mode": "round-robin-split"},
                  log_path=".tiny/demo-server.log") as server:
    print(f"vLLM server with vllm_cp_nsa (-tp {tp}, round-robin-split) starting on {server.base_url} ...")
    print(f"ready in {server.wait_ready():.0f}s")
    for line in server.log_tail(200_000).splitlines():
        if "vllm_cp_nsa:" in line:
            print(line.split("] ", 1)[-1])
            break
    prompt = "Once upon a time, in a land far away, " * 12
    status, body = server.post("/v1/completions", {"model": ".tiny/demo-v32", "prompt": prompt,
                                                  "max_tokens": 24, "temperature": 0.0})
    assert status == 200, body
    print(f"prompt: {body['usage']['prompt_tokens']} tokens (index_topk of the tiny model: 64)")
    print("answer (random weights, so gibberish):", repr(body["choices"][0]["text"]))
print("server stopped")
PY
