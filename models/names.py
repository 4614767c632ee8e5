"""Model names and references: `name`, `name@3`, `name@prod`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.errors import InvalidRequestError

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
LATEST = "latest"


def check_name(name: str, what: str = "model name") -> str:
    """Names become folder and URL parts: only this pattern, so none can climb out of a folder."""
    if not re.fullmatch(NAME_PATTERN, name) or ".." in name:
        raise InvalidRequestError(f"Invalid {what} {name!r}: it must match {NAME_PATTERN} (lowercase letters, digits, '.', '_', '-').", param="name")
    return name


@dataclass(frozen=True)
class ModelRef:
    name: str
    selector: str = LATEST  # a version number or an alias

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        name, _, selector = text.partition("@")
        check_name(name)
        if selector:
            check_name(selector, "version or alias")
        return cls(name, selector or LATEST)

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}"
