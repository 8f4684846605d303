"""Which node writer a process may use: :func:`node_id` and :func:`current_identity`.

:func:`node_id` names the writer a process shares (its socket, its segments' names): the
node's launched job, or ``CKPTSVC_NODE_ID``; :func:`current_identity` says whether a
process may use a running writer at all.

The node writer keeps the environment of the process that started it and builds every
filesystem (s3fs, gcsfs, local) from that environment: credentials, endpoints, proxies,
CA bundles and the ``CKPTSVC_*`` settings of the writer process. So a writer may only
serve processes whose environment would have built the same filesystems, from the same
installation:

- ``package_dir`` / ``prefix`` / ``version``: the ckptsvc package directory, the Python
  environment (``sys.prefix``: another venv has other s3fs/gcsfs versions) and
  ``ckptsvc.__version__``;
- ``env_digest``: a SHA-256 of every variable :func:`job_environment` selects (cloud
  credentials and settings, proxies, CA bundles, ``HOME`` for ``~/.aws``, the launcher's
  job id and every ``CKPTSVC_*`` knob except the two that name the writer itself and
  those each job carries in its ``WriterOptions``: fsync, I/O threads, chunk and part
  sizes, retries and direct I/O settings never split writers).

The identity's ``key`` is part of the writer's socket name, so two jobs that differ in any
of these start separate writers even with the same ``CKPTSVC_NODE_ID``; the handshake
compares the full identity on both sides, so a writer never serves a mismatching trainer
even on an explicit ``CKPTSVC_WRITER_SOCKET``. Local ranks of one job share a writer: a
launcher gives them the same environment apart from rank variables, which are not read.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping

from ckptsvc import knobs
from ckptsvc import version as version_module
from ckptsvc.version import __version__

from .options import PER_JOB_VARIABLES
from .protocol import WriterIdentity

__all__ = ["current_identity", "job_environment", "node_id"]

_PREFIXES = (
    "AWS_",
    "BOTO_",
    "S3_",
    "GOOGLE_",
    "GCS",
    "GCLOUD",
    "CLOUDSDK_",
    "STORAGE_EMULATOR_HOST",
    "AZURE_",
    "FSSPEC_",
    "CKPTSVC_",
)
_NAMES = frozenset(
    {
        "HOME",
        "SLURM_JOB_ID",
        "TORCHELASTIC_RUN_ID",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    }
)
# They name the writer (socket path, node id): part of the socket path already. The per-job
# settings (``WriterOptions``) travel with each job: the writer never reads them.
_IGNORED = frozenset({"CKPTSVC_NODE_ID", "CKPTSVC_WRITER_SOCKET"}) | PER_JOB_VARIABLES


def job_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default ``os.environ``) that a save's storage depends on."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in sorted(env.items())
        if k not in _IGNORED and (k in _NAMES or k.startswith(_PREFIXES))
    }


def current_identity(environ: Mapping[str, str] | None = None) -> WriterIdentity:
    """This process's identity (read now: the environment may change before a writer starts)."""
    digest = hashlib.sha256()
    for k, v in job_environment(environ).items():
        digest.update(f"{k}={v}\0".encode(errors="surrogateescape"))
    return WriterIdentity(
        package_dir=os.path.dirname(os.path.abspath(version_module.__file__)),
        version=__version__,
        prefix=os.path.abspath(sys.prefix),
        env_digest=digest.hexdigest(),
    )


def node_id(explicit: str | None = None) -> str:
    """This process's writer id, reduced to ``[A-Za-z0-9_.]``: ``CKPTSVC_NODE_ID`` (how
    processes ask to share one node writer), else ``u<uid>`` plus the launched job this
    process belongs to, so that the local ranks of one job share a writer and unrelated
    jobs never do: torchrun's ``TORCHELASTIC_RUN_ID``; Slurm's ``SLURM_JOB_ID`` and
    ``SLURM_STEP_ID`` (an ``srun`` step); ``MASTER_ADDR`` and ``MASTER_PORT`` (any other
    multi-process launch); else this process alone (``p<pid>``)."""
    raw = knobs.NODE_ID.get(explicit)
    if not raw:
        raw = f"u{os.getuid()}_{_launch_key()}"
    return re.sub(r"[^A-Za-z0-9_.]", "_", raw)[:64]


def _launch_key(environ: Mapping[str, str] | None = None) -> str:
    """The launched job of this process, as a short name (see :func:`node_id`)."""
    env = os.environ if environ is None else environ
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # torchrun without --rdzv-id says "none"
        return "te" + _short(run_id)
    job, step = env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")
    if job and step:
        return f"slurm{_short(job)}.{_short(step)}"
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    if addr and port:
        return "m" + hashlib.sha256(f"{addr}:{port}".encode()).hexdigest()[:12]
    return f"p{os.getpid()}"


def _short(text: str) -> str:
    """``text`` if it is a short plain name, else a digest of it."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,24}", text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:16]
