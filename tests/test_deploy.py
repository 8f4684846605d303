"""The deployment examples in ``deploy/`` are well-formed and call things that exist.

Static checks (fast): every YAML file parses; Kubernetes objects have apiVersion/kind and
consistent names, labels, Secret keys and a memory-backed ``/dev/shm``; the compose file's
services, builds and dependencies resolve; shell scripts pass ``bash -n``; every
``ckptsvc`` command and flag exists in the real CLI parser; every script a file calls
exists in the repository and accepts the flags it is given.

Running checks (slow): the MinIO demo command of the compose file and the Kubernetes Job,
run for real against moto's S3; ``deploy/torchrun/demo.sh``; ``deploy/examples/train.py``
resuming bitwise, saving on SIGTERM, and under ``torchrun`` (``deploy/torchrun/train.sh``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
IMAGE_REPO_ROOT = "/opt/ckptsvc/"  # where deploy/docker/Dockerfile copies the repository files
MINIO_ENDPOINT = "http://minio:9000"  # the endpoint the compose file and the Job use
VENV_BIN = str(Path(sys.executable).parent)
API_VERSION_RE = re.compile(r"([a-z0-9-]+(\.[a-z0-9-]+)*/)?v\d+((alpha|beta)\d+)?")
SHELL_VAR_RE = re.compile(r'"?\$\{?\w+\}?"?')  # "$output", ${X}: a placeholder for shlex
HANG_GUARD_S = 240  # generous bound on subprocesses, so a hang fails instead of blocking CI


# ---------------------------------------------------------------- what the files contain


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def shell_scripts() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    """``(file name, object)`` for every document of ``deploy/kubernetes/*.yaml``."""
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append((path.name, doc))
    return objects


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict), f"{COMPOSE_FILE}: not a mapping"
    return doc


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Init and regular containers of a Deployment's or Job's pod template."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def container_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every command the compose services and Kubernetes pods run."""
    found = []
    for name, service in compose()["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[0] != "server":  # MinIO's own
            found.append((f"compose service {name}", [str(a) for a in command]))
    for fname, obj in k8s_objects():
        for c in pod_containers(obj):
            argv = [*c.get("command", []), *c.get("args", [])]
            if argv and argv[0] != "server":
                found.append((f"{fname} container {c['name']}", [str(a) for a in argv]))
    return found


def command_of(where: str) -> list[str]:
    matches = [argv for w, argv in container_commands() if w == where]
    assert len(matches) == 1, f"expected one command for {where!r}, found {len(matches)}"
    return matches[0]


# ---------------------------------------------------------------- the real CLI


@functools.cache
def ckptsvc_help(*argv: str) -> str:
    """``ckptsvc [argv] --help`` from the real parser, in process."""
    from ckptsvc.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main([*argv, "--help"])
        except SystemExit as e:
            assert e.code in (0, None), (
                f"`ckptsvc {' '.join(argv)} --help` failed:\n{out.getvalue()}"
            )
        else:
            pytest.fail(f"`ckptsvc {' '.join(argv)} --help` printed no help")
    return out.getvalue()


@functools.cache
def ckptsvc_subcommands() -> frozenset[str]:
    m = re.search(r"\{([a-z0-9_,-]+)\}", ckptsvc_help())
    assert m, f"no subcommand list in `ckptsvc --help`:\n{ckptsvc_help()}"
    return frozenset(m.group(1).split(","))


def check_ckptsvc_argv(argv: list[str], where: str) -> None:
    """The subcommand exists and every ``--flag`` it is given appears in its help."""
    assert argv[0] == "ckptsvc", argv
    assert len(argv) > 1 and argv[1] in ckptsvc_subcommands(), (
        f"{where}: `ckptsvc {argv[1] if len(argv) > 1 else ''}` is not a subcommand; "
        f"have {sorted(ckptsvc_subcommands())}"
    )
    help_text = ckptsvc_help(argv[1])
    for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
            f"{where}: `ckptsvc {argv[1]}` has no option {flag}"
        )


def repo_path_of(script: str) -> Path:
    """A script path as the containers see it (``/opt/ckptsvc/...``) -> the repository file."""
    rel = script.removeprefix(IMAGE_REPO_ROOT) if script.startswith(IMAGE_REPO_ROOT) else script
    return REPO / rel


@functools.cache
def script_help(script: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def check_python_argv(argv: list[str], where: str) -> None:
    """``python SCRIPT args``: the script is in the repository and accepts the flags."""
    assert argv[0] == "python" and len(argv) > 1, f"{where}: {argv}"
    script = repo_path_of(argv[1])
    assert script.is_file(), f"{where}: {argv[1]} is not in the repository ({script})"
    help_text = script_help(script)
    for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
        assert flag in help_text, f"{where}: {script.name} has no option {flag}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test environment, the venv's bin first on PATH, and a node writer of its own."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CKPTSVC_NODE_ID"] = f"test-deploy-{uuid.uuid4().hex[:12]}"
    env["OMP_NUM_THREADS"] = "1"
    # The node writer inherits stderr: with captured output, run() waits for it to exit.
    env["CKPTSVC_WRITER_LINGER_S"] = "1"
    env.update(extra)
    return env


def run(
    argv: list[str], *, cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"`{shlex.join(argv)}` exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


# ---------------------------------------------------------------- static checks


def test_deploy_has_every_example() -> None:
    expected = [
        "README.md",
        "examples/train.py",
        "examples/ensure_bucket.py",
        "torchrun/train.sh",
        "torchrun/demo.sh",
        "slurm/train.sbatch",
        "docker/Dockerfile",
        "compose/docker-compose.yml",
        "kubernetes/kustomization.yaml",
        "kubernetes/job.yaml",
        "kubernetes/minio.yaml",
        "kubernetes/secret.yaml",
    ]
    missing = [p for p in expected if not (DEPLOY / p).is_file()]
    assert not missing, f"missing in deploy/: {missing}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_file_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs if d is not None), path
    assert any(d for d in docs), f"{path}: no document"


def test_kubernetes_objects_are_well_formed() -> None:
    objects = k8s_objects()
    kinds = sorted(obj.get("kind", "?") for _, obj in objects)
    assert kinds == ["Deployment", "Job", "Kustomization", "Secret", "Service"], kinds
    for fname, obj in objects:
        api = obj.get("apiVersion")
        assert isinstance(api, str) and API_VERSION_RE.fullmatch(api), (
            f"{fname}: apiVersion {api!r}"
        )
        assert isinstance(obj.get("kind"), str), f"{fname}: no kind"
        if obj["kind"] != "Kustomization":
            assert obj.get("metadata", {}).get("name"), f"{fname}: {obj['kind']} has no name"
        for c in pod_containers(obj):
            assert c.get("name") and c.get("image"), f"{fname}: container without name/image"


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = [obj for _, obj in k8s_objects() if obj["kind"] == "Kustomization"]
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization resources {sorted(listed)} != files {sorted(on_disk)}"


def test_kubernetes_references_resolve() -> None:
    objects = [obj for _, obj in k8s_objects()]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    secrets = {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {}))
               for s in by_kind["Secret"]}  # fmt: skip
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod_containers(obj):
            for ref in c.get("envFrom", []):
                name = ref["secretRef"]["name"]
                assert name in secrets, f"{c['name']}: envFrom unknown Secret {name}"
            for env in c.get("env", []):
                key_ref = env.get("valueFrom", {}).get("secretKeyRef")
                if key_ref:
                    assert key_ref["key"] in secrets.get(key_ref["name"], set()), (
                        f"{c['name']}: env {env['name']} refers to a missing Secret key {key_ref}"
                    )
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{c['name']}: mount of undefined volume"
    for dep in by_kind["Deployment"]:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in by_kind["Service"]:
        targets = [d for d in by_kind["Deployment"]
                   if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]  # fmt: skip
        assert targets, f"Service {svc['metadata']['name']} selects no Deployment"
        port_names = {p["name"] for c in pod_containers(targets[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"targetPort {port['targetPort']} unknown"


def parse_quantity(text: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``4Gi``, ``1G``) in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert m, f"cannot parse quantity {text!r}"
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]  # fmt: skip
    return int(m.group(1)) * scale


def test_kubernetes_job_sizes_dev_shm_as_memory() -> None:
    (job,) = [obj for _, obj in k8s_objects() if obj["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (train,) = pod["containers"]
    (shm_mount,) = [m for m in train["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    empty_dir = volumes[shm_mount["name"]]["emptyDir"]
    assert empty_dir["medium"] == "Memory", "a disk-backed /dev/shm is not shared memory"
    shm_bytes = parse_quantity(empty_dir["sizeLimit"])
    limit_bytes = parse_quantity(train["resources"]["limits"]["memory"])
    assert limit_bytes > shm_bytes, (
        "the memory limit must cover /dev/shm (it is charged to the pod)"
    )
    assert pod["restartPolicy"] in ("Never", "OnFailure")


def test_compose_services_resolve() -> None:
    doc = compose()
    services = doc["services"]
    assert {"minio", "make-bucket", "train"} <= set(services)
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name}: no image or build"
        build = service.get("build")
        if build:
            context = (COMPOSE_FILE.parent / build["context"]).resolve()
            assert (context / "pyproject.toml").is_file(), f"{name}: context is not the repo root"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        deps = service.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name}: depends on unknown service {dep}"
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in (doc.get("volumes") or {}), f"{name}: undeclared volume {source}"
    assert services["train"]["depends_on"]["make-bucket"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["train"].get("shm_size"), "train needs shm_size: Docker's /dev/shm is 64 MiB"


def test_compose_and_kubernetes_use_one_image() -> None:
    compose_images = {s["image"] for s in compose()["services"].values() if s.get("build")}
    k8s_images = {c["image"] for _, obj in k8s_objects() for c in pod_containers(obj)
                  if not c["image"].startswith("minio/")}  # fmt: skip
    assert len(compose_images) == 1 and compose_images == k8s_images, (compose_images, k8s_images)


def test_container_commands_exist() -> None:
    commands = container_commands()
    assert len(commands) == 4, commands  # make-bucket + demo, in compose and in the Job
    for where, argv in commands:
        if argv[0] == "ckptsvc":
            check_ckptsvc_argv(argv, where)
        elif argv[0] == "python":
            check_python_argv(argv, where)
        else:
            pytest.fail(f"{where}: unexpected command {argv}")
        for arg, value in itertools.pairwise(argv):
            if arg == "--storage-options":
                assert isinstance(json.loads(value), dict), f"{where}: bad JSON {value}"


def test_compose_and_kubernetes_run_the_same_commands() -> None:
    assert command_of("compose service train") == command_of("job.yaml container train")
    compose_bucket = command_of("compose service make-bucket")
    k8s_bucket = command_of("job.yaml container make-bucket")
    assert compose_bucket[:-1] == k8s_bucket[:-1], "only --timeout-s may differ"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    included = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    copies = [args.split() for op, args in dockerfile_instructions() if op == "COPY"]
    assert copies, "no COPY in the Dockerfile"
    for *sources, _dest in copies:
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
            assert src.rstrip("/") in included, f"{src} is excluded by Dockerfile.dockerignore"
    (cmd,) = [json.loads(args) for op, args in dockerfile_instructions() if op == "CMD"]
    check_ckptsvc_argv(cmd, "Dockerfile CMD")


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shell_script_syntax_and_references(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"bash -n {script}:\n{proc.stderr}"
    text = script.read_text()
    assert text.startswith("#!"), f"{script}: no shebang"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    for name in re.findall(r"examples/(\w+\.py)", text):
        assert (DEPLOY / "examples" / name).is_file(), f"{script}: examples/{name} does not exist"
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith("ckptsvc "):
            argv = shlex.split(SHELL_VAR_RE.sub("VALUE", stripped))
            check_ckptsvc_argv(argv, str(script))


def test_readme_refers_to_existing_files_and_commands() -> None:
    text = (DEPLOY / "README.md").read_text()
    for ref in re.findall(r"\bdeploy/[\w./-]*\w", text):
        assert (REPO / ref).exists(), f"deploy/README.md mentions {ref}, which does not exist"
    for ref in re.findall(
        r"`((?:examples|torchrun|slurm|docker|compose|kubernetes)/[\w./-]*)`", text
    ):
        assert (DEPLOY / ref).exists(), f"deploy/README.md mentions {ref}, which does not exist"
    mentioned = re.findall(r"`ckptsvc ([a-z][a-z-]*)", text)  # `ckptsvc demo` in code font
    assert mentioned, "the README names no ckptsvc command"
    unknown = sorted(set(mentioned) - ckptsvc_subcommands())
    assert not unknown, f"deploy/README.md names unknown subcommands {unknown}"


@pytest.mark.slow
def test_ensure_bucket_gives_up_when_nothing_listens(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run(
        [sys.executable, str(DEPLOY / "examples" / "ensure_bucket.py"), "s3://nobody/x",
         "--storage-options", json.dumps({"endpoint_url": f"http://127.0.0.1:{port}",
                                          "key": "k", "secret": "s",
                                          "config_kwargs": {"retries": {"max_attempts": 1},
                                                            "connect_timeout": 1}}),
         "--timeout-s", "2"],
        cwd=tmp_path, env=subprocess_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "giving up" in proc.stderr


# ---------------------------------------------------------------- running the examples


def with_endpoint(argv: list[str], endpoint: str) -> list[str]:
    """The argv with the MinIO endpoint replaced, and paths mapped from the image to the repo."""
    out = [a.replace(MINIO_ENDPOINT, endpoint) for a in argv]
    if out[0] == "python":
        out = [sys.executable, str(repo_path_of(out[1])), *out[2:]]
    elif out[0] == "ckptsvc":
        out = [sys.executable, "-m", "ckptsvc.cli", *out[1:]]
    return out


def delete_bucket(server: Any, bucket: str) -> None:
    client = server.boto3_client()
    with contextlib.suppress(client.exceptions.NoSuchBucket):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)


@pytest.mark.slow
def test_minio_demo_commands_run_against_s3(moto_server: Any, tmp_path: Path) -> None:
    """The Job's (= compose's) two commands, as written, against moto instead of MinIO."""
    from ckptsvc import CheckpointStatus, list_checkpoints

    make_bucket = with_endpoint(
        command_of("job.yaml container make-bucket"), moto_server.endpoint_url
    )
    demo = with_endpoint(command_of("job.yaml container train"), moto_server.endpoint_url)
    output = demo[demo.index("--output") + 1]
    bucket = output.removeprefix("s3://").split("/", 1)[0]
    env = subprocess_env(
        AWS_ACCESS_KEY_ID=moto_server.access_key,
        AWS_SECRET_ACCESS_KEY=moto_server.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
    )
    delete_bucket(moto_server, bucket)
    try:
        first = run(make_bucket, cwd=tmp_path, env=env)
        assert f"created bucket {bucket}" in first.stdout
        again = run(make_bucket, cwd=tmp_path, env=env)
        assert f"bucket {bucket} exists" in again.stdout
        run(demo, cwd=tmp_path, env=env)  # exits non-zero if its own verify fails
        opts = {"endpoint_url": moto_server.endpoint_url, "key": moto_server.access_key,
                "secret": moto_server.secret_key}  # fmt: skip
        infos = list_checkpoints(output, storage_options=opts)
        assert infos and all(i.status is CheckpointStatus.COMPLETE for i in infos), infos
    finally:
        delete_bucket(moto_server, bucket)


@pytest.mark.slow
def test_demo_sh_runs(tmp_path: Path) -> None:
    proc = run([str(DEPLOY / "torchrun" / "demo.sh"), str(tmp_path / "demo")], cwd=tmp_path,
               env=subprocess_env())  # fmt: skip
    assert "complete (latest)" in proc.stdout, proc.stdout


def train_py(*args: str) -> list[str]:
    return [sys.executable, str(DEPLOY / "examples" / "train.py"), "--width", "64", *args]


def state_tensors(ckpt: Path) -> dict[str, Any]:
    """Every tensor of every safetensors file of a checkpoint, keyed ``file:name``."""
    from safetensors.torch import load_file

    tensors = {
        f"{f.name}:{name}": t for f in sorted(ckpt.glob("*.safetensors"))
        for name, t in load_file(f).items()
    }  # fmt: skip
    assert tensors, f"no tensors in {ckpt}"
    return tensors


@pytest.mark.slow
def test_train_py_resume_is_bitwise(tmp_path: Path) -> None:
    """6 steps straight == 3 steps, restart, 3 more: model and optimizer, bit for bit."""
    import torch

    env = subprocess_env()
    run(train_py("--output", str(tmp_path / "straight"), "--steps", "6", "--save-every", "3"),
        cwd=tmp_path, env=env)  # fmt: skip
    resumed = tmp_path / "resumed"
    run(
        train_py("--output", str(resumed), "--steps", "3", "--save-every", "3"),
        cwd=tmp_path,
        env=env,
    )
    second = run(train_py("--output", str(resumed), "--steps", "6", "--save-every", "3"),
                 cwd=tmp_path, env=env)  # fmt: skip
    assert "continuing at step 4" in second.stdout, second.stdout
    a = state_tensors(tmp_path / "straight" / "checkpoints" / "checkpoint-6")
    b = state_tensors(resumed / "checkpoints" / "checkpoint-6")
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer_state") for k in a), sorted(a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different}"


def read_until(proc: subprocess.Popen[str], pattern: str) -> list[str]:
    """stdout lines up to the first matching ``pattern`` (fails on EOF or the hang guard)."""
    lines: list[str] = []
    deadline = time.monotonic() + HANG_GUARD_S
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"process ended before printing {pattern!r}:\n{''.join(lines)}")
        lines.append(line)
        if re.search(pattern, line):
            return lines
    pytest.fail(f"no {pattern!r} within {HANG_GUARD_S} s:\n{''.join(lines)}")


@pytest.mark.slow
def test_train_py_saves_on_sigterm_and_exits_cleanly(tmp_path: Path) -> None:
    from ckptsvc import find_latest_checkpoint

    output = tmp_path / "run"
    proc = subprocess.Popen(
        train_py("--output", str(output), "--steps", "100000000", "--save-every", "20"),
        cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        read_until(proc, r"^step 20: ")  # training runs and has saved once
        proc.send_signal(signal.SIGTERM)
        rest = read_until(proc, r"^preempted: step \d+ is durable")
        rc = proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, "".join(rest)
    step = int(re.search(r"preempted: step (\d+)", rest[-1]).group(1))  # type: ignore[union-attr]
    assert find_latest_checkpoint(str(output)) == str(output / "checkpoints" / f"checkpoint-{step}")


@pytest.mark.slow
@pytest.mark.multiproc
def test_train_sh_runs_and_resumes_under_torchrun(tmp_path: Path) -> None:
    env = subprocess_env(NPROC="2", OUTPUT=str(tmp_path / "run"))
    script = str(DEPLOY / "torchrun" / "train.sh")
    run([script, "--steps", "4", "--save-every", "2", "--width", "64"], cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-4").is_dir()
    second = run(
        [script, "--steps", "6", "--save-every", "2", "--width", "64"], cwd=tmp_path, env=env
    )
    assert "continuing at step 5" in second.stdout + second.stderr


def iter_sbatch_directives() -> Iterator[str]:
    for line in (DEPLOY / "slurm" / "train.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH "):
            yield line.removeprefix("#SBATCH ").strip()


@pytest.mark.slow
def test_sbatch_runs_one_torchrun_per_node_with_rendezvous() -> None:
    directives = {k: v for k, _, v in (d.partition("=") for d in iter_sbatch_directives())}
    assert directives["--ntasks-per-node"] == "1", "one torchrun agent per node"
    assert "--signal" in directives and "--requeue" in directives
    text = (DEPLOY / "slurm" / "train.sbatch").read_text()
    for needed in ("srun", "torchrun", "--rdzv-backend=c10d", "--rdzv-endpoint=", "--rdzv-id=",
                   "--nnodes=", "--nproc-per-node=", "CKPTSVC_NODE_ID"):  # fmt: skip
        assert needed in text, f"train.sbatch lacks {needed}"
    train_flags = re.findall(r"^\s+(--[a-z-]+)\s", text.split("train.py", 1)[1], re.MULTILINE)
    check_python_argv(["python", "deploy/examples/train.py", *train_flags], "train.sbatch")
