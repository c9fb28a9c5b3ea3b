"""The agent's side of the world: the action format and its parser, prompts, crop, grounding,
search backends and indexes, the search cache, the chat client, and `Tools.execute`, which runs
one action within the budgets and returns the next user turn. Every failure (a bad box, a
timeout, HTTP errors after retries, no results, a second image search) is an observation that
tells the model what went wrong: nothing raises into the rollout.

    python tools.py serve --data data --host 127.0.0.1 --port 8765   # share one search service
    python tools.py index photos/ --encoder models/siglip --out idx/photos   # CLIP / SigLIP image index
    python tools.py index corpus.jsonl --encoder models/e5 --out idx/wiki \
        --query_prefix "query: " --passage_prefix "passage: "         # dense text index (e5 / BGE)
    python tools.py --bench                                           # BM25 build time, queries/s

Backends: `local` (BM25 over corpus.jsonl, nearest neighbours over image_index.jsonl; offline,
deterministic), `http` (`python tools.py serve`), `serpapi` (Google and Google Lens), `searchr1`
(a Search-R1 /retrieve server). Dense indexes replace the search of their kind in any of them; all
sit behind `SearchCache`. No torch here: GroundingDINO and the encoders import it when built.
"""

import argparse
import base64
import contextlib
import email.utils
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import sqlite3
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image
from tqdm import tqdm


# ----------------------------------------------------------------------------- JSONL files and questions

def read_jsonl(path, strict=False, required=(), check=None):
    """Rows of a JSONL file. A bad line (not UTF-8, not JSON, not an object, lacking a `required`
    key, or refused by `check(row)`, which raises ValueError saying why and may return the row
    fixed) is skipped with a warning naming `path:lineno`, or raises ValueError when strict."""
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
    """A temporary path beside `path` that replaces it once the block succeeds: readers (and a run
    resumed after a kill) never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl(path, rows):
    """Write rows atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _scalar(value):
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def check_question(row):
    """A question row checked (ValueError naming the field) and normalised: id and answers as text
    (a bare answer is a list of one), needs_search and meta True and {} when absent."""
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
    and a file with no usable question is a ValueError, before any work."""
    base = os.path.dirname(os.path.abspath(path))
    rows = read_jsonl(path, required=("id", "question", "answers"), check=check_question)
    if not rows:
        raise ValueError(f"{path}: no usable question (empty, or every line bad)")
    for row in rows:
        row["image"] = os.path.join(base, row["image"]) if row.get("image") else None
    return rows


# ----------------------------------------------------------------------------- prompts (appendix E.1's structure)

def neutralize(text):
    """Text from outside (a result, a summary, an upstream error, a question) made inert for the chat
    format: every "<" becomes U+2039 "‹". Every control token of Qwen's vocabulary and every piece of
    our markup begins with "<", so a page can neither open or close a turn nor claim an image; NFC
    and NFKC leave U+2039 as it is (the fullwidth U+FF1C would become "<" again). Our own markup is
    added after this, so it stays intact."""
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
        """The assistant text for this action (inverse of parse_action): used to write SFT turns."""
        arg = self.arg
        if self.kind == "img_search" and (self.whole or self.box is not None):
            arg = "<img>" if self.whole else "[" + ", ".join(str(v) for v in self.box) + "]"
        return f"<reason>{self.reason}</reason>\n<{self.kind}>{arg}</{self.kind}>"


def parse_action(text):
    """One assistant turn, `<reason>...</reason>` then one action at the very end, as an Action;
    anything malformed is an `invalid` Action whose `error` tells the model what to fix. Never
    raises, and linear time on any input (find/rfind/endswith and `in`, no regular expression):
    megabytes of junk from an untrained policy cost milliseconds."""
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


# ----------------------------------------------------------------------------- crop and grounding

MIN_CROP = 28  # one Qwen2.5-VL vision patch (14 px, merged 2x2): a smaller crop has no token


def clamp_box(box, size):
    """A box clamped to an image of `size` (W, H), grown around its centre to at least MIN_CROP
    pixels per side: ((x1, y1, x2, y2) ints, "") or (None, message for the model)."""
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
    """(crop, "") or (None, message for the model). See clamp_box for the rules."""
    used, message = clamp_box(box, image.size)
    return (None, message) if used is None else (image.crop(used), "")


# A grounder is any object with ground(image, expression) -> (x1, y1, x2, y2) | None.

class GroundingDinoGrounder:
    """GroundingDINO from a local folder (e.g. IDEA-Research/grounding-dino-tiny), on the CPU."""

    def __init__(self, model_dir, box_threshold=0.3, text_threshold=0.25):
        import torch  # optional heavy dependencies, imported when built: tools.py stays torch-free
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"grounding model folder not found: {model_dir}")
        self.torch = torch
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model_dir).eval()

    def ground(self, image, expression):
        text = expression.strip().lower().rstrip(".") + "."  # GroundingDINO's training phrases look so
        rgb = image.convert("RGB")
        inputs = self.processor(images=rgb, text=text, return_tensors="pt")
        with self.torch.inference_mode():
            outputs = self.model(**inputs)
        found = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(rgb.height, rgb.width)])[0]
        if len(found["scores"]) == 0:
            return None
        return tuple(float(v) for v in found["boxes"][int(found["scores"].argmax())].tolist())


ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


class SceneGrounder:
    """The offline world's GroundingDINO, from the pixels of separate objects on a plain background.
    Objects are the runs of foreground columns. "the third object from the left" (or "right") picks
    by position; "the square" picks the one object whose silhouette is nearest (cosine) to the mean
    silhouette of the `examples` ({name: [PIL images]}) of that name. Returns its box padded by 2
    pixels, or None when the expression names nothing there."""

    def __init__(self, examples):
        if not examples:
            raise ValueError("SceneGrounder needs labelled example images of at least one shape")
        self.names = sorted(examples)
        means = [np.mean([_outline(_foreground(np.asarray(_rgb(im)))) for im in examples[n]], axis=0)
                 for n in self.names]
        self.prototypes = np.stack([m / np.linalg.norm(m) for m in means])  # (names, SHAPE_GRID**2)

    @classmethod
    def from_entities(cls, path):
        """From make_data.py's entities.jsonl: the icons of the training entities, labelled by their
        category (the grounder learns nothing about held-out ones)."""
        examples, base = {}, os.path.dirname(os.path.abspath(path))
        for row in read_jsonl(path, required=("image", "category")):
            if row.get("split") == "train":
                with Image.open(os.path.join(base, row["image"])) as im:
                    examples.setdefault(str(row["category"]), []).append(im.convert("RGB"))
        return cls(examples)

    def objects(self, image):
        """[(box, foreground mask of the box)] of the image's objects, left to right."""
        fg = _foreground(np.asarray(_rgb(image)))
        if fg.all():  # blank, or no background to tell objects apart
            return []
        edges = np.flatnonzero(np.diff(np.concatenate([[0], fg.any(axis=0).astype(np.int8), [0]])))  # starts, ends
        found = []
        for x1, x2 in zip(edges[::2], edges[1::2]):
            rows = np.flatnonzero(fg[:, x1:x2].any(axis=1))
            y1, y2 = rows[0], rows[-1] + 1
            found.append(((int(x1), int(y1), int(x2), int(y2)), fg[y1:y2, x1:x2]))
        return found

    def shape_of(self, mask):
        return self.names[int(np.argmax(self.prototypes @ _outline(mask)))]

    def ground(self, image, expression):
        words = re.findall(r"[a-z]+", expression.lower())
        objects = self.objects(image)
        ordinal = next((w for w in words if w in ORDINAL_WORDS), None)
        if ordinal and "object" in words:
            i, order = ORDINAL_WORDS.index(ordinal), objects[::-1] if "right" in words else objects
            pick = order[i] if i < len(order) else None
        else:
            name = next((w for w in words if w in self.names), None)
            hits = [o for o in objects if name and self.shape_of(o[1]) == name]
            pick = hits[0] if len(hits) == 1 else None  # "the square" among two squares names neither
        if pick is None:
            return None
        x1, y1, x2, y2 = pick[0]
        return (max(x1 - 2, 0), max(y1 - 2, 0), min(x2 + 2, image.width), min(y2 + 2, image.height))


# ----------------------------------------------------------------------------- text search: BM25

_WORD = re.compile(r"\w+")


def tokenize(text):
    return _WORD.findall(text.lower())


def top_k(scores, k):
    """Indices of the k best scores, best first; ties go to the earlier index. Only the candidates
    at or above the k-th best score are sorted."""
    keep = np.arange(len(scores))
    if len(scores) > k:
        keep = np.flatnonzero(scores >= np.partition(scores, len(scores) - k)[len(scores) - k])
    return keep[np.lexsort((keep, -scores[keep]))][:k]


class BM25Index:
    """Okapi BM25 over {"id","title","text","url"} rows, as an inverted index: flat postings sorted by
    term, `indptr[t]:indptr[t+1]` being term t's slice of `post_docs` (documents) and `post_weights`
    (its BM25 score in each). A query touches only the postings of its own terms."""

    name = "local"

    def __init__(self, rows, k1=1.2, b=0.75):
        self.docs = [{"id": str(r["id"]), "title": r.get("title", ""), "text": r.get("text", ""),
                      "url": r.get("url", "")} for r in rows]
        n = len(self.docs)
        tokens = [tokenize(f"{d['title']} {d['text']}") for d in self.docs]
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
        self.n_tokens = int(lengths.sum())
        everything = itertools.chain.from_iterable
        # Term ids in order of first appearance; the C-level map() keeps six million tokens fast.
        self.vocab = {t: i for i, t in enumerate(dict.fromkeys(everything(tokens)))}
        terms = np.fromiter(map(self.vocab.__getitem__, everything(tokens)), dtype=np.int64, count=self.n_tokens)
        # One sort gives everything: the (term, doc) pairs, packed into one integer, come out unique,
        # in term-major order, with their counts (term frequencies).
        width = max(n, 1)
        pairs, tf = np.unique(terms * width + np.repeat(np.arange(n, dtype=np.int64), lengths), return_counts=True)
        post_terms, self.post_docs = pairs // width, (pairs % width).astype(np.int32)
        df = np.bincount(post_terms, minlength=len(self.vocab))
        self.indptr = np.concatenate([[0], np.cumsum(df)])
        idf = np.log1p((n - df + 0.5) / (df + 0.5))  # Lucene's idf: never negative
        norm = k1 * (1 - b + b * lengths[self.post_docs] / max(lengths.mean() if n else 0.0, 1.0))
        self.post_weights = (idf[post_terms] * tf * (k1 + 1) / (tf + norm)).astype(np.float32)

    @classmethod
    def from_jsonl(cls, path):
        return cls(read_jsonl(path, required=("id", "text")))

    def search(self, query, k=3):
        """Top-k documents: dicts {id, title, text, url, score}; ties go to the earlier document."""
        terms = sorted({self.vocab[t] for t in tokenize(query) if t in self.vocab})
        if not terms or k <= 0:
            return []
        spans = [slice(self.indptr[t], self.indptr[t + 1]) for t in terms]
        docs = np.concatenate([self.post_docs[s] for s in spans])
        weights = np.concatenate([self.post_weights[s] for s in spans])
        if len(spans) > 1:  # a stable sort (timsort) of sorted runs is a merge: O(P log terms)
            order = np.argsort(docs, kind="stable")
            docs, weights = docs[order], weights[order]
        starts = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]]))  # each document's run
        hit, scores = docs[starts], np.add.reduceat(weights, starts, dtype=np.float64)  # hit: increasing
        return [dict(self.docs[hit[i]], score=float(scores[i])) for i in top_k(scores, k)]


# ----------------------------------------------------------------------------- image search: a crop-robust descriptor

FG_THRESHOLD = 40  # a pixel this far (max over channels) from the background colour is foreground
COLOUR_LEVELS = 4  # per channel: 4**3 = 64 colour bins
GRID = 2  # colour histograms per quadrant of the icon
SHAPE_GRID = 8  # foreground occupancy on an 8x8 grid


def _rgb(image):
    """RGB with any transparency composited onto white (icons may be saved with alpha)."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def _foreground(pixels):
    """Mask of the uint8 RGB pixels farther than FG_THRESHOLD, in some channel, from the background
    (the median border pixel); all of them when fewer than 4 are (a blank image is described whole).
    Compared on the uint8 pixels: a signed or float copy of 16 M pixels would take 0.1 to 0.4 GB."""
    background = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    fg = np.zeros(pixels.shape[:2], dtype=bool)
    for c in range(3):  # |p - b| > T is p > b + T or p < b - T
        fg |= (pixels[..., c] > background[c] + FG_THRESHOLD) | (pixels[..., c] < background[c] - FG_THRESHOLD)
    if fg.sum() < 4:
        fg[:] = True
    return fg


def _outline(fg):
    """Signed occupancy (-0.5 empty .. +0.5 full) of a mask cut to its bounding box, on a SHAPE_GRID
    grid, as a unit vector: the silhouette, whatever its colours (empty cells counting against full
    ones tell a circle from a square far better than two mostly-full grids would)."""
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    fg = fg[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    occupancy = Image.fromarray(fg.astype(np.uint8) * 255).resize((SHAPE_GRID, SHAPE_GRID), Image.BOX)
    shape = np.asarray(occupancy, dtype=np.float64).ravel() / 255 - 0.5
    return shape / max(np.linalg.norm(shape), 1e-12)


def image_descriptor(image):
    """A unit vector describing an icon-like image (cosine compares two): the image cut to the box of
    its foreground, then three blocks of equal weight: a 64-bin colour histogram (an entity is its
    colours), one per quadrant (where its marks sit), and its outline; histograms square-rooted
    (Hellinger: one big bin cannot dominate). A crop, a small shift or a rescale changes only what the
    box and the normalisation remove; a scene of several icons matches each poorly: cropping pays."""
    pixels = np.asarray(_rgb(image))  # uint8: every array the size of the image stays 1-2 bytes a pixel
    fg = _foreground(pixels)
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    pixels, fg = pixels[box], fg[box]
    (height, width), n_colours = fg.shape, COLOUR_LEVELS**3
    level = pixels // (256 // COLOUR_LEVELS)
    colour = (level[..., 0] * COLOUR_LEVELS + level[..., 1]) * COLOUR_LEVELS + level[..., 2]  # < 64: uint8
    quadrant = ((np.arange(height) * GRID // height).astype(np.uint16)[:, None] * GRID  # uint16: 256 codes
                + (np.arange(width) * GRID // width).astype(np.uint16)[None, :])
    colours = np.bincount(colour[fg], minlength=n_colours)
    placed = np.bincount((quadrant * n_colours + colour)[fg], minlength=GRID * GRID * n_colours)
    blocks = [np.sqrt(colours / colours.sum()), np.sqrt(placed / placed.sum()), _outline(fg)]
    vector = np.concatenate([block / max(np.linalg.norm(block), 1e-12) for block in blocks])
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class LocalImageIndex:
    """Nearest neighbours (cosine over image_descriptor) over {"id","image","title","text","url"}
    rows; "image" paths are relative to `base_dir`."""

    name = "local"

    def __init__(self, rows, base_dir="."):
        self.rows = [{"id": str(r["id"]), "title": r.get("title", ""), "text": r.get("text", ""),
                      "url": r.get("url", ""), "image": r["image"]} for r in rows]
        vectors = []
        for row in self.rows:
            path = os.path.join(base_dir, row["image"])
            try:
                with Image.open(path) as image:
                    vectors.append(image_descriptor(image))
            except OSError as e:
                raise ValueError(f"image index row {row['id']!r}: cannot read {path}: {e}") from None
        self.matrix = np.stack(vectors) if vectors else np.zeros((0, 1), dtype=np.float32)

    @classmethod
    def from_jsonl(cls, path):
        return cls(read_jsonl(path, required=("id", "image")), base_dir=os.path.dirname(os.path.abspath(path)))

    def search(self, image, k=3):
        """Top-k rows: dicts {id, title, text, url, image, score}; ties go to the earlier row."""
        if not self.rows or k <= 0:
            return []
        scores = self.matrix @ image_descriptor(image)
        return [dict(self.rows[i], score=float(scores[i])) for i in top_k(scores, k)]


# ----------------------------------------------------------------------------- dense retrieval (`tools.py index`)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_PART = 1024  # rows per resumable part of an index build: a kill loses at most this much work


def _weights_signature(model_dir):
    """config.json and the weight files' names and sizes: tells one checkpoint from another."""
    names = sorted(f for f in os.listdir(model_dir) if f.endswith((".safetensors", ".bin", ".json")))
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        return hashlib.sha256(f.read() + json.dumps([(n, os.path.getsize(os.path.join(model_dir, n))) for n in names])
                              .encode()).hexdigest()


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _save(path, write):
    """write(f) into a file opened "wb", atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


class Encoder:
    """Unit-length float32 embeddings from a local transformers checkpoint. A dual encoder (CLIP,
    SigLIP) embeds images and texts into one space, so text can search images too; any other (e5,
    BGE) embeds texts, pooled by `pooling` ("mean" or "cls"; by default what the sentence-transformers
    folder's 1_Pooling/config.json says, else "mean")."""

    def __init__(self, model_dir, pooling=None):
        import torch  # optional heavy dependencies, as for the grounder
        import transformers

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"encoder folder {model_dir!r} has no config.json")
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = transformers.AutoModel.from_pretrained(model_dir).to(self.device).eval()
        self.dual = hasattr(self.model, "get_image_features")
        if self.dual:  # the PIL flavour of the image processor: transformers' default one needs torchvision
            config = _read_json(os.path.join(model_dir, "preprocessor_config.json"))
            name = config.get("image_processor_type") or config.get("feature_extractor_type", "")
            name = name.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast") + "Pil"
            if not hasattr(transformers, name):
                raise ValueError(f"{model_dir}/preprocessor_config.json: no PIL image processor {name!r}")
            self.processor = getattr(transformers, name).from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        card = os.path.join(model_dir, "1_Pooling", "config.json")
        self.pooling = pooling or ("cls" if os.path.exists(card) and _read_json(card).get("pooling_mode_cls_token")
                                   else "mean")
        config = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = min(self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512))
        # SigLIP was trained on texts padded to max_length, and scores them only that way.
        self.pad = "max_length" if self.model.config.model_type.startswith("siglip") else True

    def embed(self, items, prefix=""):
        """(len(items), D) float32 rows of unit length, for a list of all PIL images or all strings."""
        with self.torch.inference_mode():
            if isinstance(items[0], Image.Image):
                if not self.dual:
                    raise SearchError("this index's encoder embeds text only")
                pixels = self.processor(images=[_rgb(image) for image in items], return_tensors="pt")["pixel_values"]
                features = self.model.get_image_features(pixel_values=pixels.to(self.device))
            else:
                tokens = self.tokenizer([prefix + text for text in items], padding=self.pad, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                if self.dual:
                    keys = ("input_ids", "attention_mask")
                    features = self.model.get_text_features(**{k: v for k, v in tokens.items() if k in keys})
                else:
                    hidden = self.model(**tokens).last_hidden_state  # (B, T, H)
                    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                    features = hidden[:, 0] if self.pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
            features = getattr(features, "pooler_output", features).float()  # transformers 5: an output object
            return self.torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


def index_rows(source):
    """(rows, base_dir) to index. A folder: its images, recursively, sorted, id the relative path and
    title the file name. A JSONL: image-index rows, or corpus rows when the first row has no "image"."""
    if os.path.isdir(source):
        base = os.path.abspath(source)
        paths = sorted(os.path.relpath(os.path.join(folder, name), base) for folder, _, names in os.walk(base)
                       for name in names if name.lower().endswith(IMAGE_SUFFIXES))
        return [{"id": p, "image": p, "title": os.path.splitext(os.path.basename(p))[0].replace("_", " "),
                 "text": "", "url": ""} for p in paths], base
    rows = read_jsonl(source, required=("id",))
    if rows and "image" in rows[0]:
        kept = [r for r in rows if isinstance(r.get("image"), str)]
        if len(kept) < len(rows):
            warnings.warn(f"{source}: {len(rows) - len(kept)} row(s) without an image path skipped")
        rows = kept
    return [{**r, "id": str(r["id"])} for r in rows], os.path.dirname(os.path.abspath(source))


def _embed_rows(encoder, rows, kind, base_dir, prefix, batch_size):
    """(len(rows), D) float32; NaN for an image that cannot be read, which is warned about and left out
    of the index (a corrupt or huge file must not end a build of hours)."""
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        if kind == "text":
            out.append(encoder.embed([f"{r.get('title', '')}\n{r.get('text', '')}".strip() for r in batch], prefix))
            continue
        images = []
        for row in batch:
            path = os.path.join(base_dir, row["image"])
            try:
                with Image.open(path) as image:
                    image.draft("RGB", (1024, 1024))  # JPEG decodes at a fraction of its size: encoders see ~224 px
                    images.append(_rgb(image))
            except Exception as e:
                warnings.warn(f"index: row {row['id']!r}: cannot read {path}: {type(e).__name__}: {e} (left out)")
                images.append(None)
        vectors = encoder.embed([image or Image.new("RGB", (8, 8)) for image in images])  # keeps the batch's shape
        vectors[[image is None for image in images]] = np.nan
        out.append(vectors)
    return np.concatenate(out)


def build_index(source, encoder_dir, out, *, batch_size=32, query_prefix="", passage_prefix="", part_size=INDEX_PART,
                progress=True):
    """Embed `source` (see index_rows) into the folder `out`: rows.jsonl, embeddings.npy (N, D) float32
    of unit rows, and index.json, written last (its presence means complete). Resumable: each
    `part_size` rows are saved atomically under out/parts/, and the same command run again goes on
    from the last saved part. Returns index.json's contents."""
    rows, base_dir = index_rows(source)
    if not rows:
        raise ValueError(f"{source}: nothing to index")
    kind, encoder = "image" if "image" in rows[0] else "text", Encoder(encoder_dir)
    if kind == "image" and not encoder.dual:
        raise ValueError(f"{encoder_dir} embeds text only: image indexes need a CLIP / SigLIP checkpoint")
    plan = {"kind": kind, "encoder": os.path.abspath(encoder_dir), "encoder_signature": _weights_signature(encoder_dir),
            "pooling": encoder.pooling, "query_prefix": query_prefix, "passage_prefix": passage_prefix,
            "base_dir": base_dir, "part_size": part_size}
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode())
    for row in rows:  # row by row: a corpus of millions is never one string
        digest.update(json.dumps(row, sort_keys=True).encode())
    plan["digest"] = digest.hexdigest()
    meta_path, parts = os.path.join(out, "index.json"), os.path.join(out, "parts")
    for path in (meta_path, os.path.join(parts, "plan.json")):
        if os.path.exists(path) and _read_json(path).get("digest") != plan["digest"]:
            raise ValueError(f"{out} holds an index of another input, encoder or settings: "
                             f"remove it or choose another folder")
    if os.path.exists(meta_path):
        print(f"{out}: up to date", flush=True)
        return _read_json(meta_path)
    _save(os.path.join(parts, "plan.json"), lambda f: f.write(json.dumps(plan).encode()))
    part = lambda start: os.path.join(parts, f"{start // part_size:06d}.npy")  # noqa: E731
    starts = range(0, len(rows), part_size)
    todo = [s for s in starts if not os.path.exists(part(s))]
    with tqdm(total=len(rows), initial=len(rows) - sum(len(rows[s : s + part_size]) for s in todo),
              desc=f"index {kind}s", unit=kind, disable=not progress) as bar:
        for start in todo:
            vectors = _embed_rows(encoder, rows[start : start + part_size], kind, base_dir, passage_prefix, batch_size)
            _save(part(start), lambda f: np.save(f, vectors))
            bar.update(len(vectors))
    matrix = np.concatenate([np.load(part(s)) for s in starts])  # (N, D)
    keep = ~np.isnan(matrix).any(axis=1)
    meta = {**plan, "count": int(keep.sum()), "dim": int(matrix.shape[1]),
            "left_out": [rows[i]["id"] for i in np.flatnonzero(~keep)]}
    write_jsonl(os.path.join(out, "rows.jsonl"), [row for row, k in zip(rows, keep) if k])
    _save(os.path.join(out, "embeddings.npy"), lambda f: np.save(f, np.ascontiguousarray(matrix[keep])))
    _save(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    shutil.rmtree(parts)
    return meta


class DenseIndex:
    """Cosine top-k over a folder written by build_index. Queries are PIL images, or strings for any
    index whose encoder has a text tower (over an image index: text-to-image search)."""

    def __init__(self, folder):
        meta_path = os.path.join(folder, "index.json")
        if not os.path.exists(meta_path):
            interrupted = os.path.isdir(os.path.join(folder, "parts"))
            resume = " (a build was interrupted: run it again to resume)" if interrupted else ""
            raise FileNotFoundError(f"{folder}: no index.json: build it with `python tools.py index`{resume}")
        self.meta = _read_json(meta_path)
        if _weights_signature(self.meta["encoder"]) != self.meta["encoder_signature"]:
            raise ValueError(f"{folder}: the encoder at {self.meta['encoder']} is not the one this index was "
                             f"built with: rebuild the index")
        self.rows = read_jsonl(os.path.join(folder, "rows.jsonl"), strict=True)
        self.matrix = np.load(os.path.join(folder, "embeddings.npy"), mmap_mode="r")  # (N, D)
        if self.matrix.shape != (len(self.rows), self.meta["dim"]):
            raise ValueError(f"{folder}: embeddings.npy is {self.matrix.shape}, rows.jsonl has {len(self.rows)} rows")
        self.encoder = Encoder(self.meta["encoder"], pooling=self.meta["pooling"])
        self.name = "dense-" + self.meta["digest"][:12]  # the cache key: a rebuilt index is a new backend
        self.lock = threading.Lock()  # one encoder forward at a time when the server's threads share it

    def search(self, query, k=3):
        """The rows' {id, title, text, url[, image]} and a score, best first. Which of the rows tied at the
        k-th score make the cut is argpartition's choice; among those kept, ties go to the earlier row."""
        if not self.rows or k <= 0:
            return []
        with self.lock:
            vector = self.encoder.embed([query], self.meta["query_prefix"] if isinstance(query, str) else "")[0]  # (D,)
        scores = self.matrix @ vector  # (N,)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]
        fields = ("id", "title", "text", "url", "image")
        return [{**{f: self.rows[i][f] for f in fields if f in self.rows[i]}, "score": float(scores[i])} for i in top]


# ----------------------------------------------------------------------------- remote backends, one request helper

class SearchError(RuntimeError):
    """A search that failed in a way worth telling the model (the message is model-readable)."""


def _png_bytes(image):
    buffer = io.BytesIO()
    _rgb(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_hash(image):
    """Content hash of an image's pixels (not of an encoding, which varies between PIL versions)."""
    rgb = _rgb(image)
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


MAX_RESPONSE_BYTES = 2 << 20  # a search reply is a few KB: more is a misbehaving service, not results
_READ_CHUNK = 64 << 10


def _detail(text, secret=None, limit=200):
    """Upstream text for an error message: the secret masked first, then cut (cut first, a key
    straddling the cut would lose its tail and no longer match the mask)."""
    return (str(text).replace(secret, "***") if secret else str(text))[:limit]


def _request_json(method, url, *, params=None, payload=None, timeout=10.0, retries=2, backoff=0.5, secret=None,
                  deadline=None, max_bytes=MAX_RESPONSE_BYTES):
    """One JSON request, or SearchError with a short message (never requests' own texts: they hold the
    URL, and so a key sent as a query parameter). Timeouts, connection errors, HTTP 429 and 5xx are
    retried with exponential backoff, a 429 or 503 with Retry-After after the time it asks (failed at
    once when that is past the deadline); other statuses fail at once. timeout: per connection
    attempt and per read; deadline: the whole call, every try, sleep and byte included (by default
    what the tries and sleeps could take); max_bytes: the most bytes of body read."""
    if deadline is None:
        deadline = timeout * (retries + 1) + sum(backoff * 2**i for i in range(retries))
    end = time.monotonic() + deadline
    last, tries, asked = f"no time left within the {deadline:g} s deadline", 0, None
    for attempt in range(retries + 1):
        if attempt:
            pause = backoff * 2 ** (attempt - 1) if asked is None else asked
            if time.monotonic() + pause >= end:
                if asked is not None:  # waiting less would only be refused again
                    raise SearchError(f"{last}: the service asked to retry after {asked:g} s, more than "
                                      f"the {max(end - time.monotonic(), 0):.1f} s left of the {deadline:g} s deadline")
                break  # no time for another try: say what the last one did
            time.sleep(pause)
        left = end - time.monotonic()
        if left <= 0:
            break
        wait, tries, asked = min(timeout, left), tries + 1, None
        try:
            with requests.request(method, url, params=params, json=payload, timeout=wait, stream=True) as response:
                status = response.status_code
                if status == 429 or status >= 500:
                    last = f"HTTP {status}"
                    if status in (429, 503):  # the two statuses whose Retry-After says when to come back
                        asked = retry_after_seconds(response.headers.get("Retry-After"))
                    continue
                body = _read_body(response, end, deadline, max_bytes, timeout)
        except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
            last = f"timed out after {wait:g} s"
            if end - time.monotonic() < 0.05:  # a read cut short at the deadline (see _read_body)
                last = f"timed out: no complete reply within the {deadline:g} s deadline"
            continue
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            last = f"connection failed ({type(e).__name__})"
            continue
        if status != 200:
            raise SearchError(f"HTTP {status}: {_detail(body.decode('utf-8', 'replace'), secret)}")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; RecursionError: nested too deeply
            raise SearchError("the search service returned invalid JSON") from None
    cut = f"; the {deadline:g} s deadline left no time for more" if tries < retries + 1 else ""
    raise SearchError(f"{last} ({tries} tries{cut})")


def retry_after_seconds(value):
    """Seconds a Retry-After header (delta-seconds or an HTTP date) asks to wait, at most 600; None
    when absent or unreadable."""
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


def _read_body(response, end, deadline, max_bytes, timeout):
    """The body of a streamed response, read before time.monotonic() passes `end` and no longer than
    max_bytes, else SearchError. read1 returns what one read of the socket brings (read(n) waits for
    n bytes, which a trickling server sends past any deadline), and before each read the socket's
    timeout is cut to the time left."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise SearchError(f"response larger than {max_bytes} bytes")
    raw = response.raw
    read = getattr(raw, "read1", raw.read)  # urllib3 1.x has no read1
    chunks, size = [], 0
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise SearchError(f"timed out: no complete reply within the {deadline:g} s deadline")
        reader = getattr(getattr(raw, "_fp", None), "fp", None)  # http.client's reader of the socket
        sock = getattr(getattr(reader, "raw", None), "_sock", None)  # None once the body is all read
        if sock is not None and sock.fileno() >= 0:
            sock.settimeout(min(timeout, left))  # urllib3 sets it afresh for the connection's next request
        chunk = read(_READ_CHUNK, decode_content=True)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:  # counted after decoding: a small gzip body may unpack to gigabytes
            raise SearchError(f"response larger than {max_bytes} bytes")
        chunks.append(chunk)


class HttpSearch:
    """Client of `python tools.py serve`, for a text query or an image: POST {url}/text {"query", "k"}
    or {url}/image {"image": base64 PNG, "k"} -> {"results": [...]} (clean_results checks them later)."""

    name = "http"

    def __init__(self, url, timeout=10.0, retries=2, backoff=0.5):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff

    def _post(self, url, payload):
        return _request_json("POST", url, payload=payload, timeout=self.timeout, retries=self.retries,
                             backoff=self.backoff)

    def search(self, query, k=3):
        if isinstance(query, str):
            reply = self._post(self.url + "/text", {"query": query, "k": k})
        else:
            reply = self._post(self.url + "/image", {"image": base64.b64encode(_png_bytes(query)).decode(), "k": k})
        if not isinstance(reply, dict) or "results" not in reply:
            raise SearchError(f"the search service replied with a JSON {type(reply).__name__} without \"results\"")
        return reply["results"]


class SearchR1TextSearch(HttpSearch):
    """Client of a Search-R1-style retrieval server (e5 / BGE servers of Search-R1, SenseNova-MARS...):
    POST {url} {"queries": [...], "topk": k, "return_scores": true} -> {"result": [[{"document": {"id",
    "contents": '"Title"\\ntext'}, "score"}, ...] per query]}; without scores, entries are documents."""

    name = "searchr1"

    def search(self, query, k=3):
        reply = self._post(self.url, {"queries": [query], "topk": k, "return_scores": True})
        result = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(result, list) or len(result) != 1 or not isinstance(result[0], list):
            raise SearchError('/retrieve: expected {"result": [[...]]} with one list for the one query')
        rows = []
        for entry in result[0][:k]:
            doc = entry.get("document", entry) if isinstance(entry, dict) else None
            if not isinstance(doc, dict):
                raise SearchError(f"/retrieve: an entry is a JSON {type(entry).__name__}, not an object")
            head, _, text = str(doc.get("contents", "")).partition("\n")
            rows.append({"id": doc.get("id", ""), "title": head.strip().strip('"'), "text": text.strip()})
            if isinstance(entry.get("score"), (int, float)):
                rows[-1]["score"] = float(entry["score"])
        return rows


SERPAPI_URL = "https://serpapi.com/search.json"


class SerpApiTextSearch:
    """Google web search through SerpAPI. The key is read from SERPAPI_API_KEY at each call and never
    shown; a missing key is an error at search time, so replaying a recorded cache needs none."""

    name, engine, entries = "serpapi", "google", "organic_results"

    def __init__(self, base_url=SERPAPI_URL, timeout=10.0, retries=2, backoff=1.0):
        self.base_url, self.timeout, self.retries, self.backoff = base_url, timeout, retries, backoff

    def _get(self, params, k):
        """The first k objects of the reply's list of results."""
        key = os.environ.get("SERPAPI_API_KEY")
        if not key:
            raise SearchError("web search is not configured (SERPAPI_API_KEY is not set)")
        reply = _request_json("GET", self.base_url, params=dict(params, engine=self.engine, api_key=key),
                              timeout=self.timeout, retries=self.retries, backoff=self.backoff, secret=key)
        if not isinstance(reply, dict):
            raise SearchError(f"SerpAPI replied with a JSON {type(reply).__name__}, not an object")
        if "error" in reply:
            if "hasn't returned any results" in str(reply["error"]):  # SerpAPI's way of saying "none"
                return []
            raise SearchError(f"SerpAPI: {_detail(reply['error'], key)}")
        entries = reply.get(self.entries, [])
        if not isinstance(entries, list):
            raise SearchError(f"SerpAPI's {self.entries} is a JSON {type(entries).__name__}, not a list")
        return [r for r in entries[:k] if isinstance(r, dict)]

    def search(self, query, k=3):
        return [{"id": r.get("link", ""), "title": r.get("title", ""), "text": r.get("snippet", ""),
                 "url": r.get("link", ""), "score": 1.0 / r.get("position", i + 1)}
                for i, r in enumerate(self._get({"q": query, "num": k}, k))]


class SerpApiLens(SerpApiTextSearch):
    """Google Lens (visual matches) through SerpAPI. Lens takes an image URL, not bytes:
    `upload_fn(png_bytes) -> url` puts the PNG where Google can fetch it (see upload_to)."""

    engine, entries = "google_lens", "visual_matches"

    def __init__(self, upload_fn, **kw):
        super().__init__(**kw)
        self.upload_fn = upload_fn

    def search(self, image, k=3):
        return [{"id": r.get("link", ""), "title": r.get("title", ""), "text": r.get("source", ""),
                 "url": r.get("link", ""), "image": r.get("thumbnail", ""), "score": 1.0 / r.get("position", i + 1)}
                for i, r in enumerate(self._get({"url": self.upload_fn(_png_bytes(image))}, k))]


def upload_to(url):
    """An upload_fn for SerpApiLens: POST the PNG (Content-Type image/png) to `url`, an endpoint of
    yours that stores it where Google can fetch it (e.g. a bucket, with a presigned GET URL) and
    answers its public URL, as plain text or as JSON {"url": ...}."""
    def upload(png):
        try:
            r = requests.post(url, data=png, headers={"Content-Type": "image/png"}, timeout=10.0)
        except requests.RequestException as e:
            raise SearchError(f"image upload failed ({type(e).__name__})") from None
        if r.status_code != 200:
            raise SearchError(f"image upload: HTTP {r.status_code}: {_detail(r.text)}")
        text = r.text.strip()[:2048]
        try:
            text = json.loads(text)["url"] if text.startswith("{") else text
        except (ValueError, KeyError, TypeError):
            raise SearchError('image upload: the reply is neither a URL nor JSON {"url": ...}') from None
        if not isinstance(text, str) or not re.match(r"https?://\S+$", text):
            raise SearchError(f"image upload: the reply is not an http(s) URL: {_detail(text, limit=80)}")
        return text
    return upload


# ----------------------------------------------------------------------------- search cache; results for the model

class SearchCache:
    """SQLite cache of search results (and eval's judge verdicts), keyed by (backend, query or image
    hash, k). Modes: "off" (always run), "rw" (read, and write what was missing), "replay" (a miss
    is a SearchError: a replayed evaluation makes no network call). Processes may share one file:
    WAL journal, a busy timeout (writers queue), INSERT OR REPLACE (two ranks caching one query is
    harmless). An empty list is never stored: it is often transient (a rate limit, a rebuild)."""

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
            self._conn.execute("PRAGMA busy_timeout=60000")
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
    """A backend's results, checked before they are cached or shown: objects whose id, title, text and
    url are text (numbers written out, None as ""); any other entry, or one that shows nothing, is
    dropped. SearchError for a reply that is not a list, or of which nothing is left: malformed
    results must not be cached and replayed forever."""
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
    lines = []
    for r in results:
        title = " ".join(str(r.get("title") or r.get("id") or "").split())
        snippet = " ".join(str(r.get("text") or "").split()[:max_words])
        lines.append(f"{title}: {snippet}" if snippet else title)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the OpenAI-compatible chat client

class TransientError(RuntimeError):
    """The item could not be finished for a reason a rerun may not meet: it gets no line."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class ApiRejected(RuntimeError):
    """The API refused this request for good (HTTP 400, 413, 422...): the item is discarded."""


class ApiFatal(RuntimeError):
    """The API refuses every request (HTTP 401, 403, 404: a wrong key, URL or model): the run stops
    rather than mark every item as done."""


FATAL_STATUS = (401, 403, 404)


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
    """When the next request may go: a 429's Retry-After holds back every thread (and every client)
    sharing the gate, since hammering a rate limit only extends it."""

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
    """A client of any OpenAI-compatible /chat/completions endpoint (vLLM, a hosted API): the
    summarizer, eval's judge and make_data's teacher. Timeouts, connection errors, malformed replies,
    HTTP 5xx and 429 are retried with exponential backoff and jitter (a 429's Retry-After holds back
    every thread sharing the `gate`); 401/403/404 raise ApiFatal (the run stops), other 4xx
    ApiRejected (the item is discarded). The key, read once from the environment variable
    `api_key_env`, only travels in the Authorization header. Outcomes and tokens go to `meter`."""

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

    def _redact(self, text):
        return text.replace(self._key, "***") if self._key else text

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
                elif status in FATAL_STATUS:
                    raise ApiFatal(f"{self.name} at {public_url(self.endpoint)}: HTTP {status}: "
                                   f"{self._redact(response.text[:300])} (check the URL, the model and the key)")
                elif status != 200:
                    self.meter.add(self.name, rejected=1)
                    raise ApiRejected(f"HTTP {status}: {self._redact(response.text[:300])}")
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
    """A chat message's content as text (a string, or a list of {"type": "text", "text"} parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class ChatSummarizer:
    """`summarizer(query, results) -> str` through a chat endpoint (key from OPENAI_API_KEY). When it
    fails, the plain results are used, with a warning: the model still gets its information."""

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
        if action.kind == "text_search":
            return self._text_search(" ".join(action.arg.split()), state)
        return self._image_search(action, image, state)

    def _text_search(self, query, state):
        if self.text_backend is None:
            return _failure("text_search", "Text search is not available. Answer now.")
        state.n_text_search += 1
        state.n_calls += 1
        backend = self.text_backend
        results = self._cached(f"{backend.name}/text", query, lambda: backend.search(query, self.topk))
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
        backend = self.image_backend
        results = self._cached(f"{backend.name}/image", "image:" + image_hash(query_image),
                               lambda: backend.search(query_image, self.topk))
        images = [query_image] if self.attach == "crop" and box is not None else []
        label = "the whole image" if box is None else f"the crop {list(box)}"
        return self._observation("img_search", label, results, IMAGE_SEARCH_PROMPT, images, box)

    def _cached(self, backend, query, run):
        """run()'s results, cleaned before the cache sees them; a cached list is cleaned again (a file
        written before results were checked may hold anything)."""
        fetch = lambda: clean_results(run())  # noqa: E731
        return fetch() if self.cache is None else clean_results(self.cache.lookup(backend, query, self.topk, fetch))

    def _observation(self, kind, query, results, prompt, images=(), box=None):
        if not results:  # the query is the model's own, but echoing "<image>" would still be a placeholder
            return _failure(kind, f"No results for {neutralize(query)}. Try something else.", box)
        results = results[: self.topk]
        body = self.summarizer(query, results) if self.summarizer else format_results(results, self.snippet_words)
        # The body is text from outside; our markup goes around it after it is made inert.
        text = "<information>" + "<image>\n" * len(images) + neutralize(body) + "</information>\n" + prompt
        return Observation(text, images=list(images), error=False, kind=kind, box=box, results=results)


BACKENDS = ("local", "http", "searchr1", "serpapi")


def make_tools(data_dir="data", backend="local", cache=None, cache_mode="rw", grounder=None, server_url=None,
               lens_upload_url=None, text_index=None, image_index=None, **kw):
    """The one factory every script uses. backend: "local" (data_dir's corpus.jsonl and
    image_index.jsonl), "http" (server_url: a `python tools.py serve`), "searchr1" (server_url: a
    /retrieve address; images through data_dir's local index if any), "serpapi" (image search needs
    `lens_upload_url`, see upload_to). text_index / image_index: `python tools.py index` folders,
    each replacing the search of its kind. cache: a SQLite path (or a SearchCache) used in
    `cache_mode`. grounder: a GroundingDINO folder or any grounder; None: data_dir's world's
    SceneGrounder if it has one; False: none. Other keywords go to Tools."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use local, http, searchr1 or serpapi")
    if backend in ("http", "searchr1") and not server_url:
        address = "a `python tools.py serve` address" if backend == "http" else "a Search-R1 /retrieve address"
        raise ValueError(f"backend {backend!r} needs server_url ({address})")
    text = DenseIndex(text_index) if text_index else None
    image = DenseIndex(image_index) if image_index else None
    if backend == "local":
        text, image = text or _local_index(data_dir, "text", True), image or _local_index(data_dir, "image", True)
    elif backend == "http":
        text, image = text or HttpSearch(server_url), image or HttpSearch(server_url)
    elif backend == "searchr1":  # text only, like Search-R1's servers
        text, image = text or SearchR1TextSearch(server_url), image or _local_index(data_dir, "image", False)
        if image is None:
            warnings.warn(f"searchr1 backend: no {data_dir}/image_index.jsonl, image search is off")
    else:
        text = text or SerpApiTextSearch()
        image = image or (SerpApiLens(upload_to(lens_upload_url)) if lens_upload_url else None)
        if image is None:
            warnings.warn("serpapi backend without lens_upload_url: image search is off (Google Lens needs an "
                          "image URL)")
    if isinstance(cache, (str, os.PathLike)):
        cache = None if cache_mode == "off" else SearchCache(cache, cache_mode)
    elif cache is None and cache_mode == "replay":
        raise ValueError("cache_mode 'replay' needs a cache file (cache=PATH)")
    if isinstance(grounder, (str, os.PathLike)):
        grounder = GroundingDinoGrounder(grounder)
    world = os.path.join(data_dir, "entities.jsonl")
    if grounder is None and os.path.exists(world):  # the synthetic world: its grounder comes with it
        grounder = SceneGrounder.from_entities(world)
    return Tools(text, image, grounder=grounder or None, cache=cache, **kw)


def _local_index(data_dir, kind, required):
    """BM25 over data_dir/corpus.jsonl or image nearest neighbours over data_dir/image_index.jsonl;
    None when the file is absent and not required."""
    path = os.path.join(data_dir, "corpus.jsonl" if kind == "text" else "image_index.jsonl")
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"missing {path} (run `python make_data.py` first, or give a {kind} index)")
        return None
    return (BM25Index if kind == "text" else LocalImageIndex).from_jsonl(path)


def add_search_args(parser):
    """The search flags that eval.py, rl.py and make_real_data.py share; search_options(args) reads them."""
    g = parser.add_argument_group("search")
    g.add_argument("--backend", default="local", choices=BACKENDS, help="search backend (see tools.make_tools)")
    g.add_argument("--server_url", help="backend http: a `python tools.py serve` address; backend searchr1: a "
                   "Search-R1 /retrieve address")
    g.add_argument("--lens_upload_url", help="backend serpapi: an endpoint of yours that takes a POSTed PNG and "
                   "answers its public URL, for Google Lens (tools.upload_to)")
    g.add_argument("--text_index", help="a `python tools.py index` folder (e5 / BGE) for text search")
    g.add_argument("--image_index", help="a `python tools.py index` folder (CLIP / SigLIP) for image search")


def search_options(args):
    return {k: getattr(args, k) for k in ("backend", "server_url", "lens_upload_url", "text_index", "image_index")}


# ----------------------------------------------------------------------------- the search server (`tools.py serve`)

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
    """A request answered with HTTP `status` and {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _decode_image(encoded):
    """The image of a request, decoded only once its header (all Image.open reads) shows at most
    MAX_IMAGE_PIXELS: a one-colour PNG of a few KB can declare 12000x12000 pixels."""
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
    """POST /text {"query", "k"} and /image {"image": base64 PNG, "k"} -> {"results": [...]}; POST
    /retrieve, Search-R1's protocol over the text index (so that our indexes and Search-R1's e5 / BGE
    servers serve either side); GET /health. The indexes and limits live on self.server."""

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
            return self._reply(e.status, {"error": str(e)})
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
        """(queries, k) of a valid request, or _Refused(400)."""
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
        """The body's JSON object, or _Refused. The body is read as long as its Content-Length says; one
        over MAX_BODY is refused unread. A client that stalls mid-body times out (the socket's
        timeout) and http.server drops the connection."""
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
            raise _Refused(400, f"body is not valid JSON: {_detail(e)}") from None
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
    """A search server over the given indexes (either may be None); port 0 picks a free one; run it
    with serve_forever(). At most `max_handlers` connections are handled at once (the next ones get
    503 from the accept loop, which starts no thread for them); each read or write waits at most
    `timeout` seconds; a connection older than `deadline` seconds is shut down by service_actions
    (serve_forever's loop)."""

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
        """503 from the accept loop, which must never wait: non-blocking (a fresh socket takes these few
        hundred bytes at once), half-closed now and closed in _LINGER s (closed while the request still
        arrives, it would answer with a reset that can destroy the 503 before the client reads it)."""
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
        done = [sock for end, sock in self._lingering if end <= now]
        self._lingering = [(end, sock) for end, sock in self._lingering if end > now]
        for sock in done:
            _close_drained(sock)

    def server_close(self):
        super().server_close()
        for _, sock in self._lingering:
            _close_drained(sock)
        self._lingering = []


def _close_drained(sock):
    """Close a non-blocking socket after reading what the client sent (unread bytes would make the
    close a reset); at most 16 reads, so that a client still uploading cannot hold the loop."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not sock.recv(_READ_CHUNK):
                break
    sock.close()


def serve(data_dir, host="127.0.0.1", port=8765, text_index=None, image_index=None):
    """Serve search over data_dir's local indexes, or the dense index folders given instead."""
    text = DenseIndex(text_index) if text_index else _local_index(data_dir, "text", required=False)
    image = DenseIndex(image_index) if image_index else _local_index(data_dir, "image", required=False)
    if text is None and image is None:
        raise FileNotFoundError(f"nothing to serve: {data_dir} has no corpus.jsonl or image_index.jsonl")
    server = SearchServer(text, image, host, port)
    served = [(kind, index.name) for kind, index in (("text", text), ("image", image)) if index is not None]
    print(f"serving {' and '.join(k for k, _ in served)} search ({', '.join(n for _, n in served)}) "
          f"on http://{host}:{server.server_port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()


# ----------------------------------------------------------------------------- bench and command line

def bench(n_docs=100_000, n_queries=2000, seed=0):
    """BM25 over a generated corpus (Zipf-distributed pseudo-words): build time, queries (three words
    of a random document) per second, and how often that document comes first."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(30_000)])
    frequency = 1.0 / (np.arange(len(words)) + 10.0)  # Zipf-like: a few very common words
    lengths = rng.integers(30, 90, size=n_docs)
    stream = words[rng.choice(len(words), size=int(lengths.sum()), p=frequency / frequency.sum())]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    rows = [{"id": f"d{i}", "title": " ".join(stream[bounds[i] : bounds[i] + 3]),
             "text": " ".join(stream[bounds[i] + 3 : bounds[i + 1]]), "url": f"https://example.org/d{i}"}
            for i in range(n_docs)]
    start = time.perf_counter()
    index = BM25Index(rows)
    build = time.perf_counter() - start
    targets = rng.integers(0, n_docs, size=n_queries)
    queries = [" ".join(rng.choice(stream[bounds[t] : bounds[t + 1]], size=3, replace=False)) for t in targets]
    start = time.perf_counter()
    top = [index.search(q, 3) for q in queries]
    elapsed = time.perf_counter() - start
    first = np.mean([bool(r) and r[0]["id"] == f"d{t}" for r, t in zip(top, targets)])
    print(f"BM25 over {n_docs:,} generated documents ({index.n_tokens:,} tokens, {len(index.vocab):,} terms, "
          f"{len(index.post_docs):,} postings): build {build:.2f} s; {n_queries / elapsed:,.0f} queries/s (k=3); "
          f"the query's source document ranked first in {first:.0%} of queries")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Search tools: build a dense index, serve indexes, or benchmark BM25.")
    parser.add_argument("--bench", action="store_true", help="time BM25 build and queries on 100k generated documents")
    commands = parser.add_subparsers(dest="command")
    server = commands.add_parser("serve", help="serve data/corpus.jsonl and data/image_index.jsonl (or dense "
                                 "indexes) over HTTP")
    server.add_argument("--data", default="data", help="folder with corpus.jsonl and/or image_index.jsonl")
    server.add_argument("--text_index", help="a `tools.py index` folder to serve for text search instead of BM25")
    server.add_argument("--image_index", help="a `tools.py index` folder to serve for image search instead")
    server.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    server.add_argument("--port", type=int, default=8765)
    index = commands.add_parser("index", help="embed a folder of images or a JSONL with a local CLIP / SigLIP / "
                                "e5 / BGE checkpoint (resumable: run it again after a kill)")
    index.add_argument("source", help="a folder of images, an image index JSONL ({id, image, title, text, url}) "
                       "or a corpus JSONL ({id, title, text, url})")
    index.add_argument("--encoder", required=True, help="local checkpoint folder: CLIP or SigLIP for images "
                       "(and text-to-image), any of them or e5 / BGE for texts")
    index.add_argument("--out", required=True, help="index folder to write (rows.jsonl, embeddings.npy, index.json)")
    index.add_argument("--batch_size", type=int, default=32)
    index.add_argument("--part_size", type=int, default=INDEX_PART, help="rows saved at a time: a kill loses at "
                       "most this much work")
    index.add_argument("--query_prefix", default="", help='put before every query, e.g. "query: " for e5')
    index.add_argument("--passage_prefix", default="", help='put before every indexed text, e.g. "passage: " for e5')
    args = parser.parse_args(argv)
    if args.command is None and not args.bench:
        parser.error("give a command: index, serve, or --bench")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.command == "serve":
        serve(args.data, args.host, args.port, text_index=args.text_index, image_index=args.image_index)
    elif args.command == "index":
        start = time.perf_counter()
        meta = build_index(args.source, args.encoder, args.out, batch_size=args.batch_size, part_size=args.part_size,
                           query_prefix=args.query_prefix, passage_prefix=args.passage_prefix)
        size = sum(os.path.getsize(os.path.join(args.out, f)) for f in ("rows.jsonl", "embeddings.npy", "index.json"))
        left_out = f"; {len(meta['left_out'])} unreadable left out" if meta["left_out"] else ""
        print(f"{args.out}: {meta['count']:,} {meta['kind']}s x {meta['dim']} dims, {size / 1024:,.0f} KiB, "
              f"{time.perf_counter() - start:.1f} s{left_out}", flush=True)
    else:
        bench()


if __name__ == "__main__":
    main()
