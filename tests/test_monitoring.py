"""Monitoring (compose profile `monitoring`: Prometheus with serve/monitoring/), for real.

promtool, inside the image that compose runs, accepts the configuration and passes the alerting rules' unit tests
(serve/monitoring/rules_test.yml). End to end: Prometheus next to the `scale` profile finds both replicas through
Docker's DNS and scrapes them, and the characters it counts (charrnn_characters_generated_total summed over the
replicas) equal the characters our client received through the proxy.

Needs a Docker engine and Compose v2; without them the tests skip and say why, and CHARRNN_REQUIRE_DOCKER=1 (set
by .ci/run) turns the skip into a failure.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from charrnn import deployment
from charrnn.repository import PYTHON
from serve.local_triton import free_port
from tests.helpers import GREEDY, ROOT, docker_or_skip, served, tf_text, wait_for
from tests.test_scale import images, scale_stack  # noqa: F401 (images: a fixture used below)

IMAGE = str(deployment.IMAGES["prometheus"])  # docker-compose.yml, service prometheus


@pytest.fixture(scope="module")
def prometheus_image() -> dict:
    """Prometheus's image, as `make compose-up-monitoring` builds it (cached when present)."""
    docker_or_skip()
    from serve.images import build

    return build(["prometheus"])


def promtool(*args: str) -> subprocess.CompletedProcess:
    """promtool in the image, with serve/monitoring mounted where compose mounts it, as the same user (its rule
    tests write a scratch database under /tmp)."""
    return subprocess.run(
        ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none"]
        + ["--entrypoint", "promtool"]
        + ["-v", f"{ROOT / 'serve' / 'monitoring'}:/etc/prometheus:ro", IMAGE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_prometheus_scrapes_every_slim_server_at_its_metrics_port():
    """Static: the DNS names Prometheus resolves are the compose services that run the slim image (a server
    added to charrnn/deployment.py without it would go unscraped), at the containers' metrics port.
    """
    config = yaml.safe_load((ROOT / "serve" / "monitoring" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    slim = {d.service for d in deployment.DEPLOYMENTS if d.image == "slim"}
    assert set(sd["names"]) == slim and sd["type"] == "A"
    assert sd["port"] == deployment.CONTAINER_PORTS.metrics


def test_promtool_accepts_the_configuration_and_its_rules(prometheus_image):
    r = promtool("check", "config", "/etc/prometheus/prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 3 rules found" in r.stdout + r.stderr, r.stdout + r.stderr


def test_the_alerting_rules_pass_their_unit_tests(prometheus_image):
    r = promtool("test", "rules", "/etc/prometheus/rules_test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(port: int, expr: str) -> float | None:
    result = query(port, expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_counts_every_character_the_client_received_through_the_proxy(
    images, prometheus_image, shipped_repo, shipped  # noqa: F811
):
    replicas, prompts, length = 2, ["ROMEO:\n", "JULIET:\n", "KING:\n", "First Citizen:\n"], 150
    with scale_stack({**images, **prometheus_image}, shipped_repo, "charrnn-mon", replicas) as s:
        port = free_port()
        env = {"PROMETHEUS_PORT": str(port)}
        try:
            r = s.compose("--profile", "monitoring", "up", "-d", "--wait", "prometheus", env=env)
            assert r.returncode == 0, r.stderr + s.compose("logs", "prometheus").stdout[-3000:]
            # Both replicas found through Docker's DNS and scraped (the slim names answer nothing here).
            wait_for(
                lambda: value(port, 'count(up{job="triton"} == 1)') == replicas,
                90,
                "targets",
                period=1,
            )
            names = {t["metric"]["service"] for t in query(port, 'up{job="triton"}')}
            assert names == {"triton-replica"}, names
            before = value(port, f'sum(charrnn_characters_generated_total{{model="{PYTHON}"}})')
            assert before in (0, None), before
            # One-chunk prompts and no re-prime (no retries): the servers answer exactly `length` requests with
            # LOGITS per sequence, one character each, and the client keeps every one.
            texts = served(s, prompts, length, GREEDY, model=PYTHON)
            assert texts == [tf_text(shipped, p, length, GREEDY) for p in prompts]
            received = sum(len(t) for t in texts)
            expr = f'sum(charrnn_characters_generated_total{{model="{PYTHON}"}})'
            wait_for(lambda: value(port, expr) == received, 60, f"{expr} == {received}", period=1)
            per_replica = query(port, f'charrnn_characters_generated_total{{model="{PYTHON}"}}')
            assert len(per_replica) == replicas, per_replica
            # The ONNX Runtime models publish no charrnn_* series; Triton's own count their requests.
            assert query(port, 'charrnn_live_sequences{model="charrnn_onnx"}') == []
            assert value(port, 'count(nv_inference_count{model="charrnn_onnx"})') == replicas
            # The rules are loaded, and none fires on a healthy stack.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as r:
                rules = [
                    rule["name"] for g in json.load(r)["data"]["groups"] for rule in g["rules"]
                ]
            assert sorted(rules) == [
                "EvictionsRising",
                "NoCharactersWhileSequencesLive",
                "TritonServerDown",
            ]
            assert query(port, "ALERTS") == []
        finally:
            s.compose("--profile", "monitoring", "down", "--remove-orphans", "--volumes", env=env)
