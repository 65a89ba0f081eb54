"""The profile scripts' kernel accounting: on CUDA only kernel rows count (not operator and kernel both)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from tests.benchmark_scripts import load_benchmark


def test_kernel_events_keep_only_the_kernel_rows_on_cuda() -> None:
    bench = load_benchmark("profile_topk_step")
    op = SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=5.0)
    kernel = SimpleNamespace(key="nvjet_sm90_tst", device_type=DeviceType.CUDA, self_device_time_total=5.0)
    events = [op, kernel]
    assert bench.kernel_events(events, torch.device("cuda")) == [kernel]
    assert bench.kernel_events(events, torch.device("cpu")) == events  # CPU self times do not overlap
