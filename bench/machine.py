"""Where a benchmark's figures were made (the CPU's name, family, model and vector units, the GPU,
the versions), and writing its record."""
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def machine_info():
    """Where the figures were made: the CPU's name, family, model and vector units, and versions.
    (Machines named alike differ: one 2-core "AMD EPYC" ran ResNet50 4.5 times faster than
    another.)"""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "cpu": fields.get("model name", platform.processor()),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"),
            "vector_flags": [flag for flag in VECTOR_FLAGS if flag in flags],
            "cores": os.cpu_count(), "gpu": gpu_name(), "python": platform.python_version(),
            "tensorflow": package_version("tensorflow", "tensorflow-cpu"),
            "keras": package_version("keras"), "keras_backend": os.environ.get(
                "KERAS_BACKEND", "tensorflow"), "openvino": package_version("openvino"),
            "command": " ".join(sys.argv)}


def gpu_name():
    """The first NVIDIA GPU's name and driver, or None."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,"
                               "noheader"], capture_output=True, text=True, timeout=30,
                              check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def package_version(*names):
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def write_json(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")
