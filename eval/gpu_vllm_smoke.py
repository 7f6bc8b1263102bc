"""The plugin inside real vLLM 0.32 on one GPU (staged stack): tiny V3.2, eager, TP=1.

Prints RESULT lines: which model class and kernel provider ran, greedy tokens, and the
prompt-logprob deviation from HF transformers' deepseek_v32 (fp32 oracle, same GPU).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
from make_tiny_model import build_tiny_model  # noqa: E402


def main() -> None:
    model_dir = build_tiny_model("/tmp/tiny_v32", seed=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tok(t).input_ids for t in ("Hello, my name is", "The quick brown fox jumps over the lazy dog. " * 12,
                                          "Once upon a time " * 60)]
    from vllm import LLM, SamplingParams, TokensPrompt

    results = {}
    for dtype in sys.argv[1:] or ["bfloat16"]:
        t0 = time.time()
        llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=2048, enforce_eager=os.environ.get("EAGER", "1") == "1",
                  gpu_memory_utilization=0.3, seed=0)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        model = runner.model
        info = {"model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "kernels": getattr(model.model.runtime.ops, "name", "?"), "init_s": round(time.time() - t0, 1)}
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, ignore_eos=True))
        info["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        info["prompt_lens"] = [len(p) for p in prompts]
        results[dtype] = {"info": info, "lp": [[None if e is None else e[t].logprob
                                                for e, t in zip(o.prompt_logprobs, o.prompt_token_ids)]
                                               for o in outs]}
        print("RESULT", dtype, json.dumps(info), flush=True)
        del llm
    from hf_oracle import greedy_generate, load_hf_model, prompt_logprobs

    hf = load_hf_model(model_dir)
    for dtype, r in results.items():
        worst = 0.0
        for p, lp in zip(prompts, r["lp"]):
            ref = prompt_logprobs(hf, p)
            worst = max([worst] + [abs(a - b) for a, b in zip(lp[1:], ref[1:])])
        same = [t == greedy_generate(hf, p, 8) for p, t in zip(prompts, r["info"]["tokens"])]
        print(f"RESULT {dtype}: max |prompt logprob - HF fp32 (CPU)| {worst:.4f}; greedy equal to HF: {same}",
              flush=True)


if __name__ == "__main__":
    main()
