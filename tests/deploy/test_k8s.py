"""deploy/k8s: the sharded job's kustomization, rendered without a cluster and checked against the
Kubernetes API schema, the daemon's and the worker's real parsers, and itself (selectors, ports,
the job's shape set in one place, grace period against snapshot time, Secrets)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from paramserve.server import cli, demo, healthcheck
from paramserve.server.app import create_server
from tests.deploy.k8s_schema import schema_errors
from tests.deploy.kustomize import containers, render, split_image
from tests.deploy.manifests import (
    argv_of_started_command,
    container,
    env_entry,
    job_shape,
    mounted_files,
    one,
    pod_spec,
    port_of,
    quantity,
    resolve_env,
)
from tests.support.processes import REPO

K8S = REPO / "deploy" / "k8s"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
POD_INDEX = "apps.kubernetes.io/pod-index"
# The slowest disk the grace period is sized for (statefulset.yaml says the same).
SLOW_DISK_BYTES_PER_S = 50 * 2**20
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(K8S)


@pytest.fixture(scope="module")
def secrets() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(SECRETS_EXAMPLE.read_text()) if doc]


def _sources(objects: list[dict], secrets: list[dict]) -> dict[tuple[str, str], set[str]]:
    """Each Secret's and ConfigMap's keys, by (kind, name)."""
    out = {}
    for obj in [*objects, *secrets]:
        if obj["kind"] in ("Secret", "ConfigMap"):
            keys = {*obj.get("data", {}), *obj.get("stringData", {})}
            out[(obj["kind"], obj["metadata"]["name"])] = keys
    return out


def _toml_config(objects: list[dict], tmp_path: Path) -> Path:
    path = tmp_path / "paramserve.toml"
    path.write_text(one(objects, "ConfigMap", "ps-config")["data"]["paramserve.toml"])
    return path


def _shard_config(objects: list[dict], tmp_path: Path, *, index: int = 0):
    """The ServerConfig shard ``index`` starts with: its args, environment and the TOML."""
    sts = one(objects, "StatefulSet", "ps")
    c = container(sts, "paramserve")
    labels = {**sts["spec"]["template"]["metadata"]["labels"], POD_INDEX: str(index)}
    env = resolve_env(c, pod_labels=labels)
    args = cli.build_parser().parse_args(["serve", *c["args"]])
    mounted = args.config
    args.config = str(_toml_config(objects, tmp_path))
    return cli.config_from_args(args, env=env), mounted, env


def _worker_argv(objects: list[dict], job: str, tmp_path: Path, *, index: int) -> list[str]:
    obj = one(objects, "Job", job)
    c = obj["spec"]["template"]["spec"]["containers"][0]
    env = resolve_env(c, pod_labels={})
    if obj["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = str(index)  # what the Job controller adds
    argv = argv_of_started_command(c, env, "paramserve", tmp_path)
    assert argv[0] == "worker", argv
    return argv[1:]


def _check_shape(objects: list[dict], shards: int, workers: int, tmp_path: Path) -> None:
    sts = one(objects, "StatefulSet", "ps")
    service = one(objects, "Service", "ps")
    port = port_of(container(sts, "paramserve"), "grpc")
    assert sts["spec"]["replicas"] == shards
    config, _, env = _shard_config(objects, tmp_path)
    assert (config.shards, env["PARAMSERVE_SHARDS"]) == (shards, str(shards))
    assert config.aggregation.replicas == workers  # one synchronous round: every worker
    addresses = ",".join(f"ps-{i}.{service['metadata']['name']}:{port}" for i in range(shards))
    create = demo.build_worker_parser().parse_args(
        _worker_argv(objects, "ps-create-model", tmp_path, index=0)
    )
    assert (create.address, create.steps) == (addresses, 0)
    job = one(objects, "Job", "ps-worker")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers
    for rank in (0, workers - 1):
        args = demo.build_worker_parser().parse_args(
            _worker_argv(objects, "ps-worker", tmp_path, index=rank)
        )
        assert (args.address, args.rank, args.workers) == (addresses, rank, workers)
        assert args.steps > 0


# -- the build itself --------------------------------------------------------------------


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_the_python_render_is_what_kubectl_kustomize_outputs(objects):
    out = subprocess.run(
        [KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    by_key = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    assert by_key == {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_every_object_and_the_secrets_template_match_the_api_schema(objects, secrets):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in [*objects, *secrets])
    assert kinds == [
        ("ConfigMap", "ps-config"),
        ("Job", "ps-create-model"),
        ("Job", "ps-worker"),
        ("PodDisruptionBudget", "ps"),
        ("Secret", "ps-tls"),
        ("Secret", "ps-tokens"),
        ("Service", "ps"),
        ("StatefulSet", "ps"),
    ]
    for obj in [*objects, *secrets]:
        assert schema_errors(obj) == [], obj["metadata"]["name"]


def test_the_image_is_named_in_one_place(objects):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for c in containers(doc or {}):
                assert c["image"] == image["name"], f"{path.name}: {c['name']} names a tag"
    images = {c["image"] for obj in objects for c in containers(obj)}
    assert images == {expected}
    assert split_image(expected)[0] == image["newName"]


# -- the job's shape ----------------------------------------------------------------------


def test_shards_and_workers_follow_the_job_shape(objects, tmp_path):
    shape = job_shape(K8S / "kustomization.yaml")
    assert shape == {"shards": 3, "workers": 2}
    _check_shape(objects, shape["shards"], shape["workers"], tmp_path)


def test_changing_the_one_number_changes_everything(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("- shards=3\n") == 1 and text.count("- workers=2\n") == 1
    text = text.replace("- shards=3\n", "- shards=5\n").replace("- workers=2\n", "- workers=4\n")
    kustomization.write_text(text)
    _check_shape(render(copy), 5, 4, tmp_path)


def test_each_shard_takes_its_index_from_its_pod_ordinal(objects, tmp_path):
    sts = one(objects, "StatefulSet", "ps")
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    index = env_entry(container(sts, "paramserve"), "PARAMSERVE_SHARD_INDEX")
    assert index["valueFrom"] == {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX}']"}}
    config, _, _ = _shard_config(objects, tmp_path, index=2)
    assert (config.shard_index, config.shards) == (2, sts["spec"]["replicas"])


# -- the shards ---------------------------------------------------------------------------


def test_the_headless_service_names_the_stateful_set_pods(objects):
    sts = one(objects, "StatefulSet", "ps")
    service = one(objects, "Service", "ps")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = container(sts, "paramserve")
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert port["port"] == port_of(c, target if isinstance(target, str) else port["name"])


def test_the_daemon_starts_with_the_manifests_settings(objects, secrets, tmp_path):
    config, mounted_config, _ = _shard_config(objects, tmp_path)
    sts = one(objects, "StatefulSet", "ps")
    c = container(sts, "paramserve")
    files = mounted_files(sts, c, sources=_sources(objects, secrets))
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert config.host == "0.0.0.0"
    assert config.port == port_of(c, "grpc")
    assert config.metrics_port == port_of(c, "metrics")
    assert {mounted_config, str(config.tls_cert), str(config.tls_key)} <= files
    assert config.checkpoint_dir is not None
    assert config.checkpoint_dir.is_relative_to(mounts["snapshots"])
    assert config.resume and config.snapshot_on_exit and config.snapshot_every_s > 0
    assert config.admin_tokens and config.worker_tokens
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "snapshots"


def test_probes_ask_the_health_service_on_the_serving_port(objects, secrets):
    sts = one(objects, "StatefulSet", "ps")
    c = container(sts, "paramserve")
    files = mounted_files(sts, c, sources=_sources(objects, secrets))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        if "grpc" in probe:  # native probe: plaintext only
            assert probe["grpc"]["port"] == port_of(c, "grpc"), kind
            continue
        command = probe["exec"]["command"]
        assert command[:3] == ["python", "-m", "paramserve.server.healthcheck"], kind
        args = healthcheck.build_parser().parse_args(command[3:])
        assert args.address == f"127.0.0.1:{port_of(c, 'grpc')}", kind
        assert str(args.tls_ca) in files, kind
        assert args.timeout_s < probe["timeoutSeconds"], kind
    # Resuming a snapshot comes before serving: the startup probe gives it minutes.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_the_probe_command_passes_against_a_shard_and_a_plaintext_probe_would_not(
    objects, pki, tmp_path, capsys
):
    config, _, _ = _shard_config(objects, tmp_path)
    # The manifests' settings, with this machine's files and a free port.
    config = config.replace(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        checkpoint_dir=str(tmp_path / "snapshots"),
        tls_cert=str(pki.server_cert),  # names localhost, as secrets.example.yaml asks
        tls_key=str(pki.server_key),
        log_level="warning",
    )
    c = container(one(objects, "StatefulSet", "ps"), "paramserve")
    argv = c["readinessProbe"]["exec"]["command"][3:]
    server = create_server(config)
    try:
        local = [
            f"--address=127.0.0.1:{server.port}" if a.startswith("--address=") else a for a in argv
        ]
        local = [f"--tls-ca={pki.ca}" if a.startswith("--tls-ca=") else a for a in local]
        assert healthcheck.main(local) == 0, capsys.readouterr().out
        # What the kubelet's native grpc probe does: plaintext, no certificate.
        assert healthcheck.check(f"127.0.0.1:{server.port}", timeout_s=3) != "SERVING"
    finally:
        server.stop(0)
    assert healthcheck.main(local) == 1


def test_the_grace_period_covers_draining_and_two_snapshots(objects, tmp_path):
    config, _, _ = _shard_config(objects, tmp_path)
    sts = one(objects, "StatefulSet", "ps")
    snapshot_s = config.limits.max_state_bytes / SLOW_DISK_BYTES_PER_S
    # A periodic snapshot in progress is finished first, then the final one is written.
    needed = config.grace_s + 2 * snapshot_s
    assert pod_spec(sts)["terminationGracePeriodSeconds"] >= needed


def test_memory_and_volume_are_sized_from_max_state_bytes(objects, tmp_path):
    config, _, _ = _shard_config(objects, tmp_path)
    state = config.limits.max_state_bytes
    sts = one(objects, "StatefulSet", "ps")
    resources = container(sts, "paramserve")["resources"]
    assert quantity(resources["limits"]["memory"]) >= 4 * state
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    storage = quantity(claim["spec"]["resources"]["requests"]["storage"])
    assert config.keep_snapshots is not None
    assert storage >= (config.keep_snapshots + 1) * state


def test_the_disruption_budget_covers_the_shards_one_at_a_time(objects):
    sts = one(objects, "StatefulSet", "ps")
    pdb = one(objects, "PodDisruptionBudget", "ps")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1  # pdb.yaml argues why not 0
    assert "minAvailable" not in pdb["spec"]


# -- the workers --------------------------------------------------------------------------


def test_workers_get_the_ca_and_only_the_token_their_role_needs(objects, secrets, tmp_path):
    sources = _sources(objects, secrets)
    roles = (("ps-create-model", "admin-token", 0), ("ps-worker", "worker-token", 1))
    for job, key, index in roles:
        obj = one(objects, "Job", job)
        c = obj["spec"]["template"]["spec"]["containers"][0]
        token = env_entry(c, "PARAMSERVE_TOKEN")["valueFrom"]["secretKeyRef"]
        assert token == {"name": "ps-tokens", "key": key}
        args = demo.build_worker_parser().parse_args(
            _worker_argv(objects, job, tmp_path, index=index)
        )
        assert mounted_files(obj, c, sources=sources) == {str(args.tls_ca)}  # no server key
        assert float(env_entry(c, "PARAMSERVE_WAIT_FOR_SERVER_S")["value"]) > 0
    worker = one(objects, "Job", "ps-worker")
    assert worker["spec"]["completionMode"] == "Indexed"


# -- every pod ----------------------------------------------------------------------------


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("StatefulSet", "Job")]


def test_every_pod_runs_locked_down_as_the_image_user(objects):
    (user,) = re.findall(r"^USER (\d+):(\d+)$", (REPO / "deploy/Dockerfile").read_text(), re.M)
    for obj in _workloads(objects):
        spec = pod_spec(obj)
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False  # no PARAMSERVE_PORT=tcp://... injected
        for c in spec["containers"]:
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, where
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) == {"cpu", "memory"}, where


def test_every_reference_resolves(objects, secrets):
    sources = _sources(objects, secrets)
    for obj in _workloads(objects):
        spec = pod_spec(obj)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"]:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes | claims, mount
            mounted_files(obj, c, sources=sources)  # asserts every item's key exists
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in sources[("Secret", ref["name"])], ref


def test_the_secrets_template_holds_placeholders_only(secrets):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert SECRETS_EXAMPLE.name not in kustomization["resources"]
    for secret in secrets:
        assert "data" not in secret
        for key, value in secret["stringData"].items():
            assert value.startswith("REPLACE-ME"), key
    for path in K8S.iterdir():
        assert "-----BEGIN" not in path.read_text(), path.name
