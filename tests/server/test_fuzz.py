"""schemathesis against a running ``e3rl serve`` and its own OpenAPI document: no generated
request, valid or not, makes the server answer with a 5xx (every bad input gets a 4xx in
OpenAI's format), and the server still answers a normal request afterwards."""

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

SCHEMATHESIS = shutil.which("schemathesis") or os.path.join(os.path.dirname(sys.executable),
                                                            "schemathesis")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(SCHEMATHESIS), reason="schemathesis is not installed")
def test_no_generated_request_causes_a_server_error(tiny_model, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # A short context keeps generated completions (max_tokens up to the context) quick.
    server = subprocess.Popen(
        [sys.executable, "-m", "e3rl.server.cli", "serve", "--model", str(tiny_model),
         "--port", str(port), "--max-model-len", "48", "--num-threads", "1",
         "--data-dir", str(tmp_path), "--log-level", "warning", "--no-access-log"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        result = subprocess.run(
            [SCHEMATHESIS, "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "15", "--request-timeout", "30", "--seed", "1"],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
