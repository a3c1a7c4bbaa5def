"""`launch(config)`: the orchestrator (and, through it, its workers) in a child process."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import TandemConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerHandle:
    address: str
    process: subprocess.Popen
    metrics_address: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain), then SIGKILL after `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(config: TandemConfig, port: int = 0, timeout: float = 300.0, log_file=None) -> ServerHandle:
    """Start `python -m orchestrator` with `config` on `port` (0: any free port); return once it is ready."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--config-json", config.model_dump_json(),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=log_file, env=env, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("TANDEM_ORCHESTRATOR_READY"):
                parts = line.split()
                return ServerHandle(parts[1], proc, parts[2] if len(parts) > 2 else "")
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the orchestrator did not become ready (exit code {proc.returncode})")
