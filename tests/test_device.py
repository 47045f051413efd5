"""device.py: one device check and one bf16 rule for every command; the run lock (fsutil)."""

import errno

import pytest
import torch
from typer.testing import CliRunner

from flowercli import device
from flowercli.cli import app
from flowercli.config import parse_set
from flowercli.device import cpu_has_native_bf16, resolve_device, resolve_precision
from flowercli.errors import FlowerError, InputError
from flowercli.fsutil import exclusive_lock, run_lock

runner = CliRunner()


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu0", "cuda:", "cuda:x", "CUDA", "cpu:0"):
        with pytest.raises(InputError, match=f"unknown device '{bad}': use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    assert parse_set(["device=cuda:1"]) == {"device": "cuda:1"}  # checked when the run starts, not by --set


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_is_the_same_message_everywhere(tmp_path):
    for name in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match=f"--device {name}: this torch .* sees no CUDA GPU; use --device cpu"):
            resolve_device(name)
    # generate asks before it looks for a checkpoint; eval before it reads the data.
    for args in (["generate", "a red flower", "--device", "cuda:0", "--checkpoint", str(tmp_path / "none.pt")],
                 ["eval", "--checkpoint", str(tmp_path / "none.pt"), "--device", "cuda:0"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, res.output
        assert "--device cuda:0: this torch" in res.output and "sees no CUDA GPU" in res.output


def test_bf16_only_with_the_instructions(tmp_path, monkeypatch):
    with_flag, without = tmp_path / "with", tmp_path / "without"
    with_flag.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_tile\n")
    without.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512vl\n")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_has_native_bf16(with_flag)
    assert not cpu_has_native_bf16(without)  # AVX-512 without BF16: emulated, so not chosen
    assert not cpu_has_native_bf16(tmp_path / "missing")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_has_native_bf16(with_flag)  # torch's kernels would not use them


def test_training_and_eval_precision_follow_one_rule(monkeypatch):
    from flowercli.metrics.features import resolve_precision as eval_precision

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu) == (torch.bfloat16 if native else None)
        assert eval_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(InputError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", cpu)


def test_run_lock_keeps_a_second_holder_out(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(FlowerError, match="in use by another flowercli process"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released on exit
        pass


def test_lock_on_a_file_system_without_locks_goes_on(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with exclusive_lock(tmp_path / ".lock", FlowerError("busy")):
        ran.append(True)
    assert ran == [True]
