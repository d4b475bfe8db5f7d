"""Tests for lora_np.machine: each probe answers or says it cannot, and the allocator setting
leaves an explicit environment alone. The allocator's effect on page faults is tested through
the benchmark command in tests/test_bench.py (in a subprocess, so this process keeps glibc's
defaults)."""

import os

import pytest

from lora_np import machine


def test_machine_info_names_cores_blas_and_numpy():
    info = machine.machine_info()
    assert info["cpu_count"] == os.cpu_count()
    assert set(info) == {"cpu_count", "numpy", "blas", "blas_threads"}
    assert info["blas_threads"] is None or info["blas_threads"] >= 1


def test_machine_load_is_a_fraction_or_unknown():
    frac = machine.MachineLoad().others_fraction()
    assert frac is None or 0.0 <= frac <= 1.0


def test_machine_load_is_unknown_without_proc_stat(monkeypatch):
    monkeypatch.setattr(machine, "_cpu_jiffies", lambda: None)
    assert machine.MachineLoad().others_fraction() is None


def test_minor_faults_count_up():
    before = machine.minor_faults()
    bytearray(8 << 20)                        # touch fresh pages
    assert machine.minor_faults() >= before


def test_keep_freed_memory_leaves_an_explicit_environment_alone(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    assert machine.keep_freed_memory() == "MALLOC_TRIM_THRESHOLD_=123 (from the environment)"
    assert machine.allocator_setting("keep") == "MALLOC_TRIM_THRESHOLD_=123 (from the environment)"


def test_allocator_default_changes_nothing(monkeypatch):
    for k in machine.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(machine, "keep_freed_memory", lambda *a: pytest.fail("mallopt called"))
    assert machine.allocator_setting("default") == "defaults"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    assert machine.allocator_setting("default") == "MALLOC_MMAP_THRESHOLD_=4096"


def test_allocator_setting_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match=r"mode must be one of \('keep', 'default'\)"):
        machine.allocator_setting("jemalloc")


def test_tune_allocator_for_training_runs_once(monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "_TRAINING_ALLOCATOR", [])
    monkeypatch.setattr(machine, "keep_freed_memory", lambda: calls.append(1) or "kept")
    assert machine.tune_allocator_for_training() == "kept"
    assert machine.tune_allocator_for_training() == "kept"
    assert calls == [1]
