"""A small kustomize for the k3s/ tree, so the tests need no cluster and no kustomize binary.

    render(Path("k3s/overlays/intel-cpu"))   # -> list of resource dicts, as `kubectl kustomize` gives

It does what k3s/ uses and refuses the rest loudly: a kustomization's `resources` (files and
directories with a kustomization.yaml), `patches` given by `path`, each a strategic-merge
patch whose kind and name pick its one target, then `nameSuffix` and `labels`, in kustomize's
order (patches name their targets by the names before the suffix). Strategic merge as Kubernetes
does it for the fields we patch: maps merge, `null` deletes, lists with a merge key (containers
by name, volumeMounts by mountPath, ...) merge item by item, other lists are replaced.
`nameSuffix` renames every resource of the kustomization and, as kustomize does, the references
to a renamed ConfigMap, Secret, ServiceAccount or PersistentVolumeClaim in pod specs; references
to objects outside it (Secrets created by hand) keep their names. `labels` entries add their
pairs to metadata, and with `includeSelectors: true` to selectors and pod templates too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "nameSuffix", "labels"}

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
    return [r for r, _ in _render(Path(directory))]


def _render(directory: Path) -> list[tuple[dict, set]]:
    """(resource, its former ids): kustomize matches a patch by a resource's current or any former name."""
    kfile = find_kustomization(directory)
    spec = load_documents(kfile)[0]
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: {', '.join(sorted(unknown))} not supported by tests/k3s/k3s_render.py; "
                          f"use resources and patches, or teach the renderer")
    resources: list[tuple[dict, set]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources += _render(path)
        elif path.is_file():
            resources += [(doc, set()) for doc in load_documents(path)]
        else:
            raise RenderError(f"{kfile}: resource {entry!r} is neither a file nor a directory")
    ids = [resource_id(r) for r, _ in resources]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RenderError(f"{kfile}: resources defined more than once: {duplicates}")
    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise RenderError(f"{kfile}: patch {patch_entry} not supported: give only `path` "
                              f"(a strategic-merge patch naming its target)")
        for patch in load_documents(directory / patch_entry["path"]):
            target = resource_id(patch)
            matches = [i for i, (r, former) in enumerate(resources) if resource_id(r) == target or target in former]
            if not matches:
                raise RenderError(f"{kfile}: patch {patch_entry['path']} targets {target}, which no resource is")
            if len(matches) > 1:
                raise RenderError(f"{kfile}: patch {patch_entry['path']} targets {target}, which is the current or "
                                  f"a former name of {[resource_id(resources[i][0]) for i in matches]}: kustomize "
                                  f"would patch them all; patch inside the kustomization that renames them")
            r, former = resources[matches[0]]
            merged = strategic_merge(r, patch)
            merged["metadata"]["name"] = r["metadata"]["name"]  # the patch names its target; it renames nothing
            resources[matches[0]] = (merged, former)
    if "nameSuffix" in spec:
        renamed = with_name_suffix([r for r, _ in resources], spec["nameSuffix"], kfile)
        resources = [(new, former | {resource_id(old)}) for new, (old, former) in zip(renamed, resources)]
    for entry in spec.get("labels", []):
        if set(entry) - {"pairs", "includeSelectors"}:
            raise RenderError(f"{kfile}: labels entry {entry} not supported: give pairs and includeSelectors")
        resources = [(with_labels(r, entry["pairs"], entry.get("includeSelectors", False)), former)
                     for r, former in resources]
    return resources


# kind -> where a pod spec names one (kustomize's nameReference for the kinds k3s/ renames)
POD_SPEC_REFERENCES = {
    "ConfigMap": ("volumes[].configMap.name", "containers[].env[].valueFrom.configMapKeyRef.name",
                  "containers[].envFrom[].configMapRef.name"),
    "Secret": ("volumes[].secret.secretName", "containers[].env[].valueFrom.secretKeyRef.name",
               "containers[].envFrom[].secretRef.name"),
    "ServiceAccount": ("serviceAccountName",),
    "PersistentVolumeClaim": ("volumes[].persistentVolumeClaim.claimName",),
}
POD_TEMPLATE_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}


def with_name_suffix(resources: list[dict], suffix: str, kfile: Path) -> list[dict]:
    """Every resource renamed with `suffix`, and the pod-spec references to the renamed ones with it."""
    if not isinstance(suffix, str) or not suffix:
        raise RenderError(f"{kfile}: nameSuffix must be a non-empty string")
    renamed = {(r["kind"], r["metadata"]["name"]) for r in resources}
    out = []
    for r in resources:
        r = copy.deepcopy(r)
        if r["kind"] == "Namespace":
            raise RenderError(f"{kfile}: nameSuffix would rename Namespace {r['metadata']['name']}")
        r["metadata"]["name"] += suffix
        if r["kind"] in POD_TEMPLATE_KINDS:
            _rename_references(r["spec"]["template"]["spec"], renamed, suffix)
        elif r["kind"] in ("CronJob", "Pod"):
            raise RenderError(f"{kfile}: nameSuffix on a {r['kind']}: its references are not renamed here")
        out.append(r)
    return out


def _rename_references(pod: dict, renamed: set, suffix: str) -> None:
    for kind, paths in POD_SPEC_REFERENCES.items():
        for path in paths:
            for holder, key in _walk(pod, path.split(".")):
                if (kind, holder[key]) in renamed:
                    holder[key] += suffix
    for c in pod.get("initContainers", []):
        for kind in ("ConfigMap", "Secret"):
            for path in POD_SPEC_REFERENCES[kind][1:]:
                for holder, key in _walk({"containers": [c]}, path.split(".")):
                    if (kind, holder[key]) in renamed:
                        holder[key] += suffix


def _walk(node, parts: list[str]):
    """(dict, key) for every value at a dotted path, `name[]` stepping into each item of a list."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    listed = head.endswith("[]")
    key = head[:-2] if listed else head
    if not isinstance(node, dict) or key not in node:
        return
    if not rest:
        yield node, key
        return
    for child in (node[key] if listed else [node[key]]):
        yield from _walk(child, rest)


def with_labels(resource: dict, pairs: dict, selectors: bool) -> dict:
    """The resource with `pairs` in its labels and, with `selectors`, in its selector and pod template."""
    r = copy.deepcopy(resource)
    r["metadata"].setdefault("labels", {}).update(pairs)
    if selectors and r["kind"] in POD_TEMPLATE_KINDS:
        r["spec"].setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
        r["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    elif selectors and r["kind"] in ("Service", "NetworkPolicy", "CronJob", "Pod"):
        raise RenderError(f"labels with includeSelectors on a {r['kind']}: not supported here")
    return r


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
