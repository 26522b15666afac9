"""Torch-free hardware probe for edge boxes.

Collects what matters for choosing and tuning an inference backend: CPU model,
cores and ISA features, memory (including a cgroup v2 or v1 limit), and which of
OpenVINO / ONNX Runtime are importable and what devices they see. Every read is
best effort: a missing file or a broken backend yields None/empty, never an
exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

X86_FEATURES = frozenset({
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
})
ARM_FEATURES = frozenset({"asimd", "asimddp", "i8mm", "sve", "bf16", "fphp"})
# ARM /proc/cpuinfo gives an implementer code instead of a vendor string.
ARM_IMPLEMENTERS = {"0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x48": "HiSilicon",
                    "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple", "0xc0": "Ampere"}
# Providers that do not indicate an accelerator on the box.
CPU_ONLY_PROVIDERS = frozenset({"CPUExecutionProvider", "AzureExecutionProvider"})


@dataclass(frozen=True)
class CpuInfo:
    model: str | None
    vendor: str | None
    architecture: str
    physical_cores: int | None  # cores among the CPUs this process may run on (and within a CPU quota)
    logical_cores: int  # the CPUs this process may run on (taskset, cpusets), within a cgroup CPU quota
    features: tuple[str, ...]
    l3_cache_bytes: int | None
    cpu_quota: float | None = None  # CPUs' worth of time a cgroup CPU quota allows (docker --cpus); None: none


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int | None
    available_bytes: int | None
    cgroup_limit_bytes: int | None
    cgroup_usage_bytes: int | None = None  # its cgroup's working set (usage - inactive file pages), with a limit

    def budget_bytes(self) -> int | None:
        """What this process can still take: MemAvailable, or less under a cgroup limit (the limit
        minus what the cgroup uses now); None when neither is known."""
        known = [self.available_bytes] if self.available_bytes is not None else []
        if self.cgroup_limit_bytes is not None:
            known.append(max(0, self.cgroup_limit_bytes - (self.cgroup_usage_bytes or 0)))
        return min(known) if known else None


@dataclass(frozen=True)
class BackendInfo:
    name: str
    version: str | None
    available: bool
    devices: tuple[str, ...] = ()  # OpenVINO: "ID (FULL_DEVICE_NAME)" where readable
    error: str | None = None

    @property
    def device_ids(self) -> tuple[str, ...]:
        """Bare device / provider names, without the descriptive suffix."""
        return tuple(d.split(" (", 1)[0] for d in self.devices)


@dataclass(frozen=True)
class DeviceInfo:
    """A GPU or NPU the operating system sees, whether or not an installed backend can use it."""

    kind: str  # "GPU" or "NPU"
    vendor: str  # "NVIDIA", "Intel", "AMD", ... or the PCI vendor id
    name: str  # the model where the driver names it, else the PCI ids
    driver: str | None = None


@dataclass(frozen=True)
class HardwareInfo:
    cpu: CpuInfo
    memory: MemoryInfo
    backends: tuple[BackendInfo, ...]
    os: str
    python: str
    devices: tuple[DeviceInfo, ...] = ()  # GPUs and NPUs found in /proc and /sys (see probe_devices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # tuples become lists: JSON-safe

    def fingerprint(self) -> str:
        """Short stable hash over the fields that affect inference speed."""
        key = {
            "cpu_model": self.cpu.model,
            "features": list(self.cpu.features),
            "logical_cores": self.cpu.logical_cores,
            # the candidates' thread counts follow it: two threads of one SMT core are not two cores
            "physical_cores": self.cpu.physical_cores,
            "backends": [[b.name, b.version, list(b.devices)] for b in self.backends],
        }
        blob = json.dumps(key, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Parse /proc/cpuinfo text into model, vendor, physical_cores and features."""
    fields: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    physical_id = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        fields.setdefault(key, value)  # keep the first processor's values
        if key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    implementer = fields.get("CPU implementer")
    return {
        # ARM kernels often omit "model name"; boards like the Pi report "Model".
        "model": fields.get("model name") or fields.get("Model") or fields.get("Hardware"),
        "vendor": fields.get("vendor_id")
        or (ARM_IMPLEMENTERS.get(implementer.lower(), implementer) if implementer else None),
        "physical_cores": len(cores) or None,
        "features": tuple(sorted(flags & (X86_FEATURES | ARM_FEATURES))),
    }


def _parse_size(text: str) -> int | None:
    """Parse sysfs cache sizes such as "32768K" or "1M" into bytes."""
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        return None


def _l3_cache_bytes() -> int | None:
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if (_read(index / "level") or "").strip() == "3":
            return _parse_size(_read(index / "size") or "")
    return None


def usable_cpu_ids() -> list[int]:
    """The logical CPUs this process may run on (taskset, cpusets), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """Threads worth running: the CPUs this process may run on, and no more than a cgroup CPU quota's whole CPUs
    (at least one). Under `docker --cpus=1` on a 4-CPU box, 4 threads spend most of each period throttled."""
    ids = len(usable_cpu_ids())
    quota = cpu_quota()
    return max(1, min(ids, int(quota))) if quota is not None else ids


CPU_QUOTA_V2 = ("/sys/fs/cgroup", "cpu.max")
CPU_QUOTA_V1 = ("/sys/fs/cgroup/cpu", "cpu.cfs_quota_us", "cpu.cfs_period_us")


def cpu_quota() -> float | None:
    """CPUs' worth of time the tightest CPU quota over this process allows (its cgroup's or an ancestor's: cgroup
    v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), None without one."""
    mount, name = CPU_QUOTA_V2
    quotas = []
    for d in _cgroup_dirs(mount, True, "cpu"):
        fields = (_read(f"{d}/{name}") or "").split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
            quotas.append(int(fields[0]) / int(fields[1]))  # "max 100000": no quota at that level
    if not quotas:
        mount, quota_name, period_name = CPU_QUOTA_V1
        for d in _cgroup_dirs(mount, False, "cpu"):
            quota, period = ((_read(f"{d}/{n}") or "").strip() for n in (quota_name, period_name))
            if quota.isdigit() and period.isdigit() and int(period) > 0:  # -1: none
                quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _core_key(cpu: int):
    """What identifies `cpu`'s physical core in sysfs: the CPUs sharing it (`core_cpus_list`, or the older
    `thread_siblings_list`), else (package, core_id); None without topology. (core_id alone repeats per cluster on
    ARM boards: an RK3588's 4 + 4 cores read as 4.)"""
    topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    for name in ("core_cpus_list", "thread_siblings_list"):
        siblings = (_read(topo / name) or "").strip()
        if siblings:
            return siblings
    core_id = (_read(topo / "core_id") or "").strip()
    return ((_read(topo / "physical_package_id") or "").strip(), core_id) if core_id else None


def usable_physical_cores() -> int | None:
    """Physical cores among the CPUs this process may run on (sysfs topology), None where it is not known."""
    cores = set()
    for cpu in usable_cpu_ids():
        key = _core_key(cpu)
        if key is None:
            return None
        cores.add(key)
    return len(cores) or None


def cpus_one_per_core() -> list[int]:
    """Usable logical CPU ids, the first of each physical core first, then their SMT siblings.

    For pinning one thread per core: threads placed on the first `physical_cores` ids never share a
    core. Without sysfs topology every usable CPU counts as its own core."""
    usable = usable_cpu_ids()
    firsts, siblings, seen = [], [], set()
    for cpu in usable:
        core = _core_key(cpu) or (cpu,)
        (siblings if core in seen else firsts).append(cpu)
        seen.add(core)
    return firsts + siblings


def accelerators(info: "HardwareInfo") -> list[str]:
    """Devices other than the CPU, as "backend:device" (e.g. "openvino:GPU.0", "onnxruntime:CUDAExecutionProvider")."""
    found = []
    for b in info.backends:
        if b.available:
            cpu_only = {"CPU"} if b.name == "openvino" else CPU_ONLY_PROVIDERS
            found += [f"{b.name}:{d}" for d in b.device_ids if d not in cpu_only]
    return found


def probe_cpu() -> CpuInfo:
    parsed = parse_cpuinfo(_read("/proc/cpuinfo") or "")
    logical = usable_cpus()
    # the cores of the CPUs this process may use: /proc/cpuinfo counts the machine's (taskset -c 0 on a 2-core box
    # showed "2 cores / 1 threads")
    physical = usable_physical_cores() or parsed["physical_cores"]
    return CpuInfo(
        model=parsed["model"] or platform.processor() or None,
        vendor=parsed["vendor"],
        architecture=platform.machine(),
        physical_cores=min(physical, logical) if physical else None,
        logical_cores=logical,
        features=parsed["features"],
        l3_cache_bytes=_l3_cache_bytes(),
        cpu_quota=cpu_quota(),
    )


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into bytes per key (values there are in kB)."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            result[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return result


CGROUP_V2 = ("/sys/fs/cgroup", "memory.max", "memory.current", "memory.stat", "inactive_file")
CGROUP_V1 = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
             "total_inactive_file")
CGROUP_V1_UNLIMITED = 1 << 60  # v1 writes "no limit" as a page-rounded 2^63 - 1


def _cgroup_dirs(mount: str, v2: bool, controller: str = "memory") -> list[str]:
    """This process's `controller` cgroup directory under `mount` and its ancestors (from /proc/self/cgroup:
    the "0::" line on v2, the line naming the controller on v1), leaf first."""
    rel = ""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and ((v2 and parts[:2] == ["0", ""]) or (not v2 and controller in parts[1].split(","))):
            rel = parts[2].strip().strip("/")
    steps = rel.split("/") if rel else []
    return [f"{mount}/{'/'.join(steps[:i])}".rstrip("/") for i in range(len(steps), -1, -1)]


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, working set) of the tightest memory cgroup over this process (its own or an ancestor's),
    v2 or else v1; (None, None) without a limit. The working set is the usage minus inactive file pages
    (page cache the kernel reclaims first), the number the kubelet evicts by."""
    for mount, limit_name, usage_name, stat_name, inactive_key in (CGROUP_V2, CGROUP_V1):
        best, found = None, False
        for d in _cgroup_dirs(mount, mount == CGROUP_V2[0]):
            limit = (_read(f"{d}/{limit_name}") or "").strip()
            if not limit:
                continue
            found = True
            if not limit.isdigit() or int(limit) >= CGROUP_V1_UNLIMITED:  # "max" (v2) or v1's no-limit value
                continue
            usage = (_read(f"{d}/{usage_name}") or "").strip()
            stat = dict(line.split()[:2] for line in (_read(f"{d}/{stat_name}") or "").splitlines()
                        if len(line.split()) >= 2)
            inactive = int(stat[inactive_key]) if stat.get(inactive_key, "").isdigit() else 0
            level = (int(limit), max(0, int(usage) - inactive) if usage.isdigit() else None)
            if best is None or level[0] - (level[1] or 0) < best[0] - (best[1] or 0):
                best = level
        if found:
            return best if best is not None else (None, None)
    return None, None


CUDA_RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device, from the CUDA runtime ONNX Runtime's CUDA provider
    loaded (cudaMemGetInfo); None where there is none. Call it only in a process that uses CUDA already:
    the call makes a CUDA context if there was none."""
    import ctypes

    for name in CUDA_RUNTIMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        try:
            if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
                return free.value, total.value
        except AttributeError:
            pass
        # this runtime cannot answer (a CUDA 13 runtime beside an older driver): the next one may be the one loaded
    return None


def probe_memory() -> MemoryInfo:
    mem = parse_meminfo(_read("/proc/meminfo") or "")
    limit, usage = _cgroup_memory()
    return MemoryInfo(
        total_bytes=mem.get("MemTotal"),
        available_bytes=mem.get("MemAvailable"),
        cgroup_limit_bytes=limit,
        cgroup_usage_bytes=usage,
    )


def _openvino_devices(ov: Any) -> tuple[str, ...]:
    from runtime.signals import same_signal_stack

    devices = []
    with same_signal_stack():  # OpenVINO's Core replaces the thread's alternate signal stack (runtime/signals.py)
        core = ov.Core()
        for dev in core.available_devices:
            try:
                devices.append(f"{dev} ({core.get_property(dev, 'FULL_DEVICE_NAME')})")
            except Exception:  # some plugins cannot report a name
                devices.append(dev)
        del core
    return tuple(devices)


def probe_backend(name: str) -> BackendInfo:
    """Import a backend ("openvino" or "onnxruntime") and list its devices."""
    try:
        mod = importlib.import_module(name)
        version = getattr(mod, "__version__", None)
        if name == "openvino":
            devices = _openvino_devices(mod)
        else:
            devices = tuple(mod.get_available_providers())
        return BackendInfo(name, version, True, devices)
    except Exception as exc:
        return BackendInfo(name, None, False, (), f"{type(exc).__name__}: {exc}")


PCI_VENDORS = {"0x10de": "NVIDIA", "0x8086": "Intel", "0x1002": "AMD", "0x1022": "AMD"}
# DRM drivers of GPUs that compute; display-only and virtual ones (simpledrm, virtio_gpu, bochs, ...) are left out
GPU_DRIVERS = {"i915": "Intel", "xe": "Intel", "amdgpu": "AMD", "nouveau": "NVIDIA", "nvidia-drm": "NVIDIA",
               "nvidia": "NVIDIA", "panfrost": "ARM", "panthor": "ARM", "mali": "ARM", "msm": "Qualcomm",
               "msm_drm": "Qualcomm"}
NPU_DRIVERS = {"intel_vpu": "Intel", "amdxdna": "AMD", "qaic": "Qualcomm"}


def _uevent(path: Path) -> dict[str, str]:
    out = {}
    for line in (_read(path) or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _pci_name(device: Path) -> str:
    ids = [(_read(device / f) or "").strip() for f in ("vendor", "device")]
    return ":".join(i.removeprefix("0x") for i in ids) if all(ids) else "unknown model"


def probe_devices(root: str | Path = "/") -> tuple[DeviceInfo, ...]:
    """GPUs and NPUs the kernel knows, read from /proc/driver/nvidia (NVIDIA's driver names the model),
    the device tree (a Jetson board's integrated GPU), /sys/class/drm (GPUs by their driver) and
    /sys/class/accel (NPUs). Best effort: nothing readable, nothing found."""
    root = Path(root)
    found: list[DeviceInfo] = []
    nvidia = root / "proc/driver/nvidia/gpus"
    try:
        for bus in sorted(nvidia.iterdir()):
            info = {k.strip(): v.strip() for k, _, v in
                    (line.partition(":") for line in (_read(bus / "information") or "").splitlines())}
            found.append(DeviceInfo("GPU", "NVIDIA", info.get("Model") or bus.name, "nvidia"))
    except OSError:
        pass
    # Jetson: the GPU is part of the Tegra SoC, with no /proc/driver/nvidia/gpus and no DRM card of its own;
    # the device tree names the board
    board = (_read(root / "proc/device-tree/model") or "").strip("\x00 \n")
    if not found and "jetson" in board.lower():
        found.append(DeviceInfo("GPU", "NVIDIA", f"{board} (integrated GPU)", "nvgpu"))
    seen_nvidia = bool(found)
    for cls, kind, drivers in (("drm", "GPU", GPU_DRIVERS), ("accel", "NPU", NPU_DRIVERS)):
        try:
            entries = sorted((root / "sys/class" / cls).iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.name.removeprefix("card" if cls == "drm" else "accel").isdigit():
                continue  # connectors (card0-HDMI-A-1) and render nodes
            device = entry / "device"
            driver = _uevent(device / "uevent").get("DRIVER")
            vendor = drivers.get(driver or "")
            if vendor is None or (vendor == "NVIDIA" and seen_nvidia):
                continue
            pci_vendor = (_read(device / "vendor") or "").strip()
            found.append(DeviceInfo(kind, PCI_VENDORS.get(pci_vendor, vendor), _pci_name(device), driver))
    return tuple(found)


# what a device needs before a backend of edgeglm can use it, by (kind, vendor)
DEVICE_HINTS = {
    ("GPU", "NVIDIA"): "ONNX Runtime's CUDA provider uses it: replace onnxruntime with onnxruntime-gpu "
                       "(pip install 'onnxruntime-gpu[cuda,cudnn]'), then probe again",
    ("GPU", "Intel"): "OpenVINO's GPU plugin uses it once Intel's compute runtime is installed "
                      "(intel-opencl-icd / level-zero), then probe again",
    ("NPU", "Intel"): "OpenVINO's NPU plugin uses it once the Intel NPU driver is installed, then probe again",
}
DEVICE_USERS = {("GPU", "NVIDIA"): ("onnxruntime:CUDAExecutionProvider", "onnxruntime:TensorrtExecutionProvider"),
                ("GPU", "Intel"): ("openvino:GPU",), ("NPU", "Intel"): ("openvino:NPU",)}


def device_report(info: "HardwareInfo") -> list[dict[str, Any]]:
    """Each device found, with the backend paths that can use it (`used_by`) or, when none can, what to
    install (`hint`)."""
    paths = accelerators(info)
    report = []
    for d in info.devices:
        users = DEVICE_USERS.get((d.kind, d.vendor), ())
        used_by = [p for p in paths if p.split(".")[0].split(" ")[0] in users]
        hint = None
        if d.driver == "nvgpu" and not used_by:  # PyPI's onnxruntime-gpu is x86-64 / SBSA: not for Tegra
            hint = "ONNX Runtime's CUDA provider uses it with NVIDIA's JetPack build of onnxruntime-gpu (not PyPI's)"
        elif d.driver == "nouveau":  # the open driver has no CUDA
            hint = "CUDA needs NVIDIA's own driver (nouveau has none), then onnxruntime-gpu: see docs/install.md"
        elif not used_by:
            hint = DEVICE_HINTS.get((d.kind, d.vendor),
                                    "no backend of edgeglm runs on it (ONNX Runtime CUDA/TensorRT on NVIDIA GPUs, "
                                    "OpenVINO on Intel GPUs and NPUs)")
        report.append({**dataclasses.asdict(d), "used_by": used_by, "hint": hint})
    return report


def probe_hardware() -> HardwareInfo:
    return HardwareInfo(
        cpu=probe_cpu(),
        memory=probe_memory(),
        backends=(probe_backend("openvino"), probe_backend("onnxruntime")),
        os=platform.platform(),
        python=sys.version.split()[0],
        devices=probe_devices(),
    )


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / (1 << 30):.1f} GiB"


def format_hardware(info: HardwareInfo) -> str:
    cpu, mem = info.cpu, info.memory
    cores = f"{cpu.physical_cores or '?'} cores / {cpu.logical_cores} threads"
    if cpu.cpu_quota is not None:
        cores += f" (cgroup CPU quota {cpu.cpu_quota:g} CPUs)"
    l3 = f", L3 {cpu.l3_cache_bytes >> 20} MiB" if cpu.l3_cache_bytes else ""
    lines = [
        f"CPU:     {cpu.model or 'unknown'} ({cpu.architecture}), {cores}{l3}",
        f"         features: {' '.join(cpu.features) or 'none detected'}",
        f"Memory:  {_gib(mem.total_bytes)} total, {_gib(mem.available_bytes)} available"
        + (f", cgroup limit {_gib(mem.cgroup_limit_bytes)} ({_gib(mem.cgroup_usage_bytes)} used)"
           if mem.cgroup_limit_bytes else ""),
    ]
    for b in info.backends:
        if not b.available:
            lines.append(f"{b.name}: unavailable ({b.error})")
            continue
        lines.append(f"{b.name} {b.version}: {', '.join(b.devices) or 'no devices'}")
    for d in device_report(info):
        use = f"used by {', '.join(d['used_by'])}" if d["used_by"] else f"not used: {d['hint']}"
        name = d["name"] if d["name"].startswith(d["vendor"]) else f"{d['vendor']} {d['name']}"
        lines.append(f"{d['kind']}:     {name} (driver {d['driver'] or 'unknown'}); {use}")
    if not accelerators(info) and not info.devices:
        lines.append("no GPU or NPU found")
    lines.append(f"OS:      {info.os}, Python {info.python}")
    return "\n".join(lines)
