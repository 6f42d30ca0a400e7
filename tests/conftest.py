"""Test setup: 8 fake CPU devices (set before JAX is imported), so multi-device code is tested on
any machine. Single-device comparisons pick one device explicitly."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
