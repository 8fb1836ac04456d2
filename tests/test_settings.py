"""settings.resolved_device: how ``--diffeval-device`` becomes a device, in particular how
``auto`` spreads xdist workers over the GPUs (worker i takes GPU i mod G).  The GPU is
simulated by patching torch.cuda, so this runs on any machine."""

from __future__ import annotations

import pytest
import torch

from pytest_diffeval import settings


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """Pretend this machine has ``count`` CUDA GPUs; returns a function that resolves a request."""
    previous = settings.current().device_request
    monkeypatch.setattr(settings, "_resolved", {})  # no device remembered from earlier tests
    monkeypatch.setattr(settings, "_no_gpu_driver", lambda: False)

    def resolve(request: str, *, count: int = 2, worker: str | None = None) -> str:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        resolve.current = []
        monkeypatch.setattr(torch.cuda, "set_device", resolve.current.append)  # records the bound GPU
        if worker is None:
            monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
        else:
            monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        settings._resolved.clear()
        settings.configure(device_request=request)
        return settings.resolved_device()

    yield resolve
    settings.configure(device_request=previous)


@pytest.mark.parametrize("worker, expected", [(None, "cuda:0"), ("gw0", "cuda:0"), ("gw1", "cuda:1"),
                                              ("gw2", "cuda:0"), ("gw3", "cuda:1")])
def test_auto_spreads_xdist_workers_over_the_gpus(gpus, worker: str | None, expected: str) -> None:
    assert gpus("auto", count=2, worker=worker) == expected
    assert gpus.current == [int(expected.split(":")[1])]  # the current device is the worker's GPU too


def test_auto_with_one_gpu_puts_every_worker_on_it(gpus) -> None:
    assert {gpus("auto", count=1, worker=f"gw{i}") for i in range(4)} == {"cuda:0"}


def test_explicit_devices_are_respected(gpus) -> None:
    assert gpus("cuda:1", count=2, worker="gw0") == "cuda:1"
    assert gpus("cuda", count=2, worker="gw3") == "cuda"
    assert gpus("cpu", count=2, worker="gw3") == "cpu"


def test_auto_without_cuda_is_the_cpu_and_cuda_without_it_is_an_error(gpus) -> None:
    assert gpus("auto", count=0, worker="gw1") == "cpu"
    with pytest.raises(RuntimeError, match=r"--diffeval-device=cuda:1 but torch .* sees no CUDA GPU; fix: use"):
        gpus("cuda:1", count=0)


def test_auto_without_a_gpu_driver_does_not_ask_torch(gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "_no_gpu_driver", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch was asked"))
    settings.configure(device_request="auto")
    assert settings.resolved_device() == "cpu"
