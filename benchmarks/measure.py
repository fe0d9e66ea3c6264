"""What the benchmark scripts share: reading this process's memory figures."""
from __future__ import annotations


def vm_status() -> dict[str, float]:
    """VmHWM (peak) and VmRSS of this process in MB, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024.0
    return out
