"""deploy/: the container image, compose file and systemd unit, checked without a Docker engine.

The files are parsed and their command lines run through the real argument parsers; the
compose workers are run for real against a server started with the compose server's flags;
the health probe is run against live, draining and dead servers; the wheel the image
installs is built and inspected.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from paramserve.client import Client, UnauthenticatedError
from paramserve.server import cli, demo, healthcheck
from paramserve.server.app import create_server
from paramserve.server.config import ServerConfig, load_config
from tests.support.processes import REPO, clean_env, free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions ``(KEYWORD, arguments)`` per stage; continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            continue
        stages[-1].append((keyword, rest.strip()))
    return stages


def _one(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for k, rest in stage if k == keyword]
    assert len(values) == 1, f"expected one {keyword}, found {len(values)}"
    return values[0]


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)  # shell form would not parse: signals must reach the server
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def _env_pairs(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


STAGES = dockerfile_stages(DEPLOY / "Dockerfile")
RUNTIME = STAGES[-1]


def test_dockerfile_is_multi_stage_and_the_runtime_installs_the_builders_wheels():
    assert len(STAGES) >= 2
    froms = [
        line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line[:5] == "FROM "
    ]
    assert re.search(r" AS builder$", froms[0]) and "slim" in froms[-1]
    builder_runs = " ".join(rest for k, rest in STAGES[0] if k == "RUN")
    assert "pip wheel" in builder_runs and "--wheel-dir /wheels" in builder_runs
    runtime_runs = " ".join(rest for k, rest in RUNTIME if k == "RUN")
    assert "from=builder" in runtime_runs and "--no-index" in runtime_runs
    assert "--find-links=/wheels paramserve" in runtime_runs


def test_dockerfile_copies_every_package_of_the_wheel():
    copied = set()
    for keyword, rest in STAGES[0]:
        if keyword == "COPY":
            *sources, _ = rest.split()
            copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    for source in copied:
        assert (REPO / source).exists(), source
    package_dirs = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    for directory in package_dirs:
        assert directory.split("/")[0] in copied, f"{directory} is not copied into the build"
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    # The build context's ignore file lets all of it through.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


def test_runtime_runs_as_non_root_with_an_exec_form_entrypoint_and_health_probe():
    user = _one(RUNTIME, "USER").split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    assert _exec_form(_one(RUNTIME, "ENTRYPOINT")) == ["paramserve", "serve"]
    assert "paramserve" in PYPROJECT["project"]["scripts"]
    assert _one(RUNTIME, "STOPSIGNAL") == "SIGTERM"
    healthcheck_line = _one(RUNTIME, "HEALTHCHECK")
    options, _, command = healthcheck_line.partition(" CMD ")
    probe = _exec_form(command)
    assert probe[:3] == ["python", "-m", "paramserve.server.healthcheck"]
    healthcheck.build_parser().parse_args(probe[3:])
    assert "--timeout=" in options and "--interval=" in options


def test_default_command_binds_all_interfaces_and_snapshots_into_the_volume():
    args = cli.build_parser().parse_args(["serve", *_exec_form(_one(RUNTIME, "CMD"))])
    config = cli.config_from_args(args, env=_env_pairs(RUNTIME))
    assert config.host == "0.0.0.0" and config.port == 50051
    volumes = _exec_form(_one(RUNTIME, "VOLUME"))
    assert str(config.checkpoint_dir) in volumes
    assert config.resume and config.snapshot_every_s > 0 and config.keep_snapshots
    assert config.log_format == "json" and config.metrics_port
    exposed = set(_one(RUNTIME, "EXPOSE").split())
    assert {str(config.port), str(config.metrics_port)} <= exposed
    assert _one(RUNTIME, "WORKDIR") in volumes


def test_dockerfile_holds_no_secrets():
    for stage in STAGES:
        for keyword, rest in stage:
            if keyword in ("ARG", "ENV"):
                assert not SECRET_NAME.search(rest), rest
            if keyword == "COPY":
                assert not re.search(r"\.(pem|key|crt)\b|token", rest, re.IGNORECASE), rest


# -- compose ----------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _server_config_from_compose() -> ServerConfig:
    args = cli.build_parser().parse_args(["serve", *COMPOSE["services"]["server"]["command"]])
    return cli.config_from_args(args, env={})


def test_compose_runs_a_sync_server_and_two_workers_after_it_is_healthy():
    services = COMPOSE["services"]
    assert set(services) == {"server", "worker-0", "worker-1"}
    server = services["server"]
    assert server["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    config = _server_config_from_compose()
    agg = config.aggregation
    assert (agg.mode, agg.replicas, config.host) == ("sync", 2, "0.0.0.0")
    assert config.resume and config.snapshot_every_s > 0
    volume, _, target = server["volumes"][0].partition(":")
    assert volume in COMPOSE["volumes"] and Path(target) == config.checkpoint_dir
    assert server["healthcheck"]["test"][:4] == [
        "CMD",
        "python",
        "-m",
        "paramserve.server.healthcheck",
    ]
    assert all(p.startswith("127.0.0.1:") for p in server["ports"])  # loopback of the host
    ranks = set()
    for name in ("worker-0", "worker-1"):
        worker = services[name]
        assert worker["depends_on"] == {"server": {"condition": "service_healthy"}}
        assert worker["entrypoint"] == ["paramserve", "worker"]
        assert worker["image"] == server["image"]
        args = demo.build_worker_parser().parse_args(worker["command"])
        assert (args.address, args.workers) == ("server:50051", config.aggregation.replicas)
        ranks.add(args.rank)
    assert ranks == {0, 1}


def _compose_server_flags(checkpoint_dir: Path) -> list[str]:
    """The compose server's flags on loopback, without the container's paths and ports."""
    flags = []
    for flag in COMPOSE["services"]["server"]["command"]:
        name = flag.split("=")[0]
        if name in ("--host", "--metrics-port"):
            continue
        if name == "--checkpoint-dir":
            flag = f"--checkpoint-dir={checkpoint_dir}"
        flags.append(flag)
    return flags


def _worker_command(service: str, address: str, steps: int) -> list[str]:
    args = list(COMPOSE["services"][service]["command"])
    args[args.index("--address") + 1] = address
    args[args.index("--steps") + 1] = str(steps)
    return [sys.executable, "-m", "paramserve.server", "worker", *args]


@pytest.mark.slow
def test_compose_workers_train_against_the_compose_server_and_it_resumes(start_process, tmp_path):
    ckpt = tmp_path / "snapshots"
    flags = _compose_server_flags(ckpt)
    server = start_process(*flags)
    steps = 12
    workers = [
        subprocess.Popen(
            _worker_command(name, server.address, steps),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
        )
        for name in ("worker-0", "worker-1")
    ]
    outputs = []
    for worker in workers:
        out, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, out
        outputs.append(out)
    # One of them created the model, the other found it (idempotent); both saw every round.
    created = sorted("model created" in out for out in outputs)
    assert created == [False, True], outputs
    for out in outputs:
        assert f"done after {steps} steps at version {steps}:" in out, out
    assert server.stop() == 0  # compose down: SIGTERM, final snapshot
    resumed = start_process(*flags)  # compose up again (the flags include --resume)
    assert resumed.wait_for_event("resumed")["version"] == steps
    assert resumed.stop() == 0


# -- systemd ------------------------------------------------------------------------------------


def systemd_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, line
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.append((key, value))
    return sections


UNIT = systemd_unit(DEPLOY / "paramserve.service")


def _unit_value(section: str, key: str) -> str:
    values = [v for k, v in UNIT[section] if k == key]
    assert len(values) == 1, f"{key}= appears {len(values)} times in [{section}]"
    return values[0]


def test_systemd_unit_runs_the_entry_point_as_a_hardened_non_root_service():
    assert _unit_value("Service", "User") not in ("", "root", "0")
    argv = shlex.split(_unit_value("Service", "ExecStart"))
    assert Path(argv[0]).name in PYPROJECT["project"]["scripts"] and argv[1] == "serve"
    args = cli.build_parser().parse_args(argv[1:])
    assert Path(args.config).name == "paramserve.toml"
    config = load_config(config_file=DEPLOY / "paramserve.toml", env={})
    assert config.resume and config.keep_snapshots and config.snapshot_on_exit
    assert config.host == "127.0.0.1"  # the example stays on loopback until TLS is set up
    assert _unit_value("Service", "Restart") == "on-failure"
    assert _unit_value("Service", "KillSignal") == "SIGTERM"
    assert float(_unit_value("Service", "TimeoutStopSec")) > config.grace_s + 30
    assert _unit_value("Service", "EnvironmentFile").lstrip("-").startswith("/etc/paramserve/")
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict")):
        assert _unit_value("Service", key) == value
    for key in ("ProtectHome", "PrivateTmp", "RestrictSUIDSGID", "LockPersonality"):
        assert _unit_value("Service", key) == "yes"
    assert "paramserve.server.healthcheck" in _unit_value("Service", "ExecStartPost")
    assert _unit_value("Install", "WantedBy") == "multi-user.target"
    # Tokens only through the EnvironmentFile: never in the unit itself.
    for key, value in UNIT["Service"]:
        assert not (key == "Environment" and SECRET_NAME.search(value)), value
    example = (DEPLOY / "paramserve.env.example").read_text().splitlines()
    assert not [line for line in example if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_accepts_the_unit():
    out = subprocess.run(
        ["systemd-analyze", "verify", str(DEPLOY / "paramserve.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        # The venv is not installed on the test machine.
        if line.strip() and "/opt/paramserve/venv/bin/paramserve is not executable" not in line
    ]
    assert not problems, problems


# -- the health probe ---------------------------------------------------------------------------


def _probe(*args: str, **env: str) -> tuple[int, str, float]:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "paramserve.server.healthcheck", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
    )
    return out.returncode, out.stdout + out.stderr, time.monotonic() - started


def test_health_probe_exits_0_only_while_serving():
    server = create_server(ServerConfig(port=0, log_level="warning"))
    try:
        code, out, _ = _probe("--address", server.address)
        assert (code, out.strip()) == (0, f"{server.address}: SERVING")
        code, out, _ = _probe(PARAMSERVE_PORT=str(server.port))  # the container's default
        assert code == 0, out
        code, out, _ = _probe(
            "--address", server.address, "--service", "paramserve.v1.ParameterServer"
        )
        assert code == 0, out
        code, out, _ = _probe("--address", server.address, "--service", "no.such.Service")
        assert (code, out.strip()) == (1, f"{server.address}: NOT_FOUND")
        server._health.enter_graceful_shutdown()  # what the drain does first
        code, out, _ = _probe("--address", server.address)
        assert (code, out.strip()) == (1, f"{server.address}: NOT_SERVING")
    finally:
        server.stop(0)


def test_health_probe_speaks_tls_and_mutual_tls_and_needs_no_token(pki):
    tls = ServerConfig(
        port=0,
        log_level="warning",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        admin_tokens=("admin-token-the-probe-never-sends",),  # authentication is on
    )
    servers = [create_server(tls), create_server(tls.replace(tls_client_ca=pki.ca))]
    try:
        one_way, mutual = (s.address for s in servers)
        assert _probe("--address", one_way)[0] == 1  # plain text against TLS
        code, out, _ = _probe("--address", one_way, "--tls-ca", str(pki.ca))
        assert (code, out.strip()) == (0, f"{one_way}: SERVING")
        client = Client(one_way, tls_ca=pki.ca, wait_for_ready=False, timeout_s=10)
        with client, pytest.raises(UnauthenticatedError):  # the service itself wants a token
            client.status()
        name = ["--tls-server-name", "localhost"]
        assert _probe("--address", one_way, "--tls-ca", str(pki.ca), *name)[0] == 0
        assert _probe("--address", mutual, "--tls-ca", str(pki.ca))[0] == 1  # no client cert
        client = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        assert _probe("--address", mutual, "--tls-ca", str(pki.ca), *client)[0] == 0
        code, out, _ = _probe("--address", one_way, "--tls-ca", str(pki.ca) + ".missing")
        assert code == 2 and "cannot read" in out
    finally:
        for server in servers:
            server.stop(0)


def test_health_probe_fails_fast_on_a_dead_address():
    address = f"127.0.0.1:{free_port()}"
    # UNAVAILABLE, not DEADLINE_EXCEEDED: the probe gave up at the refused connection instead
    # of waiting for a server until its (long) deadline. No wall-clock bound needed.
    code, out, _ = _probe("--address", address, "--timeout-s", "50")
    assert (code, out.strip()) == (1, f"{address}: UNAVAILABLE")


def test_health_probe_imports_only_grpc():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, paramserve.server.healthcheck; "
         "print(sorted({'numpy', 'numba', 'paramserve.client'} & set(sys.modules)))"],
        capture_output=True, text=True, env=clean_env(), timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "[]"


# -- the wheel the image installs ---------------------------------------------------------------


@pytest.mark.slow
def test_wheel_contains_every_module_and_the_entry_point(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("paramserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    for package, directory in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        prefix = package.replace(".", "/")
        for source in (REPO / directory).glob("*.py"):
            assert f"{prefix}/{source.name}" in names, f"{source} is missing from the wheel"
    assert "paramserve/server/healthcheck.py" in names
    assert re.search(r"^paramserve = paramserve\.server\.cli:main$", entry_points, re.M)
    for requirement in ("grpcio-health-checking", "prometheus-client", "grpcio"):
        assert re.search(rf"^Requires-Dist: {requirement}\b", metadata, re.M | re.I), requirement
