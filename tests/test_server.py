"""``kivi-serve`` on 127.0.0.1 with the default model, driven by the ``openai`` client; bad flags fail fast."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.engine
KIVI_SERVE = str(Path(sys.executable).with_name("kivi-serve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "kivi-serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([KIVI_SERVE, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
                                 "--enforce-eager", "--max-num-seqs", "8"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kivi-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"kivi-serve not healthy after 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused")


def test_models_lists_the_default_model(server):
    ids = [m.id for m in client(server[0]).models.list().data]
    assert ids == ["SmolLM2-135M-Instruct"]


def test_completion(server):
    r = client(server[0]).completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                             max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text


def test_chat_completion(server):
    r = client(server[0]).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content


def test_streamed_chat_completion_with_long_context(server):
    from kivi_vllm.prompts import long_prompts

    stream = client(server[0]).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": long_prompts(1)[0]}],
        max_tokens=48, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks, usage = [], None
    for ev in stream:
        if ev.choices and ev.choices[0].delta.content:
            chunks.append(ev.choices[0].delta.content)
        usage = ev.usage or usage
    assert len(chunks) > 5 and len("".join(chunks).split()) > 5
    assert usage.prompt_tokens > 300 and usage.completion_tokens > 0


def test_metrics_and_startup_log(server):
    base, log = server
    text = requests.get(base + "/metrics", timeout=10).text
    assert "vllm:kv_cache_usage_perc" in text and "vllm:generation_tokens_total" in text
    startup = log.read_text()
    assert "KIVI k2/v2 G=32" in startup and "an unquantized bfloat16 cache would hold" in startup


@pytest.mark.parametrize("flags,message", [
    (["--kivi-bits", "3"], "argument --kivi-bits: invalid choice: 3"),
    (["--kivi-group-size", "32", "--block-size", "48"], "--block-size=48 is not a multiple of the group size 32"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 cannot be combined with the KIVI cache"),
    (["--additional-config", '{"kivi": {"residual": "x"}}'], "--kivi-residual='x' is not supported"),
    (["--attention-backend", "FLASH_ATTN"], "--attention-backend FLASH_ATTN would not use the KIVI cache"),
])
def test_bad_flags_exit_before_loading(flags, message):
    t0 = time.time()
    r = subprocess.run([KIVI_SERVE, *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert "Loading weights" not in r.stderr and "Starting to load model" not in r.stderr
    print(f"\n{flags}: exit {r.returncode} in {time.time() - t0:.1f} s")
