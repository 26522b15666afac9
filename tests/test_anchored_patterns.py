"""Names that end up in MQTT topics, systemd units, directory names and manifests: a trailing newline
makes none of them valid (Python's `$` also matches just before a final newline; the checks use
fullmatch, pydantic's patterns end at the end of the text)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.config import DeviceSettings
from agent.install import InstallError, InstallOptions
from agent.topics import state_topic
from ota.bundle import VERSION_RE
from ota.errors import VersionError
from ota.versions import parse_version
from runtime.prefix_cache import KEY_PATTERN


def test_versions_and_cache_keys_with_a_trailing_newline_are_refused():
    assert VERSION_RE.fullmatch("1.2.3") and not VERSION_RE.fullmatch("1.2.3\n")
    assert KEY_PATTERN.fullmatch("glm-1.0") and not KEY_PATTERN.fullmatch("glm-1.0\n")
    parse_version("1.2.3")
    with pytest.raises(VersionError, match="is not like 1.2.3"):
        parse_version("1.2.3\n")


def test_ids_and_user_names_with_a_trailing_newline_are_refused():
    assert state_topic("plant7", "box1").endswith("/plant7/box1/state")
    with pytest.raises(ValueError, match="cannot be an MQTT topic level"):
        state_topic("plant7", "box1\n")
    with pytest.raises(ValidationError):
        DeviceSettings(id="box1\n")
    InstallOptions(user="edgeglm", create_venv=False, dry_run=True)
    with pytest.raises(InstallError, match="not a valid system user name"):
        InstallOptions(user="edgeglm\n", create_venv=False, dry_run=True)
