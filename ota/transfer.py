"""OTA chunk transfer over MQTT request/response: the payloads and both ends' logic.

The agent asks for one chunk at a time (`ChunkRequest`: update, file, index) on its
`ota/chunk/request` topic; the controller's chunk server answers on the agent's
`ota/chunk/response` topic with the bytes (base64 in JSON, so that the same exchange works
over MQTT 3.1.1, where the correlation id must be read from the payload). The broker never
holds a whole bundle: nothing is retained, and each message is one chunk (256 KiB by default).
The agent checks every chunk against the sha256 list of the signed manifest before writing it.
"""

from __future__ import annotations

import base64
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from ota.update import Offer, UpdateFailed


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


class ChunkSource:
    """Controller side: serves chunks of the bundles it has offered, by update id."""

    def __init__(self):
        self.bundles: dict[str, Path] = {}

    def add(self, update_id: str, bundle_dir: Path) -> None:
        self.bundles[update_id] = Path(bundle_dir).resolve()

    def serve(self, req: ChunkRequest) -> ChunkResponse:
        base = dict(id=req.id, update_id=req.update_id, path=req.path, index=req.index)
        root = self.bundles.get(req.update_id)
        if root is None:
            return ChunkResponse(**base, error=f"update {req.update_id!r} is not offered by this controller")
        file = (root / req.path).resolve()
        if root not in file.parents or not file.is_file():
            return ChunkResponse(**base, error=f"file {req.path!r} is not part of update {req.update_id}")
        with open(file, "rb") as f:
            f.seek(req.index * req.chunk_size)
            data = f.read(req.chunk_size)
        return ChunkResponse(**base, data_b64=base64.b64encode(data).decode())


class MqttChunkFetcher:
    """Agent side: `read_chunk` by request/response through an `agent.mqtt.MqttSession`-like object.

    `request(req) -> Future[Message]` is handed in. A chunk that does not arrive within
    `timeout_s` is asked for again (the broker may be restarting; the session reconnects), up
    to `give_up_s` in all; then the update fails and a later offer resumes from the last
    verified chunk.
    """

    def __init__(self, request: Callable[[ChunkRequest], object], timeout_s: float = 10.0, give_up_s: float = 300.0):
        self.request, self.timeout_s, self.give_up_s = request, timeout_s, give_up_s

    def read_chunk(self, offer: Offer, path: str, index: int, chunk_size: int) -> bytes:
        deadline = time.monotonic() + self.give_up_s
        while True:
            req = ChunkRequest(id=uuid.uuid4().hex, update_id=offer.update_id, path=path, index=index,
                               chunk_size=chunk_size)
            future = self.request(req)
            try:
                message = future.result(timeout=self.timeout_s)
            except FutureTimeout:
                future.cancel()
                if time.monotonic() > deadline:
                    raise UpdateFailed(f"chunk {index} of {path}: no answer from the controller within "
                                       f"{self.give_up_s:g} s") from None
                continue
            resp = ChunkResponse.model_validate_json(message.payload)
            if resp.error:
                raise UpdateFailed(f"chunk {index} of {path}: the controller answered: {resp.error}")
            if (resp.path, resp.index, resp.update_id) != (path, index, offer.update_id):
                raise UpdateFailed(f"chunk {index} of {path}: answer was for {resp.path} chunk {resp.index}")
            return base64.b64decode(resp.data_b64 or "")
