"""vLLM's OpenAI server with the plugin on CPU: completions and chat completions."""

import pytest

from server import start_server

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("tp,dtype,mode", [(1, "float32", "off"), (2, "bfloat16", "round-robin-split")])
def test_server_answers_completions_and_chat(tiny_model, tmp_path, tp, dtype, mode):
    with start_server(tiny_model, tp=tp, dtype=dtype, cp_nsa={"mode": mode},
                      log_path=tmp_path / "server.log") as server:
        ready_s = server.wait_ready()
        status, body = server.post("/v1/completions", {
            "model": str(tiny_model), "prompt": "The quick brown fox " * 30, "max_tokens": 16,
            "temperature": 0.0,
        })
        assert status == 200, body
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 16
        assert body["usage"]["prompt_tokens"] > 64  # longer than index_topk: sparse path
        status, chat = server.post("/v1/chat/completions", {
            "model": str(tiny_model), "max_tokens": 8, "temperature": 0.0,
            "messages": [{"role": "user", "content": "Say something."}],
        })
        assert status == 200, chat
        assert chat["choices"][0]["message"]["content"]
        log = server.log_tail(200_000)
    assert f"vllm_cp_nsa: mode={mode}" in log
    print(f"tp={tp} dtype={dtype}: server ready in {ready_s:.1f}s")
