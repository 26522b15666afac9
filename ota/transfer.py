"""OTA chunk transfer over MQTT request/response: the payloads and both ends' logic.

The agent asks for one chunk at a time (`ChunkRequest`: update, file, index) on its
`ota/chunk/request` topic; the controller's chunk server answers on the agent's
`ota/chunk/response` topic with the bytes (base64 in JSON, so that the same exchange works
over MQTT 3.1.1, where the correlation id must be read from the payload). The broker never
holds a whole bundle: nothing is retained, and each message is one chunk (256 KiB by default).
The agent checks every chunk against the sha256 list of the signed manifest before writing it.

The chunk server trusts nothing in a request but the choice of chunk: it serves the files listed
in the offered manifest, cut at the manifest's `chunk_size` (a request naming another size gets an
error answer), and never sends an answer over `MAX_RESPONSE_BYTES` (1 MiB: the agent's default
payload limit, half the shipped broker's `max_packet_size`). A bundle whose `chunk_size` is over
`MAX_CHUNK_SIZE` cannot be served and is not offered (fleet/controller.py `offerable_bundle`).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
import os
import re
import stat
import time
import uuid
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ota.bundle import MANIFEST, Manifest, read_manifest
from ota.errors import BundleError
from ota.fsutil import FileKeyedCache, stat_key
from ota.update import Offer, UpdateFailed, UpdateInterrupted

MAX_RESPONSE_BYTES = 1 << 20  # the agent's default max_payload_bytes; the shipped broker allows 2 MiB packets
MAX_CHUNK_SIZE = 512 * 1024  # base64 makes 4/3 of it: ~683 KiB, with room for the JSON around it
# the largest offer an agent takes and the controller sends: the shipped broker's max_packet_size
# (k3s/base/core/broker-config.yaml). An offer carries the whole signed manifest, about 100 bytes per
# transfer chunk once in base64: a bundle of up to about 2.5 GB in 256 KiB chunks, 5 GB in 512 KiB ones
OFFER_MAX_BYTES = 2 << 20
MANIFESTS_KEPT = 8  # parsed bundle manifests a chunk server keeps (most recently served)
CHUNK_WARNING_EVERY_S = 60.0  # a chunk left unanswered is logged at once, then at most this often
# answers refused (an error, another chunk's, not a chunk answer) before the chunk is given up: anyone who sees a
# request's id can answer it first, and one forged answer failed the whole download
ANSWER_ATTEMPTS = 3
# in a chunk answer's error: the bundle offered cannot be served (changed or unreadable since the offer): the
# operator's to fix, which the controller logs
CANNOT_SERVE = "cannot be served: "

log = logging.getLogger("edgeglm.ota")


class ChunkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: int = 1
    id: str = Field(min_length=1, max_length=128)
    reply_to: str | None = None
    update_id: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=512)
    index: int = Field(ge=0)
    chunk_size: int = Field(ge=4096, le=16 << 20)


class ChunkResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: int = 1
    id: str
    update_id: str
    path: str
    index: int
    data_b64: str | None = None
    error: str | None = None


def _printable(text: str, limit: int = 300) -> str:
    """`text` with control characters escaped (a newline forged a journal line), at most `limit` characters."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: m.group().encode("unicode_escape").decode(), text[:limit])


class ChunkSource:
    """Controller side: serves chunks of the bundles it has offered, by update id.

    Which device may ask for which update is the caller's business (the controller checks its
    offers table); this class decides only what bytes an answer may carry."""

    def __init__(self):
        self.bundles: dict[str, Path] = {}
        # parsed manifests by bundle directory, not by update id: a rollout offers one bundle under a new
        # update id per device, and a 300 MB bundle's manifest parses to ~160 KiB (1,200 chunk hashes)
        self._manifests = FileKeyedCache(MANIFESTS_KEPT)

    def add(self, update_id: str, bundle_dir: Path) -> None:
        self.bundles[update_id] = Path(bundle_dir).resolve()

    def forget(self, update_id: str) -> None:
        self.bundles.pop(update_id, None)

    def _manifest(self, root: Path) -> Manifest:
        """The bundle's manifest, parsed once while its manifest.json stays the same file (a bundle copied
        over in place is read again); the MANIFESTS_KEPT most recently served are kept."""
        return self._manifest_and_sha(root)[0]

    def _manifest_and_sha(self, root: Path) -> tuple[Manifest, str]:
        """`_manifest`, with the sha256 of manifest.json's bytes (what an offer names: `manifest_sha256`)."""
        key = stat_key(root / MANIFEST)
        hit = self._manifests.get(root, key)
        if hit is None:
            bundle = read_manifest(root)
            hit = (bundle.manifest, bundle.sha256)
            self._manifests.put(root, key, hit)
        return hit

    def serve(self, req: ChunkRequest, root: Path | None = None, version: str | None = None,
              manifest_sha256: str | None = None) -> ChunkResponse:
        """The chunk asked for, from `root` (the bundle the caller found offered under the request's
        update id, as `version`, with the manifest whose sha256 is `manifest_sha256`) or else from the bundle
        added under that update id. A chunk is sent only if it matches the bundle's manifest, and the manifest
        only if it is the one offered: a bundle directory exported again (at the same version too), truncated
        or copied over after the offer is an error answer (CANNOT_SERVE) naming what changed, not bytes every
        device refuses without a word on this side."""
        base = dict(id=req.id, update_id=req.update_id, path=req.path, index=req.index)
        root = Path(root).resolve() if root is not None else self.bundles.get(req.update_id)
        if root is None:
            return ChunkResponse(**base, error=f"update {req.update_id!r} is not offered by this controller")
        try:
            manifest, sha = self._manifest_and_sha(root)
        except BundleError as exc:
            return ChunkResponse(**base, error=f"update {req.update_id} {CANNOT_SERVE}{exc}")
        cannot = f"update {req.update_id} {CANNOT_SERVE}{root}"
        if version is not None and manifest.version != version:
            return ChunkResponse(**base, error=f"{cannot} holds version {manifest.version} now, the update offered "
                                               f"{version}: it was exported again over the offered bundle; offer "
                                               f"the bundle there again (or the one offered, from its own directory)")
        if manifest_sha256 is not None and sha != manifest_sha256:
            return ChunkResponse(**base, error=f"{cannot}: its manifest.json is not the one offered (version "
                                               f"{manifest.version} still, other contents): it was exported again "
                                               f"in place after the offer; export each build at a new version, to "
                                               f"a new directory, and offer that")
        size = manifest.chunk_size
        if size > MAX_CHUNK_SIZE:
            return ChunkResponse(**base, error=f"update {req.update_id}: the bundle's chunk_size {size} is over the "
                                               f"{MAX_CHUNK_SIZE} this server sends in one message")
        if req.chunk_size != size:
            return ChunkResponse(**base, error=f"chunk_size {req.chunk_size} differs from the manifest's {size}; "
                                               f"chunks are served at the manifest's size only")
        def moved() -> ChunkResponse:
            return ChunkResponse(**base, error=f"{cannot}: {req.path} is no longer a file inside the bundle directory "
                                               f"(it changed after the offer); export the bundle to a new directory "
                                               f"and offer that")

        def unreadable(exc: OSError) -> ChunkResponse:
            return ChunkResponse(**base, error=f"{cannot}: {req.path}: cannot read ({exc.strerror or exc}); give the "
                                               f"user that runs the controller read access")
        entry = next((f for f in manifest.files if f.path == req.path), None)
        file = (root / req.path).resolve()
        if entry is None:
            return ChunkResponse(**base, error=f"file {req.path!r} is not part of update {req.update_id}")
        try:
            is_file = file.is_file()
        except OSError as exc:  # a directory on the way made unsearchable after the offer
            return unreadable(exc)
        if root not in file.parents or not is_file:  # replaced after the offer: a link out, a directory
            return moved()
        if req.index >= len(entry.chunks):
            return ChunkResponse(**base, error=f"chunk {req.index} of {req.path}: the file has "
                                               f"{len(entry.chunks)} chunk(s)")
        try:
            # not following a link put in the file's place, nor blocking on a FIFO swapped in since the check above
            # (the MQTT thread runs this; a directory on the way swapped for a link is still followed)
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:  # a file made unreadable after the offer (mode, owner), replaced by a link
            if exc.errno == errno.ELOOP:
                return moved()
            return unreadable(exc)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return moved()
            data = os.pread(fd, size, req.index * size)
        except OSError as exc:  # an I/O error
            return unreadable(exc)
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != entry.chunks[req.index]:
            return ChunkResponse(**base, error=f"{cannot}: chunk {req.index} of {req.path} does not match the "
                                               f"bundle's manifest: the file changed after the offer (truncated, "
                                               f"copied over or exported again in place); export the bundle to a "
                                               f"new directory and offer that")
        encoded = base64.b64encode(data).decode()
        # the JSON around the data is the rest of the answer (ids and path are JSON-escaped there)
        if len(encoded) + len(ChunkResponse(**base, data_b64="").model_dump_json()) > MAX_RESPONSE_BYTES:
            return ChunkResponse(**base, error=f"chunk {req.index} of {req.path} does not fit in one "
                                               f"{MAX_RESPONSE_BYTES}-byte answer")
        return ChunkResponse(**base, data_b64=encoded)


UNSERVABLE_ANSWERS = 2  # "cannot be served" answers to a chunk's requests that fail the update


class _Unservable(str):
    """What `_problem` says of a "cannot be served" answer to this very request."""


class MqttChunkFetcher:
    """Agent side: `read_chunk` by request/response through an `agent.mqtt.MqttSession`-like object.

    `request(req) -> Future[Message]` is handed in. A chunk that does not arrive within
    `timeout_s` is asked for again (the broker may be restarting; the session reconnects), up
    to `give_up_s` in all; then the update fails (its verified chunks are kept for an offer of the same
    bundle, which resumes from them; a restart during the download resumes from the last verified chunk).
    An unanswered chunk is logged as a warning at once and then once a minute, and its answer, when it
    comes, as info.
    """

    def __init__(self, request: Callable[[ChunkRequest], object], timeout_s: float = 10.0, give_up_s: float = 300.0):
        self.request, self.timeout_s, self.give_up_s = request, timeout_s, give_up_s

    def read_chunk(self, offer: Offer, path: str, index: int, chunk_size: int) -> bytes:
        start = time.monotonic()
        deadline, next_warning = start + self.give_up_s, 0.0
        refused = unservable = 0
        while True:
            req = ChunkRequest(id=uuid.uuid4().hex, update_id=offer.update_id, path=path, index=index,
                               chunk_size=chunk_size)
            future = self.request(req)
            try:
                message = future.result(timeout=self.timeout_s)
            except CancelledError:  # the session closed under it: the agent is stopping
                raise UpdateInterrupted(f"chunk {index} of {path}: the MQTT session closed") from None
            except FutureTimeout:
                future.cancel()
                now = time.monotonic()
                if now > deadline:
                    raise UpdateFailed(f"chunk {index} of {path}: no answer from the controller within "
                                       f"{self.give_up_s:g} s") from None
                waited = now - start
                if waited >= next_warning:  # the first time, then once a minute: a stalled download is visible
                    log.warning("OTA %s: chunk %d of %s: no answer from the controller for %.0f s (is `edgeglm "
                                "fleet serve` running and the broker reachable?); asking again every %g s, "
                                "giving up after %g s", offer.update_id, index, path, waited, self.timeout_s,
                                self.give_up_s)
                    next_warning = waited + CHUNK_WARNING_EVERY_S
                continue
            if next_warning:
                log.info("OTA %s: chunk %d of %s answered after %.0f s; the download goes on", offer.update_id,
                         index, path, time.monotonic() - start)
            problem = self._problem(message.payload, offer, path, index)
            if isinstance(problem, bytes):
                return problem
            if isinstance(problem, _Unservable):
                # the bundle changed on the controller: its answer stays the same. Failed at the second such answer
                # (not after three, as "answers refused", read as forgeries); one alone may be forged, by anyone
                # who sees the request
                unservable += 1
                if unservable >= UNSERVABLE_ANSWERS:
                    raise UpdateFailed(f"chunk {index} of {path}: {problem}")
            refused += 1
            if refused >= ANSWER_ATTEMPTS:
                raise UpdateFailed(f"chunk {index} of {path}: {problem} ({refused} answers refused)")
            log.warning("OTA %s: chunk %d of %s: %s; asking again", offer.update_id, index, path, problem)

    @staticmethod
    def _problem(payload: bytes, offer: Offer, path: str, index: int) -> bytes | str:
        """The chunk's bytes from an answer, or what is wrong with the answer."""
        try:
            resp = ChunkResponse.model_validate_json(payload)
        except ValidationError as exc:  # one line, not pydantic's report with its links
            first = exc.errors(include_url=False)[0]
            where = ".".join(map(str, first["loc"])) or "(the message)"
            return f"the controller's answer is not a valid chunk answer ({where}: {first['msg']})"
        if resp.error:  # (anyone who sees the request may answer: its text goes to the log without control characters)
            if CANNOT_SERVE in resp.error and (resp.path, resp.index, resp.update_id) == (path, index, offer.update_id):
                return _Unservable(f"the controller cannot serve it: {_printable(resp.error)}")
            return f"the controller answered: {_printable(resp.error)}"
        if (resp.path, resp.index, resp.update_id) != (path, index, offer.update_id):
            return (f"the answer was for update {_printable(resp.update_id)} {_printable(resp.path)} chunk "
                    f"{resp.index}, not update {offer.update_id}")
        try:
            return base64.b64decode(resp.data_b64 or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            return f"the controller's answer holds no valid base64 data ({exc})"
