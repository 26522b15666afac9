"""A small kustomize for the k3s/ tree, so the tests need no cluster and no kustomize binary.

    render(Path("k3s/overlays/intel-cpu"))   # -> list of resource dicts, as `kubectl kustomize` gives

It does what k3s/ uses and refuses the rest loudly: a kustomization's `resources` (files and
directories with a kustomization.yaml) and `patches` given by `path`, each a strategic-merge
patch whose kind and name pick its one target. Strategic merge as Kubernetes does it for the
fields we patch: maps merge, `null` deletes, lists with a merge key (containers by name,
volumeMounts by mountPath, ...) merge item by item, other lists are replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches"}

# patchMergeKey of the list fields a patch may touch (k8s.io/api types); other lists are replaced
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "ports": "containerPort",  # a Service's ports merge by "port": see _merge_key
}
# lists that Kubernetes merges but this renderer does not: a patch touching one is refused
UNSUPPORTED_MERGE = {"hostAliases", "topologySpreadConstraints", "ephemeralContainers", "finalizers",
                     "resourceClaims", "schedulingGates"}


class RenderError(Exception):
    """The kustomization uses something this renderer does not do, or a patch has no target."""


def load_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of a file."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def find_kustomization(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


def resource_id(obj: dict) -> tuple[str, str, str]:
    """(kind, namespace, name): what kustomize matches patches and finds duplicates by."""
    meta = obj.get("metadata") or {}
    return obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def render(directory: Path) -> list[dict]:
    """The resources of the kustomization in `directory`, patches applied, in kustomize's order."""
    directory = Path(directory)
    kfile = find_kustomization(directory)
    spec = load_documents(kfile)[0]
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: {', '.join(sorted(unknown))} not supported by tests/k3s/k3s_render.py; "
                          f"use resources and patches, or teach the renderer")
    resources: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources += render(path)
        elif path.is_file():
            resources += load_documents(path)
        else:
            raise RenderError(f"{kfile}: resource {entry!r} is neither a file nor a directory")
    ids = [resource_id(r) for r in resources]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RenderError(f"{kfile}: resources defined more than once: {duplicates}")
    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise RenderError(f"{kfile}: patch {patch_entry} not supported: give only `path` "
                              f"(a strategic-merge patch naming its target)")
        for patch in load_documents(directory / patch_entry["path"]):
            target = resource_id(patch)
            matches = [i for i, r in enumerate(resources) if resource_id(r) == target]
            if not matches:
                raise RenderError(f"{kfile}: patch {patch_entry['path']} targets {target}, which no resource is")
            resources[matches[0]] = strategic_merge(resources[matches[0]], patch)
    return resources


def strategic_merge(base, patch, field: str | None = None):
    """`patch` merged into a copy of `base` (see the module docstring)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(isinstance(k, str) and k.startswith("$") for k in patch):
            raise RenderError(f"patch directive in {field or 'the patch'} not supported: {sorted(patch)}")
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        if field in UNSUPPORTED_MERGE:
            raise RenderError(f"a patch of {field!r} would be merged by Kubernetes; not supported here")
        if field in MERGE_KEYS:
            return _merge_list(base, patch, _merge_key(field, base + patch), field)
    return copy.deepcopy(patch)


def _merge_key(field: str, items: list) -> str:
    if field == "ports" and not any(isinstance(i, dict) and "containerPort" in i for i in items):
        return "port"  # ServicePort
    return MERGE_KEYS[field]


def _merge_list(base: list, patch: list, key: str, field: str) -> list:
    out = copy.deepcopy(base)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise RenderError(f"patch item of {field} without its merge key {key!r}: {item}")
        for i, existing in enumerate(out):
            if existing.get(key) == item[key]:
                out[i] = strategic_merge(existing, item, field)
                break
        else:
            out.append(copy.deepcopy(item))
    return out
