"""The status page's two looks at the readings when they live in InfluxDB (``store.backend: influxdb``): each
DER's last reading, and one 30-minute slot's register and interval energies per DER.

hubd.ops.fleet keeps its SQL: the last times are loaded into its in-memory readings table (one row a DER), and
a slot's figures come back in the shape its SQL uses, so the page computes the same energy either way.
"""

from __future__ import annotations

from hubd.config import InfluxConfig
from hubd.store.influx.client import SyncInflux
from hubd.store.influx.pushdown import ns, quote_name


class InfluxFleetReadings:
    """Read from the page's thread only (the client keeps one connection)."""

    def __init__(self, config: InfluxConfig) -> None:
        self._client = SyncInflux(config)
        self._from = quote_name(config.measurement)

    def last_times(self) -> dict[str, int]:
        """Each DER's latest measured_at: the time of its last point."""
        found = self._client.query(f'SELECT last("received_at") FROM {self._from} GROUP BY "der_id"')
        return {s["tags"]["der_id"]: int(s["values"][0][0]) for s in found if s.get("tags")}

    def slot(self, start: int, end: int, before: int) -> dict[str, tuple[float | None, ...]]:
        """Per DER with readings in [start, end): (lowest and highest register, sum of interval energies, the
        highest register in [before, start)), as hubd.ops.fleet's slot SQL has them."""
        inside, earlier = self._client.query_many(
            [
                f'SELECT min("energy_kwh"), max("energy_kwh"), sum("energy_interval_kwh") FROM {self._from} '
                f'WHERE time >= {ns(start)} AND time < {ns(end)} GROUP BY "der_id"',
                f'SELECT max("energy_kwh") FROM {self._from} WHERE time >= {ns(before)} AND time < {ns(start)} '
                'GROUP BY "der_id"',
            ]
        )
        highs = {s["tags"]["der_id"]: s["values"][0][1] for s in earlier if s.get("tags")}
        out: dict[str, tuple[float | None, ...]] = {}
        for series in inside:
            _, lo, hi, interval = series["values"][0]
            der_id = series["tags"]["der_id"]
            out[der_id] = (lo, hi, interval, highs.get(der_id))
        return out

    def close(self) -> None:
        self._client.close()
