"""Command-line runs for the tests, each in a new process forked from one that has already imported torch and
Lightning: the imports are most of a small run's time (about 5 s of every run on 2 cores).

    python tests/cli_fork_server.py SOCKET

A client connects to the Unix socket ``SOCKET`` and sends one JSON line ``{"args", "cwd", "env", "stdout",
"stderr"}``. The server forks; the child becomes ``python -m lightning_modules.cli <args>`` run in ``cwd`` with
exactly the environment ``env``, appending to the files ``stdout`` and ``stderr`` (they may be one), and exits as that command would
(its own process group, so that a timeout can stop the processes it started). The server answers the child's pid,
then its exit code (negative: the signal that ended it), one line each. It stops when its standard input closes.

Only third-party libraries are imported before the fork; the project's own code, timm, W&B and the Hugging Face
hub are imported by each run, after its environment is set. Of the preloaded libraries' settings read at import,
the runs use one: ``OMP_NUM_THREADS``, applied in the child (``torch.set_num_threads``).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import socket
import sys

PRELOADED = ("numpy", "torch", "torchvision", "lightning.pytorch", "jsonargparse")


def serve(path: str) -> dict:
    """Accept requests until standard input closes; returns in each forked child only, with its request."""
    for name in PRELOADED:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    running: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in readable and not sys.stdin.buffer.read1(1024):
            sys.exit(0)
        if listener in readable:
            connection, _ = listener.accept()
            request = json.loads(connection.makefile("rb").readline())
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in [connection, *running.values()]:
                    other.close()
                return request
            running[pid] = connection
            reply(connection, pid)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = running.pop(pid)
            reply(connection, os.waitstatus_to_exitcode(status))
            connection.close()


def reply(connection: socket.socket, number: int) -> None:
    try:
        connection.sendall(f"{number}\n".encode())
    except OSError:  # the client stopped waiting (its timeout)
        pass


def become_command(request: dict) -> None:
    """Turn this forked child into ``python -m lightning_modules.cli <args>`` as the request describes it."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for fd, (file, flags) in enumerate(
        [
            (os.devnull, os.O_RDONLY),
            *((request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND) for name in ("stdout", "stderr")),
        ]
    ):
        opened = os.open(file, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
    sys.argv = ["-m", *request["args"]]


if __name__ == "__main__":
    become_command(serve(sys.argv[1]))
    import runpy

    # An exception propagates and an exit code is raised as SystemExit, so the interpreter ends the child as it
    # would end the command: the traceback printed, exit handlers run.
    runpy.run_module("lightning_modules.cli", run_name="__main__", alter_sys=True)
