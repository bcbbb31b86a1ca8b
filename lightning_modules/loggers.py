"""Weights & Biases logging that writes into the run directory, resumes its run, and never blocks.

* ``save_dir`` and the run ``id`` default to the CLI's run directory and the id recorded in its ``run.json``,
  so a resumed run (``fit --ckpt_path last``) or a ``test`` of its checkpoint continues the same W&B run.
* ``mode=None`` chooses: ``WANDB_MODE`` when set (``disabled`` in tests, ``offline``, ``online``); otherwise
  online when W&B credentials exist and the W&B host answers within a few seconds, else offline, with a note
  on how to upload later (``wandb sync <run dir>/wandb``). Behind an HTTP(S) proxy (``HTTPS_PROXY``,
  ``ALL_PROXY``; clusters often set one for pip alone) the host is asked for through the proxy (an HTTP
  ``CONNECT``), within the same bound: a proxy that refuses, fails or hangs means offline, never a run that
  waits on W&B.
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.run_directory import current_run

WandbMode = Literal["online", "offline", "disabled"]
_PROBE_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger with run-directory defaults and an offline fallback (see the module docstring).

    Args:
        project: W&B project.
        name: run name shown in W&B; defaults to the run directory's last three parts, e.g.
            ``aesvc/embedded/version_0``.
        mode: ``"online"``, ``"offline"``, ``"disabled"``, or ``None`` to choose as described above.
        save_dir: where W&B writes its files; defaults to the run directory.
        id: W&B run id; defaults to the run directory's.
        kwargs: passed on to Lightning's ``WandbLogger`` / ``wandb.init`` (``entity``, ``tags``, ``group``...).
    """

    def __init__(
        self,
        project: str = "image-retrieval",
        name: str | None = None,
        mode: WandbMode | None = None,
        save_dir: str | None = None,
        id: str | None = None,
        **kwargs,
    ):
        run = current_run()
        save_dir = save_dir or (run.directory if run else ".")
        chosen = mode is None
        mode = mode or choose_wandb_mode()
        if chosen and mode == "offline" and run is not None and "WANDB_MODE" not in os.environ:
            rank_zero_info(
                f"W&B: no credentials or no connection; logging offline. Upload later with: "
                f"wandb sync {os.path.join(save_dir, 'wandb')}/offline-run-*"
            )
        if name is None and run is not None:
            name = "/".join(Path(run.directory).parts[-3:])  # e.g. aesvc/embedded/version_0
        kwargs["resume"] = kwargs.get("resume") or "allow"  # continue the run when its id exists
        super().__init__(
            project=project, name=name, save_dir=save_dir, id=id or (run.wandb_id if run else None), mode=mode, **kwargs
        )
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # W&B warns about the setting even when it is unset

    def finalize(self, status: str) -> None:
        super().finalize(status)
        # Close the W&B run so a later run in the same process starts its own (or resumes this one by id).
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


def choose_wandb_mode() -> WandbMode:
    """``WANDB_MODE`` if set, else online only with credentials and a W&B host reachable (through the proxy,
    when one is configured) within ``_PROBE_SECONDS``."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return {"dryrun": "offline", "run": "online"}.get(explicit, explicit)  # type: ignore[return-value]
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has(host)):
        return "offline"
    proxy = _proxy_for(host)
    reachable = _reachable_through_proxy(proxy, host, port) if proxy else _reachable(host, port)
    return "online" if reachable else "offline"


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _proxy_for(host: str) -> str | None:
    """The proxy URL W&B would use for ``host`` (``NO_PROXY`` honoured), if any."""
    if urllib.request.proxy_bypass_environment(host):
        return None
    return next((os.environ[name] for name in _PROXY_VARIABLES if os.environ.get(name)), None)


def _bounded(probe) -> bool:
    """``probe()`` run in a daemon thread and given up after ``_PROBE_SECONDS`` (name resolution included)."""
    result: list[bool] = []

    def run() -> None:
        try:
            result.append(bool(probe()))
        except OSError:
            result.append(False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(_PROBE_SECONDS)
    return bool(result and result[0])


def _reachable(host: str, port: int) -> bool:
    """A TCP connection to ``host:port`` within ``_PROBE_SECONDS``."""

    def probe() -> bool:
        with socket.create_connection((host, port), timeout=_PROBE_SECONDS):
            return True

    return _bounded(probe)


def _reachable_through_proxy(proxy: str, host: str, port: int) -> bool:
    """The proxy accepts ``CONNECT host:port`` (status 2xx) within ``_PROBE_SECONDS``.

    A SOCKS proxy cannot be asked without a SOCKS client: it counts as reachable when it accepts a TCP
    connection within the bound.
    """
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    scheme = parsed.scheme.lower()
    default_port = 443 if scheme == "https" else 1080 if "socks" in scheme else 80
    proxy_host, proxy_port = parsed.hostname, parsed.port or default_port
    if proxy_host is None:
        return False
    if "socks" in scheme:
        return _reachable(proxy_host, proxy_port)
    if scheme not in ("http", "https"):
        return False
    deadline = time.monotonic() + _PROBE_SECONDS

    def probe() -> bool:
        with socket.create_connection((proxy_host, proxy_port), timeout=_PROBE_SECONDS) as connection:
            if scheme == "https":  # a TLS connection to the proxy itself
                import ssl

                connection = ssl.create_default_context().wrap_socket(connection, server_hostname=proxy_host)
            request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
            connection.sendall(request.encode("ascii"))
            reply = b""
            while b"\r\n" not in reply:
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = connection.recv(1024)
                if not chunk:
                    return False
                reply += chunk
            status = reply.split(b"\r\n", 1)[0].split()
            return len(status) >= 2 and status[1].startswith(b"2")

    return _bounded(probe)
