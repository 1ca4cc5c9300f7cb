"""`ray job submit -- python jobs/neon_xar.py` against a real local Ray head.

Starts `ray start --head` on loopback (its own cluster, separate from the
session's embedded Ray), submits the smoke-sized config, and checks the job
SUCCEEDS with a complete run directory; then deletes the last stage's output
and resubmits: only that stage runs again.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from s3server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback in its own process group (``ray start --block``).

    Stopped by signalling that group: ``ray stop`` would kill every Ray on the
    machine, including the test session's own.
    """
    temp = tempfile.mkdtemp(prefix="neon-rayhead-", dir="/tmp")
    port, dash = free_port(), free_port()
    # Ray 2.60 turns token authentication on; the submitter sends the token the head wrote.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}
    log = open(os.path.join(temp, "head.log"), "w")
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
                             # Free ports for the per-node agents: the session's own Ray holds the defaults.
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
                             f"--object-manager-port={free_port()}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert head.poll() is None, open(log.name).read()[-3000:]
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # an HTTP answer (401: no token sent) means the dashboard is up
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail(f"the Ray head's dashboard did not answer in 120 s: {open(log.name).read()[-3000:]}")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def submit(address: str, env: dict, run_dir: str) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ROOT, "--",
           sys.executable, "jobs/neon_xar.py", "--config", "jobs/configs/smoke.yaml", "--set", f"run_dir={run_dir}"]
    for _ in range(90):  # the head's job agent starts a little after its dashboard answers
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(2)
    return proc


def submit_and_succeed(address: str, env: dict, run_dir: str) -> tuple[dict, dict[str, str]]:
    """Submit the smoke job; it must succeed. Returns run.json and each stage's status."""
    proc = submit(address, env, run_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out.lower(), out[-4000:]
    record = json.load(open(os.path.join(run_dir, "run.json")))
    return record, {s: v["status"] for s, v in record["stages"].items()}


def test_submitted_job_succeeds_and_resumes(ray_head, tmp_path):
    address, env = ray_head
    run_dir = str(tmp_path / "run")
    record, status = submit_and_succeed(address, env, run_dir)
    assert status == {"base": "ran", "reference": "ran", "synthetic": "ran", "finetune": "ran", "sweep": "ran"}
    for path in ("base/manifest.json", "synthetic/manifest.json", "finetune/manifest.json",
                 "sweep/results.parquet", "sweep/report.md", "sweep/final/manifest.json"):
        assert os.path.exists(os.path.join(run_dir, path)), path
    assert record["results"]["neon"]["fid"] > 0

    shutil.rmtree(os.path.join(run_dir, "sweep"))
    _, status = submit_and_succeed(address, env, run_dir)
    assert status == {"base": "skipped", "reference": "skipped", "synthetic": "skipped", "finetune": "skipped",
                      "sweep": "ran"}
