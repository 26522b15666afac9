"""The `edgeglm` command line.

    edgeglm export CHECKPOINT --out BUNDLE [--precision int8|fp32] [--backends ...] [--name N] [--version V]
    edgeglm build --teacher CHECKPOINT --corpus FILE... --recipe RECIPE --out BUNDLE [--work DIR] [--resume]
    edgeglm generate --bundle BUNDLE [--backend auto|openvino|onnxruntime] [--max-tokens N] ... PROMPT
    edgeglm probe [--json] [--bundle BUNDLE [--retune] [--cache-dir DIR]]
    edgeglm bench --bundle BUNDLE [--backend B] [--prompt-tokens N] [--new-tokens N] [--concurrency N] ...
    edgeglm bundle keygen --out DIR [--name NAME]
    edgeglm bundle sign BUNDLE --key PRIVATE_KEY
    edgeglm bundle verify BUNDLE --trusted KEYS [--trusted KEYS ...]
    edgeglm agent [run] [--config FILE] [--bundle BUNDLE] [--host H] [--port N] [--backend B] [--state-dir DIR]
    edgeglm agent config-schema
    edgeglm agent install [--prefix DIR] [--user NAME] [--venv PATH] [--wheel-or-source SPEC] [--no-venv] [--dry-run]
    edgeglm fleet serve|status|offer|config set ...   (see fleet/cli.py)
    edgeglm demo [--workdir DIR] [--steps N] [--broker HOST:PORT]

User errors (bad input, a broken checkpoint or bundle, a missing backend) print one line on
stderr and exit with code 2; nothing else is changed. Each command takes only its own flags:
another command's flag is a usage error (exit 2), never silently ignored. The factory commands (export, build, demo)
load torch only when run, so an edge install without the `factory` extra runs the rest.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from agent import DEVICE_HELP, __version__
from ota.errors import BundleError
from runtime.errors import RuntimeUserError

EXIT_USER_ERROR = 2


class CliError(Exception):
    """A usage problem found by the CLI itself."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from agent.errors import AgentError

    errors: list[type[BaseException]] = [CliError, BundleError, RuntimeUserError, AgentError]
    try:
        from models.errors import CheckpointError, ExportError

        errors += [CheckpointError, ExportError]
    except ImportError:
        pass
    return tuple(errors)


def _factory():
    """The factory modules (they import torch); a clear error on an edge install without them."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise CliError("this command needs the model factory: pip install 'edgeglm[factory]' "
                       "(and torch for your platform)")
    from models import export, tiny

    return export, tiny


class _WarningLines(logging.Handler):
    """The warnings of a command with progress bars as lines of their own, `edgeglm build: warning: ...`, written
    above the bars (tqdm.write). Without it Python printed the bare message onto the line of a bar being drawn."""

    def __init__(self, command: str):
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(f"edgeglm {self.command}: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:
            self.handleError(record)


@contextmanager
def _warning_lines(command: str):
    handler, logger = _WarningLines(command), logging.getLogger("edgeglm")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def cmd_export(args) -> int:
    export, _ = _factory()
    opts = export.ExportOptions(
        precision=args.precision, backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        name=args.name, version=args.version, force=args.force, chunk_kib=args.chunk_kib,
    )
    with _warning_lines("export"):
        manifest = export.export_bundle(args.checkpoint, args.out, opts, show_progress=not args.quiet)
    print(f"wrote bundle {args.out} ({manifest.name} {manifest.version}, {manifest.precision}, "
          f"backends: {', '.join(manifest.backends)})")
    return 0


_STOP_SIGNALS: list[int] = []  # SIGTERMs that stopped `build` outside distillation's own handler


def _sigterm_as_ctrl_c(signum, frame) -> None:
    """`timeout`, `docker stop`, systemd and Kubernetes stop a build with SIGTERM: it died on the spot, losing the
    training steps since the last checkpoint and leaving a work directory no command took. Now it stops as Ctrl-C
    does (distillation saves its completed steps; the line says what is kept), with exit code 143."""
    _STOP_SIGNALS.append(signum)
    raise KeyboardInterrupt


def _stopped_by_sigterm() -> bool:
    distill = sys.modules.get("models.distill")
    seen = _STOP_SIGNALS + (list(distill._CtrlC.received) if distill is not None else [])
    return bool(seen) and seen[-1] == signal.SIGTERM


def cmd_build(args) -> int:
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    with _warning_lines("build"):
        try:
            _factory()
            from models.build import BuildInputs, format_report, run_build

            inputs = BuildInputs.create(args.teacher, args.corpus, args.recipe, args.out, args.work, args.resume)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("before the build started: nothing was written") from None
        report = run_build(inputs, progress=not args.quiet)  # Ctrl-C: models.build.BuildInterrupted says what is kept
    print(format_report(report))
    print(f"wrote bundle {args.out} (report in its manifest and in {inputs.work}/report.json); "
          f"sign it with: edgeglm bundle sign {args.out} --key KEY")
    return 0


def _named_path(text: str, what: str = "a file or directory") -> str:
    """A path argument as typed; an empty one (`--corpus "$UNSET_VARIABLE"`) is refused here: read as ".", it named
    the current directory (`--corpus ""` took every file there as training text; keygen wrote its keys there)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is an empty path: name {what}")
    return text


def _named_dir(text: str) -> str:
    """An --out (or other directory) argument: `_named_path`, with an example."""
    return _named_path(text, "a directory (e.g. bundles/edge-small)")


class OutputError(CliError):
    """The command's output could not be written (a full disk, an I/O error)."""


@contextmanager
def _output_errors(after: str = ""):
    """A write or flush that fails (a full disk, an I/O error) is an OutputError: one line and exit 2, not a
    traceback; a reader that went away (`| head`) stays a BrokenPipeError: main() stops quietly."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write the output ({exc.strerror or exc}){after}") from None


def _write(out, text: str) -> None:
    with _output_errors(": generation stopped"):
        out.write(text)
        out.flush()


class _Output:
    """sys.stdout while a command runs: its writes and flushes go through `_output_errors`. Everything else is
    the stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        with _output_errors():
            return self._stream.write(text)

    def flush(self) -> None:
        with _output_errors():
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _drop_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush at exit would fail again on a closed pipe or a
    full disk and print its own message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def run_generation(model, prompt: str, params, out=None, err=None) -> list[int]:
    from runtime.generate import generate
    from runtime.tokenizer import StreamDecoder

    out, err = out or sys.stdout, err or sys.stderr  # the streams of now (main() wraps stdout), not of the import

    prompt_ids = model.tokenizer.encode(prompt).ids
    decoder = StreamDecoder(model.tokenizer)
    tokens: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    for tok in generate(model.engine, prompt_ids, params):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(tok)
        _write(out, decoder.push(tok))
    _write(out, decoder.flush() + "\n")
    t_end = time.perf_counter()
    ttft = (t_first or t_end) - t0
    rate = (len(tokens) - 1) / (t_end - t_first) if t_first and len(tokens) > 1 else 0.0
    window = model.engine.arch.max_positions
    # generation also ends where the context window is full: said, or it reads as an early stop
    full = (f" (stopped at the model's context window of {window} tokens, before --max-tokens {params.max_tokens})"
            if len(prompt_ids) + len(tokens) >= window and len(tokens) < params.max_tokens else "")
    err.write(f"[{model.backend}] prompt {len(prompt_ids)} tokens, generated {len(tokens)}{full}; "
              f"TTFT {ttft * 1000:.1f} ms, decode {rate:.1f} tokens/s\n")
    return tokens


def cmd_generate(args) -> int:
    from agent.model import load_model
    from runtime.generate import SamplingError, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    except SamplingError as exc:  # named as the flag the user typed
        raise CliError(f"--{exc.field.replace('_', '-')} {exc.value} is invalid: must be {exc.allowed}") from None
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes the locale could not decode reach argv as lone surrogates
        code = ord(args.prompt[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise CliError(f"the prompt is not valid UTF-8 ({what} at character {exc.start}): give the text in UTF-8") \
            from None
    model = load_model(args.bundle, args.backend, args.threads, device=args.device)
    run_generation(model, args.prompt, params)
    return 0


def cmd_probe(args) -> int:
    from runtime.probe import device_report, format_hardware, probe_hardware

    if args.bundle is None:
        given = [flag for flag, value in (("--retune", args.retune), ("--cache-dir", args.cache_dir),
                                          ("--threads", args.threads)) if value]
        if given:
            raise CliError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to tuning a bundle's "
                           "execution path: give --bundle BUNDLE too (without it, probe only shows the hardware)")
    info = probe_hardware()
    tuning, kv = None, None
    if args.bundle is not None:
        from ota.bundle import open_bundle
        from runtime.autotune import kv_sizing

        bundle = open_bundle(args.bundle)  # verified once (every file's sha256: a second pass cost ~1 s on glm-m)
        tuning = _autotune(args, info, bundle)
        kv = kv_sizing(bundle, info.memory, tuning.choice, tuning.prefill)
    if args.json:
        extra = {"autotune": tuning.to_dict(), "kv": kv} if tuning else {}
        print(json.dumps({**info.to_dict(), "devices": device_report(info), "fingerprint": info.fingerprint(),
                          **extra}, indent=2))
    else:
        from runtime.autotune import format_kv_sizing, format_result

        print(format_hardware(info) + ("\n" + format_result(tuning) + "\n" + format_kv_sizing(kv) if tuning else ""))
    return 0


def _autotune(args, info, bundle):
    from runtime.autotune import autotune, choose_prefill_graph, default_cache_dir

    # ONNX Runtime paths are measured the way the agent will serve them (model.prefill_graph = "auto")
    prefill = choose_prefill_graph("auto", bundle, info.memory)
    return autotune(bundle, info, cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                    retune=args.retune, threads=args.threads, progress=not args.json, prefill=prefill.mode,
                    isolate=True)


def cmd_bench(args) -> int:
    from agent.model import load_model
    from runtime.autotune import default_cache_dir
    from runtime.bench import BenchOptions, format_report, run_bench

    if args.prefill_graph is not None and args.backend == "openvino":
        raise CliError(f"--{_PREFILL_FLAGS[args.prefill_graph]} is about ONNX Runtime's prefill graph; "
                       "--backend openvino has none: leave it out, or use --backend onnxruntime (or auto)")
    named_device = (args.device or "auto").strip().lower() != "auto"
    if args.cache_dir and (args.backend == "openvino" or named_device):  # said, not silently ignored
        print(f"edgeglm bench: note: --cache-dir {args.cache_dir} is not used: it is the autotune's cache, for "
              f"--backend auto (and --backend onnxruntime's measured prefill-graph rows); "
              f"--backend {args.backend}{' --device ' + args.device if named_device else ''} runs as named, "
              "without tuning", file=sys.stderr)
    opts = BenchOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, concurrency=args.concurrency,
                        prefix_tokens=args.prefix_tokens, runs=args.runs, max_kv_mb=args.max_kv_mb)
    opts.check(1 << 62)  # the flags alone first: a usage error needs no bundle
    if args.max_kv_mb is not None and args.concurrency <= 1:
        raise CliError(f"--max-kv-mb {args.max_kv_mb:g} bounds the KV of requests decoding together: give "
                       "--concurrency 2 or more with it")
    # then against the bundle's context window, before the autotune measures (seconds) and writes its cache
    from ota.bundle import read_manifest

    opts.check(read_manifest(Path(args.bundle)).manifest.architecture["max_position_embeddings"])
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model = load_model(args.bundle, args.backend, args.threads, cache_dir=cache_dir, progress=not args.json,
                       device=args.device,
                       prefill_graph=args.prefill_graph or "auto")
    report = run_bench(model, opts)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_bundle_keygen(args) -> int:
    from ota.signing import generate_keypair

    pair = generate_keypair(args.out, args.name)  # a bad --out is a SignatureError naming it
    # which side trusts which half depends on the key's use: the rollback key's private half is the controller's
    # and its public half goes to ota.rollback_keys, never to ota.trusted_keys (it would let whoever holds the
    # controller sign bundles: docs/security.md)
    print(f"key id {pair.key_id}\nprivate key {pair.private_path} (keep it secret: on the build host for a "
          "bundle-signing key, on the controller only for a rollback key)\n"
          f"public key  {pair.public_path} (install it where it is trusted: the agents' ota.trusted_keys for a "
          "bundle-signing key, their ota.rollback_keys for a rollback key)")
    return 0


def cmd_bundle_sign(args) -> int:
    from ota.bundle import open_bundle
    from ota.signing import load_private_key, sign_bundle

    bundle = open_bundle(args.bundle, chunks=True)  # never sign files that do not match their manifest
    bundle.check_complete()  # nor a directory holding files the signature would not cover
    path = sign_bundle(bundle, load_private_key(args.key))
    print(f"signed {bundle.manifest.name} {bundle.manifest.version}: {path}")
    return 0


def cmd_bundle_verify(args) -> int:
    from ota.bundle import open_bundle
    from ota.signing import load_trusted_keys, verify_bundle_signature

    bundle = open_bundle(args.bundle, chunks=True)
    kid = verify_bundle_signature(bundle, load_trusted_keys(args.trusted))
    bundle.check_complete()
    print(f"OK: {bundle.manifest.name} {bundle.manifest.version}, {len(bundle.manifest.files)} files match "
          f"the manifest, signed by key {kid}")
    return 0


def cmd_agent(args) -> int:
    import logging
    import signal
    import threading

    from agent.config import config_schema, load_config

    if args.action == "config-schema":
        print(json.dumps(config_schema(), indent=2))
        return 0
    if args.action == "install":
        from agent.install import install_from_args

        return install_from_args(args)
    # first: `systemctl reload` is accepted as soon as the process runs (Type=exec), and SIGHUP's default action
    # ended an agent still reading its config or importing its runtime (seconds on a slow box), which systemd
    # takes for a clean exit: no restart. A reload asked that early reads the file once more when it runs.
    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    overrides = {"model.bundle": args.bundle, "http.host": args.host, "http.port": args.port,
                 "model.backend": args.backend, "model.device": args.device, "model.slots_dir": args.state_dir}
    flags = {k: v for k, v in overrides.items() if v is not None}
    cfg = load_config(args.config, flags)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.daemon import run_agent

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_agent(cfg, stop, reload=reload, read_config=lambda: load_config(args.config, flags))
    return 0


def cmd_demo(args) -> int:
    import importlib.util

    _factory()
    try:
        amqtt = importlib.util.find_spec("amqtt")
    except (ImportError, ValueError):  # (a module set to None in sys.modules)
        amqtt = None
    if not args.broker and amqtt is None:  # before half a minute of training
        raise CliError("the demo's embedded MQTT broker needs amqtt: pip install 'edgeglm[factory,demo]', or pass "
                       "--broker HOST:PORT of a running MQTT broker")
    from agent.demo import run_demo

    try:
        return run_demo(args.workdir, steps=args.steps, broker=args.broker)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None


_PREFILL_FLAGS = {"auto": "prefill-graph auto", "on": "prefill-graph on", "off": "no-prefill-graph",
                  "only": "prefill-graph only"}  # the flag that set args.prefill_graph, for messages
AGENT_ACTIONS = ("run", "config-schema", "install")


class _Parser(argparse.ArgumentParser):
    """`edgeglm`: `edgeglm agent [FLAGS]` means `edgeglm agent run [FLAGS]` (the daemon, as units and pods start it)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["agent"] and (len(args) == 1 or args[1] not in (*AGENT_ACTIONS, "-h", "--help")):
            args.insert(1, "run")
        return super().parse_known_args(args, namespace)


class _SubParser(argparse.ArgumentParser):
    """Every subcommand's parser: a flag it does not take is an error here, after its own usage, naming the
    commands that take it (or the flag it comes close to). Without it the top-level parser said it, after
    `edgeglm`'s usage; and a required flag's absence was told before a mistyped one (`--devcie d1`: "the
    following arguments are required: --device", the typo never named)."""

    owners: dict[str, list[str]] = {}  # flag -> the commands (their prog) that take it; build_parser sets it
    hints: dict[tuple[str, str], str] = {}  # (prog, flag) -> why this command does not take it

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):  # the inner passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._given = list(sys.argv[1:] if args is None else args)
        if self._subparsers is None:
            # positionals after options too: `group remove ring1 --fleet F d2` left d2 "unrecognized" (a list of
            # DEVICEs may come after the flags, as in `group add`)
            self._intermixing = True
            try:
                namespace, extras = self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False
        else:
            namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return namespace, extras

    def _unrecognized(self, extras: list[str]) -> str:
        notes = []
        for flag in dict.fromkeys(a.split("=", 1)[0] for a in extras if a.startswith("--")):
            others = [o for o in self.owners.get(flag, []) if o != self.prog]
            parent = self.prog.rsplit(" ", 1)[0]
            others = [o for o in others if o.rsplit(" ", 1)[0] == parent] or others  # a sibling's first
            if (self.prog, flag) in self.hints:
                notes.append(self.hints[self.prog, flag])
            elif others:
                more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                notes.append(f"{flag} is an option of {' and '.join(f'`{o}`' for o in others[:3])}{more}")
            else:
                names = [o[2:] for o in self._option_string_actions if o.startswith("--") and o != "--help"]
                close = difflib.get_close_matches(flag[2:], names, n=1, cutoff=0.6)  # the words, not the dashes
                if close:
                    notes.append(f"did you mean --{close[0]}?")
        return f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(notes)})" if notes else "")

    def error(self, message):
        # a mistyped flag first: its absence is what the "required" error is about
        if message.startswith("the following arguments are required") and self._subparsers is None:
            unknown = [a for a in getattr(self, "_given", []) if a.startswith("--") and a != "--"
                       and a.split("=", 1)[0] not in self._option_string_actions]
            if unknown:
                message = self._unrecognized(unknown)
        super().error(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


MAX_THREADS = 1024  # as model.threads (agent/config.py): far more only stalls the box starting threads


def _threads(text: str) -> int:
    value = _positive(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text!r} threads is more than {MAX_THREADS}, the most a model runs on "
                                         "(as model.threads); leave --threads out to use all usable cores")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgeglm", description="Edge agent for compressed GLM models.")
    p.add_argument("--version", action="version", version=f"edgeglm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_SubParser)

    e = sub.add_parser("export", help="export a GlmForCausalLM checkpoint to a bundle (needs the factory extra)")
    e.add_argument("checkpoint", type=_named_path, help="GlmForCausalLM checkpoint directory to export (config.json, "
                   "model.safetensors or its shards, tokenizer.json)")
    e.add_argument("--out", required=True, type=_named_dir, help="bundle directory to create")
    e.add_argument("--precision", default="int8", choices=["int8", "fp32"],
                   help="bundle weight precision: int8 (default: linear-layer weights in 8 bits, one scale per "
                   "output channel) or fp32 (unquantized: outputs equal the PyTorch reference)")
    e.add_argument("--backends", default="openvino,onnxruntime", help="comma-separated: openvino,onnxruntime")
    e.add_argument("--name", help="model name (default: the checkpoint directory name)")
    e.add_argument("--version", default="0.1.0", help="bundle version, e.g. 1.2.0")
    e.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    e.add_argument("--chunk-kib", type=int, default=256, help="OTA transfer chunk size in KiB, 4-512 (default 256)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_export)

    bd = sub.add_parser("build", help="compress a checkpoint by a recipe (prune, distill, quantize) into a bundle (needs "
                                          "the factory extra)")
    bd.add_argument("--teacher", required=True, type=_named_path, help="GlmForCausalLM checkpoint directory to compress")
    bd.add_argument("--corpus", required=True, nargs="+", type=_named_path, help="UTF-8 text files or directories to learn from")
    bd.add_argument("--recipe", required=True, help="recipe TOML file, or a shipped recipe: quick, edge-small")
    bd.add_argument("--out", required=True, type=_named_dir, help="bundle directory to create")
    bd.add_argument("--work", type=_named_dir, help="work directory for every stage's output (default: OUT.work)")
    bd.add_argument("--resume", action="store_true", help="continue the build whose state is in the work directory")
    bd.add_argument("--quiet", action="store_true", help="no progress bars")
    bd.set_defaults(func=cmd_build)

    g = sub.add_parser("generate", help="generate text with a bundle")
    g.add_argument("prompt")
    g.add_argument("--bundle", required=True, type=_named_path, help="the bundle directory to generate with")
    g.add_argument("--backend", default="auto", help="auto, openvino or onnxruntime")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="any integer (taken modulo 2^64, as the HTTP API takes it): the same seed "
                   "gives the same text")
    g.add_argument("--threads", type=_threads, help="inference threads (default: all usable cores)")
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("probe", help="show the hardware and the inference backends found")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--bundle", type=_named_path, help="also choose this bundle's execution path (measured autotune, cached)")
    pr.add_argument("--retune", action="store_true", help="measure again even if a cached result exists")
    pr.add_argument("--cache-dir", type=_named_dir, help="autotune cache (default $EDGEGLM_CACHE_DIR or ~/.cache/edgeglm)")
    pr.add_argument("--threads", type=_threads, help="with --bundle: tune only this thread count")
    pr.set_defaults(func=cmd_probe)

    be = sub.add_parser("bench", help="measure TTFT, decode speed, latency percentiles and memory of a bundle")
    be.add_argument("--bundle", required=True, type=_named_path, help="the bundle directory to measure")
    be.add_argument("--backend", default="auto", help="auto (the autotuned path), onnxruntime or openvino")
    be.add_argument("--device", default="auto", help=DEVICE_HELP)
    be.add_argument("--prompt-tokens", type=int, default=512)
    be.add_argument("--new-tokens", type=int, default=128)
    be.add_argument("--concurrency", type=int, default=1, help="requests at once through the batching scheduler")
    be.add_argument("--prefix-tokens", type=int, default=0, help="also measure TTFT with this many prompt tokens "
                    "in the prefix cache")
    be.add_argument("--runs", type=int, default=3)
    be.add_argument("--max-kv-mb", type=float, default=None, help="with --concurrency: bound the KV the requests "
                    "decoding together may come to hold, MiB, as batching.max_kv_mb (default: no bound)")
    be.add_argument("--prefill-graph", dest="prefill_graph", choices=("auto", "on", "off", "only"), default=None,
                    help="ONNX Runtime: the W8A8 prefill graph, as model.prefill_graph (default auto: beside the "
                    "decode graph where memory allows, else alone)")
    be.add_argument("--no-prefill-graph", dest="prefill_graph", action="store_const", const="off",
                    help="ONNX Runtime: run prompts on the decode graph, as model.prefill_graph = false does")
    be.add_argument("--prefill-graph-only", dest="prefill_graph", action="store_const", const="only",
                    help="ONNX Runtime: run everything on the prefill graph, as model.prefill_graph = \"only\" does")
    be.add_argument("--threads", type=_threads, help="inference threads (default: autotuned / all usable cores)")
    be.add_argument("--cache-dir", help="autotune cache (default $EDGEGLM_CACHE_DIR or ~/.cache/edgeglm)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)

    b = sub.add_parser("bundle", help="sign and verify bundles")
    bsub = b.add_subparsers(dest="bundle_command", required=True)
    kg = bsub.add_parser("keygen", help="create an ed25519 signing key pair")
    kg.add_argument("--out", required=True, type=_named_dir, help="directory for NAME.key and NAME.pub")
    kg.add_argument("--name", default="bundle-signing",
                    help="the files are NAME.key and NAME.pub in --out: 1 to 128 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit (default bundle-signing)")
    kg.set_defaults(func=cmd_bundle_keygen)
    sg = bsub.add_parser("sign", help="sign a bundle's manifest (writes manifest.sig)")
    sg.add_argument("bundle")
    sg.add_argument("--key", required=True, help="private key file (PEM)")
    sg.set_defaults(func=cmd_bundle_sign)
    vf = bsub.add_parser("verify", help="check a bundle's files and signature")
    vf.add_argument("bundle")
    vf.add_argument("--trusted", required=True, action="append",
                    help="public key file or directory of *.pub files (repeatable)")
    vf.set_defaults(func=cmd_bundle_verify)

    a = sub.add_parser("agent", help="run the edge agent daemon (or print its config schema, or install it)",
                       description="`edgeglm agent [FLAGS]` runs the daemon, as `edgeglm agent run [FLAGS]` does.")
    asub = a.add_subparsers(dest="action", required=True)
    ar = asub.add_parser("run", help="run the daemon (the default action)",
                         epilog="Signals: SIGTERM or Ctrl-C stop it cleanly (requests in flight finish, the offline "
                                "state is published); SIGHUP reads --config again and applies what can change live "
                                "(the log names what waits for a restart).")
    ar.add_argument("--config", help="TOML config file (defaults < file < EDGEGLM_* env < these flags)")
    ar.add_argument("--bundle", help="serve this bundle instead of the active slot")
    ar.add_argument("--host", help="HTTP API address (default 127.0.0.1)")
    ar.add_argument("--port", type=int, help="HTTP API port (default 8321)")
    ar.add_argument("--backend", help="auto, onnxruntime or openvino")
    ar.add_argument("--device", help=DEVICE_HELP)
    ar.add_argument("--state-dir", help="model slots and update state (default /var/lib/edgeglm)")
    asub.add_parser("config-schema", help="print the JSON schema of the config file's settings")
    ai = asub.add_parser("install", help="lay out this box for the agent as a systemd service (docs/install.md)")
    ai.add_argument("--prefix", default="/", help="root to install under, like DESTDIR (default /)")
    ai.add_argument("--user", default="edgeglm", help="the service user (default edgeglm)")
    ai.add_argument("--venv", help="the virtualenv's path on the box (default /opt/edgeglm/venv)")
    ai.add_argument("--wheel-or-source", help="what pip installs (default: this source tree)")
    ai.add_argument("--no-venv", action="store_true", help="no virtualenv, the unit runs this Python")
    ai.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    a.set_defaults(func=cmd_agent)

    from fleet.cli import register as register_fleet

    register_fleet(sub)

    d = sub.add_parser("demo", help="the whole product on this machine: broker, controller, 3 agents, 2 rollouts "
                                         "(needs the factory and demo extras)")
    d.add_argument("--workdir", default="edgeglm-demo",
                   help="a new or empty directory, or one an earlier demo made (its trained model is reused; its "
                        "fleet.db and agents/ start afresh); default edgeglm-demo")
    d.add_argument("--steps", type=_positive, default=300, help="training steps for the tiny model (default 300)")
    d.add_argument("--broker", help="mqtt://HOST:PORT (or HOST:PORT) of a broker to use instead of the embedded one")
    d.set_defaults(func=cmd_demo)
    owners: dict[str, list[str]] = {}
    for parser in _leaf_parsers(p):
        for flag in parser._option_string_actions:
            if flag.startswith("--") and flag != "--help":
                owners.setdefault(flag, []).append(parser.prog)
    _SubParser.owners = owners
    _SubParser.hints = {("edgeglm fleet rollout", "--broker"): "a rollout is driven by `edgeglm fleet serve`, which "
                        "holds the broker connection: rollout takes no --broker, only --db/--config to record it"}
    _name_subcommands(p)
    return p


def _name_subcommands(parser: argparse.ArgumentParser) -> None:
    """Each group of subcommands named by its choices, as the usage line shows them: `edgeglm fleet` alone said
    "the following arguments are required: fleet_command" (argparse names a missing one by its dest)."""
    if parser._subparsers is None:
        return
    for action in parser._subparsers._group_actions:
        if action.metavar is None:
            action.metavar = "{" + ",".join(action.choices) + "}"
        for child in dict.fromkeys(action.choices.values()):
            _name_subcommands(child)


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers of every command that has no subcommands of its own."""
    if parser._subparsers is None:
        yield parser
        return
    for action in parser._subparsers._group_actions:
        for child in dict.fromkeys(action.choices.values()):  # aliases name the same parser
            yield from _leaf_parsers(child)


def _process_defaults() -> None:
    """Environment defaults for the libraries, set before they load (an operator's own value wins)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # ONNX Runtime's usage telemetry: off, as in the unit
    if not sys.stderr.isatty():  # progress bars written to a log file: one update every 10 s, not ten a second
        os.environ.setdefault("TQDM_MININTERVAL", "10")


def main(argv: list[str] | None = None) -> int:
    _process_defaults()
    stdout, args = sys.stdout, None
    if stdout is not None:  # (None: started with stdout closed, `>&-`: print() then writes nowhere, as before)
        sys.stdout = _Output(stdout)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version: printed (argparse ignores a failed write; the flush is ours)
            if exc.code in (0, None) and sys.stdout is not None:
                sys.stdout.flush()
            raise
        code = args.func(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # what is still buffered: a full disk shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:  # the reader of the output went away (`edgeglm generate ... | head`): as other tools
        _drop_stdout()
        return 128 + signal.SIGPIPE
    except _user_errors() as exc:
        if isinstance(exc, OutputError):
            _drop_stdout()
        command = " ".join(filter(None, (getattr(args, "command", None), *(getattr(args, name, None) for name in (
            "bundle_command", "fleet_command", "config_command", "group_command", "device_command")))))  # the whole
        print(f"edgeglm{' ' + command if command else ''}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        if args is None:  # while the arguments were read
            return 130
        after = f" {exc}" if args.command == "build" and str(exc) else ""  # "while ...": what is kept, what next
        if args.command == "build" and not after:  # after run_build returned: the bundle and work dir are kept
            work = args.work or Path(args.out).with_name(Path(args.out).name + ".work")  # BuildInputs.create's
            after = (f"; the finished stages and the last saved training step are kept in {work}: the same "
                     f"command with --resume continues from there")
        if args.command == "build" and _stopped_by_sigterm():
            print(f"edgeglm {args.command}: stopped (SIGTERM){after}", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"edgeglm {args.command}: interrupted{after}", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
