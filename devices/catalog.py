"""The sensor catalog: which metrics exist, their unit and their physically valid range.

A reading outside its kind's range is not an anomaly but a broken measurement (a disconnected probe
reading -127 °C, a humidity of 140 %), so it is rejected at the edge with reason ``out_of_range``.
Anomalies are judged later, in the cloud, against each device's own thresholds and history.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from devices.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class SensorKind:
    """One kind of measurement: ``temperature`` in °C between -40 and 125, say."""

    name: str
    unit: str
    low: float
    high: float
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"sensor kind name must be alphanumeric/underscore, got {self.name!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(
                f"sensor kind {self.name!r}: need finite low < high, got {self.low}..{self.high}"
            )


DEFAULT_KINDS: tuple[SensorKind, ...] = (
    SensorKind(name="temperature", unit="degC", low=-40.0, high=125.0,
               description="air or surface temperature"),
    SensorKind(name="humidity", unit="%RH", low=0.0, high=100.0, description="relative humidity"),
    SensorKind(name="pressure", unit="hPa", low=300.0, high=1100.0,
               description="barometric pressure"),
    SensorKind(name="co2", unit="ppm", low=0.0, high=10_000.0, description="CO2 concentration"),
    SensorKind(name="vibration", unit="mm/s", low=0.0, high=100.0,
               description="vibration velocity RMS"),
    SensorKind(name="power", unit="W", low=0.0, high=1_000_000.0, description="active power"),
    SensorKind(name="cpu", unit="%", low=0.0, high=100.0, description="CPU utilisation"),
)


UNDECLARED_POLICIES = ("reject", "accept")
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
log = logging.getLogger("fieldline.catalog")


class Catalog:
    """A set of sensor kinds, with vectorised range checks by metric index.

    Metric names outside the catalog are rejected (``undeclared = "reject"``), or accepted
    without a range check, up to ``max_undeclared`` distinct names (``"accept"``: replaying a
    recording whose columns nobody declared; each name is logged once so it can be declared).
    The declared kinds never change; the accepted undeclared names only grow.
    """

    def __init__(self, kinds: Iterable[SensorKind] = DEFAULT_KINDS, *,
                 undeclared: str = "reject", max_undeclared: int = 64) -> None:
        if undeclared not in UNDECLARED_POLICIES:
            raise ValueError(f"undeclared metrics policy must be one of {UNDECLARED_POLICIES}")
        self._kinds: dict[str, SensorKind] = {}
        for kind in kinds:
            if kind.name in self._kinds:
                raise ValueError(f"sensor kind {kind.name!r} is defined twice")
            self._kinds[kind.name] = kind
        self.undeclared = undeclared
        self.max_undeclared = max_undeclared
        self.accepted_undeclared: list[str] = []
        self._accepted: set[str] = set()

    def admits(self, name: str) -> bool:
        """Whether readings of metric ``name`` may pass (declared, or accepted undeclared)."""
        if name in self._kinds or name in self._accepted:
            return True
        if (self.undeclared != "accept" or len(self._accepted) >= self.max_undeclared
                or not _METRIC_NAME.match(name)):
            return False
        self._accepted.add(name)
        self.accepted_undeclared.append(name)
        log.warning("metric %r is not in the catalog: accepted without a range check "
                    "(catalog.undeclared = \"accept\", %d of %d); declare [catalog.%s] with "
                    "unit, low and high to check it", name, len(self._accepted),
                    self.max_undeclared, name)
        return True

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[SensorKind]:
        return iter(self._kinds.values())

    def __len__(self) -> int:
        return len(self._kinds)

    def get(self, name: str) -> SensorKind | None:
        return self._kinds.get(name)

    def __getitem__(self, name: str) -> SensorKind:
        return self._kinds[name]

    def bounds(self, names: list[str]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Low and high bounds for each name (NaN where the name is not in the catalog)."""
        low = np.full(len(names), np.nan)
        high = np.full(len(names), np.nan)
        for i, name in enumerate(names):
            kind = self._kinds.get(name)
            if kind is not None:
                low[i] = kind.low
                high[i] = kind.high
            elif name in self._accepted:
                low[i] = -np.inf
                high[i] = np.inf
        return low, high

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object], *, key: str = "catalog") -> Catalog:
        """Default kinds, overridden or extended by a ``[catalog.<name>]`` config table;
        ``undeclared`` and ``max_undeclared`` in ``[catalog]`` set the policy for the rest."""
        kinds = {k.name: k for k in DEFAULT_KINDS}
        undeclared = raw.get("undeclared", "reject")
        if undeclared not in UNDECLARED_POLICIES:
            raise ConfigError(f"{key}.undeclared",
                              f"must be one of {', '.join(UNDECLARED_POLICIES)}, "
                              f"got {undeclared!r}")
        max_undeclared = raw.get("max_undeclared", 64)
        if type(max_undeclared) is not int or not 0 <= max_undeclared <= 200:
            raise ConfigError(f"{key}.max_undeclared", "must be an integer from 0 to 200 (metric "
                              "ids are few: 256 per gateway)")
        for name, spec in raw.items():
            if name in ("undeclared", "max_undeclared"):
                continue
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{key}.{name}", "must be a table with unit, low, high")
            try:
                kinds[name] = SensorKind(
                    name=name,
                    unit=str(spec.get("unit", kinds[name].unit if name in kinds else "")),
                    low=float(spec["low"]),
                    high=float(spec["high"]),
                    description=str(spec.get("description", "")),
                )
            except KeyError as exc:
                raise ConfigError(f"{key}.{name}.{exc.args[0]}", "is required") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{key}.{name}", str(exc)) from None
        return cls(kinds.values(), undeclared=str(undeclared), max_undeclared=max_undeclared)
