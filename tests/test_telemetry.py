"""Telemetry: JSONL/TensorBoard sinks, energy meters (fake NVML and sysfs), progress, provenance, perf."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch

from dist_train.telemetry import (
    MetricsWriter,
    Progress,
    StepTimer,
    collect_provenance,
    make_energy_meter,
    mfu,
    peak_flops,
    peak_memory_bytes,
    tag_for,
    tokens_per_s,
    write_provenance,
)
from dist_train.telemetry.energy import PowerIntegrator


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------- writers


def test_jsonl_lines_are_json_with_step_and_null(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    w.log(1, {"loss": 2.5, "energy_j": None, "tokens_per_s": 1000, "note": "x"})
    w.log(2, {"loss": torch.tensor(2.25), "val_loss": float("nan")})
    w.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["step", "loss", "energy_j", "tokens_per_s", "note"]
    assert first["step"] == 1 and first["loss"] == 2.5 and first["energy_j"] is None
    assert "null" in lines[0]
    assert second == {"step": 2, "loss": 2.25, "val_loss": None}  # tensor -> number, NaN -> null


def test_disabled_writer_writes_nothing(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "run", enabled=False, tensorboard=True)
    w.truncate_from(3)
    w.log(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_truncate_from_drops_replayed_steps(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        w.log(step, {"loss": float(step)})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # torn line from a crash mid-write

    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    assert resumed.truncate_from(4) == 3  # steps 4, 5 and the torn line
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in _records(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_truncate_from_without_file_is_noop(tmp_path: Path) -> None:
    assert MetricsWriter(tmp_path, enabled=True, tensorboard=False).truncate_from(1) == 0


def test_tensorboard_event_file_has_loss(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    w.log(1, {"loss": 3.0, "tokens_per_s": 10.0, "energy_j": None, "mystery": 7, "note": "text"})
    w.log(2, {"loss": 2.0})
    w.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "perf/tokens_per_s", "misc/mystery"} <= tags
    assert "energy/energy_j" not in tags and "misc/note" not in tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.0)]


def test_tag_mapping() -> None:
    assert tag_for("loss") == "train/loss"
    assert tag_for("energy_j") == "energy/energy_j"
    assert tag_for("val_top5") == "eval/top5"
    assert tag_for("stage0/loss") == "stage0/loss"
    assert tag_for("whatever") == "misc/whatever"


# -------------------------------------------------------------------------------------- energy


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """pynvml-shaped stand-in: one GPU, a scripted energy counter (mJ) and power (mW)."""

    NVMLError = FakeNVMLError

    def __init__(self, counter_mj: list[int] | None = None, power_mw: float = 0.0, devices: int = 1,
                 init_fails: bool = False) -> None:
        self._counter = list(counter_mj) if counter_mj is not None else None
        self.power_mw, self.devices, self.init_fails = power_mw, devices, init_fails
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index >= self.devices:
            raise FakeNVMLError("Invalid Argument")
        return f"gpu{index}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        if self._counter is None:
            raise FakeNVMLError("Not Supported")
        return self._counter.pop(0) if len(self._counter) > 1 else self._counter[0]

    def nvmlDeviceGetPowerUsage(self, handle: str) -> float:
        return self.power_mw


def test_auto_without_gpu_or_rapl_is_unavailable(tmp_path: Path) -> None:
    meter = make_energy_meter("auto", nvml=FakeNvml(init_fails=True), rapl_root=tmp_path)
    assert meter.source == "unavailable"
    meter.start()
    assert meter.read() == (None, None)
    meter.close()


def test_auto_on_this_machine_never_invents_numbers(tmp_path: Path) -> None:
    # Real pynvml (no driver here, or a real GPU elsewhere) and an empty sysfs root.
    meter = make_energy_meter("auto", rapl_root=tmp_path)
    assert meter.source in ("unavailable", "nvml", "nvml-power")
    if meter.source == "unavailable":
        meter.start()
        assert meter.read() == (None, None)
    meter.close()


def test_none_is_unavailable() -> None:
    meter = make_energy_meter("none")
    assert meter.source == "unavailable" and meter.read() == (None, None)


def test_explicit_nvml_without_gpu_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nvml"):
        make_energy_meter("nvml", nvml=FakeNvml(init_fails=True), rapl_root=tmp_path)
    with pytest.raises(ValueError, match="nvml"):
        make_energy_meter("nvml", nvml=FakeNvml(counter_mj=[0], devices=0), rapl_root=tmp_path)


def test_explicit_rapl_unreadable_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rapl"):
        make_energy_meter("rapl", rapl_root=tmp_path)


def test_nvml_counter_gives_joules_and_power() -> None:
    fake = FakeNvml(counter_mj=[1_000_000, 1_000_000, 1_250_000, 1_400_000])  # probe, start, 2 reads
    meter = make_energy_meter("auto", nvml=fake)
    assert meter.source == "nvml"
    meter.start()
    time.sleep(0.05)
    energy, power = meter.read()
    assert energy == pytest.approx(250.0)
    assert power is not None and 250.0 / 1.0 < power < 250.0 / 0.04  # 250 J over ~0.05 s
    energy, _ = meter.read()
    assert energy == pytest.approx(150.0)
    meter.close()
    assert fake.shutdowns == fake.inits == 1


def test_nvml_counter_going_backwards_is_unknown_not_negative() -> None:
    meter = make_energy_meter("nvml", nvml=FakeNvml(counter_mj=[5000, 5000, 10, 2010]))
    meter.start()
    assert meter.read() == (None, None)
    assert meter.read()[0] == pytest.approx(2.0)


@pytest.mark.serial  # a sampling thread against the wall clock
def test_nvml_power_fallback_integrates_constant_power() -> None:
    meter = make_energy_meter("nvml", nvml=FakeNvml(counter_mj=None, power_mw=200_000.0), sample_interval_s=0.01)
    assert meter.source == "nvml-power"
    t0 = time.monotonic()
    meter.start()
    time.sleep(0.3)
    energy, power = meter.read()
    elapsed = time.monotonic() - t0
    meter.close()
    assert power == pytest.approx(200.0)
    assert energy == pytest.approx(200.0 * elapsed, rel=0.1)


def test_power_integrator_trapezoid_with_fake_clock() -> None:
    clock = iter([0.0, 1.0, 3.0])
    watts = iter([100.0, 200.0, 200.0])
    integ = PowerIntegrator(lambda: next(watts), interval_s=3600, clock=lambda: next(clock))
    integ.start()  # sample (0 s, 100 W); the thread will not tick within the test
    integ._sample_locked()  # (1 s, 200 W): 150 J
    energy, power = integ.read()  # (3 s, 200 W): +400 J
    integ.close()
    assert energy == pytest.approx(550.0) and power == pytest.approx(550.0 / 3.0)


def _rapl_zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    max_uj = 262_143_328_850
    pkg0 = _rapl_zone(tmp_path, "intel-rapl:0", "package-0", max_uj - 1_000_000, max_uj)
    pkg1 = _rapl_zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000, max_uj)
    sub = _rapl_zone(tmp_path, "intel-rapl:0:0", "core", 7, max_uj)  # inside package-0: not summed
    psys = _rapl_zone(tmp_path, "intel-rapl:2", "psys", 9, max_uj)  # contains the packages: not summed

    meter = make_energy_meter("auto", nvml=FakeNvml(init_fails=True), rapl_root=tmp_path)
    assert meter.source == "rapl" and meter.scope == "node"
    meter.start()
    (pkg0 / "energy_uj").write_text("2000000\n")  # wrapped: 1 J before the wrap + 2 J after
    (pkg1 / "energy_uj").write_text("9000000\n")  # +4 J
    (sub / "energy_uj").write_text("999999999\n")
    (psys / "energy_uj").write_text("999999999\n")
    energy, power = meter.read()
    assert energy == pytest.approx(7.0)
    assert power is not None and power > 0


def test_rapl_unreadable_counter_is_skipped(tmp_path: Path) -> None:
    zone = _rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1, 10)
    (zone / "energy_uj").unlink()  # stands in for a root-only file
    assert make_energy_meter("auto", nvml=FakeNvml(init_fails=True), rapl_root=tmp_path).source == "unavailable"


# ------------------------------------------------------------------------------------ progress


def test_progress_disabled_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(total=10, initial=0, enabled=False)
    bar.update(3, {"loss": 1.0})
    bar.close()
    assert capsys.readouterr().err == ""


def test_progress_auto_off_when_not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert Progress(total=10, initial=0, enabled="auto").enabled is False


def test_progress_enabled_moves_to_absolute_step(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = Progress(total=10, initial=2, enabled=True)
    bar.update(5, {"loss": 1.234567, "energy_j": None})
    assert bar._bar is not None and bar._bar.n == 5
    bar.close()
    assert "loss=1.235" in err.getvalue()


def test_evaluation_line_shows_a_missing_loss_as_a_dash(capsys: pytest.CaptureFixture[str]) -> None:
    """A window whose every step was dropped as non-finite has loss None: the line says '-', no crash."""
    bar = Progress(total=20, initial=0, enabled=False, echo=True)
    bar.evaluation(20, {"step": 10, "loss": 2.5, "val_loss": 2.25, "samples_per_s": 123.4})
    bar.evaluation(20, {"step": 20, "loss": None, "val_loss": 2.0, "samples_per_s": 99.6})
    captured = capsys.readouterr()
    lines = captured.out.splitlines() + captured.err.splitlines()
    assert "step 10/20  loss 2.5000  val_loss 2.2500  123 samples/s" in lines
    assert "step 20/20  loss -  val_loss 2.0000  100 samples/s" in lines


# ---------------------------------------------------------------------------------- provenance


def test_provenance_keys_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    data = collect_provenance(["python", "-m", "dist_train", "train"], extra={"config": {"lr": 0.1}, "path": tmp_path})
    for key in ("timestamp_utc", "command", "python", "packages", "git", "host", "cuda", "env", "extra"):
        assert key in data
    assert data["packages"]["torch"] == torch.__version__
    assert data["env"]["WORLD_SIZE"] == "4"
    assert "SECRET_TOKEN" not in data["env"]
    assert data["host"]["cpu_count"] >= 1 and data["host"]["hostname"]
    assert data["timestamp_utc"].endswith("+00:00")
    if data["git"] is not None:
        assert len(data["git"]["sha"]) == 40 and isinstance(data["git"]["dirty"], bool)

    out = tmp_path / "sub" / "provenance.json"
    write_provenance(out, data)
    loaded = json.loads(out.read_text())
    assert loaded["command"] == ["python", "-m", "dist_train", "train"]
    assert loaded["extra"]["path"] == str(tmp_path)
    assert [p.name for p in out.parent.iterdir()] == ["provenance.json"]  # no temp file left


# ---------------------------------------------------------------------------------------- perf


def test_step_timer_and_throughput() -> None:
    timer = StepTimer("cpu")
    with timer:
        time.sleep(0.01)
    first = timer.last_s
    assert first >= 0.01  # the step's own sleep, measured (only a lower bound: the machine is shared)
    timer.start()
    time.sleep(0.005)
    second = timer.stop()
    assert second == timer.last_s and second >= 0.005
    with pytest.raises(RuntimeError, match="without start"):  # the step above is closed
        timer.stop()
    steps, seconds = timer.pop_window()
    assert steps == 2 and seconds == pytest.approx(first + second)
    assert timer.pop_window() == (0, 0.0)
    assert tokens_per_s(1000, 2.0) == 500.0 and tokens_per_s(1, 0.0) is None


def test_peak_memory_and_mfu_on_cpu() -> None:
    assert peak_memory_bytes("cpu") > 1_000_000  # this process is at least a few MB
    assert mfu(1e9, 1e3, "cpu") is None
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert peak_flops("Some Future GPU") is None
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 NVL") is None  # untabulated variant: no guess
