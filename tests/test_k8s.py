"""serve/k8s (docs/kubernetes.md): the Kubernetes manifests, checked offline. No cluster is used.

The kustomization is rendered here as kustomize renders this folder (its resources, its namespace, the ConfigMap
generator; `kubectl kustomize` must agree where kubectl is installed), and every object is validated against
Kubernetes' own JSON schemas (kubernetes-validate, strict: an unknown field is an error) for 1.30 and 1.37. Then
the manifests are checked against what runs under compose: the Triton flags are docker-compose.yml's, the
HAProxy config is serve/haproxy.cfg byte for byte, the images are compose's, and the hardening, the headless
Service, the NetworkPolicy and the model repository volume are as docs/kubernetes.md says.
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

from charrnn.repository import MODELS
from tests.helpers import ROOT, all_strings

K8S = ROOT / "serve" / "k8s"
GPU = K8S / "gpu"
# Applied by hand, never by the kustomization.
EXAMPLES = ("secret.example.yaml", "models.example.yaml")
# The oldest Kubernetes the manifests claim, and the newest kubernetes-validate knows.
VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "charrnn"
CLUSTER_SCOPED = {"Namespace"}
# The one documented difference from compose's command: Triton's addresses (loopback-only is compose's host
# port binding; in a pod the proxy and the kubelet reach the pod's address).
ADDRESS_FLAGS = {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"}
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


def test_haproxy_configmap_is_serve_haproxy_cfg_byte_for_byte(docs, proxy):
    source = (ROOT / "serve" / "haproxy.cfg").read_bytes()
    stale = "serve/k8s/haproxy.cfg is a stale copy: run serve/k8s/sync-haproxy-cfg.sh"
    assert (K8S / "haproxy.cfg").read_bytes() == source, stale
    (volume,) = proxy["spec"]["template"]["spec"]["volumes"]
    cm = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]
    assert cm["data"]["haproxy.cfg"].encode() == source


def test_proxy_deployment(proxy, compose, docs):
    s = compose["proxy"]
    c = container(proxy)
    assert c["image"] == s["image"]
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
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8404}
    for probe in ("startupProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == ("/healthz", 8404)
    assert port_number(c, c["livenessProbe"]["tcpSocket"]["port"]) == 8404
    cfg = (ROOT / "serve" / "haproxy.cfg").read_text()
    assert re.search(r"^\s*monitor-uri /healthz$", cfg, re.M) and re.search(r"bind :8404\b", cfg)
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


@pytest.mark.parametrize("service", ["triton-slim", "triton-replica"])
def test_triton_args_are_composes_command(triton, compose, service):
    """The same flags and values as compose's slim servers (keys as $(VAR) from the pod's env instead of
    ${VAR:?...} from the shell), plus only the addresses."""
    command = [str(a) for a in compose[service]["command"]]
    want = [re.sub(r"\$\{(\w+):\?[^}]*\}", r"$(\1)", a) for a in command[1:]]
    c = container(triton)
    assert c["command"] == command[:1] == ["tritonserver"]
    assert set(c["args"]) - set(want) == ADDRESS_FLAGS
    assert [a for a in c["args"] if a not in ADDRESS_FLAGS] == want
    names = {a.split("=", 1)[0] for a in c["args"]}
    assert names - {a.split("=", 1)[0] for a in want} == {a.split("=")[0] for a in ADDRESS_FLAGS}


def test_every_arg_variable_comes_from_the_secret(triton):
    """Kubernetes expands $(VAR) only for variables in the container's env (else the text stays literal)."""
    c = container(triton)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    used = {v for a in c["args"] for v in re.findall(r"\$\((\w+)\)", a)}
    assert used == set(env) == {"TRITON_ADMIN_KEY", "TRITON_INFER_KEY"}
    assert all(ref == {"name": "triton-keys", "key": name} for name, ref in env.items())
    assert not any("$" in a for a in c["args"] if not re.search(r"\$\(\w+\)", a))
    (secret,) = load(K8S / "secret.example.yaml")
    assert secret["metadata"] == {
        **secret["metadata"],
        "name": "triton-keys",
        "namespace": NAMESPACE,
    }
    # Empty on purpose: applied unchanged, Triton refuses to start (no key is written anywhere).
    assert secret["stringData"] == {"TRITON_ADMIN_KEY": "", "TRITON_INFER_KEY": ""}


def test_triton_flags_exist_in_tritonserver_2_51(triton):
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
    for arg in container(triton)["args"]:
        assert re.search(rf"^\s+{re.escape(arg.split('=')[0])} <", help_text, re.M), arg


def test_triton_image_replicas_and_spread(triton, compose):
    assert container(triton)["image"] == compose["triton-slim"]["image"]
    assert compose["triton-replica"]["image"] == compose["triton-slim"]["image"]
    assert triton["spec"]["replicas"] == 3
    # HAProxy has 8 server slots per backend (server-template): more replicas would be ignored.
    cfg = (ROOT / "serve" / "haproxy.cfg").read_text()
    slots = {int(n) for n in re.findall(r"^\s*server-template replica (\d+) ", cfg, re.M)}
    assert len(slots) == 1 and triton["spec"]["replicas"] <= slots.pop()
    (spread,) = triton["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert selects(spread["labelSelector"], pod_labels(triton))


def test_triton_resources_shm_tmp_and_models(triton, compose):
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
    # The model repository: the PVC, read-only, where --model-repository points.
    (repo,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--model-repository=")]
    assert mounts[repo]["readOnly"] is True
    assert volumes[mounts[repo]["name"]]["persistentVolumeClaim"] == {
        "claimName": "charrnn-models",
        "readOnly": True,
    }
    claims = by_kind(load(K8S / "models.example.yaml"), "PersistentVolumeClaim")
    assert set(claims["charrnn-models"]["spec"]["accessModes"]) <= {"ReadWriteMany", "ReadOnlyMany"}
    assert set(mounts) == {repo, "/dev/shm", "/tmp"}


def test_triton_probes(triton, compose):
    c = container(triton)
    for probe, path in [
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
        ("startupProbe", "/v2/health/live"),
    ]:
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == (path, 8000)
    startup = c["startupProbe"]
    start_period = compose["triton-slim"]["healthcheck"]["start_period"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(start_period.rstrip("s"))
    assert "--strict-readiness=true" in c["args"]


def test_triton_grace_period_covers_exit_timeout_and_prestop(triton):
    c = container(triton)
    (timeout,) = [int(a.split("=")[1]) for a in c["args"] if a.startswith("--exit-timeout-secs=")]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = triton["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > timeout + int(command[1])


def test_no_model_name_is_written_in_the_manifests(docs):
    """The servers load whatever the repository volume holds (model control mode none). The ConfigMap is
    serve/haproxy.cfg, whose comments may name a model; nothing routes by model."""
    text = "\n".join(s for d in docs if d["kind"] != "ConfigMap" for s in all_strings(d))
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
    assert {(p["port"], port_number(c, p["targetPort"])) for p in spec["ports"]} == {
        (8000, 8000),
        (8001, 8001),
    }
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
    assert {(p["port"], port_number(c, p["targetPort"])) for p in spec["ports"]} == {
        (8000, 8000),
        (8001, 8001),
    }
    assert spec["sessionAffinity"] == "ClientIP"


def test_network_policy_admits_only_the_proxy_to_triton(docs, triton, proxy):
    """Policies add up: every one that selects the Triton pods admits only the proxy's pods (same namespace),
    on 8000 and 8001 only."""
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
                ("TCP", 8000),
                ("TCP", 8001),
            }


# ---- the GPU variant ------------------------------------------------------------------------------------------


def test_gpu_variant_is_the_ngc_image_with_one_gpu_and_nothing_else_changed(triton, compose):
    gpu = container(by_kind(render_gpu(), "Deployment")["triton"])
    cpu = container(triton)
    assert "nvidia.com/gpu" not in str(render())
    assert gpu["image"] == compose_default(compose["triton"]["image"])
    assert gpu["resources"]["limits"] == {**cpu["resources"]["limits"], "nvidia.com/gpu": 1}
    same = {k: v for k, v in gpu.items() if k not in ("image", "resources")}
    assert same == {k: v for k, v in cpu.items() if k not in ("image", "resources")}
    # compose's GPU server runs the same command as the slim one
    assert compose["triton"]["command"] == compose["triton-slim"]["command"]
