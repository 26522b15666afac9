"""Security and operability rules every workload in every kustomization keeps.

Each container: non-root, read-only root filesystem, all capabilities dropped, no privilege
escalation, seccomp RuntimeDefault, requests and limits for CPU and memory, liveness and
readiness probes, a pinned image. No host namespaces; a hostPath only where ALLOWED_HOST_PATHS
says why.
"""

from __future__ import annotations

import re

import pytest
from k3s_manifests import containers, kustomizations, label, pod_spec, rendered, workloads

# the agent DaemonSets: the base's, and the per-hardware copies of a mixed fleet (overlays/mixed)
AGENTS = ("DaemonSet/edgeglm-agent", "DaemonSet/edgeglm-agent-cpu", "DaemonSet/edgeglm-agent-nvidia")
# (workload, volume) -> why it may be a hostPath
ALLOWED_HOST_PATHS = {
    **{(agent, "state"): "A/B model slots and the persisted OTA state must outlive the pod: an update resumes "
                         "after a power cut or a pod restart (docs/ota.md)" for agent in AGENTS},
    **{(agent, "device-identity"): "this box's own MQTT password, provisioned on the box at enrollment: a Secret "
                                   "cannot give each pod of a DaemonSet its own key, so every box would hold every "
                                   "device's password" for agent in AGENTS},
}
# workload -> why it may use the host's network, PID or IPC namespace (none does: see k3s/base/agent/agent.yaml)
ALLOWED_HOST_NAMESPACES: dict[str, str] = {}


def _all_workloads():
    return [pytest.param(name, w, id=f"{name}:{label(w)}") for name in kustomizations() for w in workloads(rendered(name))]


@pytest.mark.parametrize("name,workload", _all_workloads())
def test_containers_run_unprivileged(name, workload):
    pod = pod_spec(workload)
    pod_sc = pod.get("securityContext", {})
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label(workload)}: seccomp"
    assert pod.get("automountServiceAccountToken") is False, f"{label(workload)}: needs no Kubernetes API token"
    for c in containers(workload):
        sc = c.get("securityContext", {})
        where = f"{label(workload)}/{c['name']}"
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert uid is not None and uid != 0, f"{where}: runAsUser must be set and not 0, is {uid}"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert sc.get("privileged", False) is False, f"{where}: privileged"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop must be [ALL]"
        assert not sc.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
        assert sc.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault", where


@pytest.mark.parametrize("name,workload", _all_workloads())
def test_no_host_namespaces_or_paths_unless_allowed(name, workload):
    pod = pod_spec(workload)
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            assert label(workload) in ALLOWED_HOST_NAMESPACES, f"{label(workload)} sets {field}"
    for vol in pod.get("volumes", []):
        if "hostPath" in vol:
            assert (label(workload), vol["name"]) in ALLOWED_HOST_PATHS, \
                f"{label(workload)}: hostPath volume {vol['name']} is not in ALLOWED_HOST_PATHS"
    for c in containers(workload):
        for port in c.get("ports", []):
            assert "hostPort" not in port, f"{label(workload)}/{c['name']}: hostPort"


@pytest.mark.parametrize("name,workload", _all_workloads())
def test_requests_limits_and_probes(name, workload):
    for c in containers(workload):
        where = f"{label(workload)}/{c['name']}"
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                assert resources.get(kind, {}).get(res), f"{where}: no {kind}.{res}"
        if c in pod_spec(workload).get("initContainers", []):
            continue
        assert "livenessProbe" in c, f"{where}: no livenessProbe"
        assert "readinessProbe" in c, f"{where}: no readinessProbe"


# name[:tag][@sha256:digest]; the registry part (with a port's ':') comes before the last '/'
_IMAGE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._/-]*(?::\d+/[a-z0-9._/-]+)?)(?::(?P<tag>[\w][\w.-]{0,127}))?"
                    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def image_is_pinned(image: str) -> bool:
    m = _IMAGE.match(image)
    if not m:
        return False
    return bool(m["digest"]) or (m["tag"] is not None and m["tag"] != "latest")


@pytest.mark.parametrize("name,workload", _all_workloads())
def test_images_are_pinned(name, workload):
    for c in containers(workload):
        assert image_is_pinned(c["image"]), f"{label(workload)}/{c['name']}: image {c['image']!r} is not pinned " \
                                            f"(give a tag other than latest, or a digest)"
        assert c.get("imagePullPolicy") in ("IfNotPresent", "Never"), \
            f"{label(workload)}/{c['name']}: imagePullPolicy {c.get('imagePullPolicy')!r}"


@pytest.mark.parametrize("image,pinned", [
    ("eclipse-mosquitto:2.0.20", True), ("edgeglm/agent:0.1.0-arm64", True),
    ("eclipse-mosquitto@sha256:" + "a" * 64, True), ("eclipse-mosquitto", False),
    ("eclipse-mosquitto:latest", False), ("registry.example:5000/edgeglm/agent", False),
    ("registry.example:5000/edgeglm/agent:0.1.0", True),
])
def test_image_pin_rule(image, pinned):
    assert image_is_pinned(image) is pinned
