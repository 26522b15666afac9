"""The k3s/ tree as the tests see it: every kustomization rendered, and helpers to look inside."""

from __future__ import annotations

import functools
from pathlib import Path

from k3s_render import load_documents, render

REPO = Path(__file__).resolve().parents[2]
K3S = REPO / "k3s"
NAMESPACE = "edgeglm"
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "ReplicaSet", "Pod"}
CLUSTER_SCOPED_KINDS = {"Namespace", "RuntimeClass", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                        "StorageClass", "PriorityClass"}


def kustomizations() -> list[str]:
    """The base and every overlay, as paths relative to k3s/ (test ids)."""
    overlays = sorted(p.parent.relative_to(K3S).as_posix() for p in K3S.glob("overlays/*/kustomization.yaml"))
    return ["base", *overlays]


@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    return tuple(render(K3S / name))


def rendered(name: str) -> list[dict]:
    """The resources of k3s/<name>; callers may not mutate them (shared between tests)."""
    return list(_rendered(name))


def standalone_manifests() -> list[Path]:
    """Manifests applied by hand, not through a kustomization: Secret templates, the RuntimeClass."""
    return sorted(K3S.glob("secrets/*.yaml")) + sorted(K3S.glob("overlays/*/runtimeclass.yaml"))


def secret_templates() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for path in sorted(K3S.glob("secrets/*.yaml"))
            for doc in load_documents(path) if doc.get("kind") == "Secret"}


def find(resources: list[dict], kind: str, name: str) -> dict:
    hits = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def agents(resources: list[dict]) -> list[dict]:
    """The agent DaemonSets: the base's `edgeglm-agent`, or one per hardware kind (overlays/mixed)."""
    out = [r for r in resources if r["kind"] == "DaemonSet"
           and r["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "edgeglm-agent"]
    assert out, "no agent DaemonSet"
    return out


def agent_daemonsets() -> list[tuple[str, str]]:
    """(kustomization, DaemonSet name) of every agent in every kustomization (test parameters)."""
    return [(name, ds["metadata"]["name"]) for name in kustomizations() for ds in agents(rendered(name))]


def workloads(resources: list[dict]) -> list[dict]:
    return [r for r in resources if r["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    if workload["kind"] == "Pod":
        return workload["spec"]
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def volume(workload: dict, name: str) -> dict:
    hits = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert len(hits) == 1, f"{workload['metadata']['name']}: no volume {name}"
    return hits[0]


def label(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"
