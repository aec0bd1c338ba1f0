"""Load test of an OpenAI-compatible server on this machine: rounds of concurrent streaming chat requests.

    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --concurrency 64 --rounds 3
    python benchmarks/load_test.py --launch --concurrency 64 --rounds 3 --out result.json -- --max-num-seqs 64

Each round sends ``--concurrency`` streaming chat completions at once (openai's async client, no retries), each
asking for exactly ``--max-tokens`` tokens (greedy, ``ignore_eos``), and waits for all of them; rounds run one after
another. A request fails when it raises, when its stream ends without the usage chunk, or when the server reports
another number of completion tokens. The server must keep its process (``process_start_time_seconds`` on
``/metrics``) and answer ``/health`` after the last round. Prints one JSON object (also written to ``--out``):
TTFT (first content token), TPOT ((end - first token) / (tokens - 1)) and end-to-end latency percentiles in
seconds, failures and their first messages, output tokens per second, and vLLM's preemption count over the run.
Exit status 1 when any request failed or the server restarted or stopped answering.

Bounded: ``--rounds x --concurrency`` requests, each with a ``--timeout``; the whole run stops after
``--deadline`` seconds (requests still open then count as failed). Only loopback addresses are accepted as
targets. ``--launch`` starts ``kivi-serve`` on 127.0.0.1 on a free port with the flags after ``--``, waits for
``/health``, runs, and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

QUESTIONS = ("Summarize the text above in two sentences.", "What is the main rule described above?",
             "Explain the text above to a beginner.", "List the key points of the text above.")


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99 (nearest rank), mean and max of ``values``, rounded to 0.1 ms; empty dict when no values."""
    if not values:
        return {}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, int(-(-p * len(s) // 100)) - 1))]

    return {k: round(v, 4) for k, v in
            dict(p50=rank(50), p90=rank(90), p99=rank(99), mean=sum(s) / len(s), max=s[-1]).items()}


def prompts(n: int, chars: int) -> list[str]:
    """``n`` different prompts: ``chars`` characters of a Python reference manual section plus a question."""
    from pydoc_data.topics import topics

    keys = sorted(k for k in topics if len(topics[k]) >= chars)
    return [f"{topics[keys[i % len(keys)]][:chars].strip()}\n\n{QUESTIONS[i % len(QUESTIONS)]}" for i in range(n)]


def check_loopback(base_url: str) -> None:
    """Raise SystemExit unless ``base_url`` names this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urllib.parse.urlparse(base_url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"load_test: {base_url} is not a loopback address; this script only loads a local server")


def scrape(base_url: str) -> dict[str, float]:
    """The unlabelled-or-summed value of every metric family on ``/metrics`` (name -> sum over its samples)."""
    text = urllib.request.urlopen(base_url + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def healthy(base_url: str) -> bool:
    """``GET /health`` answers 200."""
    try:
        return urllib.request.urlopen(base_url + "/health", timeout=10).status == 200
    except OSError:
        return False


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one chat completion; returns its timings (seconds) and token count, or its error."""
    t0 = time.perf_counter()
    first = None
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for ev in stream:
            if first is None and ev.choices and ev.choices[0].delta.content:
                first = time.perf_counter()
            usage = ev.usage or usage
    except Exception as e:  # any failure counts; the message goes to the report
        return dict(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    end = time.perf_counter()
    if usage is None or first is None:
        return dict(ok=False, error="stream ended without content or usage")
    if usage.completion_tokens != max_tokens:
        return dict(ok=False, error=f"{usage.completion_tokens} completion tokens, expected {max_tokens}")
    n = usage.completion_tokens
    return dict(ok=True, ttft=first - t0, e2e=end - t0, tpot=(end - first) / max(n - 1, 1), tokens=n,
                prompt_tokens=usage.prompt_tokens)


async def run_rounds(a, model: str) -> tuple[list[dict], list[float]]:
    """All rounds; a request still open at the deadline is cancelled and counted as failed."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=a.base_url + "/v1", api_key=a.api_key or "unused", max_retries=0,
                         timeout=a.timeout)
    texts = prompts(a.concurrency, a.prompt_chars)
    results, walls = [], []
    deadline = time.monotonic() + a.deadline
    try:
        for _ in range(a.rounds):
            left = deadline - time.monotonic()
            if left <= 0:
                results += [dict(ok=False, error="not sent: deadline reached")] * a.concurrency
                continue
            t0 = time.perf_counter()
            tasks = [asyncio.ensure_future(one_request(client, model, p, a.max_tokens)) for p in texts]
            done, pending = await asyncio.wait(tasks, timeout=left)
            for t in pending:
                t.cancel()
            results += [t.result() for t in done]
            results += [dict(ok=False, error="cancelled: deadline reached")] * len(pending)
            walls.append(round(time.perf_counter() - t0, 3))
    finally:
        await client.close()
    return results, walls


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(flags: list[str], start_timeout: float) -> tuple[subprocess.Popen, str, Path]:
    """Start ``kivi-serve`` on 127.0.0.1 with ``flags``; returns the process, its base URL and its log file."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="kivi-load-")) / "kivi-serve.log"
    cmd = [sys.executable, "-m", "kivi_vllm.serving.cli", "--host", "127.0.0.1", "--port", str(port), *flags]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while not healthy(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"load_test: kivi-serve did not come up; log {log}:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc, base, log


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the load test (module docstring); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/load_test.py " + " ".join(argv)
    server_flags: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, server_flags = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to load (loopback only)")
    ap.add_argument("--launch", action="store_true", help="start kivi-serve with the flags after -- and stop it")
    ap.add_argument("--model", help="model name to request (default: the server's first model)")
    ap.add_argument("--api-key", help="bearer token, if the server was started with --api-key")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (exactly)")
    ap.add_argument("--prompt-chars", type=int, default=600, help="characters of manual text per prompt")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=1800, help="seconds for all rounds")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds for --launch to see /health")
    ap.add_argument("--out", help="also write the JSON result here")
    a = ap.parse_args(argv)
    for name in ("concurrency", "rounds", "max_tokens"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")

    # the client first: a missing dependency of openai's HTTP stack (on 2026-11-30 the H200 bundle lacked
    # truststore, which httpcore2 imports when a client is built) fails here, not after a server start
    from openai import AsyncOpenAI

    AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused", max_retries=0)
    proc = None
    if a.launch:
        proc, a.base_url, log = launch(server_flags, a.start_timeout)
    check_loopback(a.base_url)
    try:
        headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
        req = urllib.request.Request(a.base_url + "/v1/models", headers=headers)
        model = a.model or json.load(urllib.request.urlopen(req, timeout=30))["data"][0]["id"]
        before = scrape(a.base_url)
        t0 = time.perf_counter()
        results, walls = asyncio.run(run_rounds(a, model))
        wall = time.perf_counter() - t0
        alive = healthy(a.base_url)
        after = scrape(a.base_url) if alive else {}
    finally:
        if proc is not None:
            stop(proc)
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    restarted = not alive or after.get("process_start_time_seconds") != before.get("process_start_time_seconds")
    report = dict(
        command=command,
        server_flags=server_flags, model=model, concurrency=a.concurrency, rounds=a.rounds,
        max_tokens=a.max_tokens, prompt_chars=a.prompt_chars, requests=len(results), ok=len(ok),
        failed=len(failed), errors=sorted({r["error"] for r in failed})[:5],
        server_restarted_or_down=restarted, wall_s=round(wall, 2), round_wall_s=walls,
        prompt_tokens=percentiles([r["prompt_tokens"] for r in ok]),
        ttft_s=percentiles([r["ttft"] for r in ok]), tpot_s=percentiles([r["tpot"] for r in ok]),
        e2e_s=percentiles([r["e2e"] for r in ok]),
        output_tokens_per_s=round(sum(r["tokens"] for r in ok) / wall, 2),
        preemptions=after.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0),
    )
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 1 if failed or restarted else 0


if __name__ == "__main__":
    sys.exit(main())
