"""search.py: the search backends that `tools.Tools` calls, and `make_tools`, which builds them.

    python search.py index photos/ --encoder models/siglip --out idx/photos   # CLIP / SigLIP image index
    python search.py index corpus.jsonl --encoder models/e5 --out idx/wiki \
        --query_prefix "query: " --passage_prefix "passage: "         # dense text index (e5 / BGE)
    python search.py --bench                                          # BM25 build time, queries/s

Backends: `local` (BM25 over corpus.jsonl, nearest neighbours over image_index.jsonl; offline,
deterministic), `http` (our JSON protocol, `python serve.py`), `serpapi` (Google and Google Lens),
`searchr1` (a Search-R1 /retrieve server). Dense indexes replace the search of their kind in any of
them; all sit behind `tools.SearchCache`. Grounders turn a referring expression into a box. No torch
here: GroundingDINO and the encoders import it when built.
"""

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import shutil
import threading
import time
import warnings

import numpy as np
import requests
import urllib3
from PIL import Image
from tqdm import tqdm

import tools as T


# ----------------------------------------------------------------------------- grounding: an expression to a box

# A grounder is any object with ground(image, expression) -> (x1, y1, x2, y2) | None.

class GroundingDinoGrounder:
    """GroundingDINO from a local folder (e.g. IDEA-Research/grounding-dino-tiny), on the CPU."""

    def __init__(self, model_dir, box_threshold=0.3, text_threshold=0.25):
        import torch  # imported when built: search.py stays torch-free
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
    """The offline world's GroundingDINO: objects are the runs of foreground columns on a plain background.
    "the third object from the left" (or "right") picks by position; "the square" the one object whose
    silhouette is nearest (cosine) to the mean silhouette of the `examples` ({name: [PIL images]}) so named.
    Returns its box padded by 2 pixels, or None when the expression names nothing there."""

    def __init__(self, examples):
        if not examples:
            raise ValueError("SceneGrounder needs labelled example images of at least one shape")
        self.names = sorted(examples)
        means = [np.mean([_outline(_foreground(np.asarray(T._rgb(im)))) for im in examples[n]], axis=0)
                 for n in self.names]
        self.prototypes = np.stack([m / np.linalg.norm(m) for m in means])  # (names, SHAPE_GRID**2)

    @classmethod
    def from_entities(cls, path):
        """From make_data.py's entities.jsonl: the training entities' icons, labelled by category."""
        examples, base = {}, os.path.dirname(os.path.abspath(path))
        for row in T.read_jsonl(path, required=("image", "category")):
            if row.get("split") == "train":
                with Image.open(os.path.join(base, row["image"])) as im:
                    examples.setdefault(str(row["category"]), []).append(im.convert("RGB"))
        return cls(examples)

    def objects(self, image):
        """[(box, foreground mask of the box)] of the image's objects, left to right."""
        fg = _foreground(np.asarray(T._rgb(image)))
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
    """Indices of the k best scores, best first; ties go to the earlier index."""
    keep = np.arange(len(scores))
    if len(scores) > k:  # sort only the candidates at or above the k-th best score
        keep = np.flatnonzero(scores >= np.partition(scores, len(scores) - k)[len(scores) - k])
    return keep[np.lexsort((keep, -scores[keep]))][:k]


class BM25Index:
    """Okapi BM25 over {"id","title","text","url"} rows as an inverted index: `indptr[t]:indptr[t+1]` is
    term t's slice of `post_docs` (documents) and `post_weights` (its BM25 score in each)."""

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
        # One sort of the (term, doc) pairs packed into one integer: unique, term-major, with their counts (tf).
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
        return cls(T.read_jsonl(path, required=("id", "text")))

    def search(self, query, k=3):
        """Top-k documents with a "score"; ties go to the earlier document."""
        terms = sorted({self.vocab[t] for t in tokenize(query) if t in self.vocab})
        if not terms or k <= 0:
            return []
        spans = [slice(self.indptr[t], self.indptr[t + 1]) for t in terms]
        docs = np.concatenate([self.post_docs[s] for s in spans])
        weights = np.concatenate([self.post_weights[s] for s in spans])
        if len(spans) > 1:  # timsort of sorted runs is a merge
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


def _foreground(pixels):
    """Mask of the pixels farther than FG_THRESHOLD, in some channel, from the background (the median
    border pixel); all of them when fewer than 4 are. Compared in uint8: a float copy of 16 M pixels is GBs."""
    background = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    fg = np.zeros(pixels.shape[:2], dtype=bool)
    for c in range(3):  # |p - b| > T is p > b + T or p < b - T
        fg |= (pixels[..., c] > background[c] + FG_THRESHOLD) | (pixels[..., c] < background[c] - FG_THRESHOLD)
    if fg.sum() < 4:
        fg[:] = True
    return fg


def _outline(fg):
    """Signed occupancy (-0.5 empty .. +0.5 full) of a mask cut to its box, on a SHAPE_GRID grid, as a unit
    vector: the silhouette (empty cells counting against full ones tell a circle from a square)."""
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    fg = fg[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    occupancy = Image.fromarray(fg.astype(np.uint8) * 255).resize((SHAPE_GRID, SHAPE_GRID), Image.BOX)
    shape = np.asarray(occupancy, dtype=np.float64).ravel() / 255 - 0.5
    return shape / max(np.linalg.norm(shape), 1e-12)


def image_descriptor(image):
    """A unit vector describing an icon-like image (cosine compares two), cut to its foreground's box:
    three blocks of equal weight, a 64-bin colour histogram, one per quadrant, and the outline; histograms
    square-rooted (Hellinger). Robust to a crop, shift or rescale; a scene of several icons matches each poorly."""
    pixels = np.asarray(T._rgb(image))  # uint8: arrays the size of the image stay 1-2 bytes a pixel
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
    """Nearest neighbours (cosine of image_descriptor) over {"id","image","title","text","url"} rows."""

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
        return cls(T.read_jsonl(path, required=("id", "image")), base_dir=os.path.dirname(os.path.abspath(path)))

    def search(self, image, k=3):
        """Top-k rows with a "score"; ties go to the earlier row."""
        if not self.rows or k <= 0:
            return []
        scores = self.matrix @ image_descriptor(image)
        return [dict(self.rows[i], score=float(scores[i])) for i in top_k(scores, k)]


# ----------------------------------------------------------------------------- dense retrieval (`search.py index`)

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
    with T.atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


class Encoder:
    """Unit float32 embeddings from a local checkpoint. A dual encoder (CLIP, SigLIP) embeds images and texts
    into one space; any other (e5, BGE) embeds texts, pooled by `pooling` ("mean" or "cls"; by default what a
    sentence-transformers folder's 1_Pooling/config.json says, else "mean")."""

    def __init__(self, model_dir, pooling=None):
        import torch  # imported when built, as for the grounder
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
                    raise T.SearchError("this index's encoder embeds text only")
                pixels = self.processor(images=[T._rgb(image) for image in items], return_tensors="pt")["pixel_values"]
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
    """(rows, base_dir). A folder: its images, recursively, sorted, id the relative path, title the file name.
    A JSONL: image-index rows, or corpus rows when the first row has no "image"."""
    if os.path.isdir(source):
        base = os.path.abspath(source)
        paths = sorted(os.path.relpath(os.path.join(folder, name), base) for folder, _, names in os.walk(base)
                       for name in names if name.lower().endswith(IMAGE_SUFFIXES))
        return [{"id": p, "image": p, "title": os.path.splitext(os.path.basename(p))[0].replace("_", " "),
                 "text": "", "url": ""} for p in paths], base
    rows = T.read_jsonl(source, required=("id",))
    if rows and "image" in rows[0]:
        kept = [r for r in rows if isinstance(r.get("image"), str)]
        if len(kept) < len(rows):
            warnings.warn(f"{source}: {len(rows) - len(kept)} row(s) without an image path skipped")
        rows = kept
    return [{**r, "id": str(r["id"])} for r in rows], os.path.dirname(os.path.abspath(source))


def _embed_rows(encoder, rows, kind, base_dir, prefix, batch_size):
    """(len(rows), D) float32; NaN rows for unreadable images, warned about (a corrupt file must not end a build)."""
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
                    images.append(T._rgb(image))
            except Exception as e:
                warnings.warn(f"index: row {row['id']!r}: cannot read {path}: {type(e).__name__}: {e} (left out)")
                images.append(None)
        vectors = encoder.embed([image or Image.new("RGB", (8, 8)) for image in images])  # keeps the batch's shape
        vectors[[image is None for image in images]] = np.nan
        out.append(vectors)
    return np.concatenate(out)


def build_index(source, encoder_dir, out, *, batch_size=32, query_prefix="", passage_prefix="", part_size=INDEX_PART,
                progress=True):
    """Embed `source` (see index_rows) into the folder `out`: rows.jsonl, embeddings.npy (N, D) of unit rows,
    and index.json, written last. Resumable: each `part_size` rows are saved under out/parts/, and the same
    command run again goes on from there. Returns index.json's contents."""
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
    T.write_jsonl(os.path.join(out, "rows.jsonl"), [row for row, k in zip(rows, keep) if k])
    _save(os.path.join(out, "embeddings.npy"), lambda f: np.save(f, np.ascontiguousarray(matrix[keep])))
    _save(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    shutil.rmtree(parts)
    return meta


class DenseIndex:
    """Cosine top-k over a build_index folder, for PIL images or strings (over an image index: text-to-image)."""

    def __init__(self, folder):
        meta_path = os.path.join(folder, "index.json")
        if not os.path.exists(meta_path):
            interrupted = os.path.isdir(os.path.join(folder, "parts"))
            resume = " (a build was interrupted: run it again to resume)" if interrupted else ""
            raise FileNotFoundError(f"{folder}: no index.json: build it with `python search.py index`{resume}")
        self.meta = _read_json(meta_path)
        if _weights_signature(self.meta["encoder"]) != self.meta["encoder_signature"]:
            raise ValueError(f"{folder}: the encoder at {self.meta['encoder']} is not the one this index was "
                             f"built with: rebuild the index")
        self.rows = T.read_jsonl(os.path.join(folder, "rows.jsonl"), strict=True)
        self.matrix = np.load(os.path.join(folder, "embeddings.npy"), mmap_mode="r")  # (N, D)
        if self.matrix.shape != (len(self.rows), self.meta["dim"]):
            raise ValueError(f"{folder}: embeddings.npy is {self.matrix.shape}, rows.jsonl has {len(self.rows)} rows")
        self.encoder = Encoder(self.meta["encoder"], pooling=self.meta["pooling"])
        self.name = "dense-" + self.meta["digest"][:12]  # the cache key: a rebuilt index is a new backend
        self.lock = threading.Lock()  # one encoder forward at a time when the server's threads share it

    def search(self, query, k=3):
        """Rows with a "score", best first; argpartition picks among ties at the k-th score, then earlier first."""
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

MAX_RESPONSE_BYTES = 2 << 20  # a search reply is a few KB: more is a misbehaving service, not results
_READ_CHUNK = 64 << 10


def _request_json(method, url, *, params=None, payload=None, timeout=10.0, retries=2, backoff=0.5, secret=None,
                  deadline=None, max_bytes=MAX_RESPONSE_BYTES):
    """One JSON request, or SearchError with a short message (never requests' texts: they hold the URL, and
    so a key). Timeouts, connection errors, 429 and 5xx are retried with exponential backoff, or after a
    429's or 503's Retry-After (failed at once when past the deadline). timeout: per attempt and per read;
    deadline: the whole call (by default what the tries and sleeps could take); max_bytes: of the body."""
    if deadline is None:
        deadline = timeout * (retries + 1) + sum(backoff * 2**i for i in range(retries))
    end = time.monotonic() + deadline
    last, tries, asked = f"no time left within the {deadline:g} s deadline", 0, None
    for attempt in range(retries + 1):
        if attempt:
            pause = backoff * 2 ** (attempt - 1) if asked is None else asked
            if time.monotonic() + pause >= end:
                if asked is not None:  # waiting less would only be refused again
                    raise T.SearchError(f"{last}: the service asked to retry after {asked:g} s, more than "
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
                        asked = T.retry_after_seconds(response.headers.get("Retry-After"))
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
            raise T.SearchError(f"HTTP {status}: {T._detail(body.decode('utf-8', 'replace'), secret)}")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; RecursionError: nested too deeply
            raise T.SearchError("the search service returned invalid JSON") from None
    cut = f"; the {deadline:g} s deadline left no time for more" if tries < retries + 1 else ""
    raise T.SearchError(f"{last} ({tries} tries{cut})")


def _read_body(response, end, deadline, max_bytes, timeout):
    """The body of a streamed response, read by time.monotonic() `end` and within max_bytes, else SearchError.
    read1, not read(n), which waits for n bytes that a trickling server sends past any deadline."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise T.SearchError(f"response larger than {max_bytes} bytes")
    raw = response.raw
    read = getattr(raw, "read1", raw.read)  # urllib3 1.x has no read1
    chunks, size = [], 0
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise T.SearchError(f"timed out: no complete reply within the {deadline:g} s deadline")
        reader = getattr(getattr(raw, "_fp", None), "fp", None)  # http.client's reader of the socket
        sock = getattr(getattr(reader, "raw", None), "_sock", None)  # None once the body is all read
        if sock is not None and sock.fileno() >= 0:
            sock.settimeout(min(timeout, left))  # urllib3 sets it afresh for the connection's next request
        chunk = read(_READ_CHUNK, decode_content=True)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:  # counted after decoding: a small gzip body may unpack to gigabytes
            raise T.SearchError(f"response larger than {max_bytes} bytes")
        chunks.append(chunk)


class HttpSearch:
    """Client of `python serve.py`: POST {url}/text {"query", "k"} or {url}/image {"image": base64 PNG, "k"}
    -> {"results": [...]} (clean_results checks them later)."""

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
            reply = self._post(self.url + "/image", {"image": base64.b64encode(T._png_bytes(query)).decode(), "k": k})
        if not isinstance(reply, dict) or "results" not in reply:
            raise T.SearchError(f"the search service replied with a JSON {type(reply).__name__} without \"results\"")
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
            raise T.SearchError('/retrieve: expected {"result": [[...]]} with one list for the one query')
        rows = []
        for entry in result[0][:k]:
            doc = entry.get("document", entry) if isinstance(entry, dict) else None
            if not isinstance(doc, dict):
                raise T.SearchError(f"/retrieve: an entry is a JSON {type(entry).__name__}, not an object")
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
            raise T.SearchError("web search is not configured (SERPAPI_API_KEY is not set)")
        reply = _request_json("GET", self.base_url, params=dict(params, engine=self.engine, api_key=key),
                              timeout=self.timeout, retries=self.retries, backoff=self.backoff, secret=key)
        if not isinstance(reply, dict):
            raise T.SearchError(f"SerpAPI replied with a JSON {type(reply).__name__}, not an object")
        if "error" in reply:
            if "hasn't returned any results" in str(reply["error"]):  # SerpAPI's way of saying "none"
                return []
            raise T.SearchError(f"SerpAPI: {T._detail(reply['error'], key)}")
        entries = reply.get(self.entries, [])
        if not isinstance(entries, list):
            raise T.SearchError(f"SerpAPI's {self.entries} is a JSON {type(entries).__name__}, not a list")
        return [r for r in entries[:k] if isinstance(r, dict)]

    def search(self, query, k=3):
        return [{"id": r.get("link", ""), "title": r.get("title", ""), "text": r.get("snippet", ""),
                 "url": r.get("link", ""), "score": 1.0 / r.get("position", i + 1)}
                for i, r in enumerate(self._get({"q": query, "num": k}, k))]


class SerpApiLens(SerpApiTextSearch):
    """Google Lens (visual matches) through SerpAPI. Lens takes an image URL: `upload_fn(png_bytes) -> url`
    puts the PNG where Google can fetch it (see upload_to)."""

    engine, entries = "google_lens", "visual_matches"

    def __init__(self, upload_fn, **kw):
        super().__init__(**kw)
        self.upload_fn = upload_fn

    def search(self, image, k=3):
        return [{"id": r.get("link", ""), "title": r.get("title", ""), "text": r.get("source", ""),
                 "url": r.get("link", ""), "image": r.get("thumbnail", ""), "score": 1.0 / r.get("position", i + 1)}
                for i, r in enumerate(self._get({"url": self.upload_fn(T._png_bytes(image))}, k))]


def upload_to(url):
    """An upload_fn for SerpApiLens: POST the PNG to `url`, an endpoint of yours that stores it where Google
    can fetch it (e.g. a bucket) and answers its public URL, as plain text or JSON {"url": ...}."""
    def upload(png):
        try:
            r = requests.post(url, data=png, headers={"Content-Type": "image/png"}, timeout=10.0)
        except requests.RequestException as e:
            raise T.SearchError(f"image upload failed ({type(e).__name__})") from None
        if r.status_code != 200:
            raise T.SearchError(f"image upload: HTTP {r.status_code}: {T._detail(r.text)}")
        text = r.text.strip()[:2048]
        try:
            text = json.loads(text)["url"] if text.startswith("{") else text
        except (ValueError, KeyError, TypeError):
            raise T.SearchError('image upload: the reply is neither a URL nor JSON {"url": ...}') from None
        if not isinstance(text, str) or not re.match(r"https?://\S+$", text):
            raise T.SearchError(f"image upload: the reply is not an http(s) URL: {T._detail(text, limit=80)}")
        return text
    return upload


# ----------------------------------------------------------------------------- building the tools

BACKENDS = ("local", "http", "searchr1", "serpapi")


def make_tools(data_dir="data", backend="local", cache=None, cache_mode="rw", grounder=None, server_url=None,
               lens_upload_url=None, text_index=None, image_index=None, **kw):
    """The one factory every script uses. backend: "local" (data_dir's corpus.jsonl and image_index.jsonl),
    "http" (server_url: a `python serve.py`), "searchr1" (server_url: a /retrieve address; images through
    data_dir's local index if any), "serpapi" (image search needs `lens_upload_url`). text_index / image_index:
    `python search.py index` folders replacing the search of their kind. cache: a SQLite path or a
    SearchCache. grounder: a GroundingDINO folder or any grounder; None: data_dir's world's SceneGrounder
    if any; False: none. Other keywords go to Tools."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use local, http, searchr1 or serpapi")
    if backend in ("http", "searchr1") and not server_url:
        address = "a `python serve.py` address" if backend == "http" else "a Search-R1 /retrieve address"
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
        cache = None if cache_mode == "off" else T.SearchCache(cache, cache_mode)
    elif cache is None and cache_mode == "replay":
        raise ValueError("cache_mode 'replay' needs a cache file (cache=PATH)")
    if isinstance(grounder, (str, os.PathLike)):
        grounder = GroundingDinoGrounder(grounder)
    world = os.path.join(data_dir, "entities.jsonl")
    if grounder is None and os.path.exists(world):  # the synthetic world: its grounder comes with it
        grounder = SceneGrounder.from_entities(world)
    return T.Tools(text, image, grounder=grounder or None, cache=cache, **kw)


def _local_index(data_dir, kind, required):
    """BM25 over data_dir/corpus.jsonl or LocalImageIndex over image_index.jsonl; None if absent and not required."""
    path = os.path.join(data_dir, "corpus.jsonl" if kind == "text" else "image_index.jsonl")
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"missing {path} (run `python make_data.py` first, or give a {kind} index)")
        return None
    return (BM25Index if kind == "text" else LocalImageIndex).from_jsonl(path)


def add_search_args(parser):
    """The search flags that eval.py, rl.py and make_real_data.py share; search_options(args) reads them."""
    g = parser.add_argument_group("search")
    g.add_argument("--backend", default="local", choices=BACKENDS, help="search backend (see search.make_tools)")
    g.add_argument("--server_url", help="http: a `python serve.py` address; searchr1: a Search-R1 /retrieve address")
    g.add_argument("--lens_upload_url", help="serpapi: an endpoint taking a POSTed PNG, answering its public URL")
    g.add_argument("--text_index", help="a `python search.py index` folder (e5 / BGE) for text search")
    g.add_argument("--image_index", help="a `python search.py index` folder (CLIP / SigLIP) for image search")


def search_options(args):
    return {k: getattr(args, k) for k in ("backend", "server_url", "lens_upload_url", "text_index", "image_index")}


# ----------------------------------------------------------------------------- bench and command line

def bench(n_docs=100_000, n_queries=2000, seed=0):
    """BM25 over Zipf-distributed pseudo-words: build time, queries (three words of a document) per second,
    and how often that document comes first."""
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
    parser = argparse.ArgumentParser(description="Build a dense index, or benchmark BM25 (serve.py serves them).")
    parser.add_argument("--bench", action="store_true", help="time BM25 build and queries on 100k generated documents")
    commands = parser.add_subparsers(dest="command")
    index = commands.add_parser("index", help="embed images or a JSONL with a CLIP / SigLIP / e5 / BGE (resumable)")
    index.add_argument("source", help="a folder of images, an image index JSONL or a corpus JSONL")
    index.add_argument("--encoder", required=True, help="checkpoint folder: CLIP / SigLIP for images, or e5 / BGE")
    index.add_argument("--out", required=True, help="index folder to write (rows.jsonl, embeddings.npy, index.json)")
    index.add_argument("--batch_size", type=int, default=32)
    index.add_argument("--part_size", type=int, default=INDEX_PART, help="rows saved at a time (lost to a kill)")
    index.add_argument("--query_prefix", default="", help='put before every query, e.g. "query: " for e5')
    index.add_argument("--passage_prefix", default="", help='put before every indexed text, e.g. "passage: " for e5')
    args = parser.parse_args(argv)
    if args.command is None and not args.bench:
        parser.error("give a command: index, or --bench")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.command == "index":
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
