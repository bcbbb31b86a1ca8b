"""Weights & Biases logging that writes into the run directory, resumes its run, and never blocks.

* ``save_dir`` and the run ``id`` default to the CLI's run directory and the id recorded in its ``run.json``,
  so a resumed run (``fit --ckpt_path last``) or a ``test`` of its checkpoint continues the same W&B run.
* ``mode=None`` chooses: ``WANDB_MODE`` when set (``disabled`` in tests, ``offline``, ``online``); otherwise
  online when W&B credentials exist and the W&B host answers within a few seconds (or an HTTPS proxy is
  configured), else offline, with a note on how to upload later (``wandb sync <run dir>/wandb``).
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.run_directory import current_run

WandbMode = Literal["online", "offline", "disabled"]
_PROBE_SECONDS = 3.0


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
    """``WANDB_MODE`` if set, else online only with credentials and a reachable W&B host."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return {"dryrun": "offline", "run": "online"}.get(explicit, explicit)  # type: ignore[return-value]
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has(host)):
        return "offline"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return "online"  # the host is reached through the proxy; a direct probe would wrongly fail
    return "online" if _reachable(host, 443) else "offline"


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int) -> bool:
    """A TCP connection within ``_PROBE_SECONDS``, name resolution included (run in a thread to bound it)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=_PROBE_SECONDS):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_SECONDS)
    return bool(result and result[0])
