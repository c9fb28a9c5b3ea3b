"""serve.py: one search service over local or dense indexes, shared by every rank and evaluator
(search.py's `http` backend speaks to it).

    python serve.py --data data --host 127.0.0.1 --port 8765
    python serve.py --text_index idx/wiki --image_index idx/photos   # `search.py index` folders

It binds 127.0.0.1 unless told otherwise, refuses what could hold it (bodies over MAX_BODY, images
over MAX_IMAGE_PIXELS, stalled or trickling clients) and answers at most MAX_HANDLERS connections at
once (503 beyond).
"""

import argparse
import base64
import contextlib
import io
import json
import re
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

import search as S
import tools as T


# ----------------------------------------------------------------------------- the search server

# No client can hold the server for long, nor make it decode more than a photo's worth.
MAX_BODY = 32 << 20  # bytes; a base64 PNG of a large photo fits. A longer body is refused (413) unread.
MAX_K = 100
MAX_IMAGE_PIXELS = 4096 * 4096  # a 12 MP photo fits; 16.7 M pixels already take 0.4 GB and 1 s to describe
HANDLER_TIMEOUT = 10.0  # seconds one read or write on a connection may wait: a stalled client is dropped
REQUEST_DEADLINE = 60.0  # seconds a connection may last in all: a trickling client is dropped too
MAX_HANDLERS = 32  # connections handled at once (a thread each); the next ones get 503 at once
BUSY_RETRY_AFTER = 1  # seconds, the Retry-After of that 503 (_request_json waits that long)
_LINGER = 1.0  # seconds a refused connection stays half-open, so the client reads the 503 before a reset


class _Refused(Exception):
    """_Refused(status, message): a request answered with HTTP status and {"error": message}."""


def _decode_image(encoded):
    """The request's image, decoded only once its header shows at most MAX_IMAGE_PIXELS (a PNG of a few KB
    can declare 12000x12000 pixels)."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded or "", validate=True)))
        width, height = image.size
        if width * height <= MAX_IMAGE_PIXELS:
            image.load()
    except Image.DecompressionBombError:  # PIL's own refusal, past twice Image.MAX_IMAGE_PIXELS
        raise _Refused(400, f"image has more than the {MAX_IMAGE_PIXELS} pixels this server decodes") from None
    except Exception as e:  # no base64, PIL's UnidentifiedImageError, truncated data, a bad checksum...
        raise _Refused(400, f"image must be a base64 PNG ({type(e).__name__})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise _Refused(400, f"image of {width}x{height} = {width * height} pixels is over the "
                            f"{MAX_IMAGE_PIXELS} pixels this server decodes; send a smaller one")
    return image


class _SearchHandler(BaseHTTPRequestHandler):
    """POST /text {"query", "k"} and /image {"image": base64 PNG, "k"} -> {"results": [...]}; POST /retrieve,
    Search-R1's protocol over the text index; GET /health. The indexes and limits live on self.server."""

    def setup(self):
        self.timeout = self.server.handler_timeout  # StreamRequestHandler.setup puts it on the socket
        super().setup()

    def do_GET(self):
        if self.path != "/health":
            return self._reply(404, {"error": f"unknown path {self.path}"})
        self._reply(200, {"text": self.server.text_index is not None, "image": self.server.image_index is not None})

    def do_POST(self):
        indexes = {"/text": self.server.text_index, "/image": self.server.image_index,
                   "/retrieve": self.server.text_index}
        if self.path not in indexes:
            return self._reply(404, {"error": f"unknown path {self.path}"})
        if indexes[self.path] is None:
            kind = "image" if self.path == "/image" else "text"
            return self._reply(404, {"error": f"this server has no {kind} index"})
        try:
            payload = self._payload()
            queries, k = self._queries(payload)
        except _Refused as e:
            return self._reply(e.args[0], {"error": e.args[1]})
        try:
            found = [indexes[self.path].search(query, k) for query in queries]
        except Exception:
            traceback.print_exc()
            return self._reply(500, {"error": "search failed on the server"})
        if self.path != "/retrieve":
            return self._reply(200, {"results": found[0]})
        scores, result = payload.get("return_scores") is True, []
        for hits in found:
            docs = [{"id": r.get("id", ""), "contents": f'"{r.get("title", "")}"\n{r.get("text", "")}'} for r in hits]
            result.append([{"document": d, "score": r.get("score", 0.0)} if scores else d for d, r in zip(docs, hits)])
        self._reply(200, {"result": result})

    def _queries(self, payload):
        if self.path == "/retrieve":
            queries, k = payload.get("queries"), payload.get("topk", 3)
            if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
                raise _Refused(400, "queries must be a non-empty list of strings")
            if len(queries) > MAX_K or not isinstance(k, int) or not 1 <= k <= MAX_K:
                raise _Refused(400, f"at most {MAX_K} queries, and topk an integer from 1 to {MAX_K}")
            return queries, k
        k = payload.get("k", 3)
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise _Refused(400, f"k must be an integer from 1 to {MAX_K}")
        if self.path == "/image":
            return [_decode_image(payload.get("image"))], k
        if not isinstance(payload.get("query"), str) or not payload["query"].strip():
            raise _Refused(400, "query must be a non-empty string")
        return [payload["query"]], k

    def _payload(self):
        """The body's JSON object, or _Refused. A body over MAX_BODY is refused unread; a client stalling
        mid-body times out (the socket's timeout) and http.server drops it."""
        declared = self.headers.get("Content-Length", "").strip()
        wrong = f"body must be 1 to {MAX_BODY} bytes of JSON, with a Content-Length"
        if not re.fullmatch(r"[0-9]+", declared):
            raise _Refused(400, wrong)
        if len(declared) > 12 or int(declared) > MAX_BODY:  # int() of thousands of digits is itself an error
            self.close_connection = True  # the unread body must not be read as a next request
            raise _Refused(413, f"body of {declared[:20]} bytes is over the {MAX_BODY} bytes this server reads")
        if int(declared) == 0:
            raise _Refused(400, wrong)
        body = self.rfile.read(int(declared))
        if len(body) < int(declared):  # the client closed its side, or the server's deadline cut it
            raise _Refused(400, "body ended before its Content-Length")
        try:
            payload = json.loads(body)
        except RecursionError:  # no ValueError: uncaught, it would end the handler without a reply
            raise _Refused(400, "body is not valid JSON: nested too deeply") from None
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _Refused(400, f"body is not valid JSON: {T._detail(e)}") from None
        if not isinstance(payload, dict):
            raise _Refused(400, "body must be a JSON object")
        return payload

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left, or its deadline cut the connection: nobody to tell
            self.close_connection = True

    def log_message(self, format, *args):
        pass  # one line per search would drown a training log


class SearchServer(ThreadingHTTPServer):
    """A search server over the given indexes (either may be None; port 0 picks a free one). At most
    `max_handlers` connections are handled at once (the next get 503 from the accept loop); each read or
    write waits at most `timeout` s; service_actions shuts down connections older than `deadline` s."""

    daemon_threads = True
    request_queue_size = 128  # a burst of connects waits in the kernel's backlog, not in SYN retries

    def __init__(self, text_index, image_index, host="127.0.0.1", port=8765, *, timeout=HANDLER_TIMEOUT,
                 deadline=REQUEST_DEADLINE, max_handlers=MAX_HANDLERS):
        super().__init__((host, port), _SearchHandler)
        self.text_index, self.image_index = text_index, image_index
        self.handler_timeout, self.request_deadline = timeout, deadline
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._lock = threading.Lock()
        self._deadlines = {}  # socket of a handled connection -> time.monotonic() it is cut at
        self._lingering = []  # (time.monotonic() to close at, socket) of refused connections

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            return self._refuse_busy(request)
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.request_deadline
        try:
            super().process_request(request, client_address)  # starts the handler's thread
        except BaseException:
            self._release(request)  # no thread started, so none will release the slot
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request):
        with self._lock:
            self._deadlines.pop(request, None)
        self._slots.release()

    def _refuse_busy(self, request):
        """503 from the accept loop, which must never wait: non-blocking, half-closed now and closed in _LINGER s
        (closed while the request still arrives, it would reset and destroy the 503 before the client reads it)."""
        body = json.dumps({"error": f"the search server is busy: retry after {BUSY_RETRY_AFTER} s"}).encode()
        head = ("HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {BUSY_RETRY_AFTER}\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.sendall(head.encode() + body)
            request.shutdown(socket.SHUT_WR)
        self._lingering.append((time.monotonic() + _LINGER, request))

    def service_actions(self):
        """Cut connections past their deadline (which wakes their handlers) and close lingering ones."""
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, end in self._deadlines.items() if end <= now]
        for sock in late:
            with contextlib.suppress(OSError):  # its handler may have closed it meanwhile
                sock.shutdown(socket.SHUT_RDWR)
        self._close_lingering(now)

    def server_close(self):
        super().server_close()
        self._close_lingering(float("inf"))

    def _close_lingering(self, now):
        """Close the refused connections due by `now`, after reading what the client sent (unread bytes make
        the close a reset); at most 16 reads each, so that a client still uploading cannot hold the loop."""
        done = [sock for end, sock in self._lingering if end <= now]
        self._lingering = [(end, sock) for end, sock in self._lingering if end > now]
        for sock in done:
            with contextlib.suppress(OSError):
                for _ in range(16):
                    if not sock.recv(S._READ_CHUNK):
                        break
            sock.close()


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Serve corpus.jsonl and image_index.jsonl (or dense indexes) over HTTP.")
    p.add_argument("--data", default="data", help="folder with corpus.jsonl and/or image_index.jsonl")
    p.add_argument("--text_index", help="a `search.py index` folder to serve for text search instead of BM25")
    p.add_argument("--image_index", help="a `search.py index` folder to serve for image search instead")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8765)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    text = S.DenseIndex(args.text_index) if args.text_index else S._local_index(args.data, "text", required=False)
    image = S.DenseIndex(args.image_index) if args.image_index else S._local_index(args.data, "image", required=False)
    if text is None and image is None:
        raise FileNotFoundError(f"nothing to serve: {args.data} has no corpus.jsonl or image_index.jsonl")
    server = SearchServer(text, image, args.host, args.port)
    served = [(kind, index.name) for kind, index in (("text", text), ("image", image)) if index is not None]
    print(f"serving {' and '.join(k for k, _ in served)} search ({', '.join(n for _, n in served)}) "
          f"on http://{args.host}:{server.server_port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
