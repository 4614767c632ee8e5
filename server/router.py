"""Resolves the `model` field of a request to the engine that serves it."""

from __future__ import annotations

from dataclasses import dataclass

from server.engines.base import Engine
from server.errors import ModelNotFoundError


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    engine: Engine


class ModelRouter:
    def __init__(self, served: list[ServedModel]):
        self._by_name = {model.name: model for model in served}

    @property
    def models(self) -> list[ServedModel]:
        return list(self._by_name.values())

    def resolve(self, name: str) -> ServedModel:
        model = self._by_name.get(name)
        if model is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ModelNotFoundError(f"The model '{name}' does not exist. Known models: {known}.", param="model")
        return model
