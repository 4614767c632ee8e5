"""Reloading the config file without a request: on SIGHUP, and (opt-in, `watch_config_s`)
when its content changes, as a mounted Kubernetes ConfigMap does when it is edited.

Rule: a reload that fails leaves everything as it was and says why in the log; the next
change (or signal) tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from models.catalog import Change
from models.errors import BatonError
from server.config.file import environment_overrides, load_config
from server.config.settings import Settings
from server.deployments.reconcile import Reconciler

log = logging.getLogger(__name__)


class ConfigReloader:
    def __init__(self, settings: Settings, reconciler: Reconciler, keep: Callable[[asyncio.Task], asyncio.Task]):
        self._settings, self._path, self._reconciler, self._keep = settings, settings.config_file, reconciler, keep

    async def reload(self, actor: str) -> None:
        try:
            config = load_config(self._path)
            changes = await self._reconciler.apply(config, Change(actor, "config reload"))
        except BatonError as error:
            log.error("config reload (%s) refused, nothing changed: %s", actor, error)
            return
        log.info("config reloaded (%s): %s", actor, [(c["deployment"], c["action"], c["status"]) for c in changes])
        for line in config.restart_needed(self._settings, environment_overrides()):
            log.warning("config reload (%s): %s", actor, line)

    def reload_on_sighup(self) -> None:
        """Only where the server runs on the main thread (`baton serve`), where signals arrive."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: self._keep(asyncio.create_task(self.reload("sighup"))))
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (tests), or no SIGHUP
            log.debug("SIGHUP reloads are off: the server does not run on the main thread")

    def watch(self, interval_s: float) -> None:
        self._keep(asyncio.create_task(self._watch(interval_s)))

    async def _watch(self, interval_s: float) -> None:
        seen = _digest(self._path)
        while True:
            await asyncio.sleep(interval_s)
            if (now := _digest(self._path)) != seen:
                seen = now
                await self.reload("file watch")


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # mid-replace (a ConfigMap swaps a symlink): the next look sees it
        return None
