"""The embedded server: the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel.

The wheel carries the server binary, its shared libraries, the Python backend and one backend stub
per Python version. :class:`EmbeddedServer` wires the stub of the running interpreter into a
backend directory, starts the server on loopback, waits until every model is ready, and stops it
cleanly (SIGTERM to its process group, then SIGKILL after the exit timeout) so no stub survives.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rankserve.errors import ServeError
from rankserve.server.processes import StubProcess, dead_stubs, remove_shm_regions, stub_processes
from rankserve.settings import ServeSettings
from rankserve.stages.runtime_cache import CACHE_ENV


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n\\nAt:|\"$)", re.MULTILINE)


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    libs: Path
    python_backend: Path
    stub: Path
    caches: Path | None = None
    """The folder of the response-cache libraries (``local/libtritoncache_local.so``)."""


def find_triton() -> TritonInstall:
    """Locate tritonserver, its libraries and the Python-backend stub for this interpreter."""
    try:
        import pytriton
    except ImportError:
        raise ServeError("nvidia-pytriton is not installed: `pip install -e '.[serve]'`") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=libs,
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / pyver / "triton_python_backend_stub",
        caches=root / "caches",
    )
    for path in (install.binary, install.libs, install.python_backend / "libtriton_python.so", install.stub):
        if not path.exists():
            raise ServeError(f"incomplete nvidia-pytriton install: {path} not found (Python {pyver})")
    return install


def make_backend_directory(install: TritonInstall, directory: Path) -> Path:
    """``directory/python/`` holding the Python backend and the stub of the running interpreter."""
    python = directory / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (
        install.python_backend / "libtriton_python.so",
        install.python_backend / "triton_python_backend_utils.py",
        install.stub,
    ):
        dst = python / src.name
        if not dst.exists():
            dst.symlink_to(src)
    return directory


RESPONSE_CACHE = "local"
"""The response-cache implementation the embedded server loads (``caches/local`` of the wheel)."""


def response_cache_args(install: TritonInstall, s: ServeSettings) -> list[str]:
    """The flags of Triton's in-process response cache of ``s.response_cache_bytes`` (none when 0)."""
    if not s.response_cache_bytes:
        return []
    library = (install.caches or Path("/nonexistent")) / RESPONSE_CACHE / f"libtritoncache_{RESPONSE_CACHE}.so"
    if not library.exists():
        raise ServeError(f"the response cache needs {library}, which this nvidia-pytriton install lacks")
    return [f"--cache-config={RESPONSE_CACHE},size={s.response_cache_bytes}", f"--cache-directory={install.caches}"]


ADMIN_HEADER = "rankserve-admin-key"
"""The HTTP header that unlocks Triton's restricted APIs."""
ADMIN_GRPC_METADATA = f"triton-grpc-protocol-{ADMIN_HEADER}"
"""The same over gRPC: Triton 2.51 expects the metadata key prefixed with ``triton-grpc-protocol-``."""
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
"""The APIs only a caller holding the admin key may use. ``shared-memory`` covers system and CUDA
shared memory: Triton 2.51 maps any system region a client names, the Python backend's own IPC
regions (``triton_python_backend_shm_region_*``) included. Health, metadata and inference stay open."""
_KEY = re.compile(r"[A-Za-z0-9_.~+/-]{16,256}")


def new_admin_key() -> str:
    """A random admin key (192 bits)."""
    return secrets.token_urlsafe(24)


def restricted_api_args(admin_key: str) -> list[str]:
    """Triton's flags restricting :data:`RESTRICTED_APIS` over HTTP and gRPC to callers sending
    ``rankserve-admin-key: <admin_key>``. Triton 2.51 takes the key only on its command line."""
    if not _KEY.fullmatch(admin_key or ""):
        raise ServeError("the admin key must be 16 to 256 characters of letters, digits and _.~+/-")
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}",
            f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}"]


ADMIN_KEY_FILE = "/run/secrets/triton_admin_key"
"""Where the containers mount the admin key (a compose secret, a Kubernetes Secret volume)."""


def read_admin_key(path: str | Path) -> str:
    """The admin key in the file ``path`` (one line; surrounding white space ignored)."""
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ServeError(f"cannot read the admin key file {path}: {exc.strerror}") from None
    if not _KEY.fullmatch(key):
        raise ServeError(f"the admin key in {path} must be 16 to 256 characters of letters, digits and _.~+/-")
    return key


def restricted_server_argv(command: list[str], key_file: str | Path) -> list[str]:
    """``command`` (``tritonserver FLAGS...``) with the restricted-API flags of the key in ``key_file``:
    what a container's entrypoint runs, so the key is in no image, compose file, pod spec or
    ``docker inspect`` output (it still is in tritonserver's own argv: Triton reads it nowhere else)."""
    if not command:
        raise ServeError("no server command given (after --: tritonserver FLAGS...)")
    if any(a.startswith(("--http-restricted-api", "--grpc-restricted-protocol")) for a in command):
        raise ServeError("the server command already restricts APIs: leave the restricted-API flags to this command")
    return [*command, *restricted_api_args(read_admin_key(key_file))]


def repository_stub_region_bytes(repo: Path) -> int:
    """:func:`rankserve.settings.stub_region_bytes` of the settings the repository was built with
    (read back from its tokenize and rank configurations); 0 for a folder without them."""
    from rankserve.api import TOKENIZE_MODEL
    from rankserve.builder.configs import parse
    from rankserve.settings import BatchingSettings, TokenizeSettings, from_parameters, stub_region_bytes

    tokenize = Path(repo) / TOKENIZE_MODEL / "config.pbtxt"
    if not tokenize.exists():
        return 0
    settings = from_parameters(TokenizeSettings, {k: v.string_value for k, v in parse(tokenize).parameters.items()})
    needed = 0
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        config = parse(path)
        if config.backend == "python" and "max_pairs" in config.parameters:  # a CPU rank stage
            batching = from_parameters(BatchingSettings, {k: v.string_value for k, v in config.parameters.items()})
            needed = max(needed, stub_region_bytes(settings, batching))
    return max(needed, stub_region_bytes(settings, BatchingSettings()))


_SHM_FLAG = "--backend-config=python,shm-default-byte-size="


def _flag_value(command: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``command`` (``--flag=V`` or ``--flag V``; the last one wins, as in Triton)."""
    value = None
    for i, arg in enumerate(command):
        if arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
        elif arg == flag and i + 1 < len(command):
            value = command[i + 1]
    return value


def sized_server_argv(command: list[str]) -> list[str]:
    """``command`` (``tritonserver FLAGS...``) with each Python stub's region big enough for the largest
    request its repository accepts (:func:`repository_stub_region_bytes`): a smaller or missing
    ``shm-default-byte-size`` is raised to it, so a ``deadline`` repository served by a container
    needs no hand-edited flag. The region never grows while serving (a region that must grow under
    load is what Triton reports as a failed request)."""
    repo = _flag_value(command, "--model-repository")
    needed = repository_stub_region_bytes(Path(repo)) if repo else 0
    given = [a for a in command if a.startswith(_SHM_FLAG)]
    current = int(given[-1][len(_SHM_FLAG):]) if given and given[-1][len(_SHM_FLAG):].isdigit() else 0
    if needed <= current:
        return list(command)
    return [a for a in command if not a.startswith(_SHM_FLAG)] + [f"{_SHM_FLAG}{needed}"]


def server_command(install: TritonInstall, repo: Path, backends: Path, s: ServeSettings, admin_key: str) -> list[str]:
    return [
        str(install.binary),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        f"--exit-timeout-secs={s.exit_timeout_s}",
        # every stub's region holds the largest request accepted: it never grows while serving
        f"--backend-config=python,shm-default-byte-size={max(s.shm_default_bytes, repository_stub_region_bytes(repo))}",
        f"--log-verbose={s.log_verbose}",
        f"--http-address={s.host}",
        f"--http-port={s.http_port}",
        f"--grpc-address={s.host}",
        f"--grpc-port={s.grpc_port}",
        f"--metrics-address={s.host}",
        f"--metrics-port={s.metrics_port}",
        "--metrics-config=summary_latencies=true",  # latency quantiles per model, as in docker compose
        *restricted_api_args(admin_key),
        *response_cache_args(install, s),
    ]


_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0: sys.exit('prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(0)\n"  # the parent died before prctl: nobody to serve
    "os.execvp(sys.argv[2], sys.argv[2:])\n"  # a container's command names its program (rankserve, sh) by PATH
)


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run through a tiny exec wrapper that asks Linux to send it SIGTERM when the thread
    that started it exits (``PR_SET_PDEATHSIG``; kept across ``exec``), so a supervisor killed
    outright (SIGKILL, OOM) leaves no server holding its ports: tritonserver stops gracefully on
    SIGTERM, its stubs with it (a stub exits by itself once its server is gone). A wrapper
    rather than ``preexec_fn`` (unsafe in a process with threads); Python is there anyway, unlike
    ``setpriv --pdeathsig`` (util-linux 2.33+). Start the server from a thread that lives as long
    as the server (the main thread does)."""
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound (TIME_WAIT counts as free, as it does for tritonserver)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


PORT_FLAGS = {"HTTP": "--http-port", "gRPC": "--grpc-port", "metrics": "--metrics-port"}


def serve_ports(s: ServeSettings) -> dict[str, int]:
    """Role -> port of the endpoints a server (or the proxy of ``serve --releases``) listens on."""
    return {"HTTP": s.http_port, "gRPC": s.grpc_port, "metrics": s.metrics_port}


def busy_ports(host: str, ports: dict[str, int]) -> list[str]:
    """One line per process holding ports of ``ports`` (role -> port) that cannot be bound on
    ``host`` now, naming the process listening on them when this user can see it."""
    from rankserve.server.processes import port_owner

    owners: dict[str, list[str]] = {}
    for role, port in ports.items():
        if not port_free(port, host):
            owners.setdefault(port_owner(port) or "", []).append(f"{role} port {port}")
    lines = []
    for owner, taken in owners.items():
        names = taken[0] if len(taken) == 1 else ", ".join(taken[:-1]) + " and " + taken[-1]
        lines.append(f"the {names} on {host} {'is' if len(taken) == 1 else 'are'} already in use"
                     + (f" by {owner}" if owner else " (by a process of another user)"))
    return lines


def require_free_ports(host: str, ports: dict[str, int]) -> None:
    """Raise :class:`ServeError` naming every port of ``ports`` already taken on ``host``."""
    busy = busy_ports(host, ports)
    if busy:
        flags = ", ".join(PORT_FLAGS[r] for r in ports if r in PORT_FLAGS)
        raise ServeError("; ".join(busy) + f": stop it, or choose other ports ({flags})")


def free_serve_settings(**overrides) -> ServeSettings:
    """Serve settings on three distinct free loopback ports."""
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ServeSettings(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], **overrides)


_STARTED = {"gRPC": re.compile(r'"Started GRPCInferenceService at ([^"]+)"'),
            "HTTP": re.compile(r'"Started HTTPService at ([^"]+)"'),
            "metrics": re.compile(r'"Started Metrics Service at ([^"]+)"')}
"""Triton's log lines for each endpoint it bound (2.51: gRPC first, then HTTP, then metrics)."""
_BIND_FAILURE = re.compile(r'failed to start (\w+) service: ([^"\n]*)', re.IGNORECASE)


def started_endpoints(log_text: str) -> set[str]:
    """The endpoints (``HTTP``, ``gRPC``, ``metrics``) the server whose log this is has bound."""
    return {role for role, pattern in _STARTED.items() if pattern.search(log_text)}


def bind_failure(log_text: str) -> str | None:
    """What Triton said when it could not open an endpoint (a port taken between the check and the
    start), or None."""
    match = _BIND_FAILURE.search(log_text)
    return f"tritonserver failed to start its {match.group(1)} service: {match.group(2).strip()}" if match else None


def repository_models(repo: Path) -> list[str]:
    return sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))


class EmbeddedServer:
    """``with EmbeddedServer(repo, settings) as server: ...`` starts, waits for readiness, stops."""

    def __init__(self, model_repository: str | Path, settings: ServeSettings = ServeSettings(), log_path: str | Path | None = None,
                 argv: Callable[[TritonInstall, Path], list[str]] | None = None, admin_key: str | None = None) -> None:
        """``argv(install, backend_directory)``: another command line to start (e.g. a container's
        own, to prove this tritonserver accepts it); by default :func:`server_command`.
        ``admin_key``: the key of the restricted APIs (default: a new random one per server)."""
        self.admin_key = admin_key or new_admin_key()
        """Unlocks the restricted APIs (:data:`RESTRICTED_APIS`); for rankserve's own use (send
        :attr:`admin_headers`). It is on tritonserver's command line: Triton takes it nowhere else."""
        self.repo = Path(model_repository).resolve()
        self.argv = argv
        self.settings = settings
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._tmp: Path | None = None
        self._log = None
        self.stubs: list[StubProcess] = []
        """The Python-backend stubs, recorded once the server is ready."""

    @property
    def admin_headers(self) -> dict[str, str]:
        """The HTTP headers of a call to a restricted API."""
        return {ADMIN_HEADER: self.admin_key}

    @property
    def admin_grpc_metadata(self) -> dict[str, str]:
        """The gRPC metadata of a call to a restricted API."""
        return {ADMIN_GRPC_METADATA: self.admin_key}

    @property
    def http_url(self) -> str:
        return f"{self.settings.host}:{self.settings.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.settings.host}:{self.settings.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.metrics_port}/metrics"

    @property
    def models(self) -> list[str]:
        return repository_models(self.repo)

    def start(self) -> "EmbeddedServer":
        if not self.models:
            from rankserve.builder.repository import build_hint

            raise ServeError(f"{self.repo} holds no model (no */config.pbtxt): build one first with {build_hint(self.repo)}")
        install = find_triton()
        if self.argv is None:  # another command line chooses its own ports
            require_free_ports(self.settings.host, serve_ports(self.settings))
        self._tmp = Path(tempfile.mkdtemp(prefix="rankserve-triton-"))
        backends = make_backend_directory(install, self._tmp / "backends")
        log_path = self.log_path or self._tmp / "tritonserver.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.libs), env.get("LD_LIBRARY_PATH")]))
        # The stub embeds its own Python: point it at this interpreter's packages (the venv).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.settings.cache_dir:
            env[CACHE_ENV] = str(Path(self.settings.cache_dir).resolve())
        self.process = subprocess.Popen(
            die_with_parent(self.argv(install, backends) if self.argv
                            else server_command(install, self.repo, backends, self.settings, self.admin_key)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self._tmp,  # the stubs' Python puts the working directory first on sys.path: an empty private one
            start_new_session=True,  # its own process group: stopping it reaches every stub
        )
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def owns_endpoints(self) -> bool:
        """Whether this server's own tritonserver runs and its log says it bound the HTTP endpoint
        (and gRPC and metrics, for rankserve's own command line): the endpoints answer for it and
        not for another process on the same ports."""
        if self.process is None or self.process.poll() is not None:
            return False
        needed = {"HTTP"} if self.argv else {"HTTP", "gRPC", "metrics"}
        return needed <= started_endpoints(self._log_text())

    def is_ready(self) -> bool:
        """This server (:meth:`owns_endpoints`) and every model of its repository are ready."""
        return self.owns_endpoints() and self._get("/v2/health/ready") == 200 and all(
            self._get(f"/v2/models/{m}/ready") == 200 for m in self.models
        )

    def log_tail(self, lines: int = 25) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def load_failures(self) -> list[str]:
        """One line per model that failed to load, from the server log, without Python tracebacks."""
        if not self.log_path or not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        escaped_newline = "\\n"  # the log writes newlines inside messages as a literal backslash-n
        return [f"model '{m}' failed to load: {why.split(escaped_newline)[0]}" for m, why in _LOAD_FAILURE.findall(text)]

    def _startup_error(self, what: str) -> ServeError:
        failures = self.load_failures()
        detail = "\n".join(failures) if failures else self.log_tail()
        self.stop()
        return ServeError(f"{what}:\n{detail}\n(full log: {self.log_path})")

    def wait_ready(self, stop: threading.Event | None = None) -> "EmbeddedServer":
        """Wait until the server and every model are ready; returns early (not ready) once ``stop`` is set."""
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return self
            failure = bind_failure(self._log_text())
            if failure:  # a port taken between the check and the start: report it, never retry it
                self.stop(grace_s=3)
                raise ServeError(f"{failure} (another process took the port after rankserve checked it: stop it, or choose "
                                 f"other ports with --http-port/--grpc-port/--metrics-port; full log: {self.log_path})")
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise self._startup_error(f"tritonserver exited (code {code}) before it was ready")
            if self.is_ready():
                self.stubs = stub_processes(self.process.pid)
                return self
            if stop is not None:
                stop.wait(0.25)
            else:
                time.sleep(0.25)
        raise self._startup_error(f"tritonserver not ready after {self.settings.ready_timeout_s:.0f} s")

    def health_problem(self) -> str | None:
        """Why the running server cannot serve every request (its process exited, or one of its
        Python-backend stubs died: Triton 2.51 would keep reporting that model ready), or None."""
        if self.process is None or self.process.poll() is not None:
            return f"tritonserver exited (code {None if self.process is None else self.process.returncode})"
        dead = dead_stubs(self.stubs)
        if dead:
            return "Python-backend stub died: " + ", ".join(f"{s.instance} (model {s.model}, pid {s.pid})" for s in dead)
        return None

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM the server's process group, give in-flight requests ``grace_s`` (default: the
        server's exit timeout and 10 s) to finish, SIGKILL what is left, and remove any shared-memory
        region of its stubs that a killed server left in /dev/shm."""
        code = None
        if self.process is not None:
            pgid = self.process.pid
            regions = {s.shm_region for s in self.stubs + stub_processes(pgid)}
            if self.process.poll() is None:
                _signal_group(pgid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=self.settings.exit_timeout_s + 10 if grace_s is None else grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(pgid, signal.SIGKILL)
                    self.process.wait()
            _signal_group(pgid, signal.SIGKILL)  # any stub left behind in the group
            code = self.process.returncode
            self.process = None
            remove_shm_regions(sorted(regions))
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            # Keep a log we chose ourselves for reading after the fact; drop everything else.
            keep_log = self.log_path is not None and self._tmp in self.log_path.parents
            shutil.rmtree(self._tmp / "backends" if keep_log else self._tmp, ignore_errors=True)
            self._tmp = None
        return code

    def __enter__(self) -> "EmbeddedServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
