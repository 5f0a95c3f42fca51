"""schemathesis against a running ``e3rl serve`` and its own OpenAPI document: no generated
request, valid or not, makes the server answer with a 5xx (every bad input gets a 4xx in
OpenAI's format), and the server still answers a normal request afterwards."""

import os
import shutil
import subprocess
import sys

import httpx
import pytest

from .conftest import start_serve_process

SCHEMATHESIS = shutil.which("schemathesis") or os.path.join(os.path.dirname(sys.executable),
                                                            "schemathesis")


@pytest.mark.skipif(not os.path.exists(SCHEMATHESIS), reason="schemathesis is not installed")
def test_no_generated_request_causes_a_server_error(tiny_model, tmp_path):
    # A short context keeps generated completions (max_tokens up to the context) quick.
    server, url = start_serve_process(
        ["--model", str(tiny_model), "--max-model-len", "48", "--num-threads", "1",
         "--data-dir", str(tmp_path), "--log-level", "warning", "--no-access-log"])
    try:
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
