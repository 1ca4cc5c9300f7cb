"""The `neon-ray` command surface (frozen), --dry-run, and one-line errors."""

import subprocess
import sys

import pytest

from neon_ray.cli import COMMANDS, build_parser, main

SURFACE = {
    "pretrain": {"--out", "--family", "--preset", "--data", "--steps", "--batch-size", "--lr", "--warmup-steps",
                 "--weight-decay", "--grad-clip", "--ema-decay", "--seed", "--threads", "--progress"},
    "sample": {"--checkpoint", "--out", "--num", "--per-class", "--shard-size", "--seed", "--workers",
               "--gpus-per-worker", "--cpus-per-worker", "--threads-per-worker", "--batch-size", "--max-retries",
               "--progress", "--cfg", "--steps", "--solver", "--churn", "--temperature"},
    "finetune": {"--checkpoint", "--data", "--out", "--images", "--snapshot-every", "--lr", "--warmup-images",
                 "--batch", "--workers", "--zero-stage", "--ema-decay"},
    "merge": {"--base", "--finetuned", "--w", "--out"},
    "import": {"--family", "--source", "--which", "--out"},
    "sweep": {"--base", "--snapshots", "--ref-stats", "--w", "--cfg", "--search", "--num-select", "--num-final",
              "--max-concurrent", "--out"},
    "evaluate": {"--checkpoint", "--ref-stats", "--cfg", "--steps"},
    "ref-stats": {"--out", "--data"},
    "run": {"--run-dir", "--base-checkpoint"},
}


def flags(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {o for a in sub._actions for o in a.option_strings if o.startswith("--")}


def test_commands_are_frozen():
    assert set(COMMANDS) == set(SURFACE)


@pytest.mark.parametrize("command", sorted(SURFACE))
def test_flags_include_the_documented_surface(command):
    got = flags(command)
    assert SURFACE[command] | {"--config", "--set", "--dry-run"} <= got, SURFACE[command] - got


def test_dry_run_prints_resolved_config(capsys):
    assert main(["sample", "--checkpoint", "c", "--out", "o", "--num", "10", "--cfg", "2.5",
                 "--set", "sampler.steps=4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "num: 10" in out and "guidance: 2.5" in out and "steps: 4" in out


@pytest.mark.parametrize("argv, message", [
    (["sample", "--checkpoint", "c", "--out", "o", "--num", "0"], "num: must be >= 1, got 0"),
    (["pretrain", "--out", "o", "--steps", "many"], "steps: expected int, got 'many'"),
    (["pretrain", "--out", "o", "--set", "modle.width=3"], "unknown key 'modle'"),
])
def test_config_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_checkpoint_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neon_ray.cli", "sample", "--checkpoint", str(tmp_path / "no"),
                           "--out", str(tmp_path / "o"), "--num", "4"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("neon-ray sample: error: checkpoint not found")
    assert not (tmp_path / "o").exists()
