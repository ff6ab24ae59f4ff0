"""Docker compose projects (tests/test_compose_slim.py, test_scale.py, test_failover.py, test_tls.py)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import ClassVar

import pytest

from charrnn.deployment import LoopbackUrls
from tests.helpers.common import ROOT

REQUIRE_DOCKER = os.environ.get("CHARRNN_REQUIRE_DOCKER") == "1"


def docker_or_skip() -> None:
    """Skip without a Docker engine and Compose v2, or fail when .ci/run requires them (CHARRNN_REQUIRE_DOCKER=1)."""
    from charrnn.errors import UnavailableError
    from serve.images import check_docker

    try:
        check_docker()
    except UnavailableError as e:
        why = f"needs a Docker engine and Compose v2: {e.message()}"
        if REQUIRE_DOCKER:
            pytest.fail(f"{why} -- CHARRNN_REQUIRE_DOCKER=1: these tests must run here")
        pytest.skip(why)


@dataclass
class ComposeStack(LoopbackUrls):
    """One compose project of the PROFILES (set by a subclass) on free loopback ports."""

    PROFILES: ClassVar[tuple[str, ...]] = ()
    project: str
    env: dict
    http_port: int
    grpc_port: int

    @property
    def infer_key(self) -> str:
        return self.env["TRITON_INFER_KEY"]

    def compose(
        self, *args: str, timeout: float = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        profiles = [flag for profile in self.PROFILES for flag in ("--profile", profile)]
        return subprocess.run(
            ["docker", "compose", "-p", self.project, *profiles, *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
