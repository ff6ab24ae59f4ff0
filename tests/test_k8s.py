"""serve/k8s (docs/kubernetes.md): the Kubernetes manifests, checked offline. No cluster is used.

The kustomization is rendered here as kustomize renders this folder (its resources, its namespace, the ConfigMap
generator; `kubectl kustomize` must agree where kubectl is installed), and every object is validated against
Kubernetes' own JSON schemas (kubernetes-validate, strict: an unknown field is an error) for 1.30 and 1.37. Then
the manifests are checked against the deployment spec (charrnn/deployment.py) and what runs under compose: the
Triton container runs the project's entrypoint, whose command line (run here with a stand-in tritonserver) has
every flag Triton 2.51 knows; ports, images and the grace period fit the spec; and the hardening, the headless
Service, the NetworkPolicy and the model repository volume are as docs/kubernetes.md says.

Moved to tests/test_generated.py: the checks that serve/k8s/haproxy.cfg is serve/haproxy.cfg byte for byte and
that the Triton args, ports and images equal docker-compose.yml's. `make generate` now writes these files from
templates (serve/templates/haproxy.cfg, serve/templates/k8s/) and charrnn/deployment.py, and both compose and
k8s run the one entrypoint, so the copies cannot disagree; test_generated.py checks that every generated file
is current.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from charrnn import deployment as dep
from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER
from charrnn.repository import MODELS
from serve.generate import OUTPUTS
from tests.helpers import ROOT, all_strings

K8S = ROOT / "serve" / "k8s"
GPU = K8S / "gpu"
# Applied by hand, never by the kustomization.
EXAMPLES = ("secret.example.yaml", "models.example.yaml")
# The oldest Kubernetes the manifests claim, and the newest kubernetes-validate knows.
VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "charrnn"
CLUSTER_SCOPED = {"Namespace"}
# The Triton container's image (charrnn/deployment.py): compose's triton-replica's, the slim one.
SLIM_IMAGE = str(dep.IMAGES[dep.BY_SERVICE["triton-replica"].image])
KUBECTL = shutil.which("kubectl")


# ---- rendering: what kustomize does with this folder --------------------------------------------------------


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(folder: Path = K8S) -> list[dict]:
    """The objects `kubectl apply -k folder` creates, but for the generated ConfigMap's hash suffix."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator"}
    assert set(k) <= known, f"this renderer knows only {known}: teach it {set(k) - known}"
    docs = [d for r in k["resources"] for d in load(folder / r)]
    for gen in k.get("configMapGenerator", []):
        assert set(gen) == {"name", "files"}
        data = {}
        for entry in gen["files"]:
            key, _, path = entry.rpartition("=")  # "key=path" or "path"
            data[key or Path(path).name] = (folder / path).read_bytes().decode()
        meta = {"name": gen["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            d["metadata"]["namespace"] = k["namespace"]
    return docs


def merge(base, patch):
    """A strategic merge as far as gpu/ needs it: maps merge, lists of named items merge by name, other lists
    are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in patch.items()}}
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(i, dict) and "name" in i for i in base + patch):
        patched = {p["name"]: p for p in patch}
        old = {b["name"] for b in base}
        return [merge(b, patched[b["name"]]) if b["name"] in patched else b for b in base] + [
            p for p in patch if p["name"] not in old
        ]
    return patch


def render_gpu() -> list[dict]:
    """The default render with the component gpu/ applied."""
    component = yaml.safe_load((GPU / "kustomization.yaml").read_text())
    assert component["kind"] == "Component" and set(component) == {"apiVersion", "kind", "patches"}
    docs = render()
    for entry in component["patches"]:
        (patch,) = load(GPU / entry["path"])
        hits = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert len(hits) == 1, f"{entry['path']} patches nothing or several objects"
        docs[hits[0]] = merge(docs[hits[0]], patch)
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def triton(docs) -> dict:
    return by_kind(docs, "Deployment")["triton"]


@pytest.fixture(scope="module")
def proxy(docs) -> dict:
    return by_kind(docs, "Deployment")["proxy"]


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def server_argv(c: dict, tmp: Path) -> list[str]:
    """tritonserver's command line in container `c`: its command is the project's entrypoint (on the images'
    PATH; its source is serve/tritonserver.sh), run here with the container's environment (each Secret key a
    stand-in value named after it) and a stand-in tritonserver that prints its arguments."""
    assert c["command"] == [dep.ENTRYPOINT] and "args" not in c, "every flag is the entrypoint's"
    fake = tmp / "tritonserver"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TRITONSERVER": str(fake)}
    env.update({e["name"]: e.get("value", f"secret-{e['name']}") for e in c.get("env", [])})
    r = subprocess.run(
        ["sh", str(ROOT / dep.ENTRYPOINT_SOURCE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.fixture(scope="module")
def argv(triton, tmp_path_factory) -> list[str]:
    return server_argv(container(triton), tmp_path_factory.mktemp("tritonserver"))


def flag(argv: list[str], name: str) -> str:
    """The value of the last `name=value` in argv (tritonserver's: a later one wins)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    assert values, f"{name} not in {argv}"
    return values[-1]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is used here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def port_number(c: dict, port) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return number


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def compose_default(value: str) -> str:
    """`${VAR:-default}` -> default, as Compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def gibibytes(docker_size: str) -> str:
    """Docker's `8g` (GiB) as a Kubernetes quantity."""
    m = re.fullmatch(r"(\d+)g", docker_size)
    assert m, docker_size
    return f"{m.group(1)}Gi"


# ---- the files and the render ---------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_examples():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert k["namespace"] == NAMESPACE
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == on_disk - set(EXAMPLES)
    assert set(EXAMPLES) <= on_disk
    assert "components" not in k, "the GPU variant is optional, not the default"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(version):
    objects = render() + render_gpu() + [d for name in EXAMPLES for d in load(K8S / name)]
    kinds = {d["kind"] for d in objects}
    assert {"Namespace", "Deployment", "Service", "NetworkPolicy", "ConfigMap"} <= kinds
    for d in objects:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} ({version}): {e.message} at {e.path}")


def test_the_validator_is_strict(triton):
    """A field Kubernetes does not know (compose's shm_size, say) is an error, not silently dropped."""
    bad = copy.deepcopy(triton)
    container(bad)["shmSize"] = "1Gi"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_every_namespaced_object_is_in_the_namespace(docs):
    for d in docs:
        if d["kind"] in CLUSTER_SCOPED:
            assert d["metadata"]["name"] == NAMESPACE
        else:
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]


@pytest.mark.skipif(not KUBECTL, reason="no kubectl: the test's own render is checked alone")
@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_kubectl_kustomize_renders_the_same(variant, tmp_path):
    """kustomize itself (built into kubectl, offline) agrees with render() and render_gpu()."""
    folder, ours = K8S, render()
    if variant == "gpu":  # an overlay of one's own, as docs/kubernetes.md shows
        folder, ours = tmp_path, render_gpu()
        rel = [Path(os.path.relpath(p, tmp_path)).as_posix() for p in (K8S, GPU)]
        (tmp_path / "kustomization.yaml").write_text(
            f"resources: [{rel[0]}]\ncomponents: [{rel[1]}]\n"
        )
    out = subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    # kustomize appends a hash of the content to the generated ConfigMap's name, and rewrites references.
    assert re.search(r"\bhaproxy-cfg-[a-z0-9]{10}\b", out)
    out = re.sub(r"\bhaproxy-cfg-[a-z0-9]{10}\b", "haproxy-cfg", out)
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}
    assert theirs == {(d["kind"], d["metadata"]["name"]): d for d in ours}


# ---- HAProxy ------------------------------------------------------------------------------------------------


def test_proxy_runs_serve_haproxy_cfg_from_the_configmap(docs, proxy):
    """kustomize reads only this folder: `make generate` writes the config there as well as where compose
    mounts it, from one template, and the proxy mounts the ConfigMap generated from it."""
    assert set(OUTPUTS["haproxy.cfg"]) == {"serve/haproxy.cfg", "serve/k8s/haproxy.cfg"}
    (volume,) = proxy["spec"]["template"]["spec"]["volumes"]
    cm = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]
    assert cm["data"] == {"haproxy.cfg": (K8S / "haproxy.cfg").read_text()}
    assert cm["data"]["haproxy.cfg"] == (ROOT / "serve" / "haproxy.cfg").read_text()


def test_proxy_deployment(proxy, compose, docs):
    s = compose["proxy"]
    c = container(proxy)
    assert c["image"] == str(dep.IMAGES["proxy"])
    # The image's command reads the file mounted here (serve/Dockerfile.haproxy).
    dockerfile = (ROOT / "serve" / "Dockerfile.haproxy").read_text()
    assert '"-f", "/etc/haproxy/haproxy.cfg"]' in dockerfile and "command" not in c
    (mount,) = c["volumeMounts"]
    assert mount == {
        "name": "config",
        "mountPath": "/etc/haproxy/haproxy.cfg",
        "subPath": "haproxy.cfg",
        "readOnly": True,
    }
    # The ports the config binds: the main server's HTTP and gRPC (what clients use) and the statistics.
    cfg = (ROOT / "serve" / "haproxy.cfg").read_text()
    binds = {int(port) for port in re.findall(r"^\s*bind :(\d+)\b", cfg, re.M)}
    want = {dep.MAIN.ports.http, dep.MAIN.ports.grpc, dep.PROXY_STATS_PORT}
    assert {p["containerPort"] for p in c["ports"]} == binds == want
    for probe in ("startupProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == ("/healthz", dep.PROXY_STATS_PORT)
    assert port_number(c, c["livenessProbe"]["tcpSocket"]["port"]) == dep.PROXY_STATS_PORT
    assert re.search(r"^\s*monitor-uri /healthz$", cfg, re.M)
    # Every variable the config reads without a default is set here; TRITON_REPLICAS_DNS always is.
    env = {e["name"]: e["value"] for e in c["env"]}
    for name, default in re.findall(r"\$\{(\w+)(-[^}]*)?\}", cfg):
        assert default or name in env, f"haproxy.cfg needs {name}"
    assert "TRITON_REPLICAS_DNS" in env
    assert proxy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] != 0
    limit = c["resources"]["limits"]["memory"]
    assert limit == s["mem_limit"].replace("m", "Mi")


def test_proxy_soft_stop_fits_the_grace_period(proxy):
    """SIGUSR1 (compose's stop_signal) from preStop, cut by the config's hard-stop-after, before SIGKILL."""
    c = container(proxy)
    hook = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -USR1 1" in hook
    cfg = (ROOT / "serve" / "haproxy.cfg").read_text()
    (hard_stop,) = re.findall(r"^\s*hard-stop-after (\d+)s$", cfg, re.M)
    (first_sleep,) = re.findall(r"sleep (\d+); kill", hook)
    grace = proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(first_sleep) + int(hard_stop)


# ---- Triton -------------------------------------------------------------------------------------------------


def test_triton_runs_the_entrypoint_with_every_project_flag(triton, argv):
    """The container runs the project's entrypoint with no argument: tritonserver gets every flag of
    charrnn/deployment.py (the model repository, model control none, strict readiness, the exit timeout, the
    gRPC pool, the restricted APIs), on the pod's address 0.0.0.0 (the proxy and the kubelet reach it there;
    loopback-only is compose's host port binding) at the container ports."""
    names = {a.split("=", 1)[0] for a in argv}
    want = {
        re.search(r"--[a-z-]+", part).group()
        for f, _ in dep.TRITONSERVER_FLAGS
        for part in f.split()
        # not --model-config-name: only with TRITON_MODEL_CONFIG_NAME (the slim image)
        if not part.startswith("${")
    }
    assert names == want, names ^ want
    assert flag(argv, "--model-control-mode") == "none"
    assert flag(argv, "--strict-readiness") == "true"
    for what in ("http", "grpc", "metrics"):
        assert flag(argv, f"--{what}-address") == "0.0.0.0", what
        assert flag(argv, f"--{what}-port") == str(getattr(dep.CONTAINER_PORTS, what)), what
    assert "TRITON_ADDRESS" not in {e["name"] for e in container(triton)["env"]}


def test_the_keys_come_from_the_secret(triton, argv, tmp_path):
    """The entrypoint reads both keys from the container's environment: exactly the Secret's two keys. Without
    them it refuses to start (no default key)."""
    c = container(triton)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert set(env) == {dep.ADMIN_KEY_ENV, INFER_KEY_ENV}
    assert all(ref == {"name": "triton-keys", "key": name} for name, ref in env.items())
    # Each key reaches tritonserver's restricted-API flags (the stand-in values are named after the keys).
    restricted = [a for a in argv if "-restricted-" in a]
    assert {a.rsplit("=", 1)[1] for a in restricted} == {f"secret-{name}" for name in env}
    assert any(a.endswith(f"{INFER_KEY_HEADER}=secret-{INFER_KEY_ENV}") for a in restricted)
    (secret,) = load(K8S / "secret.example.yaml")
    assert secret["metadata"] == {
        **secret["metadata"],
        "name": "triton-keys",
        "namespace": NAMESPACE,
    }
    # Empty on purpose: applied unchanged, the entrypoint refuses to start (no key is written anywhere).
    assert secret["stringData"] == {name: "" for name in env}
    unchanged = {**c, "env": [{"name": k, "value": v} for k, v in secret["stringData"].items()]}
    with pytest.raises(AssertionError, match=f"{dep.ADMIN_KEY_ENV}: not set"):
        server_argv(unchanged, tmp_path)


def test_triton_flags_exist_in_tritonserver_2_51(argv):
    """The server of both images (2.51) knows every flag (the nvidia-pytriton wheel's binary, --help)."""
    from charrnn.errors import UnavailableError
    from serve.local_triton import pytriton_dist

    try:
        dist, libs = pytriton_dist()
    except UnavailableError as e:
        pytest.skip(str(e))
    usage = subprocess.run(
        [str(dist / "bin" / "tritonserver"), "--help"],
        env={"LD_LIBRARY_PATH": str(libs)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    help_text = usage.stdout + usage.stderr
    for arg in argv:
        assert re.search(rf"^\s+{re.escape(arg.split('=')[0])} <", help_text, re.M), arg


def test_triton_image_replicas_and_spread(triton):
    assert container(triton)["image"] == SLIM_IMAGE
    assert triton["spec"]["replicas"] == 3
    # HAProxy has REPLICA_SLOTS server slots per backend (server-template): more replicas would be ignored.
    cfg = (ROOT / "serve" / "haproxy.cfg").read_text()
    slots = {int(n) for n in re.findall(r"^\s*server-template replica (\d+) ", cfg, re.M)}
    assert slots == {dep.REPLICA_SLOTS} and triton["spec"]["replicas"] <= dep.REPLICA_SLOTS
    (spread,) = triton["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert selects(spread["labelSelector"], pod_labels(triton))


def test_triton_resources_shm_tmp_and_models(triton, compose, argv):
    s = compose["triton-slim"]
    spec = triton["spec"]["template"]["spec"]
    c = container(triton)
    # compose's mem_limit default (TRITON_MEM_LIMIT) as the memory limit
    assert c["resources"]["limits"]["memory"] == gibibytes(compose_default(s["mem_limit"]))
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # /dev/shm: tmpfs of compose's shm_size
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": gibibytes(s["shm_size"])}
    # /tmp writable under a read-only root: the python backend makes its environments' directory there
    # ("Failed to create temporary directory for Python environments" without it, seen in the slim image).
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The model repository: the PVC, read-only, where the entrypoint's --model-repository points.
    repo = flag(argv, "--model-repository")
    assert mounts[repo]["readOnly"] is True
    assert volumes[mounts[repo]["name"]]["persistentVolumeClaim"] == {
        "claimName": "charrnn-models",
        "readOnly": True,
    }
    claims = by_kind(load(K8S / "models.example.yaml"), "PersistentVolumeClaim")
    assert set(claims["charrnn-models"]["spec"]["accessModes"]) <= {"ReadWriteMany", "ReadOnlyMany"}
    assert set(mounts) == {repo, "/dev/shm", "/tmp"}


def test_triton_probes(triton, compose, argv):
    c = container(triton)
    for probe, path in [
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
        ("startupProbe", "/v2/health/live"),
    ]:
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == (path, dep.CONTAINER_PORTS.http)
    assert flag(argv, "--http-port") == str(dep.CONTAINER_PORTS.http)
    startup = c["startupProbe"]
    start_period = compose["triton-slim"]["healthcheck"]["start_period"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(start_period.rstrip("s"))
    assert flag(argv, "--strict-readiness") == "true"


def test_triton_grace_period_covers_exit_timeout_and_prestop(triton, argv):
    c = container(triton)
    timeout = int(flag(argv, "--exit-timeout-secs"))
    assert timeout == dep.EXIT_TIMEOUT_S
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = triton["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > timeout + int(command[1])


def test_no_model_name_is_written_in_the_manifests(docs):
    """The servers load whatever the repository volume holds (model control mode none). The ConfigMap is
    serve/haproxy.cfg, whose comments may name a model; nothing routes by model."""
    text = "\n".join(s for o in docs if o["kind"] != "ConfigMap" for s in all_strings(o))
    assert not [m.name for m in MODELS if m.name in text]
    assert "--load-model" not in text
    gpu_text = (GPU / "triton-gpu.yaml").read_text()
    assert not [m.name for m in MODELS if m.name in gpu_text]


# ---- security -------------------------------------------------------------------------------------------------


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    out = [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if "template" in d.get("spec", {})
    ]
    return out + [(d["metadata"]["name"], d["spec"]) for d in docs if d["kind"] == "Pod"]


@pytest.mark.parametrize("variant", ["default", "gpu", "examples"])
def test_security_settings_on_every_container(variant):
    docs = {
        "default": render,
        "gpu": render_gpu,
        "examples": lambda: load(K8S / "models.example.yaml"),
    }[variant]()
    specs = pod_specs(docs)
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["runAsGroup"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), name
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc.get("privileged", False) is False and sc.get("runAsUser", 1) != 0
            assert "memory" in c["resources"]["limits"], (name, c["name"])


def test_namespace_enforces_the_restricted_pod_security_standard(docs):
    (ns,) = by_kind(docs, "Namespace").values()
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_uids_are_the_images_users(triton, proxy, compose):
    """uid 1000 is triton-server in both Triton images (compose: user triton-server); the proxy's uid is the
    haproxy user of the image (any non-root uid would do: it writes nothing)."""
    assert compose["triton-slim"]["user"] == "triton-server"
    slim = (ROOT / "serve" / "Dockerfile.slim").read_text()
    assert re.search(r"useradd --uid 1000 .*triton-server$", slim, re.M)
    assert triton["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000
    assert compose["proxy"]["user"] == "haproxy" and compose["proxy"]["read_only"] is True


# ---- Services and NetworkPolicy ---------------------------------------------------------------------------------


def test_headless_service_gives_the_proxy_one_record_per_ready_triton_pod(docs, triton, proxy):
    svc = by_kind(docs, "Service")["triton-replica"]
    spec = svc["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is False
    assert spec["selector"].items() <= pod_labels(triton).items()
    assert not spec["selector"].items() <= pod_labels(proxy).items()
    c = container(triton)
    # The ports HAProxy's server-template lines name (serve/haproxy.cfg): the replicas' container ports.
    ports = (dep.CONTAINER_PORTS.http, dep.CONTAINER_PORTS.grpc)
    assert {(p["port"], port_number(c, p["targetPort"])) for p in spec["ports"]} == {
        (port, port) for port in ports
    }
    cfg = (ROOT / "serve" / "haproxy.cfg").read_text()
    assert set(re.findall(r"^\s*server-template replica \d+ \S+:(\d+)\"", cfg, re.M)) == set(
        map(str, ports)
    )
    env = {e["name"]: e["value"] for e in container(proxy)["env"]}
    name = svc["metadata"]["name"]
    assert env["TRITON_REPLICAS_DNS"] == f"{name}.{NAMESPACE}.svc.cluster.local"


def test_clients_reach_only_the_proxy_inside_the_cluster(docs, proxy):
    services = by_kind(docs, "Service")
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services.values())
    assert not by_kind(docs, "Ingress")
    spec = services["charrnn"]["spec"]
    assert spec["selector"].items() <= pod_labels(proxy).items()
    c = container(proxy)
    # Clients use the main server's ports, as with compose's proxy on the host.
    assert {(p["port"], port_number(c, p["targetPort"])) for p in spec["ports"]} == {
        (dep.MAIN.ports.http, dep.MAIN.ports.http),
        (dep.MAIN.ports.grpc, dep.MAIN.ports.grpc),
    }
    assert spec["sessionAffinity"] == "ClientIP"


def test_network_policy_admits_only_the_proxy_to_triton(docs, triton, proxy):
    """Policies add up: every one that selects the Triton pods admits only the proxy's pods (same namespace),
    on the container's HTTP and gRPC ports only (not metrics)."""
    policies = [
        p
        for p in by_kind(docs, "NetworkPolicy").values()
        if selects(p["spec"]["podSelector"], pod_labels(triton))
    ]
    assert policies
    for p in policies:
        assert "Ingress" in p["spec"]["policyTypes"]
        for rule in p["spec"].get("ingress", []):
            assert rule["from"], "a rule without `from` admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "no namespaceSelector, no ipBlock"
                assert selects(peer["podSelector"], pod_labels(proxy))
                assert not selects(peer["podSelector"], pod_labels(triton))
            assert {(q["protocol"], q["port"]) for q in rule["ports"]} == {
                ("TCP", dep.CONTAINER_PORTS.http),
                ("TCP", dep.CONTAINER_PORTS.grpc),
            }


# ---- the GPU variant ------------------------------------------------------------------------------------------


def test_gpu_variant_is_the_ngc_image_with_one_gpu_and_nothing_else_changed(triton):
    gpu = container(by_kind(render_gpu(), "Deployment")["triton"])
    cpu = container(triton)
    assert "nvidia.com/gpu" not in str(render())
    # compose's `triton` image with its default release (${TRITON_RELEASE:-<NGC_RELEASE>})
    assert gpu["image"] == compose_default(str(dep.IMAGES[dep.BY_SERVICE["triton"].image]))
    assert gpu["image"].endswith(f":{dep.NGC_RELEASE}")
    assert gpu["resources"]["limits"] == {**cpu["resources"]["limits"], "nvidia.com/gpu": 1}
    # the same entrypoint, environment, probes and hardening
    same = {k: v for k, v in gpu.items() if k not in ("image", "resources")}
    assert same == {k: v for k, v in cpu.items() if k not in ("image", "resources")}
