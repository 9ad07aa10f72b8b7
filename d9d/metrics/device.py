"""The product name of the device a run measures on (reports quote it next to numbers)."""

import platform
import re
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """Product name of the device: the GPU name, or the CPU model from ``/proc/cpuinfo``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or "cpu")
