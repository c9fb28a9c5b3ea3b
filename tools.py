"""The agent's side of the world: the action parser and prompts, crop, the search cache and the
results the model reads, the chat client, and `Tools.execute`, which runs one action within the
budgets and returns the next user turn. Every failure is an observation that tells the model what went
wrong: nothing raises into the rollout. The backends are search.py's (`search.make_tools` builds a
`Tools`). No torch here.
"""

import contextlib
import email.utils
import hashlib
import io
import json
import math
import os
import random
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
from PIL import Image


# ----------------------------------------------------------------------------- JSONL files and questions

def read_jsonl(path, strict=False, required=(), check=None):
    """Rows of a JSONL file. A bad line (not UTF-8 JSON, not an object, lacking a `required` key, or
    refused by `check(row)`, which raises ValueError or returns the row fixed) is skipped with a
    warning naming `path:lineno`, or raises ValueError when strict."""
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                if missing := [key for key in required if key not in row]:
                    raise ValueError(f"missing key(s) {missing}")
                rows.append(row if check is None else check(row))
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                if strict:
                    raise ValueError(f"{path}:{lineno}: bad JSONL line: {e}") from None
                warnings.warn(f"{path}:{lineno}: bad JSONL line: {e} (skipped)", stacklevel=2)
    return rows


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path that replaces `path` once the block succeeds: nobody sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _scalar(value):
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def check_question(row):
    """A question row checked (ValueError naming the field) and normalised: id and answers as text,
    a bare answer a list of one, needs_search True and meta {} when absent."""
    answers = [row["answers"]] if _scalar(row["answers"]) else row["answers"]
    if not _scalar(row["id"]) or isinstance(row["id"], float):
        raise ValueError(f"'id' must be a string or an integer, got {row['id']!r:.40}")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(answers, list) or not answers or not all(map(_scalar, answers)):
        raise ValueError(f"'answers' must be a non-empty list of strings, got {row['answers']!r:.60}")
    if row.get("image") is not None and not isinstance(row["image"], str):
        raise ValueError(f"'image' must be a path, got {row['image']!r:.40}")
    if not isinstance(row.get("meta", {}), dict):
        raise ValueError(f"'meta' must be an object, got {row['meta']!r:.40}")
    if not isinstance(row.get("needs_search", True), bool):
        raise ValueError(f"'needs_search' must be true or false, got {row['needs_search']!r:.40}")
    return dict(row, id=str(row["id"]), answers=[str(a) for a in answers],
                needs_search=row.get("needs_search", True), meta=row.get("meta", {}))


def load_questions(path):
    """Checked question rows, "image" made absolute (or None); bad rows are skipped with a warning,
    a file with no usable question is a ValueError."""
    base = os.path.dirname(os.path.abspath(path))
    rows = read_jsonl(path, required=("id", "question", "answers"), check=check_question)
    if not rows:
        raise ValueError(f"{path}: no usable question (empty, or every line bad)")
    for row in rows:
        row["image"] = os.path.join(base, row["image"]) if row.get("image") else None
    return rows


# ----------------------------------------------------------------------------- prompts (appendix E.1's structure)

def neutralize(text):
    """Outside text (a result, an error, a question) made inert: every "<" becomes U+2039 "‹", since
    every Qwen control token and all our markup begin with "<". NFKC keeps U+2039 (the fullwidth
    U+FF1C would become "<" again). Our own markup is added after this."""
    return str(text).replace("<", "\u2039")


# Every token is paid for by a tiny model trained on a CPU: a few dozen words each.
GIVE_UP = "Unable to answer due to lack of relevant information"
IMAGE_SEARCH_PROMPT = "Image search results above. Answer, or <text_search> for missing facts."
TEXT_SEARCH_PROMPT = "Text search results above. Answer, or search again with a better query."
RETRY_PROMPT = "Fix this. Reply <reason>...</reason> then one action."  # after an error observation


def initial_prompt(question, has_image=True):
    """The first user turn; the "<image>" placeholder and the image-search actions only with an image."""
    lines = ["Reply <reason>...</reason> then one action (image search at most once):",
             "<answer>short answer</answer>", "<text_search>query</text_search>"]
    if has_image:
        lines = ["<image>", *lines, "<img_search><img></img_search> (whole image)",
                 "<img_search>[x1, y1, x2, y2]</img_search> or <img_search>object</img_search> (a crop)"]
    return "\n".join(lines + [f"Stuck: <answer>{GIVE_UP}</answer>", f"Question: {neutralize(question)}"])


# ----------------------------------------------------------------------------- actions and their parser

ACTION_KINDS = ("answer", "text_search", "img_search")
ACTION_END_TAGS = ("</answer>", "</text_search>", "</img_search>")
_ACTION_TAGS = tuple(f"<{k}>" for k in ACTION_KINDS) + ACTION_END_TAGS
_TRAILING_TOKENS = ("<|im_end|>", "<|endoftext|>")  # what a turn may end with after its action
_WHOLE_IMAGE = ("<img>", "<img/>", "<img />", "<img></img>")
MAX_ARG_CHARS = 1000  # longer answers/queries are junk, not a search


@dataclass
class Action:
    kind: str  # "answer" | "text_search" | "img_search" | "invalid"
    arg: str = ""  # answer text, query, or the raw img_search content (a referring expression)
    box: tuple | None = None  # img_search with [x1, y1, x2, y2], in the original image's pixels
    whole: bool = False  # img_search with <img>
    reason: str = ""  # text of <reason>...</reason>, if present
    error: str = ""  # for invalid: a message the model can read

    def render(self):
        """The assistant text for this action (inverse of parse_action), for SFT turns."""
        arg = self.arg
        if self.kind == "img_search" and (self.whole or self.box is not None):
            arg = "<img>" if self.whole else "[" + ", ".join(str(v) for v in self.box) + "]"
        return f"<reason>{self.reason}</reason>\n<{self.kind}>{arg}</{self.kind}>"


def parse_action(text):
    """One assistant turn, `<reason>...</reason>` then one action at the very end, as an Action; anything
    malformed is an `invalid` Action whose `error` tells the model what to fix. Never raises; linear time
    (no regular expression): megabytes of junk from an untrained policy cost milliseconds."""
    if not isinstance(text, str):
        return Action("invalid", error="Invalid reply: not text.")
    end, token = len(text), True  # trailing space and end tokens dropped by moving an index, not slicing
    while token:
        while end and text[end - 1].isspace():
            end -= 1
        token = next((t for t in _TRAILING_TOKENS if text.endswith(t, 0, end)), None)
        end -= len(token or "")
    close = next((t for t in ACTION_END_TAGS if text.endswith(t, 0, end)), None)
    if close is None:
        opened = [t for t in _ACTION_TAGS if text.find(t, 0, end) >= 0]
        if not opened:
            return Action("invalid", error="No action found. End with <answer>, <text_search> or <img_search>.")
        if any(t.startswith("</") for t in opened):
            return Action("invalid", error="The action must be the last thing in your reply.")
        return Action("invalid", error=f"Unclosed {opened[0]}: close it with </{opened[0][1:]}.")
    kind, open_tag = close[2:-1], "<" + close[2:]
    start = text.rfind(open_tag, 0, end - len(close))
    if start < 0:
        return Action("invalid", error=f"{close} without {open_tag}.")
    prefix, content = text[:start], text[start + len(open_tag) : end - len(close)].strip()
    # <reason> may be missing (the format reward judges that), or only closed, as after a prefilled "<reason>".
    opening, closing = prefix.find("<reason>"), prefix.find("</reason>")
    reason = prefix[:closing].strip() if opening < 0 and closing >= 0 else ""
    if opening >= 0:
        closing = prefix.find("</reason>", opening)
        if closing < 0:
            return Action("invalid", error="Unclosed <reason>: close it with </reason>.")
        reason = prefix[opening + len("<reason>") : closing].strip()
    error, box = "", None
    if any(t in content for t in _ACTION_TAGS + ("<reason>", "</reason>")):
        error = f"Nested tags inside {open_tag}."
    elif any(t in prefix for t in _ACTION_TAGS):
        error = "More than one action: give exactly one action, at the end."
    elif not content:
        error = f"Empty {open_tag}."
    elif len(content) > MAX_ARG_CHARS:
        error = f"{open_tag} is too long (over {MAX_ARG_CHARS} characters)."
    elif kind == "img_search" and content.startswith("["):
        values, error = _four_numbers(content[1:-1].split(",") if content.endswith("]") else ())
        box = None if error else tuple(int(round(v)) for v in values)
    elif kind == "img_search" and "<img" in content and content not in _WHOLE_IMAGE:
        error = "Use <img> alone for the whole image."
    if error:
        return Action("invalid", reason=reason, error=error)
    return Action(kind, arg=content, box=box, whole=kind == "img_search" and content in _WHOLE_IMAGE, reason=reason)


def _four_numbers(values):
    """(four finite floats, "") or (None, message for the model)."""
    try:  # the length first: "[1,1,1,...]" may be megabytes long
        values = [float(v) for v in values] if len(values) == 4 else None
    except (TypeError, ValueError):
        values = None
    if values is None:
        return None, "A box is [x1, y1, x2, y2]: four numbers in image pixels."
    return (values, "") if all(map(math.isfinite, values)) else (None, "Box coordinates must be finite numbers.")


# ----------------------------------------------------------------------------- crop

MIN_CROP = 28  # one Qwen2.5-VL vision patch (14 px, merged 2x2): a smaller crop has no token


def clamp_box(box, size):
    """A box clamped to an image of `size` (W, H), grown around its centre to at least MIN_CROP pixels
    per side: ((x1, y1, x2, y2) ints, "") or (None, message for the model)."""
    values, error = _four_numbers(box)
    if error:
        return None, error
    (x1, y1, x2, y2), (width, height) = values, size
    shown = f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
    if x2 <= x1 or y2 <= y1:
        return None, f"Empty box {shown}: need x1 < x2 and y1 < y2."
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return None, f"Box {shown} is outside the image ({width}x{height} pixels)."
    spans = []
    for lo, hi, limit in ((x1, x2, width), (y1, y2, height)):
        lo, hi = max(0, math.floor(lo)), min(limit, math.ceil(hi))
        side = min(MIN_CROP, limit)  # an image smaller than a patch: all of it
        if hi - lo < side:  # the same centre, shifted back inside the image
            lo = min(max(int(round((lo + hi - side) / 2)), 0), limit - side)
            hi = lo + side
        spans.append((lo, hi))
    return (spans[0][0], spans[1][0], spans[0][1], spans[1][1]), ""


def crop(image, box):
    """(crop, "") or (None, message for the model), by clamp_box's rules."""
    used, message = clamp_box(box, image.size)
    return (None, message) if used is None else (image.crop(used), "")


def _rgb(image):
    """RGB with any transparency composited onto white (icons may be saved with alpha)."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------- errors and helpers the backends share

class SearchError(RuntimeError):
    """A search that failed in a way worth telling the model (the message is model-readable)."""


def _png_bytes(image):
    buffer = io.BytesIO()
    _rgb(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_hash(image):
    """Hash of the pixels (not of an encoding, which varies between PIL versions)."""
    rgb = _rgb(image)
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _detail(text, secret=None, limit=200):
    """Upstream text for an error message: the secret masked, then cut (a key cut first would escape)."""
    return (str(text).replace(secret, "***") if secret else str(text))[:limit]


def retry_after_seconds(value):
    """Seconds a Retry-After header (seconds or an HTTP date) asks, at most 600; None if unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 600.0) if math.isfinite(seconds) else None


# ----------------------------------------------------------------------------- search cache; results for the model

class SearchCache:
    """SQLite cache of search results (and eval's judge verdicts), keyed by (backend, query or image
    hash, k). Modes: "off", "rw" (write what was missing), "replay" (a miss is a SearchError: no
    network call). Processes may share the file (WAL, a busy timeout, INSERT OR REPLACE). An empty
    list is never stored: it is often transient (a rate limit, a rebuild)."""

    MODES = ("off", "rw", "replay")

    def __init__(self, path, mode="rw"):
        if mode not in self.MODES:
            raise ValueError(f"cache mode must be one of {self.MODES}, got {mode!r}")
        if mode == "replay" and not os.path.exists(path):
            raise FileNotFoundError(f"replay mode needs an existing cache: {path}")
        self.path, self.mode = str(path), mode
        self._lock = threading.Lock()  # one connection, shared by a rollout's threads
        self._conn, self._pid = None, None

    def _db(self):
        if self._conn is None or self._pid != os.getpid():  # a forked child must not reuse its parent's
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS search (key TEXT PRIMARY KEY, backend TEXT, query TEXT,"
                               " k INTEGER, results TEXT NOT NULL, created REAL)")
            self._pid = os.getpid()
        return self._conn

    @staticmethod
    def _key(backend, query, k):
        return hashlib.sha256(json.dumps([backend, query, k]).encode()).hexdigest()

    def get(self, backend, query, k):
        with self._lock:
            row = self._db().execute("SELECT results FROM search WHERE key = ?",
                                     (self._key(backend, query, k),)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, backend, query, k, results):
        with self._lock:
            self._db().execute("INSERT OR REPLACE INTO search VALUES (?, ?, ?, ?, ?, ?)",
                               (self._key(backend, query, k), backend, query, k, json.dumps(results), time.time()))

    def lookup(self, backend, query, k, run):
        """Cached `run()`; `backend` and `query` name what run() computes."""
        if self.mode == "off":
            return run()
        results = self.get(backend, query, k)
        if results is not None:
            return results
        if self.mode == "replay":
            raise SearchError(f"not in the search cache (replay mode): {backend} {query[:80]!r}")
        results = run()
        if results:
            self.put(backend, query, k, results)
        return results


def clean_results(results):
    """A backend's results, checked before they are cached or shown: id, title, text and url as text
    (numbers written out, None as ""); other entries, or ones that show nothing, dropped. SearchError
    for a non-list or nothing left: malformed results must not be cached and replayed forever."""
    if not isinstance(results, (list, tuple)):
        raise SearchError(f"the search backend's results are a {type(results).__name__}, not a list")
    clean = []
    for r in results:
        shown = {key: r[key] for key in ("id", "title", "text", "url") if key in r} if isinstance(r, dict) else None
        if shown is None or not all(v is None or isinstance(v, (str, int, float)) for v in shown.values()):
            continue
        row = dict(r, **{key: "" if v is None else str(v) for key, v in shown.items()})  # bool is an int: "True"
        if row.get("title") or row.get("text") or row.get("id"):
            clean.append(row)
    if results and not clean:
        raise SearchError(f"the search backend returned {len(results)} malformed results and no usable one")
    return clean


def format_results(results, max_words=30):
    """One "title: snippet" line per result, snippets cut to `max_words` words."""
    pairs = [(" ".join(str(r.get("title") or r.get("id") or "").split()),
              " ".join(str(r.get("text") or "").split()[:max_words])) for r in results]
    return "\n".join(f"{title}: {snippet}" if snippet else title for title, snippet in pairs)


# ----------------------------------------------------------------------------- the OpenAI-compatible chat client

class TransientError(RuntimeError):
    """The item could not be finished for a reason a rerun may not meet: it gets no line."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class ApiRejected(RuntimeError):
    """The API refused this request for good (HTTP 400, 413, 422...): the item is discarded."""


class ApiFatal(RuntimeError):
    """The API refuses every request (HTTP 401, 403, 404: a wrong key, URL or model): the run stops."""


class Meter:
    """Thread-safe counters: {group: {field: number}}."""

    def __init__(self):
        self._lock, self.data = threading.Lock(), {}

    def add(self, group, **fields):
        with self._lock:
            g = self.data.setdefault(group, {})
            for k, v in fields.items():
                g[k] = g.get(k, 0) + v

    def snapshot(self):
        with self._lock:
            return {g: dict(f) for g, f in self.data.items()}


class RateGate:
    """When the next request may go: a 429's Retry-After holds back every client sharing the gate."""

    def __init__(self):
        self._lock, self._not_before = threading.Lock(), 0.0

    def hold(self, seconds):
        with self._lock:
            self._not_before = max(self._not_before, time.time() + seconds)

    def wait(self):
        while (left := self._not_before - time.time()) > 0:  # a float read is atomic: no lock needed
            time.sleep(left)


def public_url(url):
    """scheme://host/path of a URL: never its query string (some APIs take a key there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


class ChatClient:
    """A client of any OpenAI-compatible /chat/completions endpoint: the summarizer, eval's judge and
    make_data's teacher. Timeouts, connection errors, malformed replies, 5xx and 429 are retried with
    backoff and jitter (or the gate's Retry-After); 401/403/404 raise ApiFatal, other 4xx ApiRejected.
    The key (from env `api_key_env`) only travels in the Authorization header; counts go to `meter`."""

    def __init__(self, url, model, meter=None, name="teacher", api_key_env="OPENAI_API_KEY", timeout=300.0,
                 retries=6, backoff=2.0, max_backoff=60.0, gate=None):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.meter, self.name, self.gate = model, meter or Meter(), name, gate or RateGate()
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._key = os.environ.get(api_key_env) if api_key_env else None
        self._local = threading.local()  # one requests.Session per thread (sessions are not thread-safe)

    def __repr__(self):  # never shows the key
        return f"ChatClient({self.name}, {self.model!r} at {public_url(self.endpoint)})"

    def chat(self, messages, max_tokens=1024, temperature=None, stop=None):
        """(text, usage {prompt_tokens, completion_tokens, total_tokens}, finish_reason)."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens}
        if temperature is not None:
            body["temperature"] = temperature
        if stop:
            body["stop"] = list(stop)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        last = "no attempt"
        for attempt in range(self.retries + 1):
            self.gate.wait()
            self.meter.add(self.name, requests=1)
            hold = None
            try:
                response = self._local.session.post(self.endpoint, json=body, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                last, event = f"timed out after {self.timeout:g} s", "timeouts"
            except requests.RequestException as e:  # its text may hold the URL: only the type is shown
                last, event = f"connection failed ({type(e).__name__})", "connection_errors"
            else:
                status = response.status_code
                if status == 429:
                    last, event = "HTTP 429", "rate_limited"
                    hold = retry_after_seconds(response.headers.get("Retry-After"))
                elif status >= 500:
                    last, event = f"HTTP {status}", "server_errors"
                elif status in (401, 403, 404):  # a wrong key, URL or model: every request will fail
                    raise ApiFatal(f"{self.name} at {public_url(self.endpoint)}: HTTP {status}: "
                                   f"{_detail(response.text, self._key, 300)} (check the URL, the model and the key)")
                elif status != 200:
                    self.meter.add(self.name, rejected=1)
                    raise ApiRejected(f"HTTP {status}: {_detail(response.text, self._key, 300)}")
                else:
                    try:
                        reply = response.json()
                        choice = reply["choices"][0]
                        text = _content_text(choice["message"]["content"])
                    except (ValueError, KeyError, IndexError, TypeError):
                        last, event = "malformed reply", "malformed"
                    else:
                        u = reply.get("usage") or {}
                        prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
                        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": int(u.get("total_tokens") or prompt + completion)}
                        self.meter.add(self.name, calls=1, **usage)
                        return text, usage, choice.get("finish_reason")
            self.meter.add(self.name, **{event: 1})
            if attempt < self.retries and hold is not None:
                self.gate.hold(hold)  # the server said when: no backoff of ours on top
            elif attempt < self.retries:
                self.meter.add(self.name, retries=1)
                time.sleep(min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0))
        self.meter.add(self.name, failed=1)
        raise TransientError("api_error", f"{self.name}: {last} ({self.retries + 1} tries)")


def _content_text(content):
    """A message's content as text: a string, or a list of {"type": "text", "text"} parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class ChatSummarizer:
    """`summarizer(query, results) -> str` through a chat endpoint (key from OPENAI_API_KEY); when it
    fails, the plain results, with a warning."""

    max_words = 60  # of the summary

    def __init__(self, base_url, model):
        self.client = ChatClient(base_url, model, name="summarizer", timeout=30.0, retries=2, backoff=0.5)

    def __call__(self, query, results):
        # The summarizer is a chat model too: a forged turn in a result would steer its summary.
        prompt = (f"Search: {neutralize(query)}\nResults:\n{neutralize(format_results(results, max_words=100))}\n"
                  f"Summarize the facts relevant to the search in at most {self.max_words} words.")
        try:
            text, _, _ = self.client.chat([{"role": "user", "content": prompt}], max_tokens=4 * self.max_words,
                                          temperature=0)
        except (TransientError, ApiRejected, ApiFatal) as e:
            warnings.warn(f"summarizer failed ({e}); using the plain results")
            return format_results(results)
        return " ".join(str(text).split()[: self.max_words])


# ----------------------------------------------------------------------------- executing actions

@dataclass
class State:
    """Per-trajectory tool counters; the limits live on Tools."""

    n_text_search: int = 0
    n_img_search: int = 0  # whole-image and crop searches
    n_crop: int = 0  # the crop searches among them
    n_calls: int = 0  # searches sent to a backend or the cache, failed ones too; not refused ones
    n_errors: int = 0  # observations with error=True


@dataclass
class Observation:
    text: str  # the whole user turn: "<information>...</information>\n" + stage prompt
    images: list = field(default_factory=list)  # one "<image>" placeholder in text per image
    error: bool = False
    kind: str = ""  # the action kind it answers
    box: tuple | None = None  # the crop box actually used, for reports
    results: list = field(default_factory=list)


def _failure(kind, message, box=None):
    return Observation(f"<information>{message}</information>\n{RETRY_PROMPT}", error=True, kind=kind, box=box)


class Tools:
    """Runs actions against the search backends, within budgets; build it with make_tools().
    attach="crop" puts the searched crop in the observation, so the model sees what it searched."""

    def __init__(self, text_backend, image_backend, grounder=None, cache=None, summarizer=None, topk=3,
                 max_calls=10, max_img_search=1, attach="none", snippet_words=30):
        self.text_backend, self.image_backend = text_backend, image_backend
        self.grounder, self.cache, self.summarizer = grounder, cache, summarizer
        self.topk, self.max_calls, self.max_img_search = topk, max_calls, max_img_search
        self.attach, self.snippet_words = attach, snippet_words

    def execute(self, action, image, state):
        """The observation for one action; never raises (every failure is an observation)."""
        kind = getattr(action, "kind", "invalid")
        try:
            observation = self._execute(action, image, state)
        except SearchError as e:  # its message may quote the service (an error body, a query)
            observation = _failure(kind, f"Search failed: {neutralize(e)}")
        except Exception as e:  # a bug or an odd backend must not end a rollout: show it instead
            observation = _failure(kind, f"Search failed: {type(e).__name__}: {neutralize(str(e)[:200])}")
        state.n_errors += observation.error
        return observation

    def _execute(self, action, image, state):
        if action.kind == "answer":
            return _failure("answer", "An answer ends the episode: there is nothing to run.")
        if action.kind == "invalid":
            return _failure("invalid", action.error or "Invalid action.")
        if action.kind not in ("text_search", "img_search"):
            return _failure(action.kind, f"Unknown action {action.kind!r}.")
        if state.n_calls >= self.max_calls:
            return _failure(action.kind, f"No tool calls left (at most {self.max_calls}). Answer now.")
        if action.kind == "img_search":
            return self._image_search(action, image, state)
        if self.text_backend is None:
            return _failure("text_search", "Text search is not available. Answer now.")
        query = " ".join(action.arg.split())
        state.n_text_search += 1
        state.n_calls += 1
        results = self._search(self.text_backend, "text", query, query)
        return self._observation("text_search", query, results, TEXT_SEARCH_PROMPT)

    def _image_search(self, action, image, state):
        if image is None:
            return _failure("img_search", "This question has no image. Use <text_search> or answer.")
        if self.image_backend is None:
            return _failure("img_search", "Image search is not available. Use <text_search> or answer.")
        if state.n_img_search >= self.max_img_search:
            return _failure("img_search", f"Image search already used (at most {self.max_img_search}). "
                                          "Use <text_search> or answer.")
        box = action.box
        if not action.whole and box is None:  # a referring expression: ground it first
            hint = "give a box [x1, y1, x2, y2] or use <img>."
            if self.grounder is None:
                return _failure("img_search", f"Cannot locate {neutralize(repr(action.arg))}: {hint}")
            box = self.grounder.ground(image, action.arg)
            if box is None:
                return _failure("img_search", f"Could not find {neutralize(repr(action.arg))} in the image: {hint}")
        query_image = image
        if box is not None:
            box, message = clamp_box(box, image.size)
            if box is None:
                return _failure("img_search", message)
            query_image = image.crop(box)
        state.n_img_search += 1
        state.n_crop += box is not None
        state.n_calls += 1
        results = self._search(self.image_backend, "image", "image:" + image_hash(query_image), query_image)
        images = [query_image] if self.attach == "crop" and box is not None else []
        label = "the whole image" if box is None else f"the crop {list(box)}"
        return self._observation("img_search", label, results, IMAGE_SEARCH_PROMPT, images, box)

    def _search(self, backend, kind, key, query):
        """backend.search(query), cached under `key`; cleaned before and after the cache (old files)."""
        name, fetch = f"{backend.name}/{kind}", lambda: clean_results(backend.search(query, self.topk))
        return fetch() if self.cache is None else clean_results(self.cache.lookup(name, key, self.topk, fetch))

    def _observation(self, kind, query, results, prompt, images=(), box=None):
        if not results:  # the query is the model's own, but echoing "<image>" would still be a placeholder
            return _failure(kind, f"No results for {neutralize(query)}. Try something else.", box)
        results = results[: self.topk]
        body = self.summarizer(query, results) if self.summarizer else format_results(results, self.snippet_words)
        # The body is text from outside; our markup goes around it after it is made inert.
        text = "<information>" + "<image>\n" * len(images) + neutralize(body) + "</information>\n" + prompt
        return Observation(text, images=list(images), error=False, kind=kind, box=box, results=results)
