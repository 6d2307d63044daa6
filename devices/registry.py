"""The device registry: reference data about every device, joined to its results in the cloud.

One row per device: id, the gateway it hangs off, its site, its sensor kind, its alarm thresholds
and a calibration offset (added to every reading of the device's kind). Loaded from CSV or TOML;
a broken row fails at load time naming the file, row and column.
"""

from __future__ import annotations

import csv
import math
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from devices.catalog import Catalog
from devices.errors import ConfigError

CSV_COLUMNS = ("device_id", "gateway", "site", "kind", "low", "high", "calibration_offset")


@dataclass(frozen=True, kw_only=True)
class Device:
    """Reference data for one device."""

    device_id: str
    gateway: str
    site: str
    kind: str
    low: float | None = None  # alarm threshold, in calibrated units
    high: float | None = None
    calibration_offset: float = 0.0

    def __post_init__(self) -> None:
        if not self.device_id or any(c in self.device_id for c in "/+#\n "):
            raise ValueError(
                f"device_id must be non-empty without / + # or spaces: {self.device_id!r}")
        for name in ("low", "high"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} threshold of {self.device_id} must be finite")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(
                f"device {self.device_id}: low threshold {self.low} >= high {self.high}")
        if not math.isfinite(self.calibration_offset):
            raise ValueError(f"device {self.device_id}: calibration_offset must be finite")


class Registry:
    """Devices by id. Immutable once built; reload builds a new one."""

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self._by_id: dict[str, Device] = {}
        for d in devices:
            if d.device_id in self._by_id:
                raise ValueError(f"device {d.device_id!r} is registered twice")
            self._by_id[d.device_id] = d

    def get(self, device_id: str) -> Device | None:
        return self._by_id.get(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Device]:
        return iter(self._by_id.values())

    def for_gateway(self, gateway: str) -> Registry:
        return Registry(d for d in self if d.gateway == gateway)

    def check_kinds(self, catalog: Catalog, *, source: str = "registry") -> None:
        """Every device's kind must be in the catalog."""
        for d in self:
            if d.kind not in catalog:
                raise ConfigError(
                    f"{d.device_id}.kind", f"unknown sensor kind {d.kind!r}", source=source
                )

    # ---- loading and saving -------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, key: str = "registry") -> Registry:
        """Load from ``.csv`` or ``.toml`` (``[[device]]`` tables); ``key``: the config key
        that names the file, for the errors about the file itself."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(key, f"file not found: {p}")
        if p.suffix.lower() == ".csv":
            return cls._load_csv(p)
        if p.suffix.lower() == ".toml":
            return cls._load_toml(p)
        raise ConfigError(key, f"unsupported file type {p.suffix!r} (use .csv or .toml)")

    @classmethod
    def _load_csv(cls, p: Path) -> Registry:
        """UTF-8 CSV as spreadsheets save it (with or without a byte-order mark, ',' or ';'
        between fields; with ';', as European locales save it, a decimal comma in the numbers);
        blank lines and lines starting with '#' are skipped."""
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError("registry", f"not UTF-8 text (byte {exc.start}): save it as UTF-8 "
                              "CSV", source=str(p)) from None
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(keepends=True), start=1)
                 if ln.strip() and not ln.lstrip().startswith("#")]
        header = lines[0][1] if lines else ""
        delimiter = ";" if header.count(";") > header.count(",") else ","
        reader = csv.DictReader((ln for _, ln in lines), delimiter=delimiter)
        missing = {"device_id", "gateway", "site", "kind"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(
                ",".join(sorted(missing)), "required CSV column(s) missing", source=str(p)
            )
        devices: dict[str, tuple[int, Device]] = {}
        for r in reader:
            line = lines[reader.line_num - 1][0]
            d = _device_from_row(dict(r), f"{p}:{line}", decimal_comma=delimiter == ";")
            if d.device_id in devices:
                raise ConfigError("device_id", f"{d.device_id!r} is registered twice (lines "
                                  f"{devices[d.device_id][0]} and {line})", source=str(p))
            devices[d.device_id] = (line, d)
        return cls(d for _, d in devices.values())

    @classmethod
    def _load_toml(cls, p: Path) -> Registry:
        with p.open("rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError("registry", f"invalid TOML: {exc}", source=str(p)) from None
        rows = data.get("device", [])
        if not isinstance(rows, list):
            raise ConfigError("device", "must be an array of tables ([[device]])", source=str(p))
        try:
            return cls(_device_from_row(r, f"{p}:device[{i}]") for i, r in enumerate(rows))
        except ValueError as exc:  # the same device_id in two tables
            raise ConfigError("device_id", str(exc), source=str(p)) from None

    def to_csv(self, path: str | Path) -> None:
        with Path(path).open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            for d in self:
                w.writerow([d.device_id, d.gateway, d.site, d.kind,
                            "" if d.low is None else repr(d.low),
                            "" if d.high is None else repr(d.high),
                            repr(d.calibration_offset)])


_DECIMAL_COMMA = re.compile(r"\s*[+-]?[0-9]+,[0-9]+\s*")


def _optional_float(row: Mapping[str, object], key: str, where: str,
                    decimal_comma: bool = False) -> float | None:
    raw = row.get(key)
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return None
    if decimal_comma and isinstance(raw, str) and _DECIMAL_COMMA.fullmatch(raw):
        raw = raw.replace(",", ".")  # 21,5: a spreadsheet of a European locale
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(key, f"not a number: {raw!r}", source=where) from None


def _device_from_row(row: Mapping[str, object], where: str, *,
                     decimal_comma: bool = False) -> Device:
    for key in ("device_id", "gateway", "site", "kind"):
        v = row.get(key)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(key, "is required and must be a non-empty string", source=where)
    try:
        return Device(
            device_id=str(row["device_id"]).strip(),
            gateway=str(row["gateway"]).strip(),
            site=str(row["site"]).strip(),
            kind=str(row["kind"]).strip(),
            low=_optional_float(row, "low", where, decimal_comma),
            high=_optional_float(row, "high", where, decimal_comma),
            calibration_offset=_optional_float(row, "calibration_offset", where,
                                               decimal_comma) or 0.0,
        )
    except ValueError as exc:
        raise ConfigError("device", str(exc), source=where) from None
