"""`pue-serve --ssl-certfile/--ssl-keyfile`: the server speaks TLS with the given certificate (self-signed here)."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port


def self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (it makes the test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_with_the_given_certificate(serve_bundle, tmp_path):
    cert, key = self_signed(tmp_path)
    (tmp_path / "api-key").write_text("tls-key\n")
    port = free_port()
    command = [sys.executable, "-m", "pue.cli.serve_app", str(serve_bundle), "--port", str(port), "--model-name", "m"]
    command += ["--api-key-file", str(tmp_path / "api-key"), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    env = {k: v for k, v in os.environ.items() if k != "PUE_API_KEY"}
    trusted = ssl.create_default_context(cafile=str(cert))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted, timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the TLS server did not become ready"
            time.sleep(0.1)
        response = httpx.post(
            f"https://127.0.0.1:{port}/v1/embeddings",
            json={"model": "m", "input": ["stroma"]},
            headers={"Authorization": "Bearer tls-key"},
            verify=trusted,
            timeout=60,
        )
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) > 0
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
