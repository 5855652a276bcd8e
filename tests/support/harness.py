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

REPO = Path(__file__).resolve().parents[2]


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


def wait_healthy(proc: subprocess.Popen, health_url: str, timeout: float, log) -> bool:
    """Poll `health_url` until it answers 200 (True) or `timeout` passes (False); a process that exits first
    raises with the tail of `log()`. Shared by the servers the tests and benchmarks start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds (a server that drains gets its chance to exit cleanly)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
        if wait_healthy(self.proc, self.base_url + "/health", timeout, lambda: self.log()):
            return self
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
        stop_process(self.proc, grace=60)
        self._log.close()
        return self.proc.returncode


def run_together(threads) -> float:
    """Start every thread, wait for all of them; the wall-clock seconds that took."""
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class RunnerDriver:
    """Drives a ModelRunner outside the engine (tests, micro-benchmarks), with block tables from a
    real BlockManager: `prefill` starts requests by key, `decode` feeds each its next token."""

    def __init__(self, runner, prefix_caching: bool = False):
        from server.engine.block_manager import BlockManager

        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, prefix_caching)
        self.owners: dict = {}

    @classmethod
    def build(cls, model, tokenizer, tokens: int = 1024, context_window: int = 128, block_size: int = 16,
              prefix_caching: bool = False, lora_kernels: str = "torch", attention: str = "auto") -> "RunnerDriver":
        from server.engine.model_runner import ModelRunner

        runner = ModelRunner(model, tokenizer, -(-tokens // block_size) + 1, block_size, context_window,
                             lora_kernels=lora_kernels, attention=attention)
        return cls(runner, prefix_caching)

    def prefill(self, requests: dict, chunk: int | None = None):
        """{key: (prompt ids, adapter)} -> last-token logits, one row per key in order; `chunk` splits
        each prompt into forward passes of that many tokens (only the last pass returns logits)."""
        from server.engine.block_manager import BlockOwner

        for key, (prompt, adapter) in requests.items():
            self.release(key)
            owner = BlockOwner(list(prompt), adapter)
            if not self.blocks.allocate(owner):
                raise RuntimeError("the test pool is too small")
            self.owners[key] = owner
        return self._run(list(requests), chunk)

    def decode(self, tokens: dict):
        """{key: its next token} -> logits, one row per key in order."""
        for key, token in tokens.items():
            owner = self.owners[key]
            owner.tokens.append(token)
            if not self.blocks.append_slot(owner):
                raise RuntimeError("the test pool is too small")
        return self._run(list(tokens), None)

    def release(self, key) -> None:
        owner = self.owners.pop(key, None)
        if owner is not None:
            self.blocks.free(owner)

    def _run(self, keys: list, chunk: int | None):
        import torch

        from server.engine.model_runner import StepItem

        finished: dict = {}
        while len(finished) < len(keys):
            items, owners = [], []
            for key in keys:
                owner = self.owners[key]
                count = len(owner.tokens) - owner.num_computed
                if chunk is not None:
                    count = min(count, chunk)
                if count:
                    last = owner.num_computed + count == len(owner.tokens)
                    items.append(StepItem(owner.tokens[owner.num_computed : owner.num_computed + count],
                                          owner.num_computed, owner.block_table, owner.adapter_key, last))
                    owners.append((key, owner, count, last))
            self.runner.clear_blocks(self.blocks.take_fresh())
            logits = iter(self.runner.step(items))
            for key, owner, count, last in owners:
                owner.num_computed += count
                self.blocks.commit(owner)
                if last:
                    finished[key] = next(logits)
        return torch.stack([finished[key] for key in keys])
