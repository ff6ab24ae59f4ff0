"""The compose profile `scale` (N Triton replicas behind HAProxy) as its proxy sees it, from HAProxy's statistics
(serve/haproxy.cfg, docs/scaling.md). A library: `make compose-up-scale` ends with wait_for_replicas(N), and
tests/test_scale.py reads the same table.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
import urllib.request

from charrnn.deployment import PROXY_BACKENDS, PROXY_STATS_PORT

# The backends of serve/haproxy.cfg: each lists every replica, as slots replica1..replica<REPLICA_SLOTS>.
BACKENDS = tuple(PROXY_BACKENDS.values())
# docker-compose.yml publishes the stats port there (default PROXY_STATS_PORT)
STATS_PORT_ENV = "HAPROXY_STATS_PORT"


def stats_url(port: int | str | None = None) -> str:
    """The proxy's statistics as CSV (`stats uri /stats` + `;csv`), on the loopback port compose publishes."""
    port = port or os.environ.get(STATS_PORT_ENV) or PROXY_STATS_PORT
    return f"http://127.0.0.1:{port}/stats;csv"


def servers(url: str, timeout: float = 5.0) -> dict[str, dict[str, dict[str, str]]]:
    """{backend: {server: its row}} for BACKENDS: status (UP, DOWN, MAINT (resolution) for an empty slot,
    ...), addr (ip:port of the replica in the slot), check_status, ..., as HAProxy's CSV names the columns.
    """
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    out: dict[str, dict[str, dict[str, str]]] = {b: {} for b in BACKENDS}
    for row in rows:
        if row["pxname"] in out and row["svname"] not in ("FRONTEND", "BACKEND"):
            out[row["pxname"]][row["svname"]] = row
    return out


def up(url: str) -> dict[str, list[str]]:
    """{backend: addresses of its servers that are UP}."""
    return {
        b: sorted(row["addr"] for row in rows.values() if row["status"] == "UP")
        for b, rows in servers(url).items()
    }


def wait_for_replicas(n: int, url: str | None = None, timeout: float = 60.0) -> int:
    """Wait until every backend has `n` replicas UP (compose's --wait only knows each container's own health;
    HAProxy's checks take a few seconds more). Returns an exit code: 0, or 1 on timeout, with a message.
    """
    url = url or stats_url()
    deadline, seen = time.monotonic() + timeout, None
    while True:
        try:
            seen = up(url)
            if all(len(addresses) >= n for addresses in seen.values()):
                print(
                    f"proxy: {n} replica(s) UP in every backend ({', '.join(seen[BACKENDS[0]])})",
                    file=sys.stderr,
                )
                return 0
        except OSError as e:  # the proxy is not answering yet
            seen = f"no answer from {url} ({e})"
        if time.monotonic() > deadline:
            print(
                f"error: proxy: fewer than {n} replicas UP after {timeout:.0f} s: {seen} (docker compose "
                "--profile scale ps / logs proxy)",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)  # polling HAProxy's table with a deadline
