"""``devtrust gpu rim fetch``: NVIDIA's RIMs fetched from its RIM service (or a mirror that
answers the same way) into the RIM store, by an operator, never while appraising.

NVIDIA's service (https://rim.attestation.nvidia.com/v1/rim/, nvtrust's
``CcAdminUtils.fetch_rim_file``): ``GET {service}{ID}`` answers JSON ``{"id": ID, "rim":
base64 of the RIM file, "sha256": ..., "rim_format": "TCG" | "CORIM", ...}``. The IDs, as
nvtrust's local_gpu_verifier forms them:

- ``NV_GPU_DRIVER_GH100_<driver>`` (Hopper), ``NV_GPU_CC_DRIVER_<chip>_<driver>`` (Blackwell);
- ``NV_GPU_VBIOS_<project>_<project_sku>_<chip_sku>_<vbios>``, the VBIOS version without its
  dots, hex digits upper case (96.00.5E.00.01 -> 96005E0001).

Each answer is bounded (``MAX_RESPONSE`` bytes, ``timeout`` seconds in all), read strictly
(the id must be the one asked, ``rim`` base64, ``sha256`` when present the digest of the
decoded bytes, no key twice), and the RIM verified against the RIM roots (the store's
``add``) before it is kept; a RIM whose kind or version is not the one its ID names is not
kept either. Where a RIM came from (the URL) is its ``source`` in the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from devtrust.verifier.gpu import spdm
from devtrust.verifier.gpu.types import RimKind

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_RESPONSE",
    "FetchError",
    "Fetched",
    "IdError",
    "expected_rim",
    "fetch",
    "parse_envelope",
    "report_ids",
    "rim_url",
    "service_url",
]

DEFAULT_TIMEOUT_S = 30.0
MAX_RESPONSE = 4 * 1024 * 1024  # the JSON envelope; NVIDIA's RIMs are ~20 KiB
MAX_ID = 200
_CHUNK = 64 * 1024
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
FORMATS = {"TCG": "swid", "CORIM": "corim"}
_DRIVER_ID = re.compile(r"NV_GPU_(?:DRIVER_GH100|CC_DRIVER_[A-Z0-9]+)_(?P<version>[0-9.]+)")
_VBIOS_ID = re.compile(r"NV_GPU_VBIOS_[0-9A-Z]+_[0-9A-Z]+_[0-9A-Z]+_(?P<version>[0-9A-Fa-f]+)")
# A GPU chip's name as the first word of its certificates' CN: "GH100 A01 GSP FMC LF".
_CHIP = re.compile(r"G[A-Z]\d{3}")
HOPPER_DRIVER_CHIP = "GH100"  # nvtrust names every Hopper driver RIM GH100


class FetchError(Exception):
    """One ID could not be fetched or read as NVIDIA's answer: one line, naming the ID."""


class IdError(ValueError):
    """A RIM ID, service URL or report that cannot be used: a usage error."""


@dataclass(frozen=True)
class Fetched:
    rim_id: str
    url: str
    data: bytes  # the RIM file: a SWID tag or a signed CoRIM
    rim_format: str  # "swid" or "corim", as the service said ("" when it did not)


def service_url(url: str) -> tuple[str, bool]:
    """The service's base URL (ending in "/") and whether it is plain HTTP (a mirror on a
    network the operator trusts; the RIMs are signed, but an unanswered request is not).
    IdError for anything but http:// or https:// with a host."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise IdError(
            f"--service {url!r}: expected an https:// URL (or http:// for a mirror), such "
            "as https://rim.attestation.nvidia.com/v1/rim/"
        )
    if parts.query or parts.fragment:
        raise IdError(f"--service {url!r}: expected a base URL without ?query or #fragment")
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return (base if base.endswith("/") else base + "/"), parts.scheme == "http"


def check_id(rim_id: str) -> str:
    if len(rim_id) > MAX_ID or not _ID.fullmatch(rim_id):
        raise IdError(
            f"RIM ID {rim_id[:80]!r}: expected letters, digits, '.', '_' and '-' (at most "
            f"{MAX_ID}), such as NV_GPU_DRIVER_GH100_545.00"
        )
    return rim_id


def rim_url(service: str, rim_id: str) -> str:
    return service + urllib.parse.quote(check_id(rim_id), safe="._-")


def expected_rim(rim_id: str) -> tuple[RimKind, str] | None:
    """The kind and version a GPU RIM ID names (the VBIOS version as in the ID: digits
    without dots), or None for an ID of another form (kept if it verifies)."""
    if match := _DRIVER_ID.fullmatch(rim_id):
        return RimKind.DRIVER, match["version"]
    if match := _VBIOS_ID.fullmatch(rim_id):
        return RimKind.VBIOS, match["version"].upper()
    return None


def id_version(kind: RimKind, version: str) -> str:
    """A RIM's version as its ID writes it."""
    return version.replace(".", "").upper() if kind is RimKind.VBIOS else version


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Redirects are followed to http:// and https:// only, and never from https:// to
    http://."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme
        if scheme not in ("https", "http") or (
            req.full_url.startswith("https:") and scheme != "https"
        ):
            raise urllib.error.URLError(
                f"refused a redirect from {req.full_url[:120]} to {newurl[:120]}"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(service: str, rim_id: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Fetched:
    """``GET {service}{rim_id}`` within ``timeout`` seconds in all, at most ``MAX_RESPONSE``
    bytes, read as NVIDIA's envelope (``service`` as ``service_url`` returns it: http or
    https). FetchError names the ID, the URL and what to do."""
    url = rim_url(service, rim_id)
    body = _get(url, rim_id, timeout)
    return parse_envelope(body, rim_id, url)


def _too_big(rim_id: str, url: str, found: str) -> FetchError:
    return FetchError(
        f"{rim_id}: {url}: expected at most {MAX_RESPONSE} bytes, {found}: is it a RIM service?"
    )


def _read_bounded(response: Any, rim_id: str, url: str, deadline: float) -> bytes:
    """The body: at most MAX_RESPONSE bytes, read by ``deadline`` (TimeoutError past it)."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_RESPONSE:
        raise _too_big(rim_id, url, f"the answer has {length}")
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise _too_big(rim_id, url, "found more")
        if time.monotonic() > deadline:
            raise TimeoutError
        chunks.append(chunk)
    return b"".join(chunks)


def _get(url: str, rim_id: str, timeout: float) -> bytes:
    # The scheme is http or https (service_url); redirects stay so (_NoDowngrade).
    headers = {"Accept": "application/json", "User-Agent": "devtrust-gpu-rim-fetch"}
    # NVIDIA's service may want a developer key (its RIM guide: Authorization: Bearer KEY);
    # taken from the environment, never from an option that would show in `ps`, and sent
    # over https only (an http mirror would show it to the network).
    key = os.environ.get("NVIDIA_API_KEY", "").strip()
    if key and urllib.parse.urlsplit(url).scheme == "https":
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    opener = urllib.request.build_opener(_NoDowngrade)
    deadline = time.monotonic() + timeout
    host = urllib.parse.urlsplit(url).netloc
    try:
        with opener.open(request, timeout=timeout) as response:
            return _read_bounded(response, rim_id, url, deadline)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FetchError(
                f"{rim_id}: NVIDIA publishes no RIM {rim_id} ({url} answered 404): check the "
                "ID (the driver and VBIOS versions), or the mirror's copy"
            ) from None
        raise FetchError(f"{rim_id}: {url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise FetchError(_timed_out(rim_id, url, timeout)) from None
        raise FetchError(
            f"{rim_id}: cannot reach {host}: {exc.reason}: check --service (or gpu.rim_service) "
            "and the network"
        ) from None
    except TimeoutError:
        raise FetchError(_timed_out(rim_id, url, timeout)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"{rim_id}: {url}: the connection failed: {exc!r}") from None


def _timed_out(rim_id: str, url: str, timeout: float) -> str:
    return f"{rim_id}: {url} did not answer within {timeout:g} s (--timeout)"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} twice")
        out[key] = value
    return out


def parse_envelope(body: bytes, rim_id: str, url: str) -> Fetched:
    """NVIDIA's answer for ``rim_id``, strictly: a JSON object whose id is ``rim_id``, whose
    rim is base64 of a non-empty file, whose sha256 (when present) is that file's digest, and
    whose rim_format (when present) is TCG or CORIM. FetchError names what does not fit."""
    what = f"{rim_id}: {url}"
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FetchError(
            f"{what}: expected NVIDIA's JSON answer, found {body[:40]!r}: {exc}"
        ) from None
    if not isinstance(document, dict):
        raise FetchError(f"{what}: expected a JSON object, found {type(document).__name__}")
    found = document.get("id")
    if found != rim_id:
        raise FetchError(
            f"{what}: expected the RIM {rim_id}, the answer is for {str(found)[:80]!r}"
        )
    encoded = document.get("rim")
    if not isinstance(encoded, str) or not encoded.strip():
        raise FetchError(f"{what}: expected the RIM as base64 text in 'rim', found none")
    try:
        data = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FetchError(f"{what}: 'rim' is not base64: {exc}") from None
    digest = document.get("sha256")
    if digest is not None:
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise FetchError(f"{what}: 'sha256': expected 64 hex digits, found {digest!r:.80}")
        # Of the file, or of the base64 text that carries it: NVIDIA does not document
        # which; either way the RIM's own signature is what is trusted, this only catches a
        # transfer that went wrong.
        actual = hashlib.sha256(data).hexdigest()
        carried = hashlib.sha256(encoded.encode()).hexdigest()
        if digest.lower() not in (actual, carried):
            raise FetchError(
                f"{what}: the RIM's sha256 is {actual}, the answer says {digest.lower()}: "
                "the file was changed or cut on the way"
            )
    rim_format = document.get("rim_format")
    if rim_format is not None and rim_format not in FORMATS:
        raise FetchError(
            f"{what}: 'rim_format': expected TCG or CORIM, found {str(rim_format)[:40]!r}"
        )
    return Fetched(rim_id, url, data, FORMATS.get(rim_format, "") if rim_format else "")


@dataclass(frozen=True)
class ReportIds:
    driver: str
    vbios: str
    chip: str  # from the attestation key certificate's CN


def report_ids(report: bytes, chain: Sequence[x509.Certificate], *, name: str) -> ReportIds:
    """The driver and VBIOS RIM IDs an attestation report needs, as nvtrust forms them. The
    chip is the first word of the leaf certificate's CN ("GH100 A01 GSP FMC LF"): a Hopper
    chip (GH1xx) takes NVIDIA's Hopper driver ID (NV_GPU_DRIVER_GH100_...), another chip the
    Blackwell form (NV_GPU_CC_DRIVER_<chip>_...). The report's signature is not checked
    here: the RIMs fetched are verified on their own, and `gpu check` checks the report."""
    try:
        parsed = spdm.parse_report(report)
    except spdm.SpdmFormatError as exc:
        raise IdError(f"--report {name}: not an attestation report: {exc}") from None
    opaque = parsed.response.opaque
    fields: dict[str, str] = {}
    for key in ("driver_version", "vbios_version", "project", "project_sku", "chip_sku"):
        value = opaque.get(key)
        if not isinstance(value, str) or not value.strip():
            raise IdError(
                f"--report {name}: the report's opaque data has no {key}: the RIM IDs "
                "cannot be formed (give the IDs)"
            )
        fields[key] = value.strip().upper()
    if not chain:
        raise IdError("--chain: expected the GPU's certificates, found none")
    names = chain[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    words = common_name.split()
    if not words or not _CHIP.fullmatch(words[0]):
        raise IdError(
            f"--chain: the attestation key certificate's CN {common_name[:80]!r} does not "
            "start with a GPU chip name (such as GH100): give the driver RIM's ID"
        )
    chip = words[0]
    if chip.startswith("GH1"):
        driver = f"NV_GPU_DRIVER_{HOPPER_DRIVER_CHIP}_{fields['driver_version']}"
    else:
        driver = f"NV_GPU_CC_DRIVER_{chip}_{fields['driver_version']}"
    vbios = "_".join(
        (
            "NV_GPU_VBIOS",
            fields["project"],
            fields["project_sku"],
            fields["chip_sku"],
            id_version(RimKind.VBIOS, fields["vbios_version"]),
        )
    )
    return ReportIds(driver=check_id(driver), vbios=check_id(vbios), chip=chip)
