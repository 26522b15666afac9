"""The device side of the chunk protocol (`ota.transfer.MqttChunkFetcher`) against answers a controller may send:
a bad one is asked for again, and the third fails the update with one line naming the chunk and what is wrong (the
reason the fleet sees), and a
session closed under a waiting request stops the update for a resume instead of failing it."""

from __future__ import annotations

import base64
import json
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from ota.bundle import open_bundle
from ota.offers import make_offer
from ota.transfer import ChunkResponse, MqttChunkFetcher
from ota.update import UpdateFailed, UpdateInterrupted


@pytest.fixture
def offer(signed_bundles):
    return make_offer(open_bundle(signed_bundles["v1"]), "u1", {"type": "mqtt"})


def _answering(payload_for):
    """A `request` that answers every chunk request at once with payload_for(req) (bytes)."""
    def request(req):
        future = Future()
        future.set_result(SimpleNamespace(payload=payload_for(req)))
        return future
    return request


def _answer(req, **fields) -> bytes:
    return ChunkResponse(id=req.id, update_id=req.update_id, path=req.path, index=req.index, **fields
                         ).model_dump_json().encode()


@pytest.mark.parametrize("payload_for, words", [
    (lambda req: b"{not json", "chunk 0 of manifest.json: the controller's answer is not a valid chunk answer ("),
    (lambda req: json.dumps({"id": req.id, "update_id": req.update_id, "path": req.path, "index": req.index,
                             "data_b64": "", "surprise": 1}).encode(),
     "the controller's answer is not a valid chunk answer (surprise: Extra inputs are not permitted)"),
    (lambda req: _answer(req, data_b64="abc"), "chunk 0 of manifest.json: the controller's answer holds no valid "
                                               "base64 data ("),
    (lambda req: _answer(req, data_b64="a$b*"), "holds no valid base64 data"),
    (lambda req: _answer(req, error="no such update"), "chunk 0 of manifest.json: the controller answered: no such "
                                                       "update"),
])
def test_a_bad_answer_is_one_line_naming_the_chunk(offer, payload_for, words):
    """Invalid JSON or an unknown field was pydantic's multi-line report with its links; bad base64 was
    "Error: Incorrect padding", naming no chunk; characters outside base64 were silently dropped."""
    fetcher = MqttChunkFetcher(_answering(payload_for), timeout_s=1.0, give_up_s=2.0)
    with pytest.raises(UpdateFailed) as info:
        fetcher.read_chunk(offer, "manifest.json", 0, 4096)
    assert words in str(info.value) and "\n" not in str(info.value) and "pydantic.dev" not in str(info.value)


def test_one_forged_answer_does_not_fail_the_download_and_the_right_one_is_taken(offer):
    """Anyone who sees a request's id (on the request topic, or in the payload on MQTT 3.1.1) can answer it first:
    one answer with an error, or for another update or chunk, failed the whole download. Such an answer is refused
    and the chunk asked for again (a new request); the third refused answer fails it, naming the update."""
    data = b"the real chunk"
    answers = iter([lambda req: _answer(req, error="no such update"),
                    lambda req: _answer(req.model_copy(update={"update_id": "other"}), data_b64="AAAA"),
                    lambda req: _answer(req, data_b64=base64.b64encode(data).decode())])
    asked = []

    def payload_for(req):
        asked.append(req.id)
        return next(answers)(req)

    assert MqttChunkFetcher(_answering(payload_for)).read_chunk(offer, "manifest.json", 0, 4096) == data
    assert len(set(asked)) == 3  # each time a new request
    fetcher = MqttChunkFetcher(_answering(lambda req: _answer(req.model_copy(update={"update_id": "u9"}))))
    with pytest.raises(UpdateFailed, match=r"the answer was for update u9 manifest.json chunk 0, not update u1 "
                                           r"\(3 answers refused\)"):
        fetcher.read_chunk(offer, "manifest.json", 0, 4096)


def test_a_bundle_the_controller_cannot_serve_fails_the_download_at_its_second_answer(offer):
    """The controller's "cannot be served" (its bundle changed after the offer) was refused as a forged answer: asked
    three times, failed with "(3 answers refused)", which reads as an attack or a bad link, not as the operator's to
    fix. The second such answer for this very chunk fails it, in the controller's words (one alone may be forged);
    one for another chunk is still refused as any answer that is not for the request."""
    asked = []

    def payload_for(req):
        asked.append(req.id)
        return _answer(req, error=f"update {req.update_id} cannot be served: the bundle directory: chunk 0 of "
                                  f"manifest.json does not match the bundle's manifest")
    with pytest.raises(UpdateFailed, match=r"^chunk 0 of manifest.json: the controller cannot serve it: update u1 "
                                           r"cannot be served: the bundle directory: chunk 0 of manifest.json does not "
                                           r"match the bundle's manifest$"):
        MqttChunkFetcher(_answering(payload_for)).read_chunk(offer, "manifest.json", 0, 4096)
    assert len(asked) == 2
    data = b"the real chunk"  # one forged "cannot be served" first: the real answer is still taken
    answers = iter([lambda req: _answer(req, error=f"update {req.update_id} cannot be served: forged"),
                    lambda req: _answer(req, data_b64=base64.b64encode(data).decode())])
    assert MqttChunkFetcher(_answering(lambda req: next(answers)(req))).read_chunk(offer, "manifest.json", 0,
                                                                                  4096) == data
    other = MqttChunkFetcher(_answering(lambda req: _answer(req.model_copy(update={"index": 5}),
                                                            error="update u1 cannot be served: the bundle directory")))
    with pytest.raises(UpdateFailed, match=r"\(3 answers refused\)"):
        other.read_chunk(offer, "manifest.json", 0, 4096)


def test_a_good_answer_is_the_chunks_bytes(offer):
    data = b"\x00\x01chunk bytes\xff"
    fetcher = MqttChunkFetcher(_answering(lambda req: _answer(req, data_b64=base64.b64encode(data).decode())))
    assert fetcher.read_chunk(offer, "manifest.json", 0, 4096) == data


def test_a_session_closed_while_a_chunk_is_awaited_interrupts_the_update(offer):
    """MqttSession.close() cancels the requests it holds: that was a CancelledError, and the update failed."""
    def request(req):
        future = Future()
        future.cancel()
        return future

    with pytest.raises(UpdateInterrupted, match="chunk 3 of manifest.json: the MQTT session closed"):
        MqttChunkFetcher(request, timeout_s=1.0).read_chunk(offer, "manifest.json", 3, 4096)


def test_an_offer_whose_manifest_is_not_base64_is_refused_when_read(offer):
    """It was taken, and failed in OFFERED with "Error: Only base64 data is allowed" (naming nothing); a state file
    holding one is now unreadable at start, moved aside, like any other damaged state."""
    from pydantic import ValidationError

    from ota.update import Offer

    with pytest.raises(ValidationError, match="manifest_b64\n.*not valid base64"):
        Offer.model_validate({**offer.model_dump(), "manifest_b64": "not base64!"})


@pytest.mark.parametrize("change, words", [
    ({"source": {"type": "dir"}}, "a dir source needs an absolute 'path' (got None)"),
    ({"source": {"type": "dir", "path": 5}}, "a dir source needs an absolute 'path' (got 5)"),
    ({"source": {"type": "dir", "path": "relative/dir"}}, "absolute 'path'"),
    ({"source": {"type": "ftp"}}, "type 'ftp' is not a source this agent fetches from (mqtt, dir)"),
    ({"update_id": "u1\n2026-11-28 INFO edgeglm.ota: forged"}, "update_id\n  String should match pattern"),
    ({"update_id": "with space"}, "String should match pattern"),
])
def test_an_offer_with_a_hostile_source_or_update_id_is_refused_when_read(offer, change, words):
    """A dir source without a path was KeyError 'path' at DOWNLOADING, a non-string path a TypeError; an update id
    with a newline went into journal lines as it was (a forged log line)."""
    from pydantic import ValidationError

    from ota.update import Offer

    with pytest.raises(ValidationError) as info:
        Offer.model_validate({**offer.model_dump(), **change})
    assert words in str(info.value)
    Offer.model_validate({**offer.model_dump(), "source": {"type": "dir", "path": "/srv/bundles/v1"}})
    Offer.model_validate({**offer.model_dump(), "update_id": "plant7-d1-1.2.0-1764288000000:rb"})


def test_a_manifest_chunk_size_over_what_a_request_may_ask_for_is_an_invalid_manifest(offer):
    """A signed manifest with chunk_size over 16 MiB passed, then failed at DOWNLOADING with pydantic's multi-line
    report about ChunkRequest."""
    from pydantic import ValidationError

    from ota.bundle import Manifest

    data = json.loads(offer.manifest_bytes())
    with pytest.raises(ValidationError, match="chunk_size"):
        Manifest.model_validate({**data, "chunk_size": 32 << 20})
