"""`pue-serve` as a process: SIGTERM stops new connections, finishes queued rows, exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from serve_helpers import alone, data_url, free_port, wait_ready

from pue.runtime import Query


def test_sigterm_drains_the_queue_then_exits_0(serve_bundle, offline, patches, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sigterm-key\n")
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "pue.cli.serve_app", str(serve_bundle), "--port", str(port)]
    command += ["--api-key-file", str(key_file), "--max-batch", "2", "--max-wait-ms", "50", "--model-name", "m"]
    env = {k: v for k, v in os.environ.items() if k != "PUE_API_KEY"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        headers = {"Authorization": "Bearer sigterm-key"}
        rows = [{"image": data_url(patches[i % 3]), "text": f"as IHC {i}"} for i in range(16)]
        expected = alone(offline, [Query(image=patches[i % 3], text=f"as IHC {i}") for i in range(16)])
        results: dict[int, httpx.Response] = {}

        def request(number: int) -> None:
            body = {"model": "m", "input": rows[2 * number : 2 * number + 2], "encoding_format": "float"}
            results[number] = httpx.post(
                f"http://127.0.0.1:{port}/v1/embeddings", json=body, headers=headers, timeout=60
            )

        threads = [threading.Thread(target=request, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # 16 composed rows in batches of 2: most are still queued now
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert process.wait(timeout=60) == 0
        assert sorted(results) == list(range(8))
        for number, response in results.items():
            assert response.status_code == 200, response.text
            got = np.asarray([d["embedding"] for d in response.json()["data"]], np.float32)
            assert np.abs(got - expected[2 * number : 2 * number + 2]).max() <= 1e-6
        text = log.read_text()
        assert "SIGTERM" in text and "drained" in text
        assert "as IHC" not in text and "sigterm-key" not in text  # neither texts nor the key reach the log
        after_signal = text[text.index("SIGTERM") :]
        served_after = after_signal.count('"status": 200')
        assert served_after > 0, text  # requests still queued when the signal came were answered, not dropped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
