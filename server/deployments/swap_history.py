"""The history of swaps (and loads, unloads and recoveries): the newest records kept for the
admin API by id, and every finished one counted in the metrics, logged as one JSON line and
written to the registry's history."""

from __future__ import annotations

import logging

from models.catalog import Change
from models.errors import NotFoundError
from models.registry import Registry
from server.deployments.swap_record import SwapRecord
from server.observability.metrics import Metrics

log = logging.getLogger(__name__)

MAX_RECORDS = 200


class SwapHistory:
    def __init__(self, registry: Registry, metrics: Metrics):
        self._registry = registry
        self._metrics = metrics
        self._records: dict[str, SwapRecord] = {}

    def get(self, swap_id: str) -> SwapRecord:
        if swap_id not in self._records:
            raise NotFoundError(f"No swap {swap_id}.", param="swap_id")
        return self._records[swap_id]

    def add(self, record: SwapRecord) -> None:
        """Visible by id from now on, running or not; the oldest go past MAX_RECORDS."""
        self._records[record.id] = record
        while len(self._records) > MAX_RECORDS:
            self._records.pop(next(iter(self._records)))

    def close(self, record: SwapRecord) -> None:
        """A finished record: its metrics, its JSON log line, its entry in the registry's history."""
        self._metrics.record_swap(record)
        log.info({"event": "swap", **record.to_dict()})
        model, _, number = (record.to_version or record.from_version or record.deployment).partition("@")
        try:
            self._registry.record(Change(record.actor, record.reason), record.action, model, int(number) if number.isdigit() else None, record.to_dict())
        except Exception:  # history must never turn a finished swap into a failed request
            log.exception("could not record %s in the history", record.id)

    def add_finished(self, record: SwapRecord) -> None:
        """A change already over when it is recorded (a deploy, a retarget, an unload)."""
        record.finish()
        self.add(record)
        self.close(record)
