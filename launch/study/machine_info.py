#!/usr/bin/env python3
"""What a measurement ran on: host, cards (nvidia-smi) or else the CPU model, core count, the epic
binary (sha256, git commit where it lies in a checkout), the MPI and Slurm versions, the date.
Importable (collect) and a CLI for Slurm jobs (collected on the node that runs the point):
    python3 launch/study/machine_info.py --epic build/epic --out machine.json
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys


def _first_line(command, timeout=10):
    """First non-empty output line of a command, or None when it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            return line.strip()
    return None


def gpu_cards():
    """One entry per GPU from nvidia-smi, or [] when there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(folder):
    """HEAD of the git checkout holding folder (and whether it has local changes), or None."""
    if shutil.which("git") is None or not os.path.isdir(folder):
        return None
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def epic_identity(epic_binary):
    """The binary's path, sha256 (first 16 hex), mtime, and a version: `epic --version` where it has one,
    else the git commit of the checkout the binary lies in, else EPIC_VERSION from the environment."""
    info = {"epic_binary": os.path.abspath(epic_binary) if epic_binary else None}
    if not epic_binary or not os.path.isfile(epic_binary):
        info["epic_version"] = os.environ.get("EPIC_VERSION", "unknown (binary missing)")
        return info
    digest = hashlib.sha256()
    with open(epic_binary, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    info["epic_sha256"] = digest.hexdigest()[:16]
    info["epic_mtime"] = datetime.datetime.fromtimestamp(os.path.getmtime(epic_binary),
                                                         datetime.timezone.utc).isoformat(timespec="seconds")
    version = _first_line([epic_binary, "--version"])
    if version and "version" in version.lower() and "error" not in version.lower():
        info["epic_version"] = version
    elif os.environ.get("EPIC_VERSION"):
        info["epic_version"] = os.environ["EPIC_VERSION"]
    else:
        commit = _git_commit(os.path.dirname(os.path.abspath(epic_binary)))
        info["epic_version"] = f"git {commit}" if commit else "unknown (no --version, not in a git checkout)"
    return info


def collect(epic_binary=None):
    cards = gpu_cards()
    harness_commit = _git_commit(os.path.dirname(os.path.abspath(__file__)))
    return {
        "host": socket.gethostname(),
        "card": "; ".join(cards) if cards else f"CPU: {cpu_model()}",
        "gpus": len(cards),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mpi_version": _first_line(["mpirun", "--version"]) or "none (mpirun not found)",
        "slurm_version": _first_line(["sbatch", "--version"]),
        "harness_git_commit": harness_commit,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **epic_identity(epic_binary),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epic", help="the epic binary to identify")
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    text = json.dumps(collect(args.epic), indent=2) + "\n"
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
