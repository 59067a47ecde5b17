"""The SLO file users write (`slo.yaml`): a typed, validated model of it.

```yaml
period: 30d            # 7d, 28d, 30d, or any duration (e.g. 4h to compress a test)
scrape_interval: 30s   # windows are never shorter than 4x this
slos:
  - {name: availability, model: digits, objective: 0.999, sli: availability}
  - {name: latency, model: digits, objective: 0.99, sli: latency, threshold: 0.15}
```

`load_slo_file(path)` is the only place such a file is read; errors name the file and
the field (`slo.yaml: slos[1].threshold: ...`), as for the daemon configuration.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sentinel.errors import ConfigError
from sentinel.gate.settings import CostSettings, GateSettings
from sentinel.schema import load_file
from sentinel.slo.durations import parse_duration

SliKind = Literal["availability", "latency", "agreement", "estimated_accuracy"]

# Matched with fullmatch: `$` also matches before a trailing newline, and a name such as "digits\n"
# (a quoted YAML string) would reach the PromQL label matchers and break every generated rule.
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_JOB = re.compile(r"[A-Za-z0-9_.:/-]+")

# The fastest page window is 1h of 30d (1/720 of the period); it must cover 4 scrapes.
MIN_PERIOD_SCRAPES = 720 * 4

# Fewest samples an accuracy estimate may rest on and still count towards an estimated_accuracy
# SLO (`min_samples`). The estimate is a share of n verdicts, so it moves in steps of 1/n and its
# binomial standard error near 0.97 is 0.034 at n = 25 and 0.017 at n = 100: 100 samples resolve
# a 3% error budget, 25 do not. Keep it at most the sidecar's `drift.window_size` (default 200),
# or the SLO never sees an estimate it may count.
DEFAULT_MIN_SAMPLES = 100
MAX_MIN_SAMPLES = 1_000_000

DEFAULT_RUNBOOK_URL = "https://github.com/sentinel-densenet/sentinel/blob/main/deploy/RUNBOOK.md"


# An online classifier's latency SLO above a minute is a unit mistake (milliseconds written as
# seconds: `threshold: 150` meant 0.15 s); the proxy gives up on an upstream call after
# `proxy.upstream_timeout_s` (30 s by default) anyway, so such an SLO could never burn.
MAX_LATENCY_THRESHOLD_S = 60.0


@dataclass(frozen=True)
class SloSpec:
    """One service-level objective for one model."""

    name: str
    model: str
    objective: float
    sli: SliKind
    threshold: float | None = None  # seconds; latency SLIs only
    description: str = ""
    # estimated_accuracy SLIs only: an estimate on fewer samples is not counted (default DEFAULT_MIN_SAMPLES)
    min_samples: int | None = None

    def validate(self) -> Iterator[tuple[str, str]]:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            yield "name", (f"must be lower-case letters, digits, '_' or '-', starting with a letter, "
                           f"got {self.name!r}")
        if not isinstance(self.model, str) or not _MODEL.fullmatch(self.model):
            yield "model", f"must be a model name (letters, digits, '_', '.', ':', '-'), got {self.model!r}"
        if not 0.0 < self.objective < 1.0:
            yield "objective", f"must be a ratio strictly between 0 and 1 (0.999 is 99.9%), got {self.objective}"
        elif self.objective > 0.99999:
            yield "objective", f"above 0.99999 leaves no error budget to alert on, got {self.objective}"
        if self.sli == "latency":
            if self.threshold is None:
                yield "threshold", "required for a latency SLI (seconds, e.g. 0.15)"
            elif not 0.0 < self.threshold:
                yield "threshold", f"must be a positive number of seconds, got {self.threshold}"
            elif self.threshold > MAX_LATENCY_THRESHOLD_S:
                yield "threshold", (f"is in seconds and must be at most {MAX_LATENCY_THRESHOLD_S:g}, got "
                                    f"{self.threshold:g} ({self.threshold:g} ms would be "
                                    f"{self.threshold / 1000:g})")
        elif self.threshold is not None:
            yield "threshold", f"only latency SLIs take a threshold, this one is {self.sli!r}"
        if self.min_samples is not None:
            if self.sli != "estimated_accuracy":
                yield "min_samples", f"only estimated_accuracy SLIs take min_samples, this one is {self.sli!r}"
            elif (isinstance(self.min_samples, int) and not isinstance(self.min_samples, bool)
                  and not 1 <= self.min_samples <= MAX_MIN_SAMPLES):  # other types: the loader says so
                yield "min_samples", (f"must be a whole number of samples from 1 to {MAX_MIN_SAMPLES} "
                                      f"(default {DEFAULT_MIN_SAMPLES}), got {self.min_samples!r}")

    @property
    def sample_floor(self) -> int:
        """Fewest samples an accuracy estimate must rest on to count (`min_samples` or its default)."""
        return DEFAULT_MIN_SAMPLES if self.min_samples is None else self.min_samples

    @property
    def budget(self) -> float:
        """The error budget as a ratio, 1 - objective rounded to 12 decimals (see sli.RATIO_PRECISION)."""
        return round(1.0 - self.objective, 12)


@dataclass(frozen=True)
class SloFile:
    """A whole SLO file: the compliance period, the scrape interval and the SLOs."""

    slos: tuple[SloSpec, ...]
    period: str = "30d"
    scrape_interval: str = "30s"
    job: str = "sentinel"  # Prometheus job label of the sidecars, for SentinelDown
    runbook_url: str = DEFAULT_RUNBOOK_URL
    source: str = dataclasses.field(default="<memory>", compare=False)
    gate: GateSettings = GateSettings()    # `sentinel gate` (sentinel/gate/settings.py)
    cost: CostSettings = CostSettings()    # executive dashboard: cost per 1,000 inferences

    def validate(self) -> Iterator[tuple[str, str]]:
        period_s = scrape_s = None
        try:
            period_s = parse_duration(self.period)
        except ValueError as exc:
            yield "period", str(exc)
        try:
            scrape_s = parse_duration(self.scrape_interval)
        except ValueError as exc:
            yield "scrape_interval", str(exc)
        if period_s and scrape_s and period_s < MIN_PERIOD_SCRAPES * scrape_s:
            yield "period", (f"{self.period} is too short for a {self.scrape_interval} scrape interval: "
                             f"the fastest page window (period/720) must span at least 4 scrapes, "
                             f"so the period must be at least {MIN_PERIOD_SCRAPES} scrape intervals")
        if not isinstance(self.job, str) or not _JOB.fullmatch(self.job):
            yield "job", f"must be a Prometheus job name, got {self.job!r}"
        if not self.runbook_url.startswith(("http://", "https://")):
            yield "runbook_url", f"expected an http(s) URL, got {self.runbook_url!r}"
        elif "#" in self.runbook_url:
            yield "runbook_url", (f"must have no #fragment: each alert links to its own section "
                                  f"(<runbook_url>#sentinelerrorbudgetburn), got {self.runbook_url!r}")
        elif "{{" in self.runbook_url or "}}" in self.runbook_url or any(c.isspace() for c in self.runbook_url):
            # annotations are Prometheus templates: `{{ ... }}` would be expanded (or fail to be)
            yield "runbook_url", f"must be a plain URL, without '{{{{', '}}}}' or spaces, got {self.runbook_url!r}"
        if not self.slos:
            yield "slos", "at least one SLO is required"
        seen: set[tuple[str, str]] = set()
        for i, slo in enumerate(self.slos):
            if slo is None:
                continue
            key = (slo.name, slo.model)
            if key in seen:
                yield f"slos[{i}].name", f"duplicate SLO {slo.name!r} for model {slo.model!r}"
            seen.add(key)

    @property
    def period_seconds(self) -> int:
        return parse_duration(self.period)

    @property
    def scrape_interval_seconds(self) -> int:
        return parse_duration(self.scrape_interval)

    @property
    def models(self) -> tuple[str, ...]:
        """Models named by any SLO, in first-seen order."""
        return tuple(dict.fromkeys(s.model for s in self.slos))


def load_slo_file(path: str | Path) -> SloFile:
    """Read and validate an SLO file (sentinel's format or OpenSLO v1); ConfigError lists every problem."""
    from sentinel.slo import openslo

    text = _read_text(Path(path))
    spec: SloFile
    if openslo.is_openslo(text):
        spec = openslo.load_openslo(text, str(path))
    else:
        spec = load_file(path, SloFile)
    return dataclasses.replace(spec, source=str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})"]) \
            from None
