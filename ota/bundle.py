"""The bundle: the OTA artifact that carries one model to an edge box.

A bundle is a directory:

    manifest.json          what is in it (the `Manifest` model below); signed as exact bytes
    manifest.sig           ed25519 signature of manifest.json (added by `edgeglm bundle sign`)
    tokenizer.json
    onnxruntime/model.onnx, onnxruntime/model.onnx.data
    openvino/openvino_model.xml, openvino/openvino_model.bin

Every file is listed in the manifest with its sha256 and size; `open_bundle` refuses a bundle
whose files disagree with it. Writers stage into a sibling directory and rename it into place
only once the manifest is written, so a half-written bundle never sits at the final path.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ota.errors import BundleError

FORMAT = "edgeglm-bundle/1"
FORMAT_RE = re.compile(r"^edgeglm-bundle/([1-9]\d{0,8})$")
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX)
# one to three numbers without leading zeros ("01.2.0" would sort as 1.2.0 but name another version than "1.2.0"
# wherever versions are compared as text: a rollout's "already runs it", fleet status' rows), an optional suffix
VERSION_RE = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*)){0,2}([-+][0-9A-Za-z.-]+)?$")  # use fullmatch: "1.0\n" is none
CHUNK = 1 << 20
TRANSFER_CHUNK = 256 * 1024  # default chunk of OTA transfer; each chunk's sha256 is in the manifest


def _message(error: dict) -> str:
    """pydantic's message without its "Value error, " (our own checks' text says what is wrong)."""
    return error["msg"].removeprefix("Value error, ")


def manifest_problems(exc: ValidationError, limit: int) -> str:
    """A manifest's validation errors on one line: each field's path and problem."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {_message(e)}" for e in exc.errors()[:limit])


def _shown(path: str) -> str:
    text = repr(path)
    return text if len(text) <= 80 else text[:60] + f"...' ({len(path)} characters)"


def path_problem(path: str) -> str | None:
    """Why a manifest file path is not a relative POSIX path of a file inside the bundle, or None. A NUL, a
    component longer than the file system takes and the like failed in `verify` with a raw "embedded null
    byte" or "File name too long" (errno 36) from the OS; an OTA transfer would write them on the device."""
    if not path:
        return "it is empty"
    if "\x00" in path:
        return "it holds a NUL character"
    if "\\" in path:
        return "it holds a backslash (paths in a manifest use /)"
    if path.startswith("/"):
        return "it is absolute: it points outside the bundle"
    parts = path.split("/")
    if ".." in parts:
        return "it has a '..' part: it points outside the bundle"
    if any(p in ("", ".") for p in parts):
        return "it has an empty or '.' part (write it as a/b)"
    long = next((p for p in parts if len(p.encode("utf-8", "surrogatepass")) > NAME_MAX), None)
    if long is not None:
        return f"a part of it is {len(long.encode('utf-8', 'surrogatepass'))} bytes long, more than {NAME_MAX}"
    if path in (MANIFEST, SIGNATURE, SIGNATURE + ".prev"):
        return f"{path} is the bundle's own manifest file, not a file it lists"
    return None


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    # sha256 of each `Manifest.chunk_size` piece, so a transfer can check every chunk as it arrives
    chunks: list[str] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        problem = path_problem(v)
        if problem:
            raise ValueError(f"file path {_shown(v)} is refused: {problem}")
        return v


class BackendEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entry: str  # the file the engine loads, relative to the bundle
    weights: str  # "fp32", "int8-blockwise" or "int8-per-channel"
    scheme: str  # human-readable quantization scheme


class GoldenSequence(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]
    # reference top-1 minus top-2 logit at each step: a step whose margin is below the check's
    # tolerance is a near-tie that another (correct) kernel may resolve the other way
    margins: list[float]


class GoldenCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_ids: list[int] = Field(min_length=1)
    reference: GoldenSequence  # PyTorch fp32 reference on the original weights
    backends: dict[str, GoldenSequence]  # PyTorch reference on each backend's (de)quantized weights
    tolerance: float = Field(ge=0)  # margins below this may flip on the edge


class Architecture(BaseModel):
    """What the runtime sizes its caches, inputs and outputs by, from the manifest's `architecture` (the model's
    GLM config, whose other fields are kept as they are): a size that is not a positive whole number failed
    later with a traceback or an engine's message about shapes."""
    model_config = ConfigDict(extra="allow")
    num_hidden_layers: StrictInt = Field(ge=1)
    num_key_value_heads: StrictInt = Field(ge=1)
    head_dim: StrictInt = Field(ge=1)
    vocab_size: StrictInt = Field(ge=1)
    max_position_embeddings: StrictInt = Field(ge=2)  # a prompt token and one generated
    eos_token_id: StrictInt | list[StrictInt] | None = None
    hidden_act: str = "silu"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str
    created: str
    min_agent_version: str
    architecture: dict  # checked against `Architecture`
    precision: Literal["int8", "fp32"]
    backends: dict[str, BackendEntry]
    tokenizer: str = "tokenizer.json"
    chunk_size: int = Field(default=TRANSFER_CHUNK, ge=4096, le=16 << 20)  # the largest a chunk request may ask for
    files: list[FileEntry]
    golden: GoldenCheck
    compression: dict = Field(default_factory=dict)

    @field_validator("version", "min_agent_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a version like 1.2.3 (numbers without leading zeros)")
        return v

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, v: dict) -> dict:
        try:
            Architecture.model_validate(v)
        except ValidationError as exc:
            # a field's problem with its value; the whole architecture's (eos outside the vocabulary) alone
            raise ValueError("; ".join(
                f"{'.'.join(map(str, e['loc']))}: {_message(e)}" + (f" (got {e['input']!r})" if e["type"] != "missing"
                                                                     else "")
                if e["loc"] else _message(e) for e in exc.errors()[:3])) from None
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != FORMAT:
            raise ValueError(f"bundle format {v!r} is not supported (this agent reads {FORMAT})")
        return v

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, v: list[FileEntry]) -> list[FileEntry]:
        seen = set()
        for f in v:
            if f.path in seen:
                raise ValueError(f"file path {_shown(f.path)} is listed twice")
            seen.add(f.path)
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _not_too_new(cls, data, handler):
        """A bundle of a newer format, or one that needs a newer agent and does not validate here (fields this
        agent does not know): one line saying to update the agent, not pydantic's list of what it does not
        know. Raised as a ValidationError (PydanticCustomError), so every caller that reports a manifest's
        ValidationError (read_manifest, the OTA offer check) says it."""
        if isinstance(data, dict):
            newer = too_new(data)
            if newer and data.get("format") != FORMAT:
                raise PydanticCustomError("bundle_too_new", newer)
            try:
                return handler(data)
            except ValidationError:
                if newer:
                    raise PydanticCustomError("bundle_too_new", newer) from None
                raise
        return handler(data)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise BundleError(f"manifest lists no file {path!r}")


def agent_version() -> str:
    """This agent's version (agent.__version__, read here so that ota/ does not import the agent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeglm")
    except PackageNotFoundError:  # a source tree without installing
        return "0.2.0"


def too_new(data: dict, this: str | None = None) -> str | None:
    """The message for a raw manifest made for a newer agent than this one (`this`, default: this agent's
    version): a format after FORMAT, or a min_agent_version above `this`; None otherwise (and for values
    that are not a format or a version at all: validation names those)."""
    from ota.versions import parse_version

    this = this or agent_version()
    fmt, needs = data.get("format"), data.get("min_agent_version")
    m = FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    newer_format = m is not None and int(m[1]) > int(FORMAT_RE.fullmatch(FORMAT)[1])
    try:
        newer_agent = isinstance(needs, str) and parse_version(needs) > parse_version(this)
    except BundleError:  # not a version: validation says so
        newer_agent = False
    if not (newer_format or newer_agent):
        return None
    if newer_format:
        what = f"bundle format {fmt} ({f'needs edgeglm >= {needs}' if newer_agent else 'made by a newer edgeglm'}; " \
               f"this agent is {this})"
    else:
        what = f"bundle needs edgeglm >= {needs} (this agent is {this})"
    return f"{what}: update the agent first; this bundle is not used"


def tokenizer_size(path: Path) -> int | None:
    """One more than the highest token id a tokenizer.json holds (its model's vocabulary and its added tokens),
    read as JSON; None for a file or a model kind whose ids cannot be told that way (the runtime's load
    counts them with the tokenizers library)."""
    try:
        data = json.loads(path.read_bytes())
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1] if isinstance(vocab, list) else []
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ids) + 1 if ids else None


def vocabulary_problem(bundle_root: Path, tokenizer: str, tokens: int, vocab_size: int) -> str | None:
    """The one-line refusal of a tokenizer with ids the model has no logits or embedding for, or None: such a
    bundle verified, loaded and passed its self-test, then a request whose text became such an id failed
    ("token id 604 is outside the vocabulary"). A model vocabulary larger than the tokenizer's is fine."""
    if tokens <= vocab_size:
        return None
    return (f"{bundle_root}: its tokenizer {tokenizer} has token ids up to {tokens - 1} ({tokens} tokens), but the "
            f"model's architecture.vocab_size is {vocab_size}: text with those tokens could not be run; the bundle "
            "is refused; export it again with the model's own tokenizer")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, path: Path, chunk_size: int = TRANSFER_CHUNK) -> FileEntry:
    whole, chunks = hashlib.sha256(), []
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=whole.hexdigest(), size=path.stat().st_size,
                     chunks=chunks)


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class Bundle:
    """A bundle on disk whose manifest parsed; `verify()` checks every file against it."""

    def __init__(self, root: Path, manifest: Manifest, manifest_bytes: bytes):
        self.root, self.manifest, self.manifest_bytes = root, manifest, manifest_bytes

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the hash of its exact manifest bytes (which pin every file)."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def verify(self, chunks: bool = False) -> None:
        """Every listed file's size and sha256; with `chunks`, also its transfer chunks' sha256 (read in the same
        pass): what `bundle sign`, `bundle verify` and the controller's offer check, since a manifest whose chunk
        list does not match its files verifies otherwise and fails every OTA transfer of it at that chunk."""
        for entry in self.manifest.files:
            path = self._inside(entry.path)
            try:
                if not path.is_file():
                    raise BundleError(f"{path}: listed in the manifest but missing from the bundle")
                size = path.stat().st_size
                if size != entry.size:
                    raise BundleError(
                        f"{path}: size {size} bytes does not match the manifest's {entry.size} "
                        "(truncated or replaced file); the bundle is refused"
                    )
                digest = sha256_file(path) if not chunks else self._check_chunks(path, entry)
            except OSError as exc:  # a file or directory this user may not read, an I/O error
                raise BundleError(f"{path}: cannot read ({exc.strerror or exc}); the bundle is refused; give the "
                                  "user that reads it read access (or copy it where it can)") from None
            if digest != entry.sha256:
                raise BundleError(
                    f"{path}: sha256 {digest} does not match the manifest's {entry.sha256} "
                    "(corrupted or modified file); the bundle is refused"
                )
        listed = {f.path for f in self.manifest.files}
        for backend, be in self.manifest.backends.items():
            if be.entry not in listed:
                raise BundleError(f"{self.root / MANIFEST}: backend {backend!r} entry {be.entry!r} is not a listed file")
        if self.manifest.tokenizer not in listed:
            raise BundleError(f"{self.root / MANIFEST}: tokenizer {self.manifest.tokenizer!r} is not a listed file")
        tokens = tokenizer_size(self._inside(self.manifest.tokenizer))
        problem = tokens and vocabulary_problem(self.root, self.manifest.tokenizer, tokens,
                                                self.manifest.architecture["vocab_size"])
        if problem:
            raise BundleError(problem)

    def listed_beside(self, rel: str) -> frozenset[str]:
        """The names of the listed files in the directory of the bundle file `rel` (what a graph may name)."""
        folder = PurePosixPath(rel).parent
        return frozenset(PurePosixPath(f.path).name for f in self.manifest.files if PurePosixPath(f.path).parent == folder)

    def unlisted(self) -> list[str]:
        """Files in the bundle directory that the manifest does not list (besides manifest.json and its
        manifest.sig), as paths relative to the bundle. No agent reads them and no OTA transfer carries them."""
        listed = {f.path for f in self.manifest.files} | {MANIFEST, "manifest.sig", "manifest.sig.prev"}
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                      if (p.is_file() or p.is_symlink()) and p.relative_to(self.root).as_posix() not in listed)

    def check_complete(self) -> None:
        """BundleError naming the files the manifest does not list: what `bundle sign`, `bundle verify` and the
        controller's offer refuse, since the bundle there is not what the signature covers and the agents get."""
        extra = self.unlisted()
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise BundleError(f"{self.root}: {len(extra)} file(s) not listed in the manifest: {shown}; the signature "
                              "does not cover them and no agent would get them; remove them (a bundle carries only what "
                              "`edgeglm export` wrote: a file the model needs is a change to the exporter)")

    def _check_chunks(self, path: Path, entry: FileEntry) -> str:
        """The file's sha256, after checking each `chunk_size` piece against the manifest's chunk list."""
        size = self.manifest.chunk_size
        expected = -(-entry.size // size)
        if len(entry.chunks) != expected:
            raise BundleError(f"{path}: the manifest lists {len(entry.chunks)} transfer chunk hash(es), {expected} "
                              f"expected for {entry.size} bytes in chunks of {size} (chunk_size); an OTA transfer of "
                              "it would fail; export the bundle again")
        whole, bad = hashlib.sha256(), None
        with open(path, "rb") as f:
            for i, listed in enumerate(entry.chunks):
                block = f.read(size)
                whole.update(block)
                if bad is None and hashlib.sha256(block).hexdigest() != listed:
                    bad = (i, len(block))  # read on: a file that differs as a whole is a damaged file, not a manifest
        digest = whole.hexdigest()
        if bad is not None and digest == entry.sha256:
            i, n = bad
            raise BundleError(f"{path}: transfer chunk {i} (bytes {i * size}-{i * size + n - 1}) does not match the "
                              f"manifest's chunk hash (chunk_size {size}), though the whole file does: the manifest "
                              "was edited or written for another chunk size; an OTA transfer of it would fail at "
                              "that chunk; export the bundle again")
        return digest  # (a damaged file: its sha256 differs, which the caller says)

    def _inside(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if self.root.resolve() not in path.parents:
            raise BundleError(f"{self.root / MANIFEST}: file path {rel!r} points outside the bundle")
        return path


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst", ".tzst")
# the first bytes of gzip, zip, xz, bzip2 and zstd files; a tar file says "ustar" at offset 257
ARCHIVE_MAGIC = (b"\x1f\x8b", b"PK\x03\x04", b"\xfd7zXZ\x00", b"BZh", b"\x28\xb5\x2f\xfd")


def _is_archive(path: Path) -> bool:
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(262)
    except OSError:
        return False
    return head.startswith(ARCHIVE_MAGIC) or head[257:262] == b"ustar"


def _bundles_inside(root: Path) -> list[str]:
    """Directories right under `root` that hold a manifest.json (an archive unpacked into a directory of its own),
    as paths; [] when there are none or `root` cannot be listed."""
    try:
        return sorted(str(p) for p in root.iterdir() if (p / MANIFEST).is_file())
    except OSError:
        return []


def read_manifest(root: Path) -> Bundle:
    """The bundle at `root` with its manifest parsed (files not checked: `Bundle.verify`). BundleError, one line
    naming the path, for a path that is missing, a file (an archive: unpack it), a directory without manifest.json
    (naming a bundle directory inside it, if there is one) and a manifest that cannot be read or is invalid."""
    root = Path(root)
    try:
        is_dir, exists = root.is_dir(), root.exists()
    except OSError as exc:  # a parent directory this user may not search
        raise BundleError(f"{root}: cannot read the bundle directory ({exc.strerror or exc}); give a bundle "
                          "directory you can read") from None
    if not is_dir:
        if exists:
            raise BundleError(f"{root}: is a file, not a bundle directory" + (
                "; unpack the archive and give the directory holding manifest.json" if _is_archive(root) else
                "; give the directory holding manifest.json (made by `edgeglm export`)"))
        raise BundleError(f"{root}: bundle directory not found")
    mpath = root / MANIFEST
    try:
        is_file = mpath.is_file()
    except OSError as exc:  # a bundle directory this user may not search
        raise BundleError(f"{root}: cannot read the bundle directory ({exc.strerror or exc}); the bundle is "
                          "refused; give the user that reads it read access (or copy it where it can)") from None
    if not is_file:
        if mpath.exists() or mpath.is_symlink():  # a directory, a dangling link
            raise BundleError(f"{mpath}: is not a file; the bundle is damaged and is refused; export it again")
        inside = _bundles_inside(root)
        if inside:
            raise BundleError(f"{mpath}: not found; {root} is not a bundle, but holds "
                              f"{'one' if len(inside) == 1 else 'bundles'} in {', '.join(inside[:3])}"
                              f"{' and more' if len(inside) > 3 else ''}: give that directory")
        raise BundleError(f"{mpath}: not found; is {root} a bundle made by `edgeglm export`?")
    try:
        raw = mpath.read_bytes()
    except OSError as exc:  # a manifest this user may not read, an I/O error
        raise BundleError(f"{mpath}: cannot read the manifest ({exc.strerror or exc}); the bundle is refused") \
            from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc}); truncated or corrupted manifest") from None
    except RecursionError:
        raise BundleError(f"{mpath}: not a manifest (JSON nested deeper than Python reads); the bundle is "
                          "refused") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "bundle_too_new":  # one line of its own, not a field's problem
            raise BundleError(f"{mpath}: {exc.errors()[0]['msg']}") from None
        raise BundleError(f"{mpath}: invalid manifest: {manifest_problems(exc, 5)}") from None
    return Bundle(root, manifest, raw)


def open_bundle(root: str | Path, verify: bool = True, chunks: bool = False) -> Bundle:
    """Parse the manifest and (by default) check every file's size and sha256 against it; with `chunks`, the
    transfer chunks' hashes too (see Bundle.verify)."""
    bundle = read_manifest(Path(root))
    if verify:
        bundle.verify(chunks=chunks)
    return bundle


def write_manifest(staging: Path, manifest_fields: dict, chunk_size: int = TRANSFER_CHUNK) -> Manifest:
    """List every file under `staging` in a manifest and write it (last, so it marks completeness)."""
    files = [file_entry(staging, p, chunk_size) for p in sorted(staging.rglob("*"))
             if p.is_file() and p.name != MANIFEST]
    manifest = Manifest(files=files, created=now_iso(), chunk_size=chunk_size, **manifest_fields)
    (staging / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    return manifest


def publish(staging: Path, out: Path, force: bool = False) -> None:
    """Move a complete staging directory to `out` (replacing it only with `force`).

    The replaced bundle is first moved aside under the staging directory's own (unique) name plus
    `.old`, then removed: a directory of the user's next to `out` (say `OUT.old`, a kept copy) is
    never touched; it used to be deleted without a word. `out` itself being a symlink, the link is
    replaced, not what it points to."""
    if out.exists() or out.is_symlink():
        if not force:
            raise BundleError(f"{out}: already exists; pass --force to replace it")
        old = staging.with_name(staging.name + ".old")
        out.rename(old)
        staging.rename(out)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
