"""Keeps a private redis-server alive exactly as long as its owner.

Run as ``python -m celery_ordered._keeper BINARY DIRECTORY KEEP [ARG ...]`` by
:class:`celery_ordered.embedded.RedisServer`, with a pipe as standard input.
It starts ``redis-server`` (which cannot watch its owner itself), says
``ready`` on standard output once Redis accepts connections, then waits for
standard input to close. That happens when the owner stops the server, and
also when the owner dies, however it dies (SIGKILL included): the kernel
closes the pipe. The keeper then stops Redis and removes DIRECTORY, unless
KEEP is ``1`` (a directory the owner chose, to restart Redis on its data).
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import subprocess
import sys
import threading

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux only: SIGKILL this process when the keeper (its parent) dies.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Stop(Exception):
    pass


_waiting = False


def _stop(signum: int, frame: object) -> None:
    # SIGTERM ends the wait for EOF; once that wait is over it changes nothing.
    if _waiting:
        raise _Stop


def main(argv: list[str]) -> int:
    """Run the keeper; returns the exit status."""
    binary, directory, keep, *args = argv

    def clean_up() -> None:
        if keep != "1":
            shutil.rmtree(directory, ignore_errors=True)

    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    try:
        server = subprocess.Popen(
            [binary, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=directory,
            preexec_fn=preexec,
        )
    except OSError as exc:
        print(f"failed: cannot run {binary}: {exc}", flush=True)
        clean_up()
        return 1
    assert server.stdout is not None
    log: list[bytes] = []
    for line in server.stdout:
        log.append(line)
        if b"ready to accept connections" in line.lower():
            break
    else:
        server.wait()
        text = b"".join(log[-20:]).decode("utf-8", "replace").replace("\n", " | ")
        print(f"failed: redis-server exited with {server.returncode}: {text}", flush=True)
        clean_up()
        return 1
    # Keep reading Redis's log so that it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # type: ignore[union-attr]
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    global _waiting
    _waiting = True
    print("ready", flush=True)
    try:
        sys.stdin.buffer.read()  # returns at EOF: the owner is gone or done
        _waiting = False
    except (_Stop, OSError):
        pass
    _waiting = False
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    clean_up()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
