"""deploy/: the image and the Kubernetes manifests, checked offline.

The kustomize base and both overlays are rendered with ``kubectl kustomize`` (no cluster
needed), every rendered document is validated against the Kubernetes JSON schemas shipped in
``kubernetes-validate`` (strict: unknown fields fail), and the security, probe, wiring and
overlay properties the deployment promises are checked on the rendered output, so that an
overlay cannot quietly undo what the base sets.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv  # type: ignore[import-untyped]

from revive.api.auth import AdminAuth
from revive.app import resolve_policies
from revive.config import Settings, load_settings
from revive.tokens import Keyring

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
TARGETS = {
    "base": K8S / "base",
    "sqlite": K8S / "overlays" / "sqlite",
    "postgres": K8S / "overlays" / "postgres",
}
MIN_K8S = (1, 33)
UID = 10001
SIDECAR_PORT = 8787
CONFIG_PATH = "/etc/revive/revive.yaml"
KEYS_SECRET = "revive-signing-keys"
ADMIN_SECRET = "revive-admin-token"
STORE_SECRET = "revive-store"
SECRETS_MOUNT = "/run/secrets/revive"
KEY_NAME = re.compile(r"^[0-9]{20}-[A-Za-z0-9_-]{43}\.pem$")  # what revive.tokens.keyring loads
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

Doc = dict[str, Any]


# -- rendering --------------------------------------------------------------------------------


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is required in CI to render deploy/k8s with kustomize")
        pytest.skip("kubectl is not installed: cannot render deploy/k8s (kubectl kustomize)")
    return kubectl


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    kubectl = _kubectl()
    out: dict[str, list[Doc]] = {}
    for name, path in TARGETS.items():
        proc = subprocess.run(
            [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert out[name], f"{name} rendered nothing"
    return out


@pytest.fixture(params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(rendered: dict[str, list[Doc]], target: str) -> list[Doc]:
    return rendered[target]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    doc: Doc = found[0]
    return doc


def _maybe(docs: list[Doc], kind: str, name: str) -> Doc | None:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found[0] if found else None


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in POD_KINDS]


def _pod(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _containers(pod: Doc) -> Iterator[Doc]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _container(pod: Doc, name: str, *, init: bool) -> Doc:
    pool = pod.get("initContainers", []) if init else pod["containers"]
    found: list[Doc] = [c for c in pool if c["name"] == name]
    assert len(found) == 1, f"container {name!r} (init={init}) not found exactly once"
    return found[0]


def _sidecar(docs: list[Doc]) -> Doc:
    return _container(_pod(_one(docs, "Deployment", "revive-worker")), "revive", init=True)


def _revive_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc, Doc]]:
    """(workload, pod spec, container) for every container that runs ``revive serve``."""
    for workload in _workloads(docs):
        pod = _pod(workload)
        for container in _containers(pod):
            if container.get("args", [])[:1] == ["serve"] and "command" not in container:
                yield workload, pod, container


def _volume(pod: Doc, name: str) -> Doc:
    found = [v for v in pod["volumes"] if v["name"] == name]
    assert len(found) == 1, f"volume {name!r} not found exactly once"
    volume: Doc = found[0]
    return volume


def _mounts(container: Doc) -> dict[str, Doc]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']}: no port named {port!r}"
    return int(named[port])


# -- schemas ----------------------------------------------------------------------------------


def _k8s_version() -> str:
    version = str(kv.latest_version())
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= MIN_K8S, f"kubernetes-validate only ships schemas up to {version}"
    return version


def test_every_rendered_document_is_valid_for_current_kubernetes(docs: list[Doc]) -> None:
    version = _k8s_version()
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            pytest.fail(exc.message)


# -- the pods are locked down -----------------------------------------------------------------


def test_every_container_runs_locked_down(docs: list[Doc]) -> None:
    for workload in _workloads(docs):
        pod = _pod(workload)
        where = workload["metadata"]["name"]
        assert pod.get("automountServiceAccountToken") is False, where
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), f"{where}: {flag}"
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], where
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in _containers(pod):
            who = f"{where}/{container['name']}"
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, who
            assert ctx.get("runAsUser") == UID, who
            assert ctx.get("allowPrivilegeEscalation") is False, who
            assert not ctx.get("privileged"), who
            assert ctx.get("readOnlyRootFilesystem") is True, who
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], who
            assert not ctx.get("capabilities", {}).get("add"), who
            assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", who
            # Spelled out on the container too: a pod-level setting is easy to lose in a patch.
            own = container.get("securityContext", {})
            for key in ("runAsNonRoot", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                        "capabilities"):
                assert key in own, f"{who}: securityContext.{key} only set on the pod"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in resources.get(kind, {}), f"{who}: no {kind}.{res}"


def test_revive_has_the_promised_resources(docs: list[Doc]) -> None:
    for workload, _, container in _revive_containers(docs):
        assert container["resources"] == {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        }, workload["metadata"]["name"]


def test_writable_paths_are_volumes(docs: list[Doc]) -> None:
    """Read-only root: the data dir and /tmp of every revive container are volumes."""
    for workload, pod, container in _revive_containers(docs):
        mounts = _mounts(container)
        for path in ("/tmp", "/var/lib/revive"):
            assert path in mounts and not mounts[path].get("readOnly"), path
        tmp = _volume(pod, mounts["/tmp"]["name"])
        assert "emptyDir" in tmp, workload["metadata"]["name"]


# -- native sidecar, probes, shutdown ---------------------------------------------------------


def test_revive_is_a_native_sidecar_of_the_worker(docs: list[Doc]) -> None:
    pod = _pod(_one(docs, "Deployment", "revive-worker"))
    names = [c["name"] for c in pod["initContainers"]]
    # The key copy must finish before the sidecar starts: init containers run in order.
    assert names == ["revive-secrets", "revive"]
    sidecar = _sidecar(docs)
    assert sidecar["restartPolicy"] == "Always"
    assert "restartPolicy" not in pod["initContainers"][0]
    assert sidecar["args"] == ["serve", "--config", CONFIG_PATH]
    assert _port(sidecar, "http") == SIDECAR_PORT
    assert [c["name"] for c in pod["containers"]] == ["worker"]
    worker_env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
    assert worker_env.get("REVIVE_SIDECAR_URL") == f"http://127.0.0.1:{SIDECAR_PORT}"


def test_probes(docs: list[Doc]) -> None:
    seen = 0
    for workload, _, container in _revive_containers(docs):
        who = f"{workload['metadata']['name']}/{container['name']}"
        expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                    "readinessProbe": "/readyz"}
        for probe, path in expected.items():
            http = container[probe]["httpGet"]
            assert http["path"] == path, f"{who} {probe}"
            assert _port(container, http["port"]) == SIDECAR_PORT, f"{who} {probe}"
            assert "host" not in http, f"{who} {probe}: the kubelet must probe the pod IP"
        # The sidecar should start in well under a second; give it 30 before restarting.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 10, who
        seen += 1
    assert seen >= 1


def test_sidecar_listens_where_probes_reach_it(docs: list[Doc], tmp_path: Path) -> None:
    """httpGet probes (and Prometheus) connect to the pod IP, never the pod's loopback."""
    for workload, _, container in _revive_containers(docs):
        settings = _settings_for(docs, container, tmp_path)
        assert settings.host in ("0.0.0.0", "::"), workload["metadata"]["name"]
        assert settings.port == SIDECAR_PORT
        # ...while workers still reach the proxy and the worker routes only over loopback.
        assert settings.workers_from_any_address is False


def test_grace_period_covers_the_sidecar_shutdown(docs: list[Doc]) -> None:
    # aiohttp's shutdown_timeout (revive.app.start_site) is 10 s, then ledger writes drain.
    for workload, pod, container in _revive_containers(docs):
        grace = pod["terminationGracePeriodSeconds"]
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        assert grace >= 15 + pre_stop.get("seconds", 0), workload["metadata"]["name"]
        if container in pod.get("initContainers", []):
            # A native sidecar is stopped after the main containers: leave them time too.
            assert grace >= 45, workload["metadata"]["name"]


# -- Secrets and the ConfigMap ------------------------------------------------------------------


def _config_text(docs: list[Doc], pod: Doc, container: Doc) -> str:
    mount_dir, _, key = CONFIG_PATH.rpartition("/")
    mount = _mounts(container)[mount_dir]
    assert mount.get("readOnly") is True
    volume = _volume(pod, mount["name"])
    configmap = _one(docs, "ConfigMap", volume["configMap"]["name"])
    text: str = configmap["data"][key]
    return text


def _settings_for(docs: list[Doc], container: Doc, tmp_path: Path) -> Settings:
    """Load the ConfigMap's revive.yaml as this container would (file + its REVIVE_* env)."""
    pod = next(p for _, p, c in _revive_containers(docs) if c is container)
    path = tmp_path / "revive.yaml"
    path.write_text(_config_text(docs, pod, container))
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"].get("secretKeyRef", {}).get("name") == STORE_SECRET:
            env[item["name"]] = "postgresql://revive@postgres.db.svc:5432/revive"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return load_settings(path)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_configmap_settings_load_and_fit_the_image(docs: list[Doc], tmp_path: Path) -> None:
    for workload, _, container in _revive_containers(docs):
        settings = _settings_for(docs, container, tmp_path)
        who = workload["metadata"]["name"]
        assert settings.data_dir == Path("/var/lib/revive"), who
        assert settings.admin_token_path == Path("/var/lib/revive/admin-token"), who
        assert settings.policy_dir == Path("/opt/revive/policies"), who
        # Every connection names a policy the image ships (the Dockerfile copies policies/).
        resolve_policies(settings.model_copy(update={"policy_dir": ROOT / "policies"}))
        # Files the connections read live on the read-only connections Secret mount.
        mounts = _mounts(container)
        for conn in settings.connections:
            for field in ("client_secret_file", "refresh_token_file", "tokens_file"):
                file = getattr(conn.source, field, None)
                if file is not None:
                    assert str(file.parent) in mounts, f"{who}: {conn.id}.{field} not mounted"
                    assert mounts[str(file.parent)].get("readOnly") is True


def _copy_script(pod: Doc) -> tuple[Doc, str]:
    init = _container(pod, "revive-secrets", init=True)
    assert init["command"] == ["/bin/sh", "-c"]
    script: str = init["args"][0]
    return init, script


def test_keys_and_admin_token_come_from_secrets(docs: list[Doc], tmp_path: Path) -> None:
    for workload, pod, container in _revive_containers(docs):
        who = workload["metadata"]["name"]
        init, script = _copy_script(pod)
        settings = _settings_for(docs, container, tmp_path)
        init_mounts = _mounts(init)
        # The copy writes into the very volume the sidecar uses as its data dir...
        data = str(settings.data_dir)
        assert init_mounts[data]["name"] == _mounts(container)[data]["name"], who
        assert f"{data}/keys" in script and str(settings.admin_token_path) in script, who
        # ...from read-only Secret volumes; the sidecar itself does not mount them.
        for sub, secret in (("keys", KEYS_SECRET), ("admin", ADMIN_SECRET)):
            mount = init_mounts[f"{SECRETS_MOUNT}/{sub}"]
            assert mount.get("readOnly") is True, who
            volume = _volume(pod, mount["name"])
            assert volume["secret"]["secretName"] == secret, who
            assert not volume["secret"].get("optional"), f"{who}: {secret} must not be optional"
            assert f"{SECRETS_MOUNT}/{sub}/" in script
            assert mount["name"] not in {m["name"] for m in container["volumeMounts"]}, who
        admin = _volume(pod, init_mounts[f"{SECRETS_MOUNT}/admin"]["name"])["secret"]
        assert [i["key"] for i in admin.get("items", [])] in ([], ["admin-token"])
        # Owner-only files; readable by the pod's fsGroup, which kubelet adds to Secret files.
        assert pod["securityContext"]["fsGroup"] == UID


def _run_copy_script(
    script: str, data_dir: Path, secrets_dir: Path
) -> subprocess.CompletedProcess[str]:
    """Run the init container's script with its paths moved under tmp directories."""
    local = script.replace("/var/lib/revive", str(data_dir))
    local = local.replace(SECRETS_MOUNT, str(secrets_dir))
    return subprocess.run(["/bin/sh", "-c", local], capture_output=True, text=True, timeout=10)


def _secret_files(doc: Doc) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in doc["data"].items()}


def test_make_secrets_output_works_with_the_copy_script(
    rendered: dict[str, list[Doc]], tmp_path: Path
) -> None:
    """deploy/k8s/make_secrets.py -> Secrets -> revive-secrets copy -> the sidecar's keyring."""
    if not Path("/bin/sh").exists() or shutil.which("install") is None:
        pytest.skip("needs /bin/sh and coreutils install")
    keys_dir = tmp_path / "keep"
    proc = subprocess.run(
        [sys.executable, str(K8S / "make_secrets.py"), "--keys-dir", str(keys_dir), "-n", "x"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = {d["metadata"]["name"]: d for d in yaml.safe_load_all(proc.stdout)}
    assert set(out) == {KEYS_SECRET, ADMIN_SECRET}
    for doc in out.values():
        kv.validate(doc, _k8s_version(), strict=True)
    key_files = _secret_files(out[KEYS_SECRET])
    assert len(key_files) == 1 and all(KEY_NAME.match(name) for name in key_files)
    assert list(_secret_files(out[ADMIN_SECRET])) == ["admin-token"]

    # Lay the Secrets out as kubelet mounts them, with group/other bits the sidecar refuses.
    secrets_dir = tmp_path / "secrets"
    for sub, doc in (("keys", out[KEYS_SECRET]), ("admin", out[ADMIN_SECRET])):
        (secrets_dir / sub).mkdir(parents=True)
        for name, value in _secret_files(doc).items():
            (secrets_dir / sub / name).write_bytes(value)
            (secrets_dir / sub / name).chmod(0o440)

    _, script = _copy_script(_pod(_one(rendered["base"], "Deployment", "revive-worker")))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # A stale key left in a persistent data dir must not keep verifying.
    (data_dir / "keys").mkdir(mode=0o700)
    stale = data_dir / "keys" / f"{'0' * 20}-{'A' * 43}.pem"
    stale.write_text("stale")
    for _ in range(2):  # idempotent: a restarted pod runs it again over the same volume
        result = _run_copy_script(script, data_dir, secrets_dir)
        assert result.returncode == 0, result.stderr
    assert not stale.exists()
    copied = sorted((data_dir / "keys").iterdir())
    assert [p.name for p in copied] == list(key_files)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in copied)
    assert (data_dir / "keys").stat().st_mode & 0o777 == 0o700

    async def load() -> tuple[Keyring, AdminAuth]:
        return (await Keyring.load_or_create(data_dir / "keys"),
                await AdminAuth.load_or_create(data_dir / "admin-token"))

    keyring, _ = asyncio.run(load())
    kid = next(iter(key_files)).removesuffix(".pem").split("-", 1)[1]
    assert keyring.kids == (kid,), "the sidecar must sign with the shared key, not a new one"
    assert (data_dir / "admin-token").stat().st_mode & 0o777 == 0o600


def test_copy_script_refuses_keys_the_sidecar_would_ignore(
    rendered: dict[str, list[Doc]], tmp_path: Path
) -> None:
    if not Path("/bin/sh").exists() or shutil.which("install") is None:
        pytest.skip("needs /bin/sh and coreutils install")
    _, script = _copy_script(_pod(_one(rendered["base"], "Deployment", "revive-worker")))
    secrets_dir, data_dir = tmp_path / "secrets", tmp_path / "data"
    (secrets_dir / "keys").mkdir(parents=True)
    (secrets_dir / "admin").mkdir()
    (secrets_dir / "admin" / "admin-token").write_text("x" * 43)
    data_dir.mkdir()
    empty = _run_copy_script(script, data_dir, secrets_dir)
    assert empty.returncode != 0 and "holds no *.pem" in empty.stderr
    # `openssl genpkey -algorithm ed25519 -out signing.pem`, not renamed.
    (secrets_dir / "keys" / "signing.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    misnamed = _run_copy_script(script, data_dir, secrets_dir)
    assert misnamed.returncode != 0 and "is not named" in misnamed.stderr


# -- revive-control, the NetworkPolicies, the overlays -----------------------------------------


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and labels.get(expr["key"]) in expr["values"]:
            return False
        if expr["operator"] == "Exists" and expr["key"] not in labels:
            return False
    return True


def test_control_service_reaches_a_revive_listener(docs: list[Doc], tmp_path: Path) -> None:
    service = _one(docs, "Service", "revive-control")
    selected = [
        (w, c) for w, _, c in _revive_containers(docs)
        if _selects({"matchLabels": service["spec"]["selector"]},
                    w["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(selected) == 1, "revive-control must select exactly one kind of revive pod"
    workload, container = selected[0]
    (port,) = service["spec"]["ports"]
    assert _port(container, port["targetPort"]) == SIDECAR_PORT
    settings = _settings_for(docs, container, tmp_path)
    assert settings.host == "0.0.0.0" and settings.workers_from_any_address is False


def test_network_policies(docs: list[Doc], target: str) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    allowed_egress = {(53, "UDP"), (53, "TCP"), (443, "TCP")}
    if target == "postgres":
        allowed_egress.add((5432, "TCP"))
    for workload in _workloads(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        types = {t for p in mine for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, workload["metadata"]["name"]
        for policy in mine:
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from"), f"{policy['metadata']['name']}: ingress from anywhere"
                for peer in rule["from"]:
                    assert "ipBlock" not in peer
                assert {p["port"] for p in rule["ports"]} == {SIDECAR_PORT}
            for rule in policy["spec"].get("egress", []):
                ports = {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]}
                assert ports <= allowed_egress, policy["metadata"]["name"]
    ports = {
        (p["port"], p.get("protocol", "TCP"))
        for pol in policies for r in pol["spec"].get("egress", []) for p in r["ports"]
    }
    assert ports == allowed_egress


def test_sqlite_overlay_is_one_pod_on_a_volume(rendered: dict[str, list[Doc]],
                                               tmp_path: Path) -> None:
    docs = rendered["sqlite"]
    worker = _one(docs, "Deployment", "revive-worker")
    assert worker["spec"]["replicas"] == 1
    assert worker["spec"]["strategy"] == {"type": "Recreate"}
    assert _maybe(docs, "Deployment", "revive-control") is None
    assert len(_workloads(docs)) == 1
    pod = _pod(worker)
    data = _volume(pod, _mounts(_sidecar(docs))["/var/lib/revive"]["name"])
    claim = data["persistentVolumeClaim"]["claimName"]
    assert "emptyDir" not in data
    _one(docs, "PersistentVolumeClaim", claim)
    settings = _settings_for(docs, _sidecar(docs), tmp_path)
    assert settings.store_url == "sqlite:////var/lib/revive/revive.db"
    # Not the pod name (it changes with every pod): a replacement sweeps its predecessor's rows.
    assert settings.sidecar_id == "revive-sqlite"


def test_postgres_overlay_shares_one_store(rendered: dict[str, list[Doc]],
                                           tmp_path: Path) -> None:
    docs = rendered["postgres"]
    worker = _one(docs, "Deployment", "revive-worker")
    control = _one(docs, "Deployment", "revive-control")
    assert worker["spec"]["replicas"] >= 2 and control["spec"]["replicas"] >= 2
    revives = list(_revive_containers(docs))
    assert len(revives) == 2
    for workload, _, container in revives:
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env["REVIVE_STORE"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == STORE_SECRET and ref["key"] == "url", workload["metadata"]["name"]
        assert not ref.get("optional")
        settings = _settings_for(docs, container, tmp_path)
        assert settings.store_url.startswith("postgresql://")
    # The pods' sidecars and revive-control must verify each other's capabilities.
    for _, pod, _c in revives:
        volume = _volume(pod, _mounts(_container(pod, "revive-secrets", init=True))[
            f"{SECRETS_MOUNT}/keys"]["name"])
        assert volume["secret"]["secretName"] == KEYS_SECRET
    pdb = _one(docs, "PodDisruptionBudget", "revive-control")
    assert _selects(pdb["spec"]["selector"], control["spec"]["template"]["metadata"]["labels"])


# -- the image --------------------------------------------------------------------------------


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuations joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        instr, _, rest = line.partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        stages[-1].append((instr.upper(), rest.strip()))
    return stages


def test_dockerfile_final_stage() -> None:
    preamble, *stages = _stages()
    assert len(stages) >= 2, "multi-stage: a builder and a final stage"
    args = dict(a.split("=", 1) for i, a in preamble if i == "ARG" and "=" in a)
    final = stages[-1]
    builder_from = stages[0][0][1].split()[0]
    final_from = final[0][1].split()[0]
    assert final_from == builder_from, "the venv links to the builder's interpreter"
    base = args.get(final_from.strip("${}"), final_from)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base

    instructions = [i for i, _ in final]
    body = "\n".join(rest for _, rest in final)
    users = [rest for i, rest in final if i == "USER"]
    assert users, "the final stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == UID, "numeric, so runAsNonRoot can verify it"
    for tool in ("gcc", "g++", "cc ", "build-essential", "make ", "apt-get install", "pip install"):
        assert tool not in body, f"final stage mentions {tool!r}"
    assert "COPY --from=builder /opt/revive/venv /opt/revive/venv" in [
        f"COPY {rest}" for i, rest in final if i == "COPY"
    ]
    assert "COPY policies /opt/revive/policies" in [f"COPY {r}" for i, r in final if i == "COPY"]
    env = " ".join(rest for i, rest in final if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert ("ENTRYPOINT", '["revive"]') in final
    assert ("CMD", f'["serve", "--config", "{CONFIG_PATH}"]') in final
    assert ("EXPOSE", str(SIDECAR_PORT)) in final
    assert instructions.index("USER") > max(
        n for n, i in enumerate(instructions) if i in ("RUN", "COPY")
    ), "USER comes after every RUN and COPY"


def test_dockerfile_copies_only_what_the_context_keeps() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in _stages()[1:]:
        for instr, rest in stage:
            if instr == "COPY" and not rest.startswith("--from"):
                *sources, _dest = shlex.split(rest)
                for src in sources:
                    assert src.rstrip("/") in kept, f"{src} is excluded from the build context"
                    assert (ROOT / src).exists(), src


def test_image_default_config_loads() -> None:
    settings = load_settings(DEPLOY / "revive.yaml")
    assert settings.port == SIDECAR_PORT and settings.workers_from_any_address is False
    assert settings.data_dir == Path("/var/lib/revive")
    resolve_policies(settings.model_copy(update={"policy_dir": ROOT / "policies"}))
