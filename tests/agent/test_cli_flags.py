"""`edgeglm` usage errors: each subcommand takes only its own flags, bad numbers and bad files end with
one line and exit code 2, never a traceback, and nothing is started or written."""

from __future__ import annotations

import os
import sys

import pytest

from agent.cli import build_parser, main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("EDGEGLM_"):
            monkeypatch.delenv(name)


def usage_error(capsys, *argv) -> str:
    """argparse's exit: code 2; the error line."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# --- edgeglm agent: run / config-schema / install, each with its own flags -------------------------

def test_agent_without_an_action_runs_the_daemon_with_its_flags():
    args = build_parser().parse_args(["agent", "--config", "/etc/edgeglm/agent.toml", "--port", "9000"])
    assert (args.action, args.config, args.port) == ("run", "/etc/edgeglm/agent.toml", 9000)
    args = build_parser().parse_args(["agent", "run", "--state-dir", "/tmp/s"])
    assert (args.action, args.state_dir, args.bundle) == ("run", "/tmp/s", None)
    assert build_parser().parse_args(["agent"]).action == "run"
    assert build_parser().parse_args(["agent", "config-schema"]).action == "config-schema"
    args = build_parser().parse_args(["agent", "install", "--prefix", "/x", "--dry-run"])
    assert (args.action, args.prefix, args.dry_run, args.user) == ("install", "/x", True, "edgeglm")


@pytest.mark.parametrize("argv,flag,owner", [
    (["agent", "--dry-run"], "--dry-run", "install"),  # was: a real daemon on :8321
    (["agent", "run", "--prefix", "/x"], "--prefix", "install"),
    (["agent", "--user", "bob"], "--user", "install"),
    (["agent", "--venv", "/opt/v"], "--venv", "install"),
    (["agent", "install", "--port", "9000"], "--port", "run"),
    (["agent", "install", "--config=/etc/a.toml"], "--config", "run"),
    (["agent", "config-schema", "--bundle", "b"], "--bundle", "run"),
])
def test_another_actions_flag_is_a_usage_error_naming_its_owner(capsys, argv, flag, owner):
    line = usage_error(capsys, *argv)
    assert "unrecognized arguments" in line and f"{flag} is an option of `edgeglm agent {owner}`" in line


@pytest.mark.parametrize("argv,words", [
    # a typo was named only by the top-level parser (after `edgeglm`'s usage), or not at all where a required flag
    # was missing (`--devcie d1`: "the following arguments are required: --device")
    (["fleet", "offer", "--fleet", "f", "--bundle", "b", "--devcie", "d1"], "edgeglm fleet offer: error: unrecognized "
                                                                             "arguments: --devcie (did you mean --device?)"),
    (["bundle", "sign", "B", "--kye", "K"], "edgeglm bundle sign: error: unrecognized arguments: --kye (did you mean "
                                            "--key?)"),
    (["bench", "--bundle", "b", "--new-tokns", "4"], "edgeglm bench: error: unrecognized arguments: --new-tokns 4 (did "
                                                     "you mean --new-tokens?)"),
    (["fleet", "status", "--jsn"], "edgeglm fleet status: error: unrecognized arguments: --jsn (did you mean --json?)"),
    (["generate", "--bundle", "b", "--port", "5", "hi"], "edgeglm generate: error: unrecognized arguments: --port hi "
                                                         "(--port is an option of `edgeglm agent run`)"),
    (["fleet", "rollout", "--bundle", "b", "--group", "g", "--canary", "10", "--broker", "127.0.0.1:1"],
     "rollout takes no --broker"),
])
def test_a_flag_a_command_does_not_take_is_named_after_that_commands_usage(capsys, argv, words):
    line = usage_error(capsys, *argv)
    assert words in line, line


def test_agent_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[http]\nhost = \"\xff\xfe\"\n")
    rc, err = run(capsys, "agent", "--config", bad)
    assert rc == 2 and err.startswith("edgeglm agent: error: config file ") and "is not UTF-8 text" in err
    assert len(err.strip().splitlines()) == 1


def test_http_api_entry_point_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    from agent.http_api import main as http_main

    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"log_level = \"\xe9\"\n")
    assert http_main(["--bundle", str(tmp_path / "no-bundle"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "python -m agent.http_api: error: config file" in err and "is not UTF-8 text" in err
    assert "Traceback" not in err


# --- numbers and flags that only apply with others -------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["generate", "--bundle", "b", "--threads", "0", "hi"],
    ["generate", "--bundle", "b", "--threads", "-2", "hi"],
    ["demo", "--steps", "-1"],
    ["demo", "--steps", "0"],
])
def test_counts_must_be_positive(capsys, argv):
    value = argv[argv.index("--threads" if "--threads" in argv else "--steps") + 1]
    assert f"{value!r} is not a positive integer" in usage_error(capsys, *argv)


def test_probe_threads_needs_a_bundle(capsys):
    rc, err = run(capsys, "probe", "--threads", 4)
    assert rc == 2 and "--threads applies to tuning a bundle's execution path: give --bundle BUNDLE too" in err


@pytest.mark.parametrize("flags,named", [(["--prefill-graph", "only"], "--prefill-graph only"),
                                         (["--no-prefill-graph"], "--no-prefill-graph"),
                                         (["--prefill-graph-only"], "--prefill-graph only")])
def test_bench_prefill_graph_with_openvino_is_refused(tmp_path, capsys, flags, named):
    rc, err = run(capsys, "bench", "--bundle", tmp_path / "no-bundle", "--backend", "openvino", *flags)
    assert rc == 2 and f"{named} is about ONNX Runtime's prefill graph; --backend openvino has none" in err


@pytest.mark.parametrize("command", [["generate", "--bundle", "b", "hi"], ["probe", "--bundle", "b"],
                                     ["bench", "--bundle", "b"]])
def test_threads_beyond_the_model_threads_bound_is_a_usage_error(capsys, command):
    """`probe --bundle B --threads 100000` started ONNX Runtime sessions of 100000 threads each and stalled the
    box for minutes; model.threads in the agent's config stops at 1024, the flags now do too."""
    line = usage_error(capsys, *command, "--threads", "100000")
    assert "argument --threads: '100000' threads is more than 1024" in line and "leave --threads out" in line
    assert build_parser().parse_args([*command, "--threads", "1024"]).threads == 1024


def test_bench_cache_dir_with_a_named_backend_is_said_to_be_unused(tmp_path, capsys):
    """--cache-dir is the autotune's cache (and --backend onnxruntime's measured prefill-graph rows); a named
    OpenVINO backend or a named device runs untuned, so the flag was silently ignored."""
    for named, shown in ((["--backend", "openvino"], "--backend openvino"),
                         (["--backend", "onnxruntime", "--device", "CPU"], "--backend onnxruntime --device CPU")):
        rc, err = run(capsys, "bench", "--bundle", tmp_path / "no-bundle", *named, "--cache-dir", tmp_path / "cache")
        assert f"edgeglm bench: note: --cache-dir {tmp_path / 'cache'} is not used: it is the autotune's cache, " \
               f"for --backend auto (and --backend onnxruntime's measured prefill-graph rows); {shown} runs as " \
               "named, without tuning" in err
        assert rc == 2 and "no-bundle" in err.splitlines()[-1]  # then the run goes on, here to the missing bundle
    for used in ([], ["--backend", "onnxruntime"]):  # with --backend auto it is used, and for onnxruntime's rows
        rc, err = run(capsys, "bench", "--bundle", tmp_path / "no-bundle", *used, "--cache-dir", tmp_path / "cache")
        assert rc == 2 and "note" not in err


def test_a_bundle_to_serve_without_its_trusted_keys_stops_the_agent_before_it_listens(tmp_path, int8_bundle):
    """The agent logged "HTTP API listening" and then stopped on the missing keys: a health check could see a port
    open for a box that was never going to serve. The keys are checked first now."""
    import subprocess

    conf = tmp_path / "agent.toml"
    conf.write_text(f'[model]\nslots_dir = "{tmp_path / "state"}"\n[http]\nport = 0\n'
                    f'[ota]\ntrusted_keys = "{tmp_path / "no-keys"}"\n')
    out = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(conf), "--bundle",
                          str(int8_bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"{tmp_path / 'no-keys'}: trusted key file or directory not found" in out.stderr
    assert "listening" not in out.stderr and "Traceback" not in out.stderr
