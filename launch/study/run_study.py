#!/usr/bin/env python3
"""Runs a scaling study: every point of the sweep under mpirun on this machine (launch/epic_mpirun.sh),
or with --submit as one sbatch job per point (srun --mpi=pmix inside), then collects every point's
figures with what it ran on (host, card, versions, date, the exact command) into results.json and
results.csv. A point that fails is recorded with its error, never dropped.

    python3 launch/study/run_study.py launch/study/studies/cpu_weak.json --out out/cpu_weak
    python3 launch/study/run_study.py STUDY.json --submit --out /shared/study   # sbatch, then poll
    python3 launch/study/run_study.py STUDY.json --dry-run                      # the points and commands
    python3 launch/study/run_study.py STUDY.json --collect --out DIR            # (re)collect a finished run
Exit: 0 every point ran, 1 some point failed (results still written), 2 a bad study file or flags.
"""

import argparse
import csv
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import epic_results  # noqa: E402
import machine_info  # noqa: E402
import study_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(study_file.REPO_ROOT, "launch", "epic_mpirun.sh")
RESULTS_FORMAT = "epic-study-results-v1"


def fail_usage(message):
    print(f"run_study: {message}", file=sys.stderr)
    sys.exit(2)


def epic_help_flags(epic_binary, command):
    """The flags `epic COMMAND --help` lists, or None where the binary cannot tell."""
    try:
        done = subprocess.run([epic_binary, command, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    flags = set()
    for token in done.stdout.replace(",", " ").split():
        if token.startswith("--") and len(token) > 2:
            flags.add(token[2:].split("=")[0].split("{")[0].split(":")[0])
    return flags


def check_flags_exist(study, points, epic_binary):
    """StudyError naming the study key whose flag this epic does not have (e.g. --ep-dispatch before it exists)."""
    known = epic_help_flags(epic_binary, study.command)
    if known is None:
        raise study_file.StudyError(f"{epic_binary} {study.command} --help failed: is '{epic_binary}' an epic "
                                    "binary? (set --epic or the study's epic_binary)")
    origin = study_file.flags_of_axes(study)
    for flag in sorted(study_file.used_flags(points)):
        base = flag[3:] if flag.startswith("no-") and flag not in known else flag
        if flag not in known:
            where = origin.get(base, origin.get(flag, "the study"))
            raise study_file.StudyError(f"{study.path}: {where} asks for --{flag}, which `{epic_binary} "
                                        f"{study.command}` does not have (see its --help); remove it or use an "
                                        "epic that has it")


def output_file(point_dir):
    return os.path.join(point_dir, "result.json")


def point_command(study, point, epic_binary, point_dir):
    """argv of the epic part (after the launcher): the subcommand, its flags, the output flag."""
    return [*point.epic_args, epic_results.output_flag(study.command), output_file(point_dir)]


def local_launch(study, point, epic_binary, point_dir, extra_mpirun_args):
    """(argv, env additions) of one point under launch/epic_mpirun.sh on this machine."""
    mpirun_args = list(study.launcher.get("mpirun_args", [])) + list(extra_mpirun_args)
    if any(" " in a for a in mpirun_args):
        raise study_file.StudyError(f"{study.path}: launcher.mpirun_args entries must not contain spaces "
                                    "(epic_mpirun.sh splits EPIC_MPIRUN_ARGS at whitespace)")
    if point.nodes > 1:
        joined = " ".join(mpirun_args)
        if not any(k in joined for k in ("--hostfile", "--host", "plm_rsh_agent", "--machinefile")):
            raise study_file.StudyError(
                f"{study.path}: point {point.point_id} spans {point.nodes} nodes; a local run needs the hosts: "
                "give launcher.mpirun_args (or --mpirun-args) a --hostfile, or the emulated nodes' mpirun_args "
                "(tests/multinode/emulated_nodes.sh up DIR N writes DIR/mpirun_args); or use --submit")
        mpirun_args += ["--map-by", f"ppr:{point.ranks_per_node}:node"]
    oversubscribe = study.launcher.get("oversubscribe", point.ranks > (os.cpu_count() or 1))
    env = {"EPIC_BINARY": epic_binary, "EPIC_OVERSUBSCRIBE": "1" if oversubscribe else "0"}
    if mpirun_args:
        env["EPIC_MPIRUN_ARGS"] = " ".join(mpirun_args)
    env.update(study.launcher.get("env", {}))
    argv = ["bash", LAUNCHER, "-n", str(point.ranks), "--", *point_command(study, point, epic_binary, point_dir)]
    return argv, env, bool(oversubscribe)


def shell_line(argv, env):
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + (" " if env else "") + shlex.join(argv)


def error_line(stderr_text):
    """The line that says what went wrong: epic's own error line first, else the last line."""
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("epic: error") or "error [" in line:
            return line[:500]
    for line in reversed(lines):
        if not line.startswith("epic_mpirun:"):
            return line[:500]
    return "(no output on stderr)"


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _load_average():
    """The 1-minute load average (other work on the machine makes timings noisy), or None."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_local_point(study, point, epic_binary, point_dir, extra_mpirun_args):
    argv, env, oversubscribed = local_launch(study, point, epic_binary, point_dir, extra_mpirun_args)
    command = shell_line(argv, env)
    with open(os.path.join(point_dir, "command.txt"), "w", encoding="utf-8") as f:
        f.write(command + "\n")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    begin = time.monotonic()
    # The binary's identity per point: a shared binary can be replaced while a long study runs.
    status = {"launcher": "mpirun", "command": command, "started": started, "oversubscribed": oversubscribed,
              "load_average_before": _load_average(), "epic": machine_info.epic_identity(epic_binary)}
    with open(os.path.join(point_dir, "stdout.txt"), "wb") as out, \
            open(os.path.join(point_dir, "stderr.txt"), "wb") as err:
        # A session of its own, so a timeout ends mpirun and every rank it started (by the group's id).
        process = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, **env}, cwd=study_file.REPO_ROOT,
                                   start_new_session=True)
        try:
            status["exit_code"] = process.wait(timeout=study.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            status["exit_code"] = None
            status["error"] = f"timed out after {study.timeout_s:g} s (the study's timeout_s); ended"
    status["wall_s"] = round(time.monotonic() - begin, 3)
    status["load_average_after"] = _load_average()
    write_json(os.path.join(point_dir, "status.json"), status)
    return status


def slurm_time(study):
    if "time" in study.slurm:
        return study.slurm["time"]
    minutes = max(1, int((study.timeout_s + 59) // 60))
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def job_script(study, point, epic_binary, point_dir):
    """The sbatch script of one point: machine info from the node, then srun --mpi=pmix epic ..."""
    lines = ["#!/usr/bin/env bash",
             f"# epic study {study.name}, point {point.point_id} (written by launch/study/run_study.py)",
             f"#SBATCH --job-name=epic-study-{study.name}"[:200],
             f"#SBATCH --nodes={point.nodes}",
             f"#SBATCH --ntasks={point.ranks}",
             f"#SBATCH --ntasks-per-node={point.ranks_per_node}",
             f"#SBATCH --cpus-per-task={study.slurm.get('cpus_per_task', 1)}",
             f"#SBATCH --time={slurm_time(study)}",
             f"#SBATCH --output={os.path.join(point_dir, 'slurm.out')}",
             f"#SBATCH --error={os.path.join(point_dir, 'slurm.err')}"]
    if study.slurm.get("partition"):
        lines.append(f"#SBATCH --partition={study.slurm['partition']}")
    if study.slurm.get("gpus_per_task"):
        lines.append(f"#SBATCH --gpus-per-task={study.slurm['gpus_per_task']}")
    epic_argv = point_command(study, point, epic_binary, point_dir)
    srun = ["srun", "--mpi=pmix", f"--ntasks={point.ranks}", epic_binary, *epic_argv]
    lines += ["set -u",
              "export NCCL_NVLS_ENABLE=0  # NVLink SHARP stays off on the GPU machines this targets"]
    for key, value in study.launcher.get("env", {}).items():
        lines.append(f"export {key}={shlex.quote(value)}")
    point_q = shlex.quote(point_dir)
    lines += ["# Relative paths in the study's args are relative to the checkout's root, as in local runs.",
              f"cd {shlex.quote(study_file.REPO_ROOT)}",
              f"python3 {shlex.quote(os.path.join(HERE, 'machine_info.py'))} --epic {shlex.quote(epic_binary)} "
              f"--out {point_q}/machine.json || echo 'run_study: machine_info.py failed on this node' >&2",
              f"echo {shlex.quote(shlex.join(srun))} > {point_q}/command.txt",
              "rc=0",
              f"{shlex.join(srun)} > {point_q}/stdout.txt 2> {point_q}/stderr.txt || rc=$?",
              f"echo \"$rc\" > {point_q}/exit_code",
              "exit \"$rc\""]
    return "\n".join(lines) + "\n"


def submit_points(study, points, epic_binary, out_dir, max_wait_s):
    """One sbatch job per point; polls squeue until every job has left the queue (or max_wait_s)."""
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            fail_usage(f"--submit needs {tool} on PATH (Slurm); run without --submit to use mpirun here")
    jobs = {}
    for point in points:
        point_dir = os.path.join(out_dir, "points", point.point_id)
        script = os.path.join(point_dir, "job.sh")
        with open(script, "w", encoding="utf-8") as f:
            f.write(job_script(study, point, epic_binary, point_dir))
        argv = ["sbatch", "--parsable", *study.slurm.get("sbatch_args", []), script]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        status = {"launcher": "sbatch", "submit_command": shlex.join(argv),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if done.returncode != 0:
            status["error"] = f"sbatch failed (exit {done.returncode}): {error_line(done.stderr)}"
            status["exit_code"] = None
            write_json(os.path.join(point_dir, "status.json"), status)
            print(f"run_study: {point.point_id}: {status['error']}", file=sys.stderr)
            continue
        job_id = done.stdout.strip().split(";")[0]
        status["job_id"] = job_id
        write_json(os.path.join(point_dir, "status.json"), status)
        jobs[job_id] = point_dir
        print(f"run_study: {point.point_id}: submitted job {job_id}", file=sys.stderr)
    poll_s = float(study.slurm.get("poll_s", 5))
    deadline = time.monotonic() + max_wait_s
    pending = set(jobs)
    while pending:
        listed = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(sorted(pending))],
                                capture_output=True, text=True, timeout=60)
        still = {line.strip() for line in listed.stdout.splitlines() if line.strip()} & pending
        if listed.returncode != 0 and "Invalid job id" not in listed.stderr:
            still = pending  # squeue trouble: keep waiting (bounded by the deadline)
        pending = still
        if not pending:
            break
        if time.monotonic() > deadline:
            for job_id in sorted(pending):
                subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
                point_dir = jobs[job_id]
                status = json.load(open(os.path.join(point_dir, "status.json"), encoding="utf-8"))
                status["error"] = f"job {job_id} did not finish within {max_wait_s:g} s of waiting; cancelled"
                write_json(os.path.join(point_dir, "status.json"), status)
            break
        time.sleep(poll_s)


def finish_slurm_status(point_dir, status):
    """Exit code and command from the files the job wrote; an error where it wrote none."""
    exit_file = os.path.join(point_dir, "exit_code")
    if os.path.isfile(exit_file):
        text = open(exit_file, encoding="utf-8").read().strip()
        status["exit_code"] = int(text) if text.lstrip("-").isdigit() else None
    elif "error" not in status:
        err = os.path.join(point_dir, "slurm.err")
        tail = error_line(open(err, encoding="utf-8", errors="replace").read()) if os.path.isfile(err) else ""
        status["error"] = f"job {status.get('job_id')} ended without an exit code (cancelled, timed out or its " \
                          f"node failed){': ' + tail if tail else ''}"
        status.setdefault("exit_code", None)
    command = os.path.join(point_dir, "command.txt")
    if os.path.isfile(command):
        status["command"] = open(command, encoding="utf-8").read().strip()
    return status


def collect(study, points, out_dir, local_machine):
    """One record per measurement row of every point (a failed point: one record with its error)."""
    records = []
    for point in points:
        point_dir = os.path.join(out_dir, "points", point.point_id)
        status_path = os.path.join(point_dir, "status.json")
        status = json.load(open(status_path, encoding="utf-8")) if os.path.isfile(status_path) else \
            {"error": "never ran (no status.json)", "exit_code": None}
        if status.get("launcher") == "sbatch":
            status = finish_slurm_status(point_dir, status)
        machine_path = os.path.join(point_dir, "machine.json")
        machine = json.load(open(machine_path, encoding="utf-8")) if os.path.isfile(machine_path) else local_machine
        base = {"study": study.name, "point": point.point_id, "repeat": point.repeat, **point.params,
                "ranks": point.ranks, "nodes": point.nodes, "ranks_per_node": point.ranks_per_node,
                "scaling": study.scaling}
        epic = status.get("epic") or machine  # local runs: identified when the point started
        meta = {"host": machine.get("host"), "card": machine.get("card"), "cores": machine.get("cores"),
                "epic_version": epic.get("epic_version"), "epic_sha256": epic.get("epic_sha256"),
                "mpi_version": machine.get("mpi_version"), "date": status.get("started", machine.get("date")),
                "command": status.get("command", status.get("submit_command")),
                "launcher": status.get("launcher"), "job_id": status.get("job_id"),
                "oversubscribed": status.get("oversubscribed"), "wall_s": status.get("wall_s"),
                "load_average_before": status.get("load_average_before"),
                "load_average_after": status.get("load_average_after")}
        error = status.get("error")
        rows = []
        if error is None and status.get("exit_code") != 0:
            err_path = os.path.join(point_dir, "stderr.txt")
            text = open(err_path, encoding="utf-8", errors="replace").read() if os.path.isfile(err_path) else ""
            error = f"exit code {status.get('exit_code')}: {error_line(text)}"
        if error is None:
            try:
                rows = epic_results.rows_from_file(study.command, output_file(point_dir))
            except (OSError, ValueError, KeyError, TypeError) as e:
                error = f"no figures: {e}"
        if error is not None:
            records.append({**base, "status": "failed", "error": error, **meta})
            continue
        for row in rows:
            clean = {k: v for k, v in row.items() if k not in base}  # the study's own names win
            records.append({**base, "status": "ok", "error": None, **clean, **meta})
    return records


def write_results(out_dir, study, records, local_machine):
    write_json(os.path.join(out_dir, "results.json"),
               {"format": RESULTS_FORMAT, "study": study.raw, "study_file": study.path,
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "collected_on": local_machine, "records": records})
    columns = []
    for record in records:
        for key in record:
            if key not in columns:
                columns.append(key)
    tmp = os.path.join(out_dir, "results.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in columns})
    os.replace(tmp, os.path.join(out_dir, "results.csv"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("study", help="the study file (JSON; YAML where PyYAML imports)")
    parser.add_argument("--out", help="results folder (default: out/study-NAME in the checkout)")
    parser.add_argument("--epic", help="the epic binary (default: the study's epic_binary, else build/epic)")
    parser.add_argument("--submit", action="store_true", help="one sbatch job per point instead of local mpirun")
    parser.add_argument("--dry-run", action="store_true", help="print the points and commands; run nothing")
    parser.add_argument("--collect", action="store_true", help="only collect the points already in --out")
    parser.add_argument("--force", action="store_true", help="reuse an --out that already holds results")
    parser.add_argument("--mpirun-args", default="", help="extra mpirun options for local runs (whitespace-split)")
    parser.add_argument("--max-wait-s", type=float, help="--submit: stop waiting after this long "
                        "(default: the study's timeout_s x points + 600)")
    args = parser.parse_args(argv)

    try:
        study = study_file.load_study(args.study)
        points = study_file.expand(study)
    except study_file.StudyError as e:
        fail_usage(str(e))
    epic_binary = os.path.abspath(args.epic or study.epic_binary or os.path.join(study_file.REPO_ROOT, "build", "epic"))
    out_dir = os.path.abspath(args.out or os.path.join(study_file.REPO_ROOT, "out", f"study-{study.name}"))

    if args.dry_run:
        for point in points:
            if args.submit:
                print(f"# {point.point_id}\n" + job_script(study, point, epic_binary,
                                                           os.path.join(out_dir, "points", point.point_id)))
            else:
                try:
                    argv_, env, _ = local_launch(study, point, epic_binary,
                                                 os.path.join(out_dir, "points", point.point_id),
                                                 args.mpirun_args.split())
                except study_file.StudyError as e:
                    fail_usage(str(e))
                print(f"{point.point_id}: {shell_line(argv_, env)}")
        print(f"run_study: {len(points)} point(s)", file=sys.stderr)
        return 0

    if not (os.path.isfile(epic_binary) and os.access(epic_binary, os.X_OK)):
        fail_usage(f"epic binary '{epic_binary}' is missing or not executable; build it (launch/build.sh) or "
                   "pass --epic PATH")
    if not args.submit and shutil.which("mpirun") is None and not args.collect:
        fail_usage("mpirun not found: install OpenMPI (launch/setup_debian.sh), or use --submit with Slurm")
    try:
        check_flags_exist(study, points, epic_binary)
    except study_file.StudyError as e:
        fail_usage(str(e))
    if not args.collect:
        if os.path.exists(os.path.join(out_dir, "results.json")) and not args.force:
            fail_usage(f"{out_dir} already holds results.json; pass --force to run again there, or another --out")
        for point in points:
            os.makedirs(os.path.join(out_dir, "points", point.point_id), exist_ok=True)
            for stale in ("result.json", "status.json", "exit_code", "machine.json"):
                path = os.path.join(out_dir, "points", point.point_id, stale)
                if os.path.exists(path):
                    os.unlink(path)
    local_machine = machine_info.collect(epic_binary)

    if not args.collect:
        if args.submit:
            max_wait = args.max_wait_s or study.timeout_s * len(points) + 600
            submit_points(study, points, epic_binary, out_dir, max_wait)
        else:
            extra = args.mpirun_args.split()
            for number, point in enumerate(points, 1):
                point_dir = os.path.join(out_dir, "points", point.point_id)
                try:
                    status = run_local_point(study, point, epic_binary, point_dir, extra)
                except study_file.StudyError as e:
                    fail_usage(str(e))
                state = "ok" if status.get("exit_code") == 0 else f"FAILED ({status.get('error') or 'exit ' + str(status.get('exit_code'))})"
                print(f"run_study: [{number}/{len(points)}] {point.point_id}: {state} in {status['wall_s']:.1f} s",
                      file=sys.stderr)

    records = collect(study, points, out_dir, local_machine)
    write_results(out_dir, study, records, local_machine)
    failed = [r for r in records if r["status"] != "ok"]
    print(f"run_study: {len(records)} record(s) from {len(points)} point(s), {len(failed)} failed; "
          f"{os.path.join(out_dir, 'results.json')} and results.csv", file=sys.stderr)
    for record in failed:
        print(f"run_study: FAILED {record['point']}: {record['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
