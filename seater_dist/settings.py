"""What every settings model shares: unknown fields are errors, values are checked on assignment too, and a
bad value fails with one line that names the field; loading from a YAML or JSON file.

    class TreeSettings(Settings):
        k: int = Field(8, ge=2, description="Branching factor.")

    TreeSettings.build(k=1)             # SettingsError: k: Input should be greater than or equal to 2
    TreeSettings.from_file("tree.yaml") # SettingsError: tree.yaml: kk: Extra inputs are not permitted

The settings of each stage are in :mod:`seater_dist.config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class SettingsError(ValueError):
    """A settings file or dict that does not validate; the message names the field."""


class Settings(BaseModel):
    """Base of every settings model: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as err:
            raise SettingsError(_describe(err)) from None

    @classmethod
    def build(cls, **fields: Any):
        """Construct from keyword fields with the same one-line errors as :meth:`model_validate`."""
        return cls.model_validate(fields)

    @classmethod
    def from_file(cls, path: str | Path):
        """Load from a YAML or JSON file; errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"{path}: settings file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise SettingsError(f"{path}: not valid YAML/JSON ({' '.join(str(err).split())})") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except SettingsError as err:
            raise SettingsError(f"{path}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)  # a model-level check's message names its own fields
    return "; ".join(parts)
