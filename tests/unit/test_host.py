"""The host profile: PVM words and the vCPU cap only on a PVM host."""

from __future__ import annotations

import pytest

from embervm import config, host


@pytest.fixture(autouse=True)
def fresh_detection():
    host.host_profile.cache_clear()
    yield
    host.host_profile.cache_clear()


@pytest.mark.parametrize("forced, name, words, cap", [
    ("pvm", "pvm", host.PVM_CMDLINE, 8),
    ("kvm", "kvm", "", None),
])
def test_the_environment_overrides_detection(monkeypatch, forced, name, words, cap):
    monkeypatch.setenv("EMBERVM_HOST_PROFILE", forced)
    p = host.host_profile()
    assert (p.name, p.cmdline_words, p.max_vcpus) == (name, words, cap)
    assert name.upper() in p.description or "KVM" in p.description


def test_detection_follows_the_kvm_pvm_module(monkeypatch):
    monkeypatch.delenv("EMBERVM_HOST_PROFILE", raising=False)
    monkeypatch.setattr(host.os.path, "isdir", lambda p: p == "/sys/module/kvm_pvm")
    assert host.host_profile().name == "pvm"
    host.host_profile.cache_clear()
    monkeypatch.setattr(host.os.path, "isdir", lambda p: False)
    assert host.host_profile().name == "kvm"


def test_vcpu_limit_is_the_mp_tables_except_on_pvm(monkeypatch):
    from embervm.boot.mptable import MAX_VCPUS

    monkeypatch.setenv("EMBERVM_HOST_PROFILE", "kvm")
    assert config.max_vcpus() == MAX_VCPUS
    config.VmConfig(vcpus=32).validate()
    host.host_profile.cache_clear()
    monkeypatch.setenv("EMBERVM_HOST_PROFILE", "pvm")
    assert config.max_vcpus() == 8
    with pytest.raises(config.ConfigError, match="PVM host"):
        config.VmConfig(vcpus=9).validate()
