"""The benchmark scripts' handling of user mistakes, and the pieces of their fixes that run without a model.

A bad flag value must end in argparse's `ap.error` style: exit code 2, ONE error line naming the flag (and what
is allowed), no traceback, before anything slow is loaded or started. Each case runs the script as a user does
(`python benchmarks/X.py ...` from the repository root); nothing here builds a model.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# (script, arguments, the flag the error must name, a piece of the allowed values it must give)
BAD_VALUES = [
    ("batching.py", ["--shape", "nosuch"], "--shape", "choose from"),
    ("batching.py", ["--repeats", "0"], "--repeats", "must be an integer >= 1"),
    ("batching.py", ["--merge-rounds", "0"], "--merge-rounds", ">= 1"),
    ("batching.py", ["--prompt-tokens", "0"], "--prompt-tokens", ">= 1"),
    ("batching.py", ["--max-tokens", "0"], "--max-tokens", ">= 1"),
    ("batching.py", ["--max-batch", "2:-1"], "--max-batch", "an integer >= 0"),
    ("batching.py", ["--seconds", "-1"], "--seconds", "> 0"),
    ("agent_load.py", ["--bundle", "/nonexistent"], "--bundle", "not found"),
    ("agent_load.py", ["--concurrency", "x"], "--concurrency", "integers >= 1"),
    ("agent_load.py", ["--concurrency", "0,1"], "--concurrency", "integers >= 1"),
    ("agent_load.py", ["--overhead-rounds", "0"], "--overhead-rounds", ">= 1"),
    ("agent_load.py", ["--backend", "foo"], "--backend", "onnxruntime"),
    ("agent_load.py", ["--max-tokens", "0"], "--max-tokens", ">= 1"),
    ("decode.py", ["--repeats", "0"], "--repeats", ">= 1"),
    ("decode.py", ["--new-tokens", "0"], "--new-tokens", ">= 1"),
    ("decode.py", ["--threads", "0"], "--threads", ">= 1"),
    ("decode.py", ["--precisions", "int4"], "--precisions", "fp32, int8"),
    ("decode.py", ["--baseline-src", "/nonexistent"], "--baseline-src", "source tree"),
    ("prefix_cache.py", ["--repeats", "0"], "--repeats", ">= 1"),
    ("prefix_cache.py", ["--block-tokens", "0"], "--block-tokens", ">= 1"),
    ("prefix_cache.py", ["--cache-mb", "-1"], "--cache-mb", "> 0"),
    ("prefix_cache.py", ["--system-tokens", "600"], "--system-tokens", "below --prompt-tokens"),
    ("kv_bound.py", ["--shape", "nosuch"], "--shape", "choose from"),
    ("kv_bound.py", ["--modes", "off,bogus"], "--modes", "off, auto or a whole number"),
    ("kv_bound.py", ["--requests", "0"], "--requests", ">= 1"),
    ("long_prompt.py", ["--shape", "nosuch"], "--shape", "choose from"),
    ("long_prompt.py", ["--bundle", "/nonexistent"], "--bundle", "not found"),
    ("long_prompt.py", ["--tokens", "0,512"], "--tokens", "integers >= 1"),
    ("compression.py", ["--extra-mixes", "2:0.5"], "--extra-mixes", "T:KL:CE"),
    ("compression.py", ["--teacher-shape", "64x1x128"], "--teacher-shape", "multiple of 128"),
    ("compression.py", ["--student-layers", "9"], "--student-layers", "allowed 1..4"),
    ("soak.py", ["--agent-env", "BADVALUE"], "--agent-env", "NAME=VALUE"),
    ("soak.py", ["--skip", "nosuch"], "--skip", "allowed: stream-completion"),
    ("soak.py", ["--minutes", "0"], "--minutes", "> 0"),
    ("latency_histograms.py", ["--devices", "0"], "--devices", "integers >= 1"),
    ("ov_reload.py", ["--bundle", "/tmp", "--rounds", "1"], "--rounds", "integer >= 2"),
    ("ov_reload.py", ["--bundle", "/nonexistent"], "--bundle", "no manifest.json"),
    ("latency_histograms.py", ["--windows", "0"], "--windows", ">= 1"),
    ("fleet_scale.py", ["--steps", "0,5"], "--steps", "integers >= 1"),
    ("fleet_scale.py", ["--duration", "0"], "--duration", "> 0"),
    ("ota_transfer.py", ["--chunk-kib", "1024"], "--chunk-kib", "[4, 512]"),
    ("ota_transfer.py", ["--agents", "0"], "--agents", "integers >= 1"),
    ("database_size.py", ["--devices", "0"], "--devices", ">= 1"),
    ("database_size.py", ["--windows", "x"], "--windows", ">= 1"),
]


@pytest.mark.parametrize("script,args,flag,allowed", BAD_VALUES,
                         ids=[f"{s}:{' '.join(a)}" for s, a, _, _ in BAD_VALUES])
def test_bad_value_is_a_one_line_error(script, args, flag, allowed, tmp_path):
    # a throwaway workdir wherever a script has one: a case that got past its checks builds nothing in the tree
    no_workdir = ("fleet_scale.py", "ov_reload.py", "latency_histograms.py", "database_size.py")
    work = ["--workdir", str(tmp_path)] if script not in no_workdir else []
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args, *work], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"{script}: error: "), errors[0]
    assert flag in errors[0] and allowed in errors[0], errors[0]
    # argparse's style: the usage, then the error line, and nothing else (no child traceback, no progress)
    others = [line for line in done.stderr.splitlines() if line not in errors]
    assert all(line.startswith(("usage:", " ")) or not line.strip() for line in others), done.stderr
    assert done.stdout == ""


def _load(name: str):
    """A benchmark script imported as a module (benchmarks/ on sys.path, as when it runs)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kv_bound_prompt_ids_stay_below_the_vocabulary():
    kv = _load("kv_bound")
    for vocab in (16, 512, 8192):
        for i in range(4):
            ids = kv.prompt_ids(i, 2000, vocab)
            assert len(ids) == 2000 and 0 <= min(ids) and max(ids) < vocab
    assert min(kv.prompt_ids(0, 2000, 8192)) >= 10  # clear of the special tokens where the vocabulary allows
    assert kv.prompt_ids(3, 50, 512) == kv.prompt_ids(3, 50, 512)  # seeded: every mode sends the same prompts


def test_kv_bound_tally_separates_answers_statuses_and_drops():
    kv = _load("kv_bound")
    answers = [{"status": 200, "tokens": 8}, {"status": 200, "tokens": 3}, {"status": 400, "detail": "x"},
               {"dropped": "ConnectionResetError"}, {"dropped": "RemoteDisconnected"}]
    t = kv.tally(answers, 8)
    assert t == {"answered": 2, "eos_early": 1, "http_errors": {"400": 1},
                 "dropped": {"ConnectionResetError": 1, "RemoteDisconnected": 1}}
    results = [{"mode": "off", "answered": 4, "cgroup_peak_mb": 800.0},
               {"mode": "auto", "answered": 8, "cgroup_peak_mb": 600.0}]
    assert kv.vs_off(results, "answered") == [1.0, 2.0]
    assert kv.vs_off(results, "cgroup_peak_mb") == [1.0, 0.75]
    assert kv.vs_off(results[1:], "answered") == [None]  # no `off` in the run: no ratio
    with pytest.raises(ValueError):
        kv.parse_modes("off,-5")
    assert kv.parse_modes("off, auto,128") == ["off", "auto", "128"]


def test_fleet_scale_ratio_and_ceiling_reasons():
    fs = _load("fleet_scale")
    assert fs.ratio_text(3.0, 0.0) == "n/a"
    assert fs.ratio_text(3.0, float("nan")) == "n/a"
    assert fs.ratio_text(float("nan"), 2.0) == "n/a"
    assert fs.ratio_text(3.0, 2.0) == "1.50x"
    row = {"lag_p95": 0.1, "lost_pct": 0.0, "fresh_max": 3.0}
    assert len(fs.ceiling_reasons(row)) == 1 and "fresh max" in fs.ceiling_reasons(row)[0]
    assert fs.ceiling_reasons({"lag_p95": float("nan"), "lost_pct": 0.0, "fresh_max": 1.0}) == []


def test_soak_warmup_sample_is_the_same_in_report_and_summary():
    soak = _load("soak")
    samples = [{"t": t, "agent.rss_mb": 100.0 + t} for t in (0.0, 4.0, 9.0, 11.0, 16.0, 20.0)]
    for frac in (0.0, 0.2, 0.5, 0.56, 0.99):
        i = soak.warmup_index(samples, frac)
        rss = next(r for r in soak.summarize(samples, frac) if r["quantity"] == "agent.rss_mb")
        assert rss["after_warmup"] == samples[i]["agent.rss_mb"]
        assert samples[i]["t"] >= frac * samples[-1]["t"]


def test_prefix_cache_docstring_example_parses(monkeypatch):
    pc = _load("prefix_cache")
    example = next(line for line in pc.__doc__.splitlines() if "--system-tokens" in line)
    argv = example.split("prefix_cache.py", 1)[1].split()

    class Reached(Exception):
        pass

    def benchmark(args):
        raise Reached(args)

    monkeypatch.setattr(pc, "benchmark", benchmark)
    with pytest.raises(Reached) as got:
        pc.main(argv)
    args = got.value.args[0]
    assert 0 < args.system_tokens < args.prompt_tokens


def test_batching_candidates():
    b = _load("batching")
    assert b.parse_candidate("8m:64") == (8, True, 64)
    assert b.parse_candidate("8:0") == (8, False, 0)
    assert b.parse_candidate("4") == (4, False, None)
    for bad in ("2:-1", "0", "m", "8:x", "-3m"):
        with pytest.raises(ValueError):
            b.parse_candidate(bad)


def _fake_tree(root: Path, decode_py: str) -> Path:
    (root / "runtime").mkdir(parents=True)
    (root / "runtime" / "engine.py").write_text("")
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "decode.py").write_text(decode_py)
    return root


def test_decode_baseline_bundles_come_from_the_baseline_tree(tmp_path):
    dec = _load("decode")
    # the baseline tree's own prepare names its bundles with its exporter key: they are found by what it returns
    src = _fake_tree(tmp_path / "src", (
        "import json\nfrom pathlib import Path\n"
        "def prepare(shape, workdir, precisions=('fp32', 'int8')):\n"
        "    out = {}\n"
        "    for p in precisions:\n"
        "        d = workdir / shape / f'bundle-{p}-0123456789'\n"
        "        d.mkdir(parents=True, exist_ok=True)\n"
        "        (d / 'manifest.json').write_text('{}')\n"
        "        out[p] = d\n"
        "    return workdir / shape / 'checkpoint', out\n"))
    got = dec.baseline_bundles(src, tmp_path / "work", "tiny", ["int8"])
    assert got == {"int8": (tmp_path / "work" / "tiny" / "bundle-int8-0123456789").resolve()}


def test_decode_baseline_without_bundles_fails_in_one_line(tmp_path, capsys):
    dec = _load("decode")
    src = _fake_tree(tmp_path / "src", "raise ImportError('an old tree')\n")
    work = tmp_path / "work"
    (work / "tiny" / "bundle-int8-abc").mkdir(parents=True)  # exported before by that tree: found by its name
    (work / "tiny" / "bundle-int8-abc" / "manifest.json").write_text(json.dumps({}))
    assert dec.baseline_bundles(src, work, "tiny", ["int8"]) == {"int8": work / "tiny" / "bundle-int8-abc"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        dec.baseline_bundles(src, tmp_path / "empty", "tiny", ["int8"])
    assert exit_.value.code == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(errors) == 1 and "--baseline-workdir" in errors[0] and "prepare" in errors[0]
    assert "Traceback" not in errors[0]


def test_agent_load_worker_failure_gives_the_workers_reason():
    al = _load("agent_load")
    with pytest.raises(al.WorkerError) as err:
        al.DirectWorker(Path("/nonexistent-bundle"), "auto")
    assert "BundleError" in str(err.value) and "/nonexistent-bundle" in str(err.value)


def test_ota_transfer_runs_and_prints_the_agents_rate_against_the_peers(tmp_path):
    """It failed on every run once the chunk server wanted a manifest beside the files it serves: one small
    pass, the agent's path (TCP_NODELAY, as the agent sets it), Nagle on, and mosquitto's own clients, each
    verified, with the ratios of the same pass."""
    import shutil

    if not all(shutil.which(t) or Path(f"/usr/sbin/{t}").exists() for t in ("mosquitto", "mosquitto_pub",
                                                                            "mosquitto_sub")):
        pytest.skip("needs mosquitto and mosquitto-clients (apt-get install mosquitto mosquitto-clients)")
    done = subprocess.run([sys.executable, "benchmarks/ota_transfer.py", "--mb", "0.5", "--agents", "1",
                           "--repeats", "1", "--chunk-kib", "64", "--workdir", str(tmp_path), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {r["candidate"]: r for r in report["summary"]}
    assert set(rows) == {"edgeglm", "edgeglm, Nagle on", "mosquitto whole", "mosquitto chunked"}
    assert all(r["verified"] for r in rows.values())
    assert all(rows[name]["edgeglm_over_this"] > 0 for name in rows if name != "edgeglm")


def test_the_database_size_benchmark_measures_what_the_store_writes():
    """benchmarks/database_size.py on a small fleet: the tables that grow with reports, each measured, and a
    busy device (histograms for a day) larger than an idle one."""
    done = subprocess.run([sys.executable, "benchmarks/database_size.py", "--devices", "4", "--windows", "24"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"telemetry", "latency", "rollup", "telemetry_by_stored"} <= set(rows), done.stdout
    busy, idle = (float(x) for x in re.search(r"busy ([0-9.]+) MB, idle ([0-9.]+) MB", done.stdout).groups())
    assert busy > idle > 0, done.stdout
