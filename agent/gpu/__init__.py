"""GPU state: one snapshot shape (the GpuState message of the evidence body), three sources.

- ``nvml``: the NVIDIA Management Library through nvidia-ml-py (real hosts);
- ``smi_xml``: ``nvidia-smi -q -x`` output (recorded captures in tests, or where NVML is not
  loadable by the agent);
- ``procfs``: /proc/driver/nvidia (driver version and GPUs without NVML).

A field the card or driver does not support is recorded with its reason (not_supported,
no_permission, gpu_lost) in ``unavailable``, never as off.
"""
