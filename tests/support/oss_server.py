"""A small in-memory HTTP server speaking enough of Alibaba OSS's REST/XML dialect for oss2.

Hand-written because no OSS emulator is installable here, and the oss2 client must be exercised
for real (not mocked). It listens on 127.0.0.1 (oss2 then uses path-style URLs:
http://127.0.0.1:PORT/bucket/key) and implements PutObject, GetObject (Range, 206,
x-oss-range-behavior: standard), HeadObject, DeleteObject, DeleteMultipleObjects, ListObjects
(v1: prefix, marker, max-keys, delimiter, encoding-type, pagination), and multipart upload
(Initiate, UploadPart, Complete, Abort). It checks the Authorization header: the AccessKeyId, and
the V1 (HMAC-SHA1) or V4 (OSS4-HMAC-SHA256) signature, answering 403 with OSS's error XML.
CRC64-ECMA checksums are returned as x-oss-hash-crc64ecma so oss2's integrity checks run.

Fault injection for resilience tests: `fail_next` answers the next N matching requests with an
error status; `reset_next` cuts the connection in the middle of the next N matching responses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import re
import socket
import struct
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

import crcmod  # installed with oss2

# CRC-64/XZ (ECMA-182 polynomial, reflected, xor-out all ones): what OSS calls crc64ecma.
_crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)

OSS_TEST_ACCESS_KEY_ID = "test-access-key-id"
OSS_TEST_ACCESS_KEY_SECRET = "test-access-key-secret"
OSS_TEST_BUCKET = "test-bucket"

MIN_PART_SIZE = 100 * 1024  # OSS rejects smaller non-last parts with EntityTooSmall

# Query parameters that OSS's V1 signature includes in the canonicalized resource (the subset
# relevant to the operations served here, plus a few common ones).
_V1_SUBRESOURCES = frozenset(
    ["acl", "uploads", "uploadId", "partNumber", "delete", "location", "append", "position",
     "security-token", "tagging", "objectMeta", "symlink", "restore", "versionId", "versions",
     "versioning", "x-oss-process", "continuation-token", "response-content-type",
     "response-content-disposition", "response-cache-control", "response-expires"]
)


@dataclass
class StoredObject:
    data: bytes
    content_type: str
    mtime: float = field(default_factory=time.time)

    @property
    def etag(self) -> str:
        return hashlib.md5(self.data).hexdigest().upper()


@dataclass
class Upload:
    bucket: str
    key: str
    content_type: str
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass
class Fault:
    kind: str  # "fail" or "reset"
    remaining: int
    op: str | None
    status: int = 500
    code: str = "InternalError"
    key: str | None = None  # only requests for this object key (None: any key)


@dataclass(frozen=True)
class Call:
    op: str
    bucket: str
    key: str


class OssError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class OssTestServer:
    """In-memory OSS on 127.0.0.1:<random port>. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        access_key_id: str = "test-access-key-id",
        access_key_secret: str = "test-access-key-secret",
        security_token: str | None = None,
        region: str | None = None,
        verify_signature: bool = True,
    ) -> None:
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.security_token = security_token
        self.region = region  # if set, V4 requests must be scoped to it
        self.verify_signature = verify_signature
        self.default_bucket = "test-bucket"
        self.max_keys_cap = 1000  # lower it to force pagination whatever the client asks for
        self.buckets: dict[str, dict[str, StoredObject]] = {}
        self.uploads: dict[str, Upload] = {}
        self.calls: list[Call] = []
        self._faults: list[Fault] = []
        self._die_after: tuple[int, str] | None = None
        self._dead = False
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> OssTestServer:
        server = self

        class _Httpd(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def process_request(self, request, client_address):  # type: ignore[override]
                with server._lock:
                    server._conns.add(request)
                super().process_request(request, client_address)

            def handle_error(self, request, client_address):  # type: ignore[override]
                if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that hang up are normal
                    super().handle_error(request, client_address)

            def shutdown_request(self, request):  # type: ignore[override]
                with server._lock:
                    server._conns.discard(request)
                super().shutdown_request(request)

        handler = type("Handler", (_Handler,), {"oss": self})
        self._httpd = _Httpd(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="oss-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns.clear()
        self._httpd = None

    def __enter__(self) -> OssTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- state helpers for tests -----------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        with self._lock:
            self.buckets.setdefault(name, {})

    def url(self, key: str = "", bucket: str | None = None) -> str:
        return f"oss://{bucket or self.default_bucket}/{key}"

    def objects(self) -> dict[str, bytes]:
        """Every stored object as {"bucket/key": data}."""
        with self._lock:
            return {f"{b}/{k}": o.data for b, objs in self.buckets.items() for k, o in objs.items()}

    def keys(self, bucket: str | None = None) -> list[str]:
        with self._lock:
            return sorted(self.buckets[bucket or self.default_bucket])

    def count(self, op: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.op == op)

    def fail_next(
        self, n: int, op: str | None = None, status: int = 500, code: str = "InternalError", key: str | None = None
    ) -> None:
        """Answer the next n requests of operation `op` (None: any) on `key` (None: any) with an error status."""
        with self._lock:
            self._faults.append(Fault("fail", n, op, status, code, key))

    def reset_next(self, n: int, op: str | None = "GetObject", key: str | None = None) -> None:
        """Cut the connection mid-response (after half the body) for the next n `op` requests (on `key`)."""
        with self._lock:
            self._faults.append(Fault("reset", n, op, key=key))

    def die_after(self, n: int, op: str = "GetObject") -> None:
        """The endpoint dies once n `op` requests were answered: later requests are dropped
        unanswered and the server stops listening (connections refused), whatever the client's pace."""
        with self._lock:
            self._die_after = (n, op)

    def _dying(self, op: str) -> bool:
        with self._lock:
            if not self._dead and self._die_after is not None:
                n, die_op = self._die_after
                self._dead = op == die_op and sum(1 for c in self.calls if c.op == die_op) > n
                if self._dead:
                    threading.Thread(target=self.stop, daemon=True).start()
            return self._dead

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, op: str, key: str = "") -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.remaining > 0 and (f.op is None or f.op == op) and (f.key is None or f.key == key):
                    f.remaining -= 1
                    return f
            return None

    def next_request_id(self) -> str:
        return f"{next(self._ids):08X}{uuid.uuid4().hex[:16].upper()}"


# ------------------------------------------------------------------------------------------
# Request handling
# ------------------------------------------------------------------------------------------


def _iso8601(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


def _v4_encode(text: str, keep_slash: bool) -> str:
    safe = "-_.~" + ("/" if keep_slash else "")
    return quote(text, safe=safe)


def _classify(method: str, key: str, query: dict[str, str]) -> str:
    if not key:
        if method == "GET" and "uploads" not in query:
            return "ListObjects"
        if method == "POST" and "delete" in query:
            return "DeleteMultipleObjects"
        return f"Unsupported{method}Bucket"
    if method == "PUT":
        return "UploadPart" if "uploadId" in query else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "InitiateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "UnsupportedPostObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "HEAD":
        return "HeadObject"
    return "GetObject"


class _Handler(BaseHTTPRequestHandler):
    oss: OssTestServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end after this
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- plumbing ------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self, method: str) -> None:
        self.request_id = self.oss.next_request_id()
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        raw_bucket, _, raw_key = parts.path.lstrip("/").partition("/")
        bucket, key = unquote(raw_bucket), unquote(raw_key)
        body = self._read_body()
        op = _classify(method, key, query)
        with self.oss._lock:
            self.oss.calls.append(Call(op, bucket, key))
        self.method, self.bucket, self.key, self.query = method, bucket, key, query
        if self.oss._dying(op):
            self._abort_connection()
            return

        fault = self.oss._take_fault(op, key)
        self._reset_pending = False
        if fault is not None and fault.kind == "fail":
            self._error(OssError(fault.status, fault.code, "Injected failure."))
            return
        self._reset_pending = fault is not None and fault.kind == "reset"

        try:
            self._authenticate(method, bucket, key, query)
            if not bucket:
                raise OssError(400, "NotImplemented", "Service-level operations are not supported.")
            with self.oss._lock:
                if bucket not in self.oss.buckets:
                    raise OssError(404, "NoSuchBucket", "The specified bucket does not exist.", BucketName=bucket)
            getattr(self, f"_op_{op}", self._op_unsupported)(body)
        except OssError as e:
            self._error(e)

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", length: int | None = None) -> None:
        if self._reset_pending and (self.method == "HEAD" or not body):
            self._abort_connection()  # nothing to cut in half: drop the connection unanswered
            return
        self.send_response(status)
        self.send_header("x-oss-request-id", self.request_id)
        self.send_header("Date", formatdate(usegmt=True))
        self.send_header("Server", "AliyunOSS")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.method == "HEAD":
            return
        if self._reset_pending:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self._abort_connection()
            return
        self.wfile.write(body)

    def _abort_connection(self) -> None:
        # SO_LINGER 0 makes close() send a TCP RST: the client sees "connection reset by peer".
        self._reset_pending = False
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _xml(self, status: int, xml: str, headers: dict[str, str] | None = None) -> None:
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n' + xml).encode()
        self._send(status, {"Content-Type": "application/xml", **(headers or {})}, body)

    def _error(self, e: OssError) -> None:
        extra = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in e.extra.items())
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{e.code}</Code>'
            f"<Message>{escape(e.message)}</Message><RequestId>{self.request_id}</RequestId>"
            f"<HostId>127.0.0.1</HostId>{extra}</Error>"
        )
        if self.method == "HEAD":  # no body on HEAD: OSS puts the error XML in x-oss-err
            self._send(e.status, {"x-oss-err": base64.b64encode(xml.encode()).decode()}, length=0)
        else:
            self._send(e.status, {"Content-Type": "application/xml"}, xml.encode())

    # -- authentication ------------------------------------------------------------------------

    def _authenticate(self, method: str, bucket: str, key: str, query: dict[str, str]) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            raise OssError(403, "AccessDenied", "AccessDenied: anonymous access is not allowed.")
        m1 = re.fullmatch(r"OSS ([^:]+):(.+)", auth)
        v4 = self._parse_v4(auth)
        if m1 is not None:
            akid, signature = m1.groups()
        elif v4 is not None:
            akid, signature = v4["akid"], v4["signature"]
        else:
            raise OssError(400, "InvalidArgument", "Authorization header is invalid.")
        if akid != self.oss.access_key_id:
            raise OssError(
                403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.",
                OSSAccessKeyId=akid,
            )
        token = self.headers.get("x-oss-security-token")
        if self.oss.security_token is not None and token != self.oss.security_token:
            raise OssError(403, "InvalidAccessKeyId", "The security token you provided is invalid.",
                           OSSAccessKeyId=akid)
        if not self.oss.verify_signature:
            return
        if m1 is not None:
            string_to_sign = self._v1_string_to_sign(method, bucket, key, query)
            digest = hmac.new(self.oss.access_key_secret.encode(), string_to_sign, hashlib.sha1).digest()
            expected = base64.b64encode(digest).decode()
        else:
            assert v4 is not None
            date, region = v4["date"], v4["region"]
            if self.oss.region is not None and region != self.oss.region:
                raise OssError(403, "SignatureDoesNotMatch", f"Invalid signing region {region!r}.",
                               OSSAccessKeyId=akid)
            extra_headers = [h.lower() for h in v4["additional"].split(";") if h]
            string_to_sign = self._v4_string_to_sign(method, bucket, key, query, date, region, extra_headers)
            signing_key = ("aliyun_v4" + self.oss.access_key_secret).encode()
            for part in (date, region, "oss", "aliyun_v4_request"):
                signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
            expected = hmac.new(signing_key, string_to_sign, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise OssError(
                403, "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. "
                "Check your key and signing method.",
                OSSAccessKeyId=akid, SignatureProvided=signature,
                StringToSign=string_to_sign.decode("utf-8", "replace"),
            )

    @staticmethod
    def _parse_v4(auth: str) -> dict[str, str] | None:
        """Fields of 'OSS4-HMAC-SHA256 Credential=id/date/region/oss/aliyun_v4_request, Signature=..'."""
        if not auth.startswith("OSS4-HMAC-SHA256 "):
            return None
        fields = dict(
            item.strip().split("=", 1) for item in auth.removeprefix("OSS4-HMAC-SHA256 ").split(",") if "=" in item
        )
        scope = fields.get("Credential", "").split("/")
        if len(scope) != 5 or scope[3:] != ["oss", "aliyun_v4_request"] or "Signature" not in fields:
            return None
        return {"akid": scope[0], "date": scope[1], "region": scope[2], "signature": fields["Signature"],
                "additional": fields.get("AdditionalHeaders", "")}

    def _v1_string_to_sign(self, method: str, bucket: str, key: str, query: dict[str, str]) -> bytes:
        oss_headers = sorted((k.lower(), v) for k, v in self.headers.items() if k.lower().startswith("x-oss-"))
        canon_headers = "".join(f"{k}:{v}\n" for k, v in oss_headers)
        sub = sorted((k, v) for k, v in query.items() if k in _V1_SUBRESOURCES)
        subresource = ("?" + "&".join(f"{k}={v}" if v else k for k, v in sub)) if sub else ""
        resource = f"/{bucket}/{key}{subresource}" if bucket else f"/{subresource}"
        date = self.headers.get("x-oss-date") or self.headers.get("Date", "")
        return "\n".join(
            [method, self.headers.get("Content-MD5", ""), self.headers.get("Content-Type", ""), date,
             canon_headers + resource]
        ).encode()

    def _v4_string_to_sign(
        self, method: str, bucket: str, key: str, query: dict[str, str], date: str, region: str,
        extra_headers: list[str],
    ) -> bytes:
        uri = _v4_encode(f"/{bucket}/{key}" if bucket else "/", keep_slash=True)
        encoded = sorted((_v4_encode(k, False), _v4_encode(v, False)) for k, v in query.items())
        canon_query = "&".join(f"{k}={v}" if v else k for k, v in encoded)
        signed = sorted(
            (k.lower(), v) for k, v in self.headers.items()
            if k.lower().startswith("x-oss-") or k.lower() in ("content-type", "content-md5")
            or k.lower() in extra_headers
        )
        canon_headers = "".join(f"{k}:{v}\n" for k, v in signed)
        payload = self.headers.get("x-oss-content-sha256", "UNSIGNED-PAYLOAD")
        canonical = "\n".join([method, uri, canon_query, canon_headers, ";".join(sorted(extra_headers)), payload])
        scope = f"{date}/{region}/oss/aliyun_v4_request"
        return "\n".join(
            ["OSS4-HMAC-SHA256", self.headers.get("x-oss-date", ""), scope,
             hashlib.sha256(canonical.encode()).hexdigest()]
        ).encode()

    # -- object operations ---------------------------------------------------------------------

    def _objects(self) -> dict[str, StoredObject]:
        return self.oss.buckets[self.bucket]

    def _get_object(self) -> StoredObject:
        with self.oss._lock:
            obj = self._objects().get(self.key)
        if obj is None:
            raise OssError(404, "NoSuchKey", "The specified key does not exist.", Key=self.key)
        return obj

    def _check_md5(self, body: bytes) -> None:
        given = self.headers.get("Content-MD5")
        if given and given != base64.b64encode(hashlib.md5(body).digest()).decode():
            raise OssError(400, "InvalidDigest", "The Content-MD5 you specified is not valid.")

    def _op_unsupported(self, body: bytes) -> None:
        raise OssError(400, "NotImplemented", "This operation is not supported by the test server.")

    def _op_PutObject(self, body: bytes) -> None:
        self._check_md5(body)
        obj = StoredObject(body, self.headers.get("Content-Type", "application/octet-stream"))
        with self.oss._lock:
            objects = self._objects()
            if self.headers.get("x-oss-forbid-overwrite", "").lower() == "true" and self.key in objects:
                raise OssError(409, "FileAlreadyExists", "The object you specified already exists and can not be overwritten.")
            objects[self.key] = obj
        self._send(200, {"ETag": f'"{obj.etag}"', "x-oss-hash-crc64ecma": str(_crc64(body))})

    def _object_headers(self, obj: StoredObject) -> dict[str, str]:
        return {
            "ETag": f'"{obj.etag}"',
            "Last-Modified": formatdate(obj.mtime, usegmt=True),
            "Content-Type": obj.content_type,
            "x-oss-object-type": "Normal",
            "x-oss-storage-class": "Standard",
            "Accept-Ranges": "bytes",
        }

    def _op_HeadObject(self, body: bytes) -> None:
        obj = self._get_object()
        headers = {**self._object_headers(obj), "x-oss-hash-crc64ecma": str(_crc64(obj.data))}
        self._send(200, headers, length=len(obj.data))

    def _op_GetObject(self, body: bytes) -> None:
        obj = self._get_object()
        headers = self._object_headers(obj)
        size = len(obj.data)
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        standard = self.headers.get("x-oss-range-behavior", "").lower() == "standard"
        if rng and rng.group(0) != "bytes=-":
            first, last = rng.groups()
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, size - int(last)), size - 1
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            if start < size and start <= end:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                self._send(206, headers, obj.data[start : end + 1])
                return
            if standard:
                raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.")
            # legacy OSS behaviour: an unsatisfiable range returns the whole object
        headers["x-oss-hash-crc64ecma"] = str(_crc64(obj.data))
        self._send(200, headers, obj.data)

    def _op_DeleteObject(self, body: bytes) -> None:
        with self.oss._lock:
            self._objects().pop(self.key, None)
        self._send(204, {})

    def _op_DeleteMultipleObjects(self, body: bytes) -> None:
        if not self.headers.get("Content-MD5"):
            raise OssError(400, "InvalidDigest", "Content-MD5 is required for DeleteMultipleObjects.")
        self._check_md5(body)
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise OssError(400, "MalformedXML", "The XML you provided was not well-formed.") from None
        keys = [node.text or "" for node in root.iter("Key")]
        if not keys or len(keys) > 1000:
            raise OssError(400, "MalformedXML", "Between 1 and 1000 keys are required.")
        quiet = (root.findtext("Quiet") or "false").lower() == "true"
        url_encode = self.query.get("encoding-type") == "url"
        with self.oss._lock:
            for k in keys:
                self._objects().pop(k, None)
        deleted = "" if quiet else "".join(
            f"<Deleted><Key>{escape(quote(k, safe='/') if url_encode else k)}</Key></Deleted>" for k in keys
        )
        enc = "<EncodingType>url</EncodingType>" if url_encode else ""
        self._xml(200, f"<DeleteResult>{enc}{deleted}</DeleteResult>")

    def _op_ListObjects(self, body: bytes) -> None:
        q = self.query
        if q.get("list-type") == "2":
            raise OssError(400, "NotImplemented", "ListObjectsV2 is not supported by the test server.")
        prefix, marker, delimiter = q.get("prefix", ""), q.get("marker", ""), q.get("delimiter", "")
        try:
            max_keys = int(q.get("max-keys") or 100)
        except ValueError:
            raise OssError(400, "InvalidArgument", "max-keys must be an integer.") from None
        if not 0 < max_keys <= 1000:
            raise OssError(400, "InvalidArgument", "max-keys must be between 1 and 1000.")
        max_keys = min(max_keys, self.oss.max_keys_cap)
        url_encode = q.get("encoding-type") == "url"
        enc = (lambda s: quote(s, safe="/")) if url_encode else (lambda s: s)
        with self.oss._lock:
            objects = dict(self._objects())
        contents: list[str] = []
        prefixes: list[str] = []
        truncated, last = False, ""
        for k in sorted(objects):
            if not k.startswith(prefix) or k <= marker:
                continue
            entry = k
            if delimiter:
                cut = k.find(delimiter, len(prefix))
                if cut >= 0:
                    entry = k[: cut + len(delimiter)]
                    if entry in prefixes or entry <= marker:
                        continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            (prefixes if entry != k else contents).append(entry)
            last = entry
        items = []
        for k in contents:
            o = objects[k]
            items.append(
                f"<Contents><Key>{escape(enc(k))}</Key><LastModified>{_iso8601(o.mtime)}</LastModified>"
                f'<ETag>"{o.etag}"</ETag><Type>Normal</Type><Size>{len(o.data)}</Size>'
                f"<StorageClass>Standard</StorageClass><Owner><ID>0</ID><DisplayName>0</DisplayName></Owner>"
                f"</Contents>"
            )
        items += [f"<CommonPrefixes><Prefix>{escape(enc(p))}</Prefix></CommonPrefixes>" for p in prefixes]
        xml = (
            f"<ListBucketResult><Name>{escape(self.bucket)}</Name><Prefix>{escape(enc(prefix))}</Prefix>"
            f"<Marker>{escape(enc(marker))}</Marker><MaxKeys>{max_keys}</MaxKeys>"
            f"<Delimiter>{escape(enc(delimiter))}</Delimiter>"
            + ("<EncodingType>url</EncodingType>" if url_encode else "")
            + f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
            + (f"<NextMarker>{escape(enc(last))}</NextMarker>" if truncated else "")
            + "".join(items)
            + "</ListBucketResult>"
        )
        self._xml(200, xml)

    # -- multipart -----------------------------------------------------------------------------

    def _upload(self) -> Upload:
        with self.oss._lock:
            up = self.oss.uploads.get(self.query["uploadId"])
        if up is None or (up.bucket, up.key) != (self.bucket, self.key):
            raise OssError(404, "NoSuchUpload", "The specified upload does not exist.",
                           UploadId=self.query["uploadId"])
        return up

    def _op_InitiateMultipartUpload(self, body: bytes) -> None:
        upload_id = uuid.uuid4().hex.upper()
        with self.oss._lock:
            self.oss.uploads[upload_id] = Upload(
                self.bucket, self.key, self.headers.get("Content-Type", "application/octet-stream")
            )
        self._xml(
            200,
            f"<InitiateMultipartUploadResult><Bucket>{escape(self.bucket)}</Bucket>"
            f"<Key>{escape(self.key)}</Key><UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>",
        )

    def _op_UploadPart(self, body: bytes) -> None:
        up = self._upload()
        number = int(self.query.get("partNumber", "0"))
        if not 1 <= number <= 10000:
            raise OssError(400, "InvalidArgument", "Part number must be an integer between 1 and 10000.")
        self._check_md5(body)
        with self.oss._lock:
            up.parts[number] = body
        etag = hashlib.md5(body).hexdigest().upper()
        self._send(200, {"ETag": f'"{etag}"', "x-oss-hash-crc64ecma": str(_crc64(body))})

    def _op_CompleteMultipartUpload(self, body: bytes) -> None:
        up = self._upload()
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise OssError(400, "MalformedXML", "The XML you provided was not well-formed.") from None
        listed = [(int(p.findtext("PartNumber") or 0), (p.findtext("ETag") or "").strip('"')) for p in root.iter("Part")]
        if not listed or [n for n, _ in listed] != sorted({n for n, _ in listed}):
            raise OssError(400, "InvalidPartOrder", "The list of parts was not in ascending order.")
        chunks = []
        for i, (number, etag) in enumerate(listed):
            data = up.parts.get(number)
            if data is None or hashlib.md5(data).hexdigest().upper() != etag.upper():
                raise OssError(400, "InvalidPart", "One or more of the specified parts could not be found.")
            if i < len(listed) - 1 and len(data) < MIN_PART_SIZE:
                raise OssError(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size.")
            chunks.append(data)
        obj = StoredObject(b"".join(chunks), up.content_type)
        with self.oss._lock:
            self._objects()[self.key] = obj
            self.oss.uploads.pop(self.query["uploadId"], None)
        self._xml(
            200,
            f"<CompleteMultipartUploadResult><Location>{self.oss.endpoint}/{escape(self.bucket)}/"
            f"{escape(self.key)}</Location><Bucket>{escape(self.bucket)}</Bucket><Key>{escape(self.key)}</Key>"
            f'<ETag>"{obj.etag}-{len(chunks)}"</ETag></CompleteMultipartUploadResult>',
            {"x-oss-hash-crc64ecma": str(_crc64(obj.data))},
        )

    def _op_AbortMultipartUpload(self, body: bytes) -> None:
        self._upload()
        with self.oss._lock:
            self.oss.uploads.pop(self.query["uploadId"], None)
        self._send(204, {})
