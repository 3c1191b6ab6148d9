"""A peer's driver process (pgqueuer_runner.py, graphile.mjs), spoken to in lines: requests on
its stdin, answers on its stdout, its warnings on our stderr. Closing its stdin stops it."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


class Driver:
    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.popen = subprocess.Popen(
            command, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def expect(self, word: str, timeout: float = 60) -> list[str]:
        """The fields after `word` of the next line, which must start with it."""
        line = self._line(timeout)
        fields = line.split()
        if not fields or fields[0] != word:
            raise RuntimeError(f"{self.popen.args!r} said {line!r}, expected {word!r}")
        return fields[1:]

    def ask(self, request: str, timeout: float = 60) -> list[str]:
        self.send(request)
        return self.expect(request, timeout)

    def _line(self, timeout: float) -> str:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"{self.popen.args!r} said nothing for {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.popen.args!r} exited ({self.popen.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        """End of stdin: the driver stops its worker cleanly; killed if it has not within 30 s."""
        if self.popen.stdin and not self.popen.stdin.closed:
            with suppress(BrokenPipeError):  # a driver that already exited
                self.popen.stdin.close()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdout:
            self.popen.stdout.close()


@contextmanager
def running(command: list[str], env: dict[str, str], cwd: Path) -> Iterator[Driver]:
    driver = Driver(command, env, cwd)
    try:
        yield driver
    finally:
        driver.stop()


def run_once(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> None:
    """A driver command that does one thing and exits (install, fill)."""
    done = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {(done.stderr or done.stdout)[-2000:]}")
