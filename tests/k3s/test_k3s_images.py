"""The container build files, read (no image can be built here): multi-stage on the pinned slim
base, no torch, a non-root user the manifests run as, a HEALTHCHECK on the real port, labels, and
the command the manifests expect."""

from __future__ import annotations

import json
import re
import sys

import pytest
from k3s_manifests import K3S, REPO, containers, kustomizations, pod_spec, rendered, workloads

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

IMAGES = {"agent": ("edgeglm-agent", 8321, ["agent", "--config", "/etc/edgeglm/agent.toml"]),
          "controller": ("edgeglm-controller", 9100, ["fleet", "serve", "--config", "/etc/edgeglm/fleet.toml"])}
BASE_IMAGE = "python:3.11-slim-bookworm"


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


@pytest.mark.parametrize("image", IMAGES)
def test_multi_stage_on_the_pinned_slim_base(image):
    path = K3S / "images" / f"{image}.Containerfile"
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["PYTHON_IMAGE"] == BASE_IMAGE
    assert f"{BASE_IMAGE}@sha256:<digest>" in text, "says how to pin the base by digest"
    built = stages(path)
    assert len(built) >= 2, "multi-stage"
    assert all(s[0][1].split()[0] == "${PYTHON_IMAGE}" for s in built), "every stage on the pinned base"
    assert built[0][0][1].endswith(" AS build")


@pytest.mark.parametrize("image", IMAGES)
def test_installs_edgeglm_without_torch_or_the_factory(image):
    path = K3S / "images" / f"{image}.Containerfile"
    build = stages(path)[0]
    runs = " ".join(args for ins, args in build if ins == "RUN")
    installs = [seg.strip() for seg in re.split(r"&&|;", runs) if "pip install" in seg]
    assert any(re.fullmatch(r"\S*pip install \.", seg) for seg in installs), "edgeglm itself, no extras"
    for seg in installs:
        assert "torch" not in seg and "[" not in seg, seg
    assert "find_spec('torch')" in runs, "the build fails if torch came in anyway"
    copied = [args.split()[0] for ins, args in build if ins == "COPY"]
    assert "models" not in " ".join(copied), "the model factory stays out of the image"
    for src in " ".join(args.rsplit(" ", 1)[0] for ins, args in build if ins == "COPY").split():
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
        assert not src.startswith("models")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if re.match(r"torch\b", d)], "torch must stay in the factory extra"


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_runs_as_the_manifests_user_with_healthcheck_and_labels(image):
    title, port, cmd = IMAGES[image]
    final = stages(K3S / "images" / f"{image}.Containerfile")[-1]
    by = {}
    for ins, args in final:
        by.setdefault(ins, []).append(args)
    user = by["USER"][-1]
    uid = int(user.split(":")[0])
    assert uid != 0
    assert f"--uid {uid}" in " ".join(by["RUN"]), "the user exists in the image"
    (health,) = by["HEALTHCHECK"]
    assert f"http://127.0.0.1:{port}/healthz" in health
    labels = " ".join(by["LABEL"])
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert f'org.opencontainers.image.title="{title}"' in labels
    assert json.loads(by["ENTRYPOINT"][-1]) == ["edgeglm"]
    assert json.loads(by["CMD"][-1]) == cmd
    # the manifests run the image as this user
    for name in kustomizations():
        for w in workloads(rendered(name)):
            for c in containers(w):
                if c["image"].startswith(f"edgeglm/{image}:"):
                    assert pod_spec(w)["securityContext"]["runAsUser"] == uid


@pytest.mark.parametrize("image", IMAGES)
def test_build_context_keeps_what_the_build_copies(image):
    ignore = (K3S / "images" / f"{image}.Containerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**")] == "**", "everything is ignored but what is listed"
    for ins, args in stages(K3S / "images" / f"{image}.Containerfile")[0]:
        if ins == "COPY":
            for src in args.split()[:-1]:
                assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, f"{src} is not in the build context"


def test_every_edgeglm_image_in_the_manifests_has_a_documented_build():
    doc = (REPO / "docs" / "deploy-k3s.md").read_text()
    images = {c["image"] for name in kustomizations() for w in workloads(rendered(name)) for c in containers(w)
              if c["image"].startswith("edgeglm/")}
    assert "docker save" in doc and "k3s ctr images import" in doc
    for image in sorted(images):
        assert f"-t {image} " in doc, f"docs/deploy-k3s.md does not build {image}"


def test_image_tags_and_version_labels_are_the_package_version():
    """The manifests, the build files and the deployment guide name one release: an image built by the guide's
    command is the one the manifests run, labelled with the version `edgeglm --version` prints in it."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    texts = {p: p.read_text() for p in [*K3S.rglob("*.yaml"), *(K3S / "images").glob("*.Containerfile"),
                                       REPO / "docs" / "deploy-k3s.md"]}
    tags = {(p.name, t) for p, text in texts.items()
            for t in re.findall(r"edgeglm/(?:agent|controller):([0-9][0-9.]*[0-9])", text)}
    assert tags and all(t == version for _, t in tags), sorted(tags)
    args = {(p.name, v) for p, text in texts.items() for v in re.findall(r"ARG VERSION=(\S+)", text)}
    assert len(args) == 2 and all(v == version for _, v in args), args


def test_bundles_exported_here_run_on_the_agent_of_this_version():
    """`min_agent_version` of an exported bundle (models.export.MIN_AGENT_VERSION) is raised with each change of
    the graphs an agent before could not run, and never past this package's version: an agent of this release
    would refuse the bundles its own factory makes."""
    from models.export import MIN_AGENT_VERSION
    from ota.versions import parse_version

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert parse_version(MIN_AGENT_VERSION) <= parse_version(version)
