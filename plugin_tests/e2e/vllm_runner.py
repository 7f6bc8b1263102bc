"""Run one vLLM ``LLM`` configuration in this (fresh) process and print JSON results.

Tests start it as a subprocess, one per engine configuration, so vLLM's process-wide
state (distributed groups, HF config registry) never leaks between cases.
Spec (JSON on argv[1], or on stdin when argv[1] is ``-``: a 64K-token prompt is longer
than the OS allows an argument to be): {"llm": {...LLM kwargs...}, "prompts": [[ids...], ...],
"sampling": {...SamplingParams kwargs...}}. Output: the last stdout line,
``RESULT {"outputs": [{"token_ids": [...], "prompt_logprobs": [...]}], ...}``.
"""

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.stdin.read() if sys.argv[1] == "-" else sys.argv[1])
    from vllm import LLM, SamplingParams, TokensPrompt

    started = time.time()
    llm_kwargs = dict(spec["llm"])
    if "speculative_config" in llm_kwargs:
        llm_kwargs.setdefault("disable_log_stats", False)  # for the acceptance counters
    llm = LLM(**llm_kwargs)
    init_s = time.time() - started
    params = SamplingParams(**spec.get("sampling", {"temperature": 0.0, "max_tokens": 8}))
    started = time.time()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params)
    generate_s = time.time() - started
    result = []
    for out in outputs:
        prompt_lp = None
        if out.prompt_logprobs is not None:
            prompt_lp = [
                None if entry is None else entry[tok].logprob
                for entry, tok in zip(out.prompt_logprobs, out.prompt_token_ids)
            ]
        result.append({"token_ids": list(out.outputs[0].token_ids), "prompt_logprobs": prompt_lp})
    engine = llm.llm_engine
    info = {
        "architecture": engine.model_config.architecture,
        "kv_cache_dtype": engine.vllm_config.cache_config.cache_dtype,
        "enable_chunked_prefill": engine.vllm_config.scheduler_config.enable_chunked_prefill,
    }
    try:  # in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), TP=1
        runner = engine.model_executor.driver_worker.worker.model_runner
    except AttributeError:
        runner = None
    if runner is not None:
        info["model_class"] = f"{type(runner.model).__module__}.{type(runner.model).__qualname__}"
        per_token = {}
        for group in runner.kv_cache_config.kv_cache_groups:
            specs = getattr(group.kv_cache_spec, "kv_cache_specs", None) or {
                name: group.kv_cache_spec for name in group.layer_names}
            per_token.update({name: spec.page_size_bytes / spec.block_size for name, spec in specs.items()})
        info["kv_bytes_per_token"] = per_token
    if "speculative_config" in llm_kwargs:
        info["spec_decode"] = {m.name.removeprefix("vllm:spec_decode_num_"): getattr(m, "value", None) or 0
                               for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_num")
                               and hasattr(m, "value")}
    print("RESULT " + json.dumps({"outputs": result, "init_s": init_s, "generate_s": generate_s, "info": info}),
          flush=True)
    os._exit(0)  # skip vLLM's slow interpreter-shutdown hooks


if __name__ == "__main__":
    main()
