"""Shared by load tests and integration tests: a real `loraplex serve` subprocess, random PEFT adapters."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_peft_adapter(model, out_dir: Path, seed: int, rank: int = 8, targets=("q_proj", "v_proj", "down_proj"),
                      b_std: float = 0.05, **lora_options) -> Path:
    """Save a LoRA made with peft on `model`, with non-zero B so it really changes the output.

    lora_options go to peft's LoraConfig as they are (rank_pattern, alpha_pattern, use_rslora...).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, **lora_options)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / rank**0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # leave `model` as it was for the next adapter
    return Path(out_dir)


class ServerProcess:
    """`loraplex serve` in a subprocess on a free loopback port, as a user would run it."""

    def __init__(self, workdir: Path, settings: dict | None, env: dict | None = None):
        """settings None: `loraplex serve` with no --config at all (it serves configs/default.yaml)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = None if settings is None else workdir / f"server-{self.port}.yaml"
        if self.config_path is not None:
            self.config_path.write_text(yaml.safe_dump(settings))
        self.log_path = workdir / f"server-{self.port}.log"
        # a private adapter store per server: never the user's, never another test's
        self._env = {**os.environ, "LORAPLEX_DATA_DIR": str(workdir / f"data-{self.port}"), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def launch(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.startup.cli", "serve", "--port", str(self.port),
             *(["--config", str(self.config_path)] if self.config_path is not None else [])],
            cwd=REPO,
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def start(self, timeout: float = 300) -> "ServerProcess":
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def health(self) -> dict:
        return httpx.get(self.base_url + "/health", timeout=5).json()

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
