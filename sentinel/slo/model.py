"""Prometheus rule files as frozen values, and their YAML rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True)
class Rule:
    """A recording rule (`record` set) or an alerting rule (`alert` set)."""

    expr: str
    record: str | None = None
    alert: str | None = None
    for_: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.record:
            out["record"] = self.record
        if self.alert:
            out["alert"] = self.alert
        out["expr"] = self.expr
        if self.for_:
            out["for"] = self.for_
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class RuleGroup:
    """A rule group; Prometheus evaluates its rules in order every `interval`."""

    name: str
    interval: str
    rules: tuple[Rule, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "interval": self.interval, "rules": [r.as_dict() for r in self.rules]}


@dataclass(frozen=True)
class RuleFile:
    """One rule file: a name (e.g. `sentinel-slo.rules.yml`) and its groups."""

    filename: str
    groups: tuple[RuleGroup, ...]
    header: str = field(default="", compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"groups": [g.as_dict() for g in self.groups]}

    def render(self) -> str:
        return (self.header + dump_yaml(self.as_dict()))


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings, so PromQL stays readable in the files."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump_yaml(data: Any) -> str:
    """Deterministic YAML: keys in insertion order, block scalars for PromQL."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
