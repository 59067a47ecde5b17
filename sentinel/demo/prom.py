"""`sentinel demo --prometheus`: a real Prometheus scraping the demo's sidecar with generated rules."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

# The demo lasts minutes, so the SLO period is compressed: 2h instead of 30d scales the
# Workbook's 1h/5m page windows to 10 s/0.4 s; the generator keeps every window at least
# 4 scrape intervals long.
DEMO_PERIOD = "2h"
SCRAPE = "1s"


def start_prometheus(demo, sidecar_config: Path) -> str:
    from sentinel.demo.processes import free_port, wait_ready

    out = demo.opts.out
    spec = yaml.safe_load((demo.opts.repo / "slo.yaml").read_text())
    spec.update({"period": DEMO_PERIOD, "scrape_interval": SCRAPE, "job": "sentinel"})
    slo_path = out / "slo.demo.yaml"
    slo_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    rules_dir = out / "rules"
    subprocess.run([sys.executable, "-m", "sentinel", "rules", "generate", "--slo", str(slo_path),
                    "-o", str(rules_dir), "--no-prometheusrule"], check=True, capture_output=True, text=True)
    port = free_port()
    cfg = {
        "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
        "rule_files": [str(p) for p in sorted(rules_dir.glob("*.yaml")) + sorted(rules_dir.glob("*.yml"))
                       if not p.name.endswith((".test.yaml", ".test.yml"))],
        "scrape_configs": [{"job_name": "sentinel", "static_configs": [
            {"targets": [f"127.0.0.1:{demo.ports['admin']}"]}]}],
    }
    (out / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    fresh_tsdb(out / "tsdb")
    demo.children.start("prometheus", [
        "prometheus", f"--config.file={out / 'prometheus.yml'}", f"--storage.tsdb.path={out / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/-/ready", demo.children, timeout=60)
    demo.prom_started = time.perf_counter()
    return url


TSDB_ENTRIES = ("wal", "chunks_head", "queries.active", "lock")


def fresh_tsdb(path: Path) -> None:
    """Remove the TSDB a previous demo left in this `--out` (the run holds the folder's lock).

    Its ALERTS series carry no instance label, so they would merge with this run's, and
    Prometheus keeps answering a series for 5 minutes past its last sample (no staleness
    marker at shutdown): a rerun would report the last run's alerts as its own, firing from
    before its traffic began. A folder that is not a Prometheus TSDB is refused, not removed.
    """
    import shutil

    from sentinel.errors import UsageError

    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()
        return
    if path.is_symlink() or not path.is_dir() or not any((path / e).exists() for e in TSDB_ENTRIES):
        raise UsageError(f"--out: {path} exists and is not a Prometheus TSDB left by a previous demo; "
                         "move it or pass another --out")
    shutil.rmtree(path)


async def collect_alerts(client: httpx.AsyncClient, url: str, t0_wall: float) -> list[dict]:
    """Every alert series that fired during the run, with when it first and last fired (s since start)."""
    now = time.time()
    r = await client.get(f"{url}/api/v1/query_range", params={
        "query": 'ALERTS{alertstate="firing"}', "start": t0_wall - 60, "end": now, "step": "1s"})
    out = []
    for item in r.json().get("data", {}).get("result", []):
        labels = {k: v for k, v in item["metric"].items() if k not in ("__name__", "alertstate")}
        times = [float(t) for t, _ in item.get("values", [])]
        out.append({"alertname": labels.pop("alertname", "?"), "labels": labels,
                    "first_seen_s": round(min(times) - t0_wall, 1) if times else None,
                    "last_seen_s": round(max(times) - t0_wall, 1) if times else None})
    return sorted(out, key=lambda a: (a["first_seen_s"] is None, a["first_seen_s"] or 0))
