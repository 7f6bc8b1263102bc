"""GSM8K through lm-eval against vLLM with the cp_nsa plugin: ``python -m eval.gsm8k --help``."""
