"""InfluxDB 2.x / 3.x sink through the official ``influxdb-client`` (URL, token, org, bucket).

Same line protocol as 1.x; dashboards stay in InfluxQL, which 2.x serves through a DBRP mapping
and 3.x natively. Errors are translated into ``SinkError`` here, so the writer's retry policy is
the same for every InfluxDB generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from cloud.sinks.base import SinkError
from cloud.sinks.points import Points, encode

if TYPE_CHECKING:
    from cloud.config import InfluxConfig


class InfluxV2Sink:
    name = "influxdb2"

    def __init__(self, url: str, *, token: str, org: str, bucket: str,
                 timeout_s: float = 10.0) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self._client = InfluxDBClient(url=url, token=token, org=org,
                                      timeout=int(timeout_s * 1000))
        self._write = self._client.write_api(write_options=SYNCHRONOUS)
        self.bucket = bucket
        self.org = org

    @classmethod
    def from_config(cls, ix: InfluxConfig) -> InfluxV2Sink:
        if not (ix.token and ix.org and ix.bucket):  # InfluxConfig refuses this already
            raise ValueError("InfluxDB 2.x needs token, org and bucket")
        return cls(ix.url, token=ix.token, org=ix.org, bucket=ix.bucket,
                   timeout_s=ix.timeout_ms / 1000)

    def write(self, batch: list[Points]) -> None:
        self.write_lines(encode(batch))

    def write_lines(self, lines: list[str]) -> None:
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            self._write.write(bucket=self.bucket, org=self.org, record=lines,
                              write_precision=cast(Any, WritePrecision.MS))
        except ApiException as exc:
            status = int(exc.status or 0)
            if status == 413 and len(lines) > 1:
                mid = len(lines) // 2
                self.write_lines(lines[:mid])
                self.write_lines(lines[mid:])
                return
            retry_after = _retry_after(exc)
            # only 400/422 (and a single point's 413) refuse points; anything else (404: a
            # bucket or org that is not there) is retried, never a reason to give points up
            raise SinkError(f"InfluxDB 2.x write failed ({status}): {exc.body!r}",
                            retryable=status not in (400, 413, 422),
                            rejected=len(lines) if status in (400, 422) else 0,
                            retry_after_s=retry_after) from exc
        except Exception as exc:  # urllib3/socket errors: the server was not reached
            raise SinkError(f"InfluxDB 2.x unreachable: {exc!r}", retryable=True) from exc

    def delete(self, points: list[tuple[str, dict[str, str], int]]) -> None:
        from datetime import UTC, datetime

        api = self._client.delete_api()
        for measurement, tags, ts in points:
            pred = " AND ".join([f'_measurement="{measurement}"'] + [
                f'{k}="{v}"' for k, v in sorted(tags.items()) if v])
            at = datetime.fromtimestamp(ts / 1000, tz=UTC)
            try:
                api.delete(start=at, stop=at, predicate=pred, bucket=self.bucket, org=self.org)
            except Exception as exc:
                raise SinkError(f"InfluxDB 2.x delete failed: {exc!r}", retryable=True) from exc

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def _retry_after(exc: Any) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
