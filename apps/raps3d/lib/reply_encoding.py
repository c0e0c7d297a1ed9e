"""Infer replies gzip-encoded on the wire for clients that accept it.

OHIF asks for the label as a raw NRRD of the whole volume (``result_compress: false``): 79 MB for a 512 x 512 x 300 CT,
on every click, though it is nearly all zeros. Encoded with gzip at level 1 it is about 0.35 MB and takes about
0.08 s; a browser (and Python's ``requests``) decodes it without being asked, so the label a client reads is the same
byte for byte. Clients that do not send ``Accept-Encoding: gzip`` (Python's ``http.client``, which MONAI Label's
client library uses for most requests) get the reply as before. Labels already compressed (``.nii.gz``, an NRRD with
gzip encoding, DICOM SEG) are sent as they are.
"""

from __future__ import annotations

import gzip
import zlib

from starlette.responses import FileResponse, Response, StreamingResponse

LEVEL = 1  # the label is mostly zeros: level 1 already shrinks it ~200 times, and is the fastest
MIN_BYTES = 64 * 1024  # smaller replies are not worth encoding
CHUNK = 1 << 20
_NRRD_HEADER_BYTES = 4096


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip: named with a quality above 0, or not named and ``*``
    accepted (an explicit ``gzip;q=0`` refuses it whatever ``*`` says)."""
    qualities = {}
    for part in (accept_encoding or "").split(","):
        name, *params = [p.strip() for p in part.split(";")]
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        qualities[name.lower()] = quality
    named = [qualities[n] for n in ("gzip", "x-gzip") if n in qualities]
    if named:
        return max(named) > 0
    return qualities.get("*", 0.0) > 0


def _uncompressed_label(path: str) -> bool:
    lower = path.lower()
    if lower.endswith(".nii"):
        return True
    if lower.endswith(".nrrd"):
        with open(path, "rb") as f:
            head = f.read(_NRRD_HEADER_BYTES)
        return b"\nencoding: raw\n" in head
    return False


def _gzip_file(path: str):
    """The file gzip-encoded, chunk by chunk. The file is opened for each chunk, not held between them: a client
    that goes away mid-reply leaves this generator unfinished, and an open file would keep the deleted label's disk
    space until the generator happens to be collected."""
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    offset = 0
    while True:
        with open(path, "rb") as f:
            f.seek(offset)
            block = f.read(CHUNK)
        if not block:
            break
        offset += len(block)
        data = compressor.compress(block)
        if data:
            yield data
    yield compressor.flush()


def encode_reply(response, accept_encoding: str | None):
    """``response`` (what MONAI Label's infer endpoint returns) gzip-encoded where the client accepts it and it is
    worth it; otherwise ``response`` itself."""
    if not accepts_gzip(accept_encoding) or not isinstance(response, Response):
        return response
    headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    if isinstance(response, FileResponse):  # output=image: the label file
        path = str(response.path)
        if not _uncompressed_label(path):
            return response
        disposition = response.headers.get("content-disposition")
        if disposition:
            headers["Content-Disposition"] = disposition
        return StreamingResponse(_gzip_file(path), media_type=response.media_type, headers=headers)
    body = getattr(response, "body", b"")
    if isinstance(response, StreamingResponse) or len(body) < MIN_BYTES:
        return response
    # The multipart reply (no output given: params and label together), already in memory.
    return Response(gzip.compress(body, compresslevel=LEVEL), media_type=response.media_type, headers=headers)
