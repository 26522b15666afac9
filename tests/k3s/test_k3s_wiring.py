"""The pieces of k3s/ agree with each other and with the code: config files load with the real
config loader, paths point at mounts, names at Services, Secrets and ConfigMaps that exist,
ports at listeners, and the fleet id is the same in the agent, the controller and the ACL."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import PurePosixPath

import pytest
from k3s_manifests import (REPO, agent_daemonsets, agents, containers, env_of, find, kustomizations, label, pod_spec,
                           rendered, secret_templates, volume, workloads)

from agent.topics import controller_presence_topic, presence_topics

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

AGENT_COMMAND = "edgeglm agent --config /etc/edgeglm/agent.toml"
CONTROLLER_COMMAND = ["edgeglm", "fleet", "serve", "--config", "/etc/edgeglm/fleet.toml"]
OPERATOR_CONFIG = "/etc/edgeglm/fleet-cli.toml"  # `kubectl exec ... edgeglm fleet offer --config` (docs/deploy-k3s.md)
CONTROLLER_PORT = 9100
NODE_NAME = "box-1"


def _container(workload: dict, name: str) -> dict:
    (c,) = [c for c in containers(workload) if c["name"] == name]
    return c


def _toml(resources: list[dict], configmap: str, key: str) -> dict:
    return tomllib.loads(find(resources, "ConfigMap", configmap)["data"][key])


def _mosquitto_conf(resources: list[dict]) -> dict[str, list[str]]:
    """Option -> values, in file order (an option may repeat, e.g. log_type)."""
    out: dict[str, list[str]] = {}
    for line in find(resources, "ConfigMap", "edgeglm-broker-config")["data"]["mosquitto.conf"].splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            option, _, value = line.partition(" ")
            out.setdefault(option, []).append(value.strip())
    return out


def _mounted_file(workload: dict, container: dict, path: str) -> tuple[dict, str]:
    """The volume a file path lies in and the file's key in it (Secret/ConfigMap key)."""
    best = None
    for m in container.get("volumeMounts", []):
        mount = PurePosixPath(m["mountPath"])
        p = PurePosixPath(path)
        if p == mount or mount in p.parents:
            if best is None or len(mount.parts) > len(PurePosixPath(best["mountPath"]).parts):
                best = m
    assert best is not None, f"{label(workload)}/{container['name']}: {path} is in no mounted volume"
    vol = volume(workload, best["name"])
    if "subPath" in best:
        assert PurePosixPath(path) == PurePosixPath(best["mountPath"])
        return vol, best["subPath"]
    rel = PurePosixPath(path).relative_to(best["mountPath"]).as_posix()
    items = (vol.get("secret") or vol.get("configMap") or {}).get("items")
    if items:
        keys = [i["key"] for i in items if i["path"] == rel]
        assert keys, f"{label(workload)}: {path} is not among the items of volume {vol['name']}"
        return vol, keys[0]
    return vol, rel


def _volume_at(workload: dict, container: dict, path: str) -> dict:
    """The volume mounted exactly at `path`."""
    hits = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert hits, f"{label(workload)}/{container['name']}: nothing is mounted at {path}"
    return volume(workload, hits[0])


def _agent_env(ds: dict, agent: dict) -> dict[str, str]:
    """The environment the kubelet gives the agent on node NODE_NAME (before its start script)."""
    env = {}
    for name, e in env_of(agent).items():
        if "value" in e:
            env[name] = e["value"]
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "spec.nodeName", f"{name}: unexpected fieldRef"
            env[name] = NODE_NAME
        elif "resourceFieldRef" in src:
            ref = src["resourceFieldRef"]
            assert ref["containerName"] == agent["name"]
            section, res = ref["resource"].split(".")
            assert res == "cpu" and str(ref.get("divisor", "1")) == "1"
            env[name] = str(math.ceil(float(agent["resources"][section][res])))  # the kubelet rounds up
        else:
            pytest.fail(f"{label(ds)}: env {name} from {src}, which this test does not model")
    return env


@pytest.mark.parametrize("name,daemonset", agent_daemonsets())
def test_agent_config_loads_as_the_daemonset_runs_it(name, daemonset, tmp_path, monkeypatch):
    from agent.config import load_config

    resources = rendered(name)
    ds = find(resources, "DaemonSet", daemonset)
    agent = _container(ds, "agent")
    conf_path = "/etc/edgeglm/agent.toml"
    vol, key = _mounted_file(ds, agent, conf_path)
    toml_text = find(resources, "ConfigMap", vol["configMap"]["name"])["data"][key]
    (tmp_path / "agent.toml").write_text(toml_text)
    for var in [v for v in os.environ if v.upper().startswith("EDGEGLM_")]:
        monkeypatch.delenv(var)
    for var, value in _agent_env(ds, agent).items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("EDGEGLM_MQTT__PASSWORD", "from-the-start-script")
    cfg = load_config(tmp_path / "agent.toml")

    assert cfg.device.id == NODE_NAME and cfg.mqtt.username == NODE_NAME, "device id == MQTT user == node name"
    assert cfg.model.threads == math.ceil(float(agent["resources"]["limits"]["cpu"]))
    assert cfg.mqtt.enabled and cfg.mqtt.tls is not None
    svc = find(resources, "Service", "edgeglm-broker")
    assert cfg.mqtt.host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert cfg.mqtt.port == svc["spec"]["ports"][0]["port"]
    # every path the agent reads or writes is a mount of the right volume
    state = _volume_at(ds, agent, str(cfg.model.slots_dir))
    assert state["hostPath"]["path"] == str(cfg.model.slots_dir)
    vol, key = _mounted_file(ds, agent, str(cfg.mqtt.tls.ca_file))
    assert key in secret_templates()[vol["secret"]["secretName"]]["stringData"]
    trusted = _volume_at(ds, agent, str(cfg.ota.trusted_keys))
    assert trusted["secret"]["secretName"] == "edgeglm-trusted-keys"
    if name in ("overlays/intel-gpu-npu", "overlays/nvidia") or daemonset.endswith("-nvidia"):
        # the autotune measures the accelerator's paths
        assert (cfg.model.backend, cfg.model.device) == ("auto", "auto")


def test_agent_start_script_runs_the_documented_command():
    ds = find(rendered("base"), "DaemonSet", "edgeglm-agent")
    agent = _container(ds, "agent")
    assert agent["command"] == ["/bin/sh", "-c"]
    script = agent["args"][0]
    assert script.strip().splitlines()[-1].strip() == f"exec {AGENT_COMMAND}"
    creds = re.search(r'password_file="(?P<path>[^"$]+)"', script)
    assert creds, "the script reads the box's password file"
    # the file is on the box, in a read-only hostPath: no Secret holds any device's password
    vol, name = _mounted_file(ds, agent, creds["path"])
    host_file = f"{vol['hostPath']['path']}/{name}"
    assert vol["hostPath"]["type"] == "Directory" and host_file == "/etc/edgeglm-device/mqtt-password"
    assert [m for m in agent["volumeMounts"] if m["name"] == vol["name"]][0]["readOnly"] is True
    assert host_file in script, "the error names the file to write on the box"
    enrollment = (REPO / "docs" / "deploy-k3s.md").read_text()
    assert f"sudo install -o 10001 -g 10001 -m 0400 box-1.password {host_file}" in enrollment
    assert _mounted_file(ds, agent, "/etc/edgeglm/agent.toml")[1] == "agent.toml"


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
def test_agent_probes_ask_the_configured_api(probe):
    resources = rendered("base")
    agent = _container(find(resources, "DaemonSet", "edgeglm-agent"), "agent")
    http = _toml(resources, "edgeglm-agent-config", "agent.toml")["http"]
    path = {"livenessProbe": "/healthz", "readinessProbe": "/readyz?no_model_ok=1"}[probe]
    command = agent[probe]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    assert f"http://{http['host']}:{http['port']}{path}" in command[2]


def test_controller_runs_the_documented_command_and_port():
    resources = rendered("base")
    dep = find(resources, "Deployment", "edgeglm-controller")
    c = _container(dep, "controller")
    assert c["command"] == CONTROLLER_COMMAND
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": CONTROLLER_PORT}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz" and c[probe]["httpGet"]["port"] in ("http", CONTROLLER_PORT)
    fleet = _toml(resources, "edgeglm-controller-config", "fleet.toml")
    assert fleet["http"]["port"] == CONTROLLER_PORT and fleet["http"]["host"] == "0.0.0.0"
    assert _mounted_file(dep, c, CONTROLLER_COMMAND[-1])[1] == "fleet.toml"
    data = _volume_at(dep, c, "/var/lib/edgeglm-fleet")
    assert "persistentVolumeClaim" in data
    for path in (fleet["database"]["path"], fleet["bundles"]["dir"]):
        assert PurePosixPath("/var/lib/edgeglm-fleet") in PurePosixPath(path).parents
    svc = find(resources, "Service", "edgeglm-broker")
    assert fleet["mqtt"]["host"] == f"edgeglm-broker.{svc['metadata']['namespace']}.svc.cluster.local"
    assert fleet["mqtt"]["port"] == svc["spec"]["ports"][0]["port"]
    vol, key = _mounted_file(dep, c, fleet["mqtt"]["tls"]["ca_file"])
    assert key in secret_templates()[vol["secret"]["secretName"]]["stringData"]


# The controller pod's two fleet configs: `fleet serve`'s, and the operator commands' (`kubectl exec ...
# edgeglm fleet offer|config set|rollback|device remove --config /etc/edgeglm/fleet-cli.toml`), each with the
# broker user and the Secret that holds its password. With use_username_as_clientid one user is one connection.
FLEET_CONFIGS = [(CONTROLLER_COMMAND[-1], "edgeglm-controller", "edgeglm-controller-mqtt"),
                 (OPERATOR_CONFIG, "edgeglm-operator", "edgeglm-operator-mqtt")]
# the [mqtt] keys in which fleet-cli.toml may differ from fleet.toml
OPERATOR_KEYS = ("username", "client_id", "password_file")


@pytest.mark.parametrize("name", kustomizations())
@pytest.mark.parametrize("path,user,secret", FLEET_CONFIGS)
def test_controller_configs_load_through_the_fleet_config_loader(name, path, user, secret, tmp_path, monkeypatch):
    """fleet.toml and fleet-cli.toml as the Deployment mounts them parse with the fleet commands' loader, and
    the MQTT password of each is its user's Secret, mounted as a file (no password in the environment)."""
    from fleet.config import load_fleet_config, mqtt_password

    resources = rendered(name)
    dep = find(resources, "Deployment", "edgeglm-controller")
    c = _container(dep, "controller")
    vol, key = _mounted_file(dep, c, path)
    assert key == PurePosixPath(path).name and vol["configMap"]["name"] == "edgeglm-controller-config"
    (tmp_path / key).write_text(find(resources, "ConfigMap", vol["configMap"]["name"])["data"][key])
    for var in [v for v in os.environ if v.upper().startswith("EDGEGLM_")]:
        monkeypatch.delenv(var)
    for var, value in _controller_env(dep, c).items():
        monkeypatch.setenv(var, value)
    cfg = load_fleet_config(tmp_path / key)
    assert cfg.http.port == CONTROLLER_PORT and cfg.http.host == "0.0.0.0"
    assert cfg.mqtt.username == user and cfg.mqtt.client_id == user
    assert cfg.mqtt.tls is not None and cfg.fleet.id == "default"
    assert cfg.mqtt.password is None and cfg.mqtt.password_file is not None
    # the password file is the key of the user's Secret, readable by the controller's user through its group
    vol, key = _mounted_file(dep, c, str(cfg.mqtt.password_file))
    assert vol["secret"]["secretName"] == secret and key == "password"
    template = secret_templates()[secret]
    assert key in template["stringData"] and template["metadata"]["namespace"] == "edgeglm"
    texts = [p.read_text() for p in sorted((REPO / "k3s" / "secrets").glob("*.yaml"))]
    (header,) = [t for t in texts if f"name: {secret}\n" in t]
    assert f"kubectl -n edgeglm create secret generic {secret} --from-file=password=" in header
    mount = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert len(mount) == 1 and mount[0]["readOnly"] is True and "subPath" not in mount[0], mount
    assert vol["secret"]["defaultMode"] & 0o007 == 0 and vol["secret"]["defaultMode"] & 0o040, oct(
        vol["secret"]["defaultMode"])
    assert pod_spec(dep)["securityContext"]["fsGroup"] == pod_spec(dep)["securityContext"]["runAsUser"]
    # what the command reads, as the kubelet writes it (the template's value and a trailing newline)
    secret_file = tmp_path / "secret" / key
    secret_file.parent.mkdir()
    secret_file.write_text(template["stringData"][key] + "\n")
    assert mqtt_password(cfg.mqtt.model_copy(update={"password_file": secret_file})) == template["stringData"][key]


def _controller_env(dep: dict, container: dict) -> dict[str, str]:
    """The controller's environment as the kubelet gives it; a password from a Secret fails the test."""
    env = {}
    for name, e in env_of(container).items():
        assert "value" in e, f"{label(dep)}: env {name} from {e.get('valueFrom')}: the MQTT password is a file"
        env[name] = e["value"]
    return env


def test_the_controller_gets_no_password_in_its_environment():
    """The MQTT passwords are files (fleet.toml / fleet-cli.toml [mqtt] password_file), not EDGEGLM_MQTT__PASSWORD:
    a variable is in every `kubectl exec`'d command's environment and in the pod spec's readers' view."""
    dep = find(rendered("base"), "Deployment", "edgeglm-controller")
    c = _container(dep, "controller")
    assert "EDGEGLM_MQTT__PASSWORD" not in env_of(c)
    assert not [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert not c.get("envFrom")


def test_fleet_cli_toml_differs_from_fleet_toml_only_in_the_mqtt_user():
    """The two files must not drift: the operator commands read the same database, bundles, rollback key
    and broker as `fleet serve`; only [mqtt] username, client_id and password_file (and comments) differ."""
    resources = rendered("base")
    serve = _toml_text(resources, "edgeglm-controller-config", "fleet.toml")
    cli = _toml_text(resources, "edgeglm-controller-config", "fleet-cli.toml")
    a, b = tomllib.loads(serve), tomllib.loads(cli)
    for key in OPERATOR_KEYS:
        assert a["mqtt"].pop(key) != b["mqtt"].pop(key), key
    assert a == b

    def settings(text: str) -> list[str]:  # the lines that are not comments, in order
        return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    changed = [(x, y) for x, y in zip(settings(serve), settings(cli)) if x != y]
    assert len(settings(serve)) == len(settings(cli))
    assert sorted(x.split(" =")[0] for x, _ in changed) == sorted(OPERATOR_KEYS), changed
    assert "--config /etc/edgeglm/fleet-cli.toml" in cli and "use_username_as_clientid" in cli


def test_the_operator_commands_user_has_only_its_acl_lines():
    """edgeglm-operator (fleet-cli.toml) writes desired configs and offers of its fleet's devices, nothing else,
    and reads nothing; the serving controller's user is another one."""
    resources = rendered("base")
    serve = _toml(resources, "edgeglm-controller-config", "fleet.toml")["mqtt"]
    cli = _toml(resources, "edgeglm-controller-config", "fleet-cli.toml")
    users = _acl_users(find(resources, "ConfigMap", "edgeglm-broker-config")["data"]["acl.conf"])
    assert cli["mqtt"]["username"] != serve["username"]
    fleet = cli["fleet"]["id"]
    assert users[cli["mqtt"]["username"]] == [("write", f"edgeglm/v1/{fleet}/+/config/desired"),
                                              ("write", f"edgeglm/v1/{fleet}/+/ota/offer")]
    assert set(users[cli["mqtt"]["username"]]) < set(users[serve["username"]])


@pytest.mark.parametrize("name", kustomizations())
def test_rollback_keys_are_split_from_the_bundle_keys(name, tmp_path, monkeypatch):
    """Agents trust a rollback key of their own (ota.rollback_keys, always mounted: an empty directory
    would refuse every rollback); the controller signs with its private half from fleet.toml's
    [rollback] key; no agent pod mounts a private key, and the controller mounts no bundle key."""
    from agent.config import load_config
    from fleet.config import load_fleet_config

    resources = rendered(name)
    templates = secret_templates()
    for var in [v for v in os.environ if v.upper().startswith("EDGEGLM_")]:
        monkeypatch.delenv(var)
    for ds in agents(resources):
        agent = _container(ds, "agent")
        vol, key = _mounted_file(ds, agent, "/etc/edgeglm/agent.toml")
        (tmp_path / "agent.toml").write_text(_toml_text(resources, vol["configMap"]["name"], key))
        cfg = load_config(tmp_path / "agent.toml")
        assert cfg.ota.rollback_keys is not None, label(ds)
        pub = _volume_at(ds, agent, str(cfg.ota.rollback_keys))["secret"]
        assert pub["secretName"] == "edgeglm-rollback-keys" and not pub.get("optional", False)
        assert pub["secretName"] != _volume_at(ds, agent, str(cfg.ota.trusted_keys))["secret"]["secretName"]
    assert all(k.endswith(".pub") for k in templates["edgeglm-rollback-keys"]["stringData"])

    dep = find(resources, "Deployment", "edgeglm-controller")
    c = _container(dep, "controller")
    (tmp_path / "fleet.toml").write_text(_toml_text(resources, "edgeglm-controller-config", "fleet.toml"))
    key_path = load_fleet_config(tmp_path / "fleet.toml").rollback.key
    vol, key = _mounted_file(dep, c, str(key_path))
    assert vol["secret"]["secretName"] == "edgeglm-controller-rollback-key"
    assert "PRIVATE KEY" in templates["edgeglm-controller-rollback-key"]["stringData"][key]
    # readable by the controller's user only through its group (fsGroup), by no one else
    assert vol["secret"]["defaultMode"] & 0o007 == 0 and pod_spec(dep)["securityContext"]["fsGroup"] == \
        pod_spec(dep)["securityContext"]["runAsUser"]

    private = {n for n, t in templates.items() if any("PRIVATE KEY" in str(v) for v in t["stringData"].values())}
    assert {"edgeglm-controller-rollback-key", "edgeglm-broker-tls"} <= private
    for ds in agents(resources):
        assert not {v["secret"]["secretName"] for v in pod_spec(ds)["volumes"] if "secret" in v} & private
    for w in workloads(resources):
        mounted = {v["secret"]["secretName"] for v in pod_spec(w).get("volumes", []) if "secret" in v}
        assert w is dep or "edgeglm-controller-rollback-key" not in mounted, label(w)
    assert "edgeglm-trusted-keys" not in {v["secret"]["secretName"] for v in pod_spec(dep)["volumes"] if "secret" in v}


def _toml_text(resources: list[dict], configmap: str, key: str) -> str:
    return find(resources, "ConfigMap", configmap)["data"][key]


def _acl_users(acl: str) -> dict[str, list[tuple[str, str]]]:
    """acl.conf's `user` sections: user -> [(read|write, topic)], in file order."""
    users: dict[str, list[tuple[str, str]]] = {}
    user = None
    for line in acl.splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            user = words[1]
            assert user not in users, f"two 'user {user}' sections"
            users[user] = []
        elif words[:1] == ["topic"]:
            assert user is not None and len(words) == 3, line
            users[user].append((words[1], words[2]))
    return users


@pytest.mark.parametrize("key", ["fleet.toml", "fleet-cli.toml"])
def test_fleet_id_and_controller_user_agree_with_the_acl(key):
    resources = rendered("base")
    agent_fleet = _toml(resources, "edgeglm-agent-config", "agent.toml")["device"]["fleet"]
    fleet = _toml(resources, "edgeglm-controller-config", key)
    assert fleet["fleet"]["id"] == agent_fleet
    users = _acl_users(find(resources, "ConfigMap", "edgeglm-broker-config")["data"]["acl.conf"])
    assert fleet["mqtt"]["username"] in users, f"no 'user {fleet['mqtt']['username']}' section in acl.conf"
    topics = [t for _, t in users[fleet["mqtt"]["username"]]]
    presence = controller_presence_topic(fleet["fleet"]["id"])  # (the serving one's presence: a topic of its own)
    assert (("write", presence) in users[fleet["mqtt"]["username"]]) == (key == "fleet.toml")
    assert topics and all(t.startswith(f"edgeglm/v1/{agent_fleet}/+/") for t in topics if t != presence), topics


def test_a_device_may_write_a_fixed_set_of_topics_in_the_agents_fleet():
    """The device patterns had '+' at the fleet and requester levels: one device could store retained messages
    under as many topics as it liked and exhaust the broker (memory, then its volume, reloaded at every start)."""
    resources = rendered("base")
    agent_fleet = _toml(resources, "edgeglm-agent-config", "agent.toml")["device"]["fleet"]
    patterns = [line.split() for line in find(resources, "ConfigMap", "edgeglm-broker-config")["data"]["acl.conf"]
                .splitlines() if line.split()[:1] == ["pattern"]]
    # every device reads the controller presences it subscribes to (its fleet's, every fleet's), and writes none
    presences = [["pattern", "read", topic] for topic in presence_topics(agent_fleet)]
    assert all(p in patterns for p in presences)
    patterns = [p for p in patterns if p not in presences]
    assert patterns and all(len(p) == 3 and p[2].startswith(f"edgeglm/v1/{agent_fleet}/%u/") for p in patterns), \
        patterns
    assert not [p for p in patterns if p[1] == "write" and ("+" in p[2] or "#" in p[2])], patterns


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_broker_config_matches_its_pod():
    resources = rendered("base")
    dep = find(resources, "Deployment", "edgeglm-broker")
    c = _container(dep, "mosquitto")
    conf = _mosquitto_conf(resources)
    assert conf["allow_anonymous"] == ["false"]
    assert conf["set_tcp_nodelay"] == ["true"], "DESIGN.md: 40 ms stalls per QoS 1 round trip otherwise"
    assert conf["persistence"] == ["true"]
    assert conf["listener"] == ["8883"], "one listener, TLS"
    assert {p["containerPort"] for p in c["ports"]} == {8883}
    assert c["command"][-1] == "/mosquitto/config/mosquitto.conf"
    assert _mounted_file(dep, c, c["command"][-1])[1] == "mosquitto.conf"
    assert _mounted_file(dep, c, conf["acl_file"][0])[1] == "acl.conf"
    vol, key = _mounted_file(dep, c, conf["password_file"][0])
    assert key in secret_templates()[vol["secret"]["secretName"]]["stringData"]
    for option, key in (("certfile", "tls.crt"), ("keyfile", "tls.key")):
        vol, found = _mounted_file(dep, c, conf[option][0])
        assert found == key and vol["secret"]["secretName"] == "edgeglm-broker-tls"
    data = _volume_at(dep, c, conf["persistence_location"][0].rstrip("/"))
    assert "persistentVolumeClaim" in data
    assert pod_spec(dep)["securityContext"]["runAsUser"] == 1883
    # refusing allocations past memory_limit keeps the one broker up where the container limit would kill it
    assert 0 < int(conf["memory_limit"][0]) < _bytes(c["resources"]["limits"]["memory"])
    assert 0 < int(conf["max_queued_bytes"][0]) < int(conf["memory_limit"][0])


@pytest.mark.parametrize("name", kustomizations())
def test_every_referenced_secret_configmap_and_claim_exists(name):
    resources = rendered(name)
    templates = secret_templates()
    for w in workloads(resources):
        for vol in pod_spec(w).get("volumes", []):
            if "secret" in vol:
                template = templates.get(vol["secret"]["secretName"])
                assert template, f"{label(w)}: Secret {vol['secret']['secretName']} has no template in k3s/secrets/"
                for item in vol["secret"].get("items", []):
                    assert item["key"] in template["stringData"], f"{label(w)}: key {item['key']}"
            if "configMap" in vol:
                cm = find(resources, "ConfigMap", vol["configMap"]["name"])
                for item in vol["configMap"].get("items", []):
                    assert item["key"] in cm["data"]
            if "persistentVolumeClaim" in vol:
                find(resources, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
        for c in containers(w):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in templates[ref["name"]]["stringData"], f"{label(w)}: {ref}"
            for m in c.get("volumeMounts", []):
                vol = volume(w, m["name"])
                if "subPath" in m and "configMap" in vol:
                    assert m["subPath"] in find(resources, "ConfigMap", vol["configMap"]["name"])["data"]
        sa = pod_spec(w).get("serviceAccountName")
        if sa:
            find(resources, "ServiceAccount", sa)


@pytest.mark.parametrize("name", kustomizations())
def test_services_select_their_pods_and_named_ports(name):
    resources = rendered(name)
    for svc in [r for r in resources if r["kind"] == "Service"]:
        selector = svc["spec"]["selector"]
        (target,) = [w for w in workloads(resources)
                     if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        names = {p.get("name") for c in containers(target) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"{label(svc)}: targetPort {port['targetPort']}"


@pytest.mark.parametrize("name", kustomizations())
def test_network_policies(name):
    resources = rendered(name)
    policies = {p["metadata"]["name"]: p["spec"] for p in resources if p["kind"] == "NetworkPolicy"}
    deny = policies["edgeglm-default-deny"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, "a default deny for the namespace"
    broker_labels = find(resources, "Deployment", "edgeglm-broker")["spec"]["template"]["metadata"]["labels"]

    def egress_targets(spec):
        out = []
        for rule in spec.get("egress", []):
            for peer in rule["to"]:
                ports = sorted((p["protocol"], p["port"]) for p in rule["ports"])
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
                    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
                    out.append(("dns", ports))
                else:
                    assert peer["podSelector"]["matchLabels"].items() <= broker_labels.items()
                    out.append(("broker", ports))
        return sorted(out)

    dns = ("dns", [("TCP", 53), ("UDP", 53)])
    for who in ("edgeglm-agent", "edgeglm-controller"):
        assert egress_targets(policies[who]) == [("broker", [("TCP", 8883)]), dns], who
    assert policies["edgeglm-agent"]["ingress"] == []
    assert policies["edgeglm-broker"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8883}]}]
    assert policies["edgeglm-broker"]["egress"] == []
    for w in workloads(resources):  # each pod has an allow policy of its own (the overlays' pods: their base's)
        labels = w["spec"]["template"]["metadata"]["labels"]
        own = [p for p, spec in policies.items() if p != "edgeglm-default-deny"
               and spec["podSelector"]["matchLabels"].items() <= labels.items()]
        assert own == [labels["app.kubernetes.io/name"]], f"{w['metadata']['name']}: own policy {own}"
