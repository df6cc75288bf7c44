"""Real TLS for the tests: certificates made here with the ``openssl`` CLI (a CA, a server certificate
for 127.0.0.1/localhost, a client certificate for mutual TLS, and an unrelated CA nobody trusts), and
the gateway of deploy/gateway/rankserve.conf.template run by Debian's ``nginx``."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "gateway" / "rankserve.conf.template"
TEMPLATE_VARIABLES = ("GATEWAY_HTTPS_PORT", "GATEWAY_GRPC_PORT", "TRITON_HTTP", "TRITON_GRPC", "GATEWAY_TLS_CERT",
                      "GATEWAY_TLS_KEY", "GATEWAY_TOKEN")


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: trusting only it must fail the handshake."""


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {out.stderr}")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", cert.name, "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    ext.write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial", "-out", cert.name,
             "-days", "2", "-extfile", ext.name, cwd=directory)
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "rankserve-test-ca")
    server = _leaf(directory, "server", ca, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    client = _leaf(directory, "client", ca, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=clientAuth\n")
    other = _ca(directory, "untrusted-ca")
    return Certificates(ca[0], server[0], server[1], client[0], client[1], other[0])


def render_template(text: str, values: dict[str, str]) -> str:
    """What the nginx image's envsubst does to a template: ``${NAME}`` of the given names replaced,
    nginx's own ``$variables`` left alone."""
    missing = set(TEMPLATE_VARIABLES) - set(values)
    if missing:
        raise ValueError(f"template variables without a value: {sorted(missing)}")
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """Debian's nginx in the foreground in its own prefix, serving the gateway template."""

    def __init__(self, directory: Path, certs: Certificates, token: str, triton_http: str, triton_grpc: str) -> None:
        self.directory = directory
        self.https_port, self.grpc_port = free_port(), free_port()
        self.token = token
        for sub in ("logs", "tmp"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        server_block = render_template(TEMPLATE.read_text(), {
            "GATEWAY_HTTPS_PORT": f"127.0.0.1:{self.https_port}", "GATEWAY_GRPC_PORT": f"127.0.0.1:{self.grpc_port}",
            "TRITON_HTTP": triton_http, "TRITON_GRPC": triton_grpc, "GATEWAY_TLS_CERT": str(certs.server_cert),
            "GATEWAY_TLS_KEY": str(certs.server_key), "GATEWAY_TOKEN": token})
        (directory / "rankserve.conf").write_text(server_block)
        tmp = directory / "tmp"
        # the main file of the nginx image, in short (the template is its conf.d/ include), with paths a non-root user may write
        (directory / "nginx.conf").write_text(f"""worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {directory}/logs/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {directory}/rankserve.conf;
}}
""")
        self.process: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.directory / "nginx.conf"
        check = subprocess.run([binary, "-t", "-p", str(self.directory), "-c", str(conf)], capture_output=True, text=True, timeout=30)
        if check.returncode:
            raise RuntimeError(f"nginx refused the gateway configuration:\n{check.stderr}")
        self.process = subprocess.Popen([binary, "-p", str(self.directory), "-c", str(conf), "-g", "daemon off;"],
                                        stdout=subprocess.DEVNULL, stderr=(self.directory / "logs" / "stderr.log").open("wb"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.directory / 'logs' / 'error.log').read_text()[-2000:]}")
            try:
                for port in (self.https_port, self.grpc_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not listen within 15 s")

    def access_log(self) -> str:
        path = self.directory / "logs" / "access.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
