"""Tests for runtime.probe against this machine and fixed /proc/cpuinfo texts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.probe import (
    BackendInfo,
    HardwareInfo,
    format_hardware,
    parse_cpuinfo,
    probe_backend,
    probe_hardware,
)

REPO = Path(__file__).resolve().parents[2]

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16 ht

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16 ht

processor\t: 2
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16 ht
"""

ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm bf16
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm bf16
CPU implementer\t: 0x41

Hardware\t: Example SoC
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


@pytest.fixture(scope="module")
def info() -> HardwareInfo:
    return probe_hardware()


def _backend(info: HardwareInfo, name: str) -> BackendInfo:
    (backend,) = [b for b in info.backends if b.name == name]
    return backend


def test_parse_x86_cpuinfo():
    parsed = parse_cpuinfo(X86_CPUINFO)
    assert parsed["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert parsed["vendor"] == "GenuineIntel"
    assert parsed["physical_cores"] == 2  # three threads on two distinct core ids
    assert parsed["features"] == (
        "amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_vnni",
        "avx512bw", "avx512f", "avx512vl", "f16c", "fma", "sse4_2",
    )


def test_parse_arm_cpuinfo():
    parsed = parse_cpuinfo(ARM_CPUINFO)
    assert parsed["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert parsed["vendor"] == "ARM"
    assert parsed["physical_cores"] is None
    # fp, aes, asimdhp etc. are not in the relevant set; sve is absent on this core.
    assert parsed["features"] == ("asimd", "asimddp", "bf16", "fphp", "i8mm")


def test_parse_empty_cpuinfo():
    assert parse_cpuinfo("") == {"model": None, "vendor": None, "physical_cores": None, "features": ()}


def test_cpu_on_this_machine(info):
    assert info.cpu.logical_cores >= 1
    assert info.cpu.logical_cores == len(os.sched_getaffinity(0))
    flags_line = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith(("flags", "Features"))), "")
    flags = set(flags_line.partition(":")[2].split())
    assert set(info.cpu.features) <= flags
    assert list(info.cpu.features) == sorted(info.cpu.features)
    if "avx2" in flags:
        assert "avx2" in info.cpu.features


def test_memory_matches_proc_meminfo(info):
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        meminfo[key] = int(value.split()[0]) * 1024
    assert info.memory.total_bytes == meminfo["MemTotal"]
    assert 0 < info.memory.available_bytes <= info.memory.total_bytes


def test_backends_available_with_versions(info):
    import onnxruntime
    import openvino

    ov = _backend(info, "openvino")
    assert ov.available and ov.error is None
    assert ov.version == openvino.__version__ == openvino.get_version()
    assert "CPU" in ov.device_ids

    ort = _backend(info, "onnxruntime")
    assert ort.available and ort.error is None
    assert ort.version == onnxruntime.__version__
    assert "CPUExecutionProvider" in ort.devices
    assert ort.devices == tuple(onnxruntime.get_available_providers())


def test_missing_backend_reported_not_raised():
    backend = probe_backend("no_such_backend_module_xyz")
    assert not backend.available
    assert backend.version is None and backend.devices == ()
    assert "ModuleNotFoundError" in backend.error


def test_to_dict_is_json_serialisable(info):
    data = json.loads(json.dumps(info.to_dict()))
    assert data["cpu"]["logical_cores"] == info.cpu.logical_cores
    assert {b["name"] for b in data["backends"]} == {"openvino", "onnxruntime"}


def test_fingerprint_stable_and_ignores_available_memory(info):
    again = probe_hardware()
    fp = info.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == again.fingerprint()
    from dataclasses import replace
    changed_mem = replace(info, memory=replace(info.memory, available_bytes=1))
    assert changed_mem.fingerprint() == fp
    changed_cpu = replace(info, cpu=replace(info.cpu, logical_cores=info.cpu.logical_cores + 1))
    assert changed_cpu.fingerprint() != fp
    # two threads of one SMT core (taskset -c 0,1) against two cores (-c 0,2): other candidate thread counts
    smt = replace(info, cpu=replace(info.cpu, physical_cores=(info.cpu.physical_cores or 2) + 1))
    assert smt.fingerprint() != fp


def test_format_hardware(info):
    text = format_hardware(info)
    assert text.startswith("CPU:")
    assert str(info.cpu.logical_cores) + " threads" in text
    for backend in info.backends:
        assert any(line.startswith(backend.name) for line in text.splitlines())
    accel = [d for d in _backend(info, "openvino").device_ids if d != "CPU"]
    accel += [p for p in _backend(info, "onnxruntime").devices
              if p not in ("CPUExecutionProvider", "AzureExecutionProvider")]
    assert ("no GPU or NPU found" in text) == (not accel)


def test_format_reports_accelerator():
    info = probe_hardware()
    from dataclasses import replace
    gpu = BackendInfo("openvino", "x", True, ("CPU (cpu)", "GPU.0 (Intel Arc)"))
    text = format_hardware(replace(info, backends=(gpu,)))
    assert "GPU.0 (Intel Arc)" in text and "no GPU or NPU found" not in text


def test_probe_never_imports_torch():
    code = ("import sys; from runtime.probe import probe_hardware; probe_hardware(); "
            "sys.exit('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch" not in (REPO / "runtime" / "probe.py").read_text()


def test_missing_files_give_none_not_exceptions(monkeypatch):
    import runtime.probe as probe

    monkeypatch.setattr(probe, "_read", lambda path: None)
    monkeypatch.setattr(probe, "_l3_cache_bytes", lambda: None)
    info = probe.probe_hardware()
    assert info.cpu.features == () and info.cpu.physical_cores is None
    assert info.memory == probe.MemoryInfo(None, None, None)
    assert "unknown" in format_hardware(info)


def test_cgroup_limit_parsed(monkeypatch):
    import runtime.probe as probe

    files = {"/proc/meminfo": "MemTotal: 2048 kB\nMemAvailable: 1024 kB\n",
             "/sys/fs/cgroup/memory.max": "1073741824\n"}
    monkeypatch.setattr(probe, "_read", lambda path: files.get(str(path)))
    assert probe.probe_memory() == probe.MemoryInfo(2048 * 1024, 1024 * 1024, 1 << 30)
    files["/sys/fs/cgroup/memory.max"] = "max\n"
    assert probe.probe_memory().cgroup_limit_bytes is None


def test_memory_budget_under_a_cgroup_is_its_limit_minus_its_usage(monkeypatch):
    """What the agent may still take (the prefill graph's "auto" and the autotune decide with it)."""
    import runtime.probe as probe

    files = {"/proc/meminfo": "MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n",
             "/sys/fs/cgroup/memory.max": str(1 << 30) + "\n", "/sys/fs/cgroup/memory.current": str(800 << 20) + "\n",
             "/sys/fs/cgroup/memory.stat": f"anon {600 << 20}\nfile {200 << 20}\ninactive_file {100 << 20}\n"}
    monkeypatch.setattr(probe, "_read", lambda path: files.get(str(path)))
    mem = probe.probe_memory()  # the working set: usage less the inactive page cache
    assert mem.cgroup_usage_bytes == 700 << 20 and mem.budget_bytes() == 324 << 20
    assert "cgroup limit 1.0 GiB (0.7 GiB used)" in format_hardware(probe.probe_hardware())
    files["/sys/fs/cgroup/memory.max"] = "max\n"  # no limit: MemAvailable
    assert probe.probe_memory().budget_bytes() == 4 << 30
    files["/sys/fs/cgroup/memory.current"] = str(6 << 30) + "\n"
    files["/sys/fs/cgroup/memory.max"] = str(4 << 30) + "\n"  # over its limit already: nothing left
    assert probe.probe_memory().budget_bytes() == 0


def test_cgroup_v1_limit_and_working_set(monkeypatch):
    """Hosts still on cgroup v1 (older distributions, some K3s nodes): the memory controller's files."""
    import runtime.probe as probe

    v1 = "/sys/fs/cgroup/memory/"
    files = {"/proc/meminfo": "MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n",
             v1 + "memory.limit_in_bytes": str(1 << 30), v1 + "memory.usage_in_bytes": str(900 << 20),
             v1 + "memory.stat": f"cache {300 << 20}\ntotal_inactive_file {200 << 20}\n"}
    monkeypatch.setattr(probe, "_read", lambda path: files.get(str(path)))
    mem = probe.probe_memory()
    assert (mem.cgroup_limit_bytes, mem.cgroup_usage_bytes, mem.budget_bytes()) == (1 << 30, 700 << 20, 324 << 20)
    files[v1 + "memory.limit_in_bytes"] = "9223372036854771712"  # v1's "no limit"
    assert probe.probe_memory() == probe.MemoryInfo(8 << 30, 4 << 30, None, None)


def test_the_tightest_cgroup_over_the_process_counts(monkeypatch):
    """A pod's limit may sit on a parent of the container's cgroup: the tightest level decides."""
    import runtime.probe as probe

    pod, leaf = "/sys/fs/cgroup/kubepods/pod1", "/sys/fs/cgroup/kubepods/pod1/c1"
    files = {"/proc/self/cgroup": "0::/kubepods/pod1/c1\n", "/proc/meminfo": "MemAvailable: 4194304 kB\n",
             "/sys/fs/cgroup/memory.max": "max\n", leaf + "/memory.max": "max\n",
             leaf + "/memory.current": str(100 << 20), pod + "/memory.max": str(512 << 20),
             pod + "/memory.current": str(200 << 20)}
    monkeypatch.setattr(probe, "_read", lambda path: files.get(str(path)))
    mem = probe.probe_memory()
    assert (mem.cgroup_limit_bytes, mem.cgroup_usage_bytes, mem.budget_bytes()) == (512 << 20, 200 << 20, 312 << 20)
    files[leaf + "/memory.max"] = str(256 << 20)  # the container's own limit is tighter still
    assert probe.probe_memory().budget_bytes() == 156 << 20


def test_a_cgroup_cpu_quota_caps_the_threads_and_enters_the_fingerprint(monkeypatch):
    """Under `docker --cpus=1.5` (or a pod's limits.cpu) on a 4-CPU box every engine ran 4 threads, throttled for
    most of each period, and the autotune's cache did not change when the quota did."""
    import runtime.probe as probe

    pod, leaf = "/sys/fs/cgroup/kubepods/pod1", "/sys/fs/cgroup/kubepods/pod1/c1"
    files = {"/proc/self/cgroup": "0::/kubepods/pod1/c1\n", leaf + "/cpu.max": "max 100000\n",
             pod + "/cpu.max": "150000 100000\n"}
    monkeypatch.setattr(probe, "_read", lambda path: files.get(str(path)))
    monkeypatch.setattr(probe, "usable_cpu_ids", lambda: [0, 1, 2, 3])
    assert probe.cpu_quota() == 1.5 and probe.usable_cpus() == 1  # whole CPUs of the quota, at least one
    quota = probe.probe_hardware()
    assert (quota.cpu.logical_cores, quota.cpu.cpu_quota) == (1, 1.5)
    assert "1 threads (cgroup CPU quota 1.5 CPUs)" in format_hardware(quota)
    files[pod + "/cpu.max"] = "300000 100000\n"
    assert probe.usable_cpus() == 3
    files[pod + "/cpu.max"] = "max 100000\n"  # no quota at any level
    free = probe.probe_hardware()
    assert probe.cpu_quota() is None and free.cpu.logical_cores == 4 and free.fingerprint() != quota.fingerprint()
    # cgroup v1 (the cpu controller's quota and period)
    v1 = "/sys/fs/cgroup/cpu/"
    files.update({"/proc/self/cgroup": "1:cpu,cpuacct:/\n", v1 + "cpu.cfs_quota_us": "200000",
                  v1 + "cpu.cfs_period_us": "100000"})
    del files[pod + "/cpu.max"], files[leaf + "/cpu.max"]
    assert probe.cpu_quota() == 2.0 and probe.usable_cpus() == 2
    files[v1 + "cpu.cfs_quota_us"] = "-1"
    assert probe.cpu_quota() is None and probe.usable_cpus() == 4


def _run_in_cpu_cgroup(tmp_path, quota_us: int, code: str) -> str:
    """Run `code` in a fresh cgroup v1 or v2 CPU cgroup with `quota_us` per 100 ms (root only)."""
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    if os.geteuid() != 0:
        pytest.skip("needs root to make a CPU cgroup")
    if (v1 / "cpu.cfs_quota_us").exists():
        group = v1 / f"edgeglm-test-{os.getpid()}"
        settings = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(quota_us)}
    elif (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
        group = v2 / f"edgeglm-test-{os.getpid()}"
        settings = {"cpu.max": f"{quota_us} 100000"}
    else:
        pytest.skip("no CPU cgroup controller to make a quota with")
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a CPU cgroup here ({exc})")
    try:
        for name, value in settings.items():
            (group / name).write_text(value)
        script = f"import os; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid())); {code}"
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    finally:
        group.rmdir()


def test_a_real_cpu_quota_is_what_the_engines_and_the_probe_use(tmp_path):
    """A real cgroup: one CPU's worth of time on this box gives one engine thread, and the probe says why."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a box with 2+ CPUs to tell a quota from the CPU count")
    out = _run_in_cpu_cgroup(tmp_path, 100000, "import json; from runtime.probe import probe_hardware; "
                                               "from runtime.engine import _default_threads; "
                                               "cpu = probe_hardware().to_dict()['cpu']; "
                                               "print(json.dumps([cpu['logical_cores'], cpu['cpu_quota'], "
                                               "_default_threads()]))")
    assert json.loads(out) == [1, 1.0, 1]


def test_physical_cores_are_counted_over_the_cpus_this_process_may_use():
    """`taskset -c 0 edgeglm probe` on a 2-core box said "2 cores / 1 threads"."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a box with 2+ CPUs")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from runtime.probe import probe_cpu; "
            "c = probe_cpu(); print(c.physical_cores, c.logical_cores)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "1"], (proc.stdout, proc.stderr)


def _sysfs(root: Path) -> Path:
    """A /proc and /sys with an NVIDIA GPU (its driver names the model), an Intel GPU with a display
    connector and a render node, the NVIDIA GPU's own DRM card, a virtual GPU and an Intel NPU."""
    def write(rel: str, text: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    write("proc/driver/nvidia/gpus/0000:19:00.0/information",
          "Model: \t\t NVIDIA H200\nIRQ:   \t\t 38\nBus Location: \t 0000:19:00.0\n")
    cards = (("card0", "i915", "0x8086", "0x56a0"), ("card1", "nvidia-drm", "0x10de", "0x2335"),
             ("card2", "virtio_gpu", "0x1af4", "0x1050"))
    for card, driver, vendor, device in cards:
        write(f"sys/class/drm/{card}/device/uevent", f"DRIVER={driver}\nPCI_ID=X\n")
        write(f"sys/class/drm/{card}/device/vendor", vendor + "\n")
        write(f"sys/class/drm/{card}/device/device", device + "\n")
    write("sys/class/drm/card0-HDMI-A-1/device/uevent", "DRIVER=i915\n")
    write("sys/class/drm/renderD128/device/uevent", "DRIVER=i915\n")
    write("sys/class/accel/accel0/device/uevent", "DRIVER=intel_vpu\n")
    write("sys/class/accel/accel0/device/vendor", "0x8086\n")
    write("sys/class/accel/accel0/device/device", "0x7d1d\n")
    return root


def test_gpus_and_npus_are_found_by_their_drivers_and_told_what_they_need(tmp_path):
    """`edgeglm probe` says which GPU/NPU the box has, which backend path uses it and, where none can,
    what to install (seen on a CUDA machine with the CPU-only onnxruntime: the GPU went unmentioned)."""
    from dataclasses import replace

    from runtime.probe import DeviceInfo, device_report, probe_devices

    devices = probe_devices(_sysfs(tmp_path))
    assert devices == (DeviceInfo("GPU", "NVIDIA", "NVIDIA H200", "nvidia"),
                       DeviceInfo("GPU", "Intel", "8086:56a0", "i915"),
                       DeviceInfo("NPU", "Intel", "8086:7d1d", "intel_vpu"))
    assert probe_devices(tmp_path / "nothing") == ()

    base = probe_hardware()
    backends = (BackendInfo("openvino", "x", True, ("CPU (cpu)", "GPU.0 (Intel Arc)")),
                BackendInfo("onnxruntime", "x", True, ("CPUExecutionProvider",)))
    cpu_only = replace(base, devices=devices, backends=backends)
    report = {(d["vendor"], d["kind"]): d for d in device_report(cpu_only)}
    assert report[("NVIDIA", "GPU")]["used_by"] == [] and "onnxruntime-gpu" in report[("NVIDIA", "GPU")]["hint"]
    assert report[("Intel", "GPU")]["used_by"] == ["openvino:GPU.0"] and report[("Intel", "GPU")]["hint"] is None
    assert "NPU driver" in report[("Intel", "NPU")]["hint"]
    text = format_hardware(cpu_only)
    assert "GPU:     NVIDIA H200 (driver nvidia); not used: ONNX Runtime's CUDA provider" in text
    assert "NPU:     Intel 8086:7d1d (driver intel_vpu); not used" in text
    assert "used by openvino:GPU.0" in text and "no GPU or NPU found" not in text

    with_cuda = replace(cpu_only, backends=(BackendInfo("onnxruntime", "x", True, (
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),))
    nvidia = device_report(with_cuda)[0]
    assert nvidia["used_by"] == ["onnxruntime:TensorrtExecutionProvider", "onnxruntime:CUDAExecutionProvider"]
    assert json.loads(json.dumps(device_report(with_cuda)))  # part of `edgeglm probe --json`


def test_an_nvidia_gpu_on_nouveau_is_told_it_needs_nvidias_driver():
    from dataclasses import replace

    from runtime.probe import DeviceInfo, device_report

    info = replace(probe_hardware(), devices=(DeviceInfo("GPU", "NVIDIA", "10de:2335", "nouveau"),),
                   backends=(BackendInfo("onnxruntime", "x", True, ("CPUExecutionProvider",)),))
    (report,) = device_report(info)
    assert report["used_by"] == [] and "nouveau has none" in report["hint"]


def test_a_jetson_boards_integrated_gpu_is_found_from_the_device_tree(tmp_path):
    """Tegra has no /proc/driver/nvidia/gpus and no DRM card for its GPU (its tegra DRM card drives the
    display); the device tree names the board, and the hint names JetPack's ONNX Runtime."""
    from dataclasses import replace

    from runtime.probe import DeviceInfo, device_report, probe_devices

    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (tmp_path / "sys/class/drm/card0/device").mkdir(parents=True)
    (tmp_path / "sys/class/drm/card0/device/uevent").write_text("DRIVER=tegra-drm\n")
    devices = probe_devices(tmp_path)
    assert devices == (DeviceInfo("GPU", "NVIDIA", "NVIDIA Jetson Orin Nano Developer Kit (integrated GPU)", "nvgpu"),)
    info = replace(probe_hardware(), devices=devices,
                   backends=(BackendInfo("onnxruntime", "x", True, ("CPUExecutionProvider",)),))
    assert "JetPack" in device_report(info)[0]["hint"]
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert probe_devices(tmp_path) == ()


def test_physical_cores_come_from_the_cpus_sharing_a_core_not_core_id_alone(monkeypatch):
    """On ARM boards core_id restarts in each cluster (an RK3588's 4 small + 4 big cores, package 0): keyed by
    (package, core_id) they read as 4 cores, and one-thread-per-core pinning took the small cluster only. The CPUs
    sharing a core (core_cpus_list / thread_siblings_list) say which CPUs are one core."""
    import runtime.probe as probe

    topo = "/sys/devices/system/cpu/cpu{}/topology/{}"
    arm = {topo.format(c, "core_id"): str(c % 4) for c in range(8)}
    arm.update({topo.format(c, "physical_package_id"): "0" for c in range(8)})
    arm.update({topo.format(c, "core_cpus_list"): str(c) for c in range(8)})
    monkeypatch.setattr(probe, "usable_cpu_ids", lambda: list(range(8)))
    monkeypatch.setattr(probe, "_read", lambda path: arm.get(str(path)))
    assert probe.usable_physical_cores() == 8 and probe.cpus_one_per_core() == list(range(8))
    smt = {topo.format(c, "thread_siblings_list"): f"{c % 4},{c % 4 + 4}" for c in range(8)}  # 4 cores x 2 threads
    monkeypatch.setattr(probe, "_read", lambda path: smt.get(str(path)))
    assert probe.usable_physical_cores() == 4 and probe.cpus_one_per_core() == [0, 1, 2, 3, 4, 5, 6, 7]
    monkeypatch.setattr(probe, "usable_cpu_ids", lambda: [0, 4, 1])  # two threads of core 0, one of core 1
    assert probe.usable_physical_cores() == 2 and probe.cpus_one_per_core() == [0, 1, 4]
    monkeypatch.setattr(probe, "_read", lambda path: None)  # no topology at all
    assert probe.usable_physical_cores() is None and probe.cpus_one_per_core() == [0, 4, 1]
