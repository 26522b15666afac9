"""Every kustomization in k3s/ renders, and every resource is valid for the K3s we target.

Schemas: the Kubernetes OpenAPI schemas shipped by the `kubernetes-validate` package, strict
(unknown fields are errors, so a typo such as `securityContxt` fails here instead of being
dropped by the API server).
"""

from __future__ import annotations

import pytest
from k3s_manifests import (CLUSTER_SCOPED_KINDS, K3S, NAMESPACE, agents, containers, env_of, find, kustomizations,
                           label, pod_spec, rendered, standalone_manifests)
from k3s_render import RenderError, load_documents, render, strategic_merge

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

# K3s v1.33 is the release line docs/deploy-k3s.md is written for; the newest schemas the package
# ships catch an API that a later K3s removes.
TARGET_KUBERNETES = "1.33.0"


def _validate(obj: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:  # the full message prints the whole schema
        where = "".join(f"[{p!r}]" for p in exc.absolute_path)
        pytest.fail(f"{label(obj)} is not valid Kubernetes {version}: {exc.message} at {where or 'the top'}")


def _versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return sorted({TARGET_KUBERNETES, latest_version()})


@pytest.mark.parametrize("name", kustomizations())
def test_every_rendered_resource_is_valid(name):
    resources = rendered(name)
    assert resources, f"k3s/{name} renders nothing"
    for version in _versions():
        for obj in resources:
            _validate(obj, version)


@pytest.mark.parametrize("path", standalone_manifests(), ids=lambda p: p.relative_to(K3S).as_posix())
def test_standalone_manifests_are_valid(path):
    docs = load_documents(path)
    assert docs
    for version in _versions():
        for obj in docs:
            _validate(obj, version)


def test_the_validator_refuses_a_misspelt_field():
    agent = find(rendered("base"), "DaemonSet", "edgeglm-agent")
    broken = strategic_merge(agent, {"spec": {"template": {"spec": {"containers": [
        {"name": "agent", "securityContxt": {"privileged": True}}]}}}})
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContxt"):
        kubernetes_validate.validate(broken, TARGET_KUBERNETES, strict=True)


@pytest.mark.parametrize("name", kustomizations())
def test_namespaced_resources_are_in_the_edgeglm_namespace(name):
    for obj in rendered(name):
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED_KINDS:
            assert ns is None, f"{label(obj)} is cluster-scoped but names namespace {ns}"
        else:
            assert ns == NAMESPACE, f"{label(obj)} is in namespace {ns!r}, not {NAMESPACE!r}"


def test_secret_templates_are_not_applied_by_any_kustomization():
    """`kubectl apply -k` must never overwrite the real Secrets with placeholders."""
    for name in kustomizations():
        kinds = {obj["kind"] for obj in rendered(name)}
        assert "Secret" not in kinds, f"k3s/{name} renders a Secret"


# --- what each overlay changes ---------------------------------------------------------------------

def _agent(name: str) -> tuple[dict, dict]:
    ds = find(rendered(name), "DaemonSet", "edgeglm-agent")
    (container,) = [c for c in containers(ds) if c["name"] == "agent"]
    return ds, container


def test_overlays_keep_everything_of_the_base_agent_they_do_not_change():
    _, base = _agent("base")
    for name in kustomizations()[1:]:
        for ds in agents(rendered(name)):
            (agent,) = [c for c in containers(ds) if c["name"] == "agent"]
            where = f"{name}: {label(ds)}"
            assert set(env_of(base)) <= set(env_of(agent)), where
            assert agent["volumeMounts"] == base["volumeMounts"], where
            assert agent["securityContext"] == base["securityContext"], where
            assert agent["resources"]["requests"] == base["resources"]["requests"], where
            assert pod_spec(ds)["nodeSelector"]["edgeglm.io/edge"] == "true", where


def test_intel_cpu_overlay():
    ds, agent = _agent("overlays/intel-cpu")
    assert pod_spec(ds)["nodeSelector"]["kubernetes.io/arch"] == "amd64"
    assert agent["image"] == _agent("base")[1]["image"]


def test_intel_gpu_npu_overlay():
    ds, agent = _agent("overlays/intel-gpu-npu")
    limits = agent["resources"]["limits"]
    assert limits["gpu.intel.com/i915"] == "1" and limits["npu.intel.com/accel"] == "1"
    assert limits["cpu"] and limits["memory"], "the base's limits are kept"
    # backend auto: the autotune measures OpenVINO GPU/NPU against the CPU (a named backend alone ran on the CPU)
    assert "EDGEGLM_MODEL__BACKEND" not in env_of(agent)
    assert pod_spec(ds)["securityContext"]["supplementalGroups"], "the render group for /dev/dri and /dev/accel"
    assert pod_spec(ds)["securityContext"]["runAsUser"] == 10001, "the base's pod securityContext is kept"


def test_nvidia_overlay():
    ds, agent = _agent("overlays/nvidia")
    assert pod_spec(ds)["runtimeClassName"] == "nvidia"
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(agent)["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "compute,utility"  # CUDA, not only nvidia-smi
    assert "EDGEGLM_MODEL__BACKEND" not in env_of(agent)  # auto: CUDA against the CPU, measured
    (runtime_class,) = load_documents(K3S / "overlays/nvidia/runtimeclass.yaml")
    assert runtime_class["metadata"]["name"] == "nvidia"


def test_mixed_overlay_runs_one_agent_per_hardware_kind_on_disjoint_nodes():
    resources = rendered("overlays/mixed")
    assert [label(ds) for ds in agents(resources)] == ["DaemonSet/edgeglm-agent-cpu", "DaemonSet/edgeglm-agent-nvidia"]
    cpu, gpu = agents(resources)
    # a node labelled nvidia gets only the NVIDIA agent, any other edge box only the CPU one
    assert pod_spec(gpu)["nodeSelector"]["edgeglm.io/hardware"] == "nvidia"
    (term,) = pod_spec(cpu)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "edgeglm.io/hardware", "operator": "NotIn", "values": ["nvidia"]}]
    # neither selector matches the other's pods (a DaemonSet adopts the matching pods it does not own)
    for ds, other in ((cpu, gpu), (gpu, cpu)):
        assert not ds["spec"]["selector"]["matchLabels"].items() <= other["spec"]["template"]["metadata"]["labels"].items()
        assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    # each mounts its own agent.toml and runs as its own ServiceAccount; the same Secrets and the same config
    assert pod_spec(gpu)["serviceAccountName"] == "edgeglm-agent-nvidia"
    find(resources, "ServiceAccount", "edgeglm-agent-nvidia")
    config = {v["name"]: v["configMap"]["name"] for v in pod_spec(gpu)["volumes"] if "configMap" in v}
    assert config == {"config": "edgeglm-agent-config-nvidia"}
    assert find(resources, "ConfigMap", "edgeglm-agent-config-nvidia")["data"] == \
        find(resources, "ConfigMap", "edgeglm-agent-config-cpu")["data"] == \
        find(rendered("base"), "ConfigMap", "edgeglm-agent-config")["data"]
    secrets = lambda ds: {v["secret"]["secretName"] for v in pod_spec(ds)["volumes"] if "secret" in v}  # noqa: E731
    assert secrets(gpu) == secrets(cpu) and secrets(gpu)
    # the same pods as the single-kind overlays, apart from names, labels and node placement
    def placement_free(ds: dict) -> dict:
        spec = dict(pod_spec(ds))
        spec.pop("nodeSelector")
        spec.pop("affinity", None)
        spec.pop("serviceAccountName")
        spec["volumes"] = [v for v in spec["volumes"] if "configMap" not in v]
        return spec

    assert placement_free(cpu) == placement_free(_agent("overlays/intel-cpu")[0])
    assert placement_free(gpu) == placement_free(_agent("overlays/nvidia")[0])
    assert pod_spec(cpu)["nodeSelector"]["kubernetes.io/arch"] == "amd64"
    # the NetworkPolicy for agents selects both
    policy = find(resources, "NetworkPolicy", "edgeglm-agent")["spec"]["podSelector"]["matchLabels"]
    for ds in (cpu, gpu):
        assert policy.items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_arm64_overlay():
    ds, agent = _agent("overlays/arm64")
    assert pod_spec(ds)["nodeSelector"]["kubernetes.io/arch"] == "arm64"
    assert agent["image"].endswith("-arm64")


# --- the renderer itself ---------------------------------------------------------------------------

def test_strategic_merge_merges_keyed_lists_and_replaces_the_others():
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["x"]}],
            "tolerations": [{"key": "t1"}], "nodeSelector": {"a": "1"}, "drop": 1}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["y"]},
                            {"name": "b"}],
             "tolerations": [{"key": "t2"}], "nodeSelector": {"b": "2"}, "drop": None}
    assert strategic_merge(base, patch) == {
        "containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}], "args": ["y"]},
                       {"name": "b"}],
        "tolerations": [{"key": "t2"}], "nodeSelector": {"a": "1", "b": "2"}}
    assert base["drop"] == 1, "the base is not modified"


def test_strategic_merge_refuses_what_it_does_not_implement():
    with pytest.raises(RenderError, match="directive"):
        strategic_merge({"a": {}}, {"a": {"$patch": "replace"}})
    with pytest.raises(RenderError, match="topologySpreadConstraints"):
        strategic_merge({"topologySpreadConstraints": []}, {"topologySpreadConstraints": [{}]})


def test_merge_keys_agree_with_the_kubernetes_schema():
    """Every list of a pod spec or container that Kubernetes merges by key is merged by that key
    here, or refused."""
    import json
    from pathlib import Path

    from k3s_render import MERGE_KEYS, UNSUPPORTED_MERGE

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{TARGET_KUBERNETES}-local-strict"
    declared = {}
    for name in ("podspec-v1.json", "container-v1.json"):
        for field, prop in json.loads((schemas / name).read_text())["properties"].items():
            if "x-kubernetes-patch-merge-key" in prop:
                declared[field] = prop["x-kubernetes-patch-merge-key"]
    assert declared, f"no patch-merge keys found in {schemas}"
    for field, key in declared.items():
        assert MERGE_KEYS.get(field) == key or field in UNSUPPORTED_MERGE, \
            f"{field}: Kubernetes merges by {key!r}, the renderer by {MERGE_KEYS.get(field)!r}"


def test_name_suffix_renames_resources_and_their_references_inside_the_kustomization(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [r.yaml]\nnameSuffix: -x\nlabels: [{pairs: {k: v}, includeSelectors: true}]\n")
    (tmp_path / "r.yaml").write_text("""
apiVersion: v1
kind: ConfigMap
metadata: {name: conf}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sa}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ds, labels: {app: a}}
spec:
  selector: {matchLabels: {app: a}}
  template:
    metadata: {labels: {app: a}}
    spec:
      serviceAccountName: sa
      containers:
        - name: c
          env:
            - {name: A, valueFrom: {configMapKeyRef: {name: conf, key: k}}}
            - {name: B, valueFrom: {secretKeyRef: {name: made-by-hand, key: k}}}
      volumes:
        - {name: v1, configMap: {name: conf}}
        - {name: v2, secret: {secretName: made-by-hand}}
""")
    conf, sa, ds = render(tmp_path)
    assert (conf["metadata"]["name"], sa["metadata"]["name"], ds["metadata"]["name"]) == ("conf-x", "sa-x", "ds-x")
    spec = ds["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "sa-x"
    assert [v.get("configMap", v.get("secret")) for v in spec["volumes"]] == [{"name": "conf-x"},
                                                                             {"secretName": "made-by-hand"}]
    env = {e["name"]: e["valueFrom"] for e in spec["containers"][0]["env"]}
    assert env["A"]["configMapKeyRef"]["name"] == "conf-x" and env["B"]["secretKeyRef"]["name"] == "made-by-hand"
    assert ds["spec"]["selector"]["matchLabels"] == {"app": "a", "k": "v"} == ds["spec"]["template"]["metadata"][
        "labels"]
    assert conf["metadata"]["labels"] == {"k": "v"}


def test_a_patch_matching_a_former_name_of_several_resources_is_refused(tmp_path):
    """kustomize matches a patch by a resource's current or former name: a patch of `cm` in a kustomization
    holding `cm` and a renamed copy `cm-x` would patch both, so the renderer refuses it."""
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "kustomization.yaml").write_text("resources: [../cm.yaml]\nnameSuffix: -x\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: b}\n")
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "kustomization.yaml").write_text("resources: [../inner]\npatches: [{path: p.yaml}]\n")
    (tmp_path / "outer" / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: c}\n")
    (patched,) = render(tmp_path / "outer")  # the former name alone matches: patched, as kustomize does
    assert patched["metadata"]["name"] == "cm-x" and patched["data"] == {"a": "c"}
    (tmp_path / "outer" / "kustomization.yaml").write_text(
        "resources: [../inner, ../cm.yaml]\npatches: [{path: p.yaml}]\n")
    with pytest.raises(RenderError, match="current or a former name of"):
        render(tmp_path / "outer")


def test_render_errors_name_the_problem(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nimages: [{name: x, newTag: y}]\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    with pytest.raises(RenderError, match="images not supported"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: p.yaml}]\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\ndata: {a: b}\n")
    with pytest.raises(RenderError, match="targets .*'other'"):
        render(tmp_path)
