"""Benchmark the Neon merge: streaming over disk and in memory. Prints one JSON line.

(a) Streaming merge of synthetic fp32 checkpoints (2 GB and 4 GB, sharded at
    1 GB, written to a temp dir on local disk) against the I/O floor measured in
    the same run: read both inputs fully and write one output of the same size
    with plain buffered I/O (8 MB blocks, fsync at the end, as the merge fsyncs
    its shards). The page cache cannot be dropped here, so floor and merge run
    alternately (floor, merge, floor, merge) and each ratio uses the medians;
    both see the same cache state. Target: merge / floor ≤ 1.3.
    CPU seconds (user + system) of both are reported too: on a shared, busy
    machine wall time mostly measures the CPU share a process gets.
(b) Peak resident memory (VmHWM) of a subprocess that runs only the merge,
    with its RSS right after imports for reference. Target: < 1 GB and < 10 %
    growth from 2 GB to 4 GB.
(c) The in-memory merger's time per w (``load_into``) on a tiny and a ~100M
    parameter model, against the obvious alternative: a fresh state dict of
    ``r - w * (s - r)`` per tensor and ``model.load_state_dict``.

Run: ``.venv/bin/python benchmarks/bench_merge.py [--sizes-gb 2 4] [--reps 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neon_ray import checkpoints as ck  # noqa: E402
from neon_ray import tensorfile as tf  # noqa: E402
from neon_ray import storage as st  # noqa: E402
from neon_ray.config import option, to_dict  # noqa: E402
from neon_ray.families.base import Family  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILY = "bench_merge:BenchFamily"      # importable from HERE (added to sys.path below)
BLOCK = 8 << 20


@dataclass
class BenchConfig:
    image_size: int = option(8, "side")
    channels: int = option(1, "channels")
    num_classes: int = option(0, "classes")
    width: int = option(4096, "layer width")
    layers: int = option(32, "square linear layers")


class BenchNet(nn.Module):
    def __init__(self, c: BenchConfig):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(c.width, c.width) for _ in range(c.layers))
        self.register_buffer("pos", torch.linspace(-1, 1, c.width))    # (width,) copied


class BenchFamily(Family):
    name = "bench"
    config_cls = BenchConfig
    presets = {"bench": BenchConfig}

    def build(self, config):
        return BenchNet(config)

    def loss(self, model, images, labels):
        raise NotImplementedError

    def sample(self, model, labels, seeds, sampler):
        raise NotImplementedError


def write_synthetic(uri: str, config: BenchConfig, finetuned: bool) -> None:
    """A sharded fp32 checkpoint written tensor by tensor (θ_s = θ_r + 1e-3 noise)."""
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in BenchNet(config).state_dict().items()}
    metas = [(k, dt, sh) for k, (sh, dt) in sorted(shapes.items())]
    shards, size = [[]], 0
    for m in metas:
        n = m[1].itemsize * torch.Size(m[2]).numel()
        if shards[-1] and size + n > (1 << 30):
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += n
    files, weight_map = {}, {}
    for i, shard in enumerate(shards):
        name = ck.shard_name(i, len(shards))
        writer = tf.ShardWriter(st.join(uri, name), shard)
        for key in writer.order:
            shape = shapes[key][0]
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            t = torch.randn(shape, generator=g) * 0.02
            if finetuned and key != "pos":
                t += torch.randn(shape) * 1e-3
            writer.write(t)
            weight_map[key] = name
        files[name] = writer.close()
    index = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    st.write_bytes(st.join(uri, ck.INDEX), index)
    files[ck.INDEX] = st.sha256_bytes(index)
    info = ck.CheckpointInfo(family=FAMILY, model=to_dict(config), preset="bench")
    config_blob = json.dumps(info.to_json()).encode()
    st.write_bytes(st.join(uri, "config.json"), config_blob)
    files["config.json"] = st.sha256_bytes(config_blob)
    st.write_manifest(uri, files, {"kind": "checkpoint", "family": FAMILY})


def io_floor(base: str, finetuned: str, out_file: str) -> float:
    """Seconds to read both inputs fully and write one output of the same size."""
    t0 = time.perf_counter()
    buf_r, buf_s = bytearray(BLOCK), bytearray(BLOCK)
    names = list(ck.weight_files(base))
    with open(out_file, "wb") as out:
        for name in names:
            with open(os.path.join(base, name), "rb") as fr, open(os.path.join(finetuned, name), "rb") as fs:
                while True:
                    n = fr.readinto(buf_r)
                    fs.readinto(buf_s)
                    if not n:
                        break
                    out.write(memoryview(buf_r)[:n])
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - t0


MERGE_SCRIPT = """
import json, resource, sys, time
sys.path[:0] = [{root!r}, {here!r}]
from neon_ray.merge import merge_checkpoints
def status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
rss0, cpu0 = status('VmRSS:'), cpu()
t0 = time.perf_counter()
merge_checkpoints({base!r}, {ft!r}, 1.6, {out!r})
print(json.dumps({{"seconds": time.perf_counter() - t0, "cpu": cpu() - cpu0, "vmhwm": status('VmHWM:'),
                  "rss_after_import": rss0}}))
"""


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def merge_subprocess(base: str, finetuned: str, out: str) -> dict:
    script = MERGE_SCRIPT.format(root=os.path.dirname(HERE), here=HERE, base=base, ft=finetuned, out=out)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"merge subprocess failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(base: str, finetuned: str, out: str, key: str) -> None:
    from neon_ray.merge import neon_tensor

    got = [tf.TensorReader(u).get(ck.tensor_index(u)[key]) for u in (base, finetuned, out)]
    if not torch.equal(got[2], neon_tensor(got[0], got[1], 1.6)):
        raise AssertionError(f"merged {key} differs from neon_tensor")


def bench_disk(root: str, gb: int, reps: int) -> dict:
    config = BenchConfig(width=4096, layers=gb * 16)          # 64 MB per layer, fp32
    base, ft = os.path.join(root, "base"), os.path.join(root, "ft")
    write_synthetic(base, config, False)
    write_synthetic(ft, config, True)
    floors, merges, hwm, floor_cpu, merge_cpu = [], [], [], [], []
    for _ in range(reps):
        floor_file = os.path.join(root, "floor.bin")
        cpu0 = cpu_seconds()
        floors.append(io_floor(base, ft, floor_file))
        floor_cpu.append(cpu_seconds() - cpu0)
        os.unlink(floor_file)
        res = merge_subprocess(base, ft, os.path.join(root, "out"))
        merges.append(res["seconds"])
        merge_cpu.append(res["cpu"])
        hwm.append(res["vmhwm"])
        rss0 = res["rss_after_import"]
        if len(merges) == 1:      # spot-check one tensor against the pure function
            check(base, ft, os.path.join(root, "out"), "layers.1.weight")
        shutil.rmtree(os.path.join(root, "out"))
    size = sum(m.nbytes for m in ck.tensor_index(base).values())
    shutil.rmtree(base)
    shutil.rmtree(ft)
    return {"bytes": size, "floor_s": [round(x, 2) for x in floors], "merge_s": [round(x, 2) for x in merges],
            "ratio": round(statistics.median(merges) / statistics.median(floors), 3),
            "floor_cpu_s": [round(x, 2) for x in floor_cpu], "merge_cpu_s": [round(x, 2) for x in merge_cpu],
            "cpu_ratio": round(statistics.median(merge_cpu) / statistics.median(floor_cpu), 3),
            "peak_rss_mb": round(max(hwm) / 2 ** 20, 1), "rss_after_import_mb": round(rss0 / 2 ** 20, 1)}


def bench_in_memory(width: int, layers: int, reps: int = 5) -> dict:
    from neon_ray.merge import InMemoryMerger

    torch.manual_seed(0)
    model = BenchNet(BenchConfig(width=width, layers=layers))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v + 1e-3 * torch.randn_like(v) if k != "pos" else v.clone() for k, v in base.items()}
    merger = InMemoryMerger(base, ft, copy_keys={"pos"})
    ws = [0.5 + 0.25 * i for i in range(reps)]

    def ours():
        for w in ws:
            merger.load_into(model, w)

    def naive():
        for w in ws:
            sd = {k: base[k] - w * (ft[k] - base[k]) if k != "pos" else base[k] for k in base}
            model.load_state_dict(sd)

    times = {}
    for name, fn in (("ours", ours), ("naive", naive), ("ours", ours), ("naive", naive)):
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append((time.perf_counter() - t0) / reps)
    params = sum(v.numel() for v in base.values())
    return {"params": params, "s_per_w": round(min(times["ours"]), 5),
            "naive_s_per_w": round(min(times["naive"]), 5),
            "ratio": round(min(times["ours"]) / min(times["naive"]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir", default=None, help="temp dir parent (local disk)")
    args = parser.parse_args()
    result = {"bench": "merge", "cpus": os.cpu_count(), "loadavg_start": round(os.getloadavg()[0], 1)}
    for gb in args.sizes_gb:
        root = tempfile.mkdtemp(prefix="bench-merge-", dir=args.dir)
        try:
            result[f"disk_{gb}gb"] = bench_disk(root, gb, args.reps)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if len(args.sizes_gb) >= 2:
        lo, hi = (result[f"disk_{g}gb"]["peak_rss_mb"] for g in args.sizes_gb[:2])
        result["peak_rss_growth"] = round(hi / lo - 1, 3)
    result["in_memory_tiny"] = bench_in_memory(width=32, layers=4)
    result["in_memory_100m"] = bench_in_memory(width=2048, layers=24)
    result["loadavg_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
