"""eval.py: score answers, convert the paper's benchmarks, run direct / RAG / agent inference, report.

    python eval.py                      # synthetic held-out set (data/questions_eval.jsonl), newest checkpoint
                                        # (out/rl, out/sft, else data/tiny), all three modes: prints the table
    python eval.py --ckpt out/sft --modes agent --limit 50 --report out/eval/report.html
    python eval.py --questions bench/infoseek.jsonl bench/dynvqa.jsonl --backend http --server_url http://127.0.0.1:8765
    python eval.py --judge_url http://127.0.0.1:8000/v1 --judge_model Qwen2.5-72B-Instruct   # LLM judge
    torchrun --standalone --nproc_per_node=4 eval.py --questions bench/infoseek.jsonl     # shards questions
    python eval.py convert --bench infoseek --src infoseek_val.jsonl --images oven_images/ --out bench/infoseek.jsonl

Scoring. `score(pred, answers)` is the one scorer (rl.py's rewards call it too): 1.0 when the prediction
matches any gold alias after normalisation (case, accents, punctuation, articles), or is the gold phrase with
at most two extra words and no hedge ("or", "not", ...), or when both are numbers that agree (reasonable
rounding, a gold range containing the prediction, a narrow predicted range containing the gold (years:
at most 5 wide), simple unit conversions); empty or missing answers score 0. With a `Judge` (any
OpenAI-compatible endpoint, verdicts cached in SQLite) the answers the rules reject are judged by an LLM, as the paper's evaluation does.

Modes. All three run through `rollout.rollout`, so the model sees the conversation format it was trained on
and token ids are never re-tokenized; decoding is greedy.
  direct  the paper's direct answer: one assistant turn, no tools; a turn that is not an answer ends the
          trajectory unanswered (scored wrong).
  rag     the paper's fixed workflow: a forced whole-image search, a forced text search with the question
          (`RAG_TURNS`), then one answer turn, which is wrong unless it is an answer.
  agent   on-demand multi-turn search.

Benchmarks (`convert --bench NAME`; the file layouts each loader expects are in its docstring, and in
`python eval.py convert --help`): infoseek, evqa (Encyclopedic-VQA), simplevqa, dynvqa, okvqa, aokvqa,
fvqa and livevqa (MMSearch-R1's). Output rows are the design's question JSONL, image paths relative to it.

Outputs of a run (--out, default out/eval): metrics.json (per benchmark and mode: accuracy, share of
questions that searched, searches per question by kind, turns, tokens generated, tool errors, wall time),
table.md (the paper's Table 1 shape, then the search behaviour), trajectories.jsonl (one record per
question and mode) and, with --report, one self-contained HTML file showing every trajectory.
"""
import argparse
import ast
import base64
import copy
import csv
import html
import io
import json
import math
import os
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import tools

HERE = Path(__file__).resolve().parent
MODES = ("direct", "rag", "agent")
MODE_TITLES = {"direct": "Direct answer (no search)",
               "rag": "RAG workflow (image search, then text search)",
               "agent": "Agent (on-demand search)"}

# ============================================================================ scorer

MAX_EXTRA_WORDS = 2  # "the answer is Paris" / "Eiffel Tower, Paris" pass; long answers go to the judge
# Words that turn "<gold> + a few words" into a hedge, a list or a negation: never a match.
HEDGE_WORDS = {"or", "and", "not", "no", "never", "nor", "neither", "either", "maybe", "perhaps",
               "possibly", "probably", "unlikely", "unknown", "unsure", "except", "but", "than"}
RANGE_MAX_WIDTH = 0.25  # a predicted range counts only if narrow: width <= 25% of the gold value
# ... and for years, at most 5 years wide: the paper's judge accepts "1990-1995" for 1993, while a
# decade ("1990-2000") says too little (a share of the value means nothing for years)
YEAR_RANGE_MAX_WIDTH = 5.0


def normalize_answer(text):
    """Lower-case, strip accents, punctuation (keeping decimal points), articles and extra spaces."""
    s = unicodedata.normalize("NFKD", str(text))
    s = "".join(c for c in s if not unicodedata.combining(c)).lower()
    s = s.replace("&", " and ")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)          # 1,000 -> 1000
    s = re.sub(r"['\u2019`]", "", s)                     # o'brien -> obrien, don't -> dont
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", "", s)             # U.S. -> us, but 3.5 stays
    s = re.sub(r"[^\w\s.]", " ", s)                      # other punctuation separates words
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _text_match(pred_n, gold_n):
    if not gold_n:
        return False
    if pred_n == gold_n:
        return True
    pt, gt = pred_n.split(), gold_n.split()
    if not 0 < len(pt) - len(gt) <= MAX_EXTRA_WORDS:
        return False
    for i in range(len(pt) - len(gt) + 1):
        if pt[i:i + len(gt)] == gt:
            return not (set(pt[:i] + pt[i + len(gt):]) & HEDGE_WORDS)
    return False


# ---------------------------------------------------------------------------- numbers and units

UNITS = {}  # written unit -> (dimension, factor to the dimension's base unit, offset added first)


def _units(dim, factor, *names, offset=0.0):
    for n in names:
        UNITS[n] = (dim, factor, offset)


_units("length", 1e-3, "mm", "millimeter", "millimeters", "millimetre", "millimetres")
_units("length", 1e-2, "cm", "centimeter", "centimeters", "centimetre", "centimetres")
_units("length", 1.0, "m", "meter", "meters", "metre", "metres")
_units("length", 1e3, "km", "kilometer", "kilometers", "kilometre", "kilometres")
_units("length", 0.0254, "in", "inch", "inches")
_units("length", 0.3048, "ft", "foot", "feet")
_units("length", 0.9144, "yd", "yard", "yards")
_units("length", 1609.344, "mi", "mile", "miles")
_units("mass", 1e-6, "mg", "milligram", "milligrams")
_units("mass", 1e-3, "g", "gram", "grams")
_units("mass", 1.0, "kg", "kilogram", "kilograms", "kilo", "kilos")
_units("mass", 1e3, "t", "tonne", "tonnes", "ton", "tons", "metric ton", "metric tons")  # ton = metric
_units("mass", 0.45359237, "lb", "lbs", "pound", "pounds")
_units("mass", 0.028349523125, "oz", "ounce", "ounces")
_units("area", 1.0, "m2", "m²", "sq m", "square meter", "square meters", "square metre", "square metres")
_units("area", 1e6, "km2", "km²", "sq km", "square kilometer", "square kilometers", "square kilometre",
       "square kilometres")
_units("area", 1e4, "ha", "hectare", "hectares")
_units("area", 4046.8564224, "acre", "acres")
_units("area", 2589988.110336, "mi2", "mi²", "sq mi", "square mile", "square miles")
_units("area", 0.09290304, "ft2", "ft²", "sq ft", "square foot", "square feet")
_units("volume", 1e-3, "ml", "milliliter", "milliliters", "millilitre", "millilitres")
_units("volume", 1.0, "l", "liter", "liters", "litre", "litres")
_units("volume", 3.785411784, "gal", "gallon", "gallons")
_units("volume", 1e3, "m3", "m³", "cubic meter", "cubic meters", "cubic metre", "cubic metres")
_units("time", 1.0, "s", "sec", "secs", "second", "seconds")
_units("time", 60.0, "min", "mins", "minute", "minutes")
_units("time", 3600.0, "h", "hr", "hrs", "hour", "hours")
_units("time", 86400.0, "day", "days")
_units("time", 604800.0, "week", "weeks")
_units("time", 31557600.0, "yr", "yrs", "year", "years")
_units("speed", 1 / 3.6, "km/h", "kmh", "kph", "km per hour", "kilometers per hour", "kilometres per hour")
_units("speed", 0.44704, "mph", "miles per hour")
_units("speed", 1.0, "m/s", "meters per second", "metres per second")
_units("speed", 0.514444, "knot", "knots", "kn")
_units("temperature", 1.0, "°c", "degrees c", "degree c", "degrees celsius", "degree celsius", "celsius",
       offset=273.15)
_units("temperature", 5 / 9, "°f", "degrees f", "degree f", "degrees fahrenheit", "degree fahrenheit",
       "fahrenheit", offset=459.67)
_units("temperature", 1.0, "kelvin", "kelvins")
_units("percent", 1.0, "%", "percent", "per cent", "pct")
_units("angle", 1.0, "°", "degree", "degrees")
for _code, _names in {"usd": ("usd", "us dollars", "dollars", "dollar"), "eur": ("eur", "euro", "euros"),
                      "gbp": ("gbp",), "jpy": ("jpy", "yen"), "cny": ("cny", "rmb", "yuan")}.items():
    _units("currency:" + _code, 1.0, *_names)
CURRENCY_SYMBOLS = {"$": "currency:usd", "€": "currency:eur", "£": "currency:gbp", "¥": "currency:jpy"}
SCALES = {"hundred": 1e2, "thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "mln": 1e6,
          "billion": 1e9, "bn": 1e9, "trillion": 1e12}
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                     "ninety": 90, "dozen": 12})
# Words that may surround a number without making the answer something other than a number.
NUMBER_FILLER = {"about", "approximately", "approx", "around", "roughly", "circa", "ca", "c", "nearly",
                 "almost", "some", "estimated", "an", "a", "the", "~", "≈", "is", "of"}
RANGE_WORDS = {"-", "to", "and", "between", "from"}

_NUM = r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])\.\d+"
_UNIT_ALT = "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))
_QTY = re.compile(
    r"(?P<cur>[$€£¥])?\s*(?P<num>" + _NUM + r")"
    r"(?:\s*(?P<scale>hundred|thousand|million|billion|trillion|mln|mn|bn)\b|(?P<k>k)(?![a-z]))?"
    r"(?:\s*(?P<unit>" + _UNIT_ALT + r"))?(?![a-z0-9])")


@dataclass
class Quantity:
    """A number or a range as written (raw, in its own unit) and in the unit's base (for conversions).
    tol_pred: half the resolution the written number stands for (when it is the prediction, it may be a
    rounding of the gold); tol_gold: the same, but only when the gold was written with decimals."""
    lo: float
    hi: float
    lo_base: float
    hi_base: float
    unit: str | None
    dim: str | None
    tol_pred: float
    tol_gold: float
    tol_pred_base: float
    tol_gold_base: float
    year: bool


def _num_text(text):
    s = unicodedata.normalize("NFKC", str(text)).lower().strip()
    s = s.replace("\u2212", "-").replace("\u2013", " - ").replace("\u2014", " - ")
    s = re.sub(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", lambda m: str(NUMBER_WORDS[m.group(1)]), s)
    return s.rstrip(".")


def _parse_one(m):
    num = m.group("num")
    digits = num.lstrip("+-").replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    intpart = digits.split(".")[0].lstrip("0")
    sig_str = (intpart + (digits.split(".")[1] if decimals else "")).lstrip("0")
    trailing = 0 if decimals else len(sig_str) - len(sig_str.rstrip("0"))
    sig = len(sig_str.rstrip("0")) if not decimals else len(sig_str)
    scale = SCALES[m.group("scale")] if m.group("scale") else (1e3 if m.group("k") else 1.0)
    unit = m.group("unit")
    if unit is None and m.group("cur"):
        unit = m.group("cur")
    value = float(num.replace(",", "")) * scale
    year = (scale == 1.0 and unit is None and not decimals and "," not in num
            and num.isdigit() and 1000 <= int(num) <= 2100)
    if year:
        res = 1.0
    elif decimals:
        res = 10.0 ** -decimals
    elif trailing and sig >= 2:
        res = 10.0 ** trailing          # 1,200 stands for "1,200 to the nearest hundred"
    else:
        res = 1.0
    res *= scale
    # One significant digit is too coarse to call a rounding: "2 million" is not 1.6 million, "2000"
    # is not 1990, "3" is not 3.4; "3.4" is 3.42, "12" is 12.3, "1,200" is 1,234.
    tol_pred = res / 2 if (decimals or sig >= 2) else 0.0
    tol_gold = res / 2 if decimals else 0.0
    return {"value": value, "unit": unit, "scale": scale, "tol_pred": tol_pred, "tol_gold": tol_gold,
            "year": year, "has_scale": scale != 1.0}


def _unit_info(unit):
    if unit is None:
        return None, 1.0, 0.0
    if unit in CURRENCY_SYMBOLS:
        return CURRENCY_SYMBOLS[unit], 1.0, 0.0
    return UNITS[unit]


def parse_quantity(text):
    """A number or a range of numbers with an optional unit, or None when the text is more than that
    (e.g. "Boeing 747", "May 5, 1990", "1990-05-12")."""
    s = _num_text(text)
    matches = list(_QTY.finditer(s))
    if not 1 <= len(matches) <= 2:
        return None
    rest = re.findall(r"[^\s,;:!?()]+", _QTY.sub(" ", s))
    allowed = NUMBER_FILLER | (RANGE_WORDS if len(matches) == 2 else set())
    if any(w.strip(".") not in allowed for w in rest if w.strip(".")):
        return None
    parts = [_parse_one(m) for m in matches]
    if len(parts) == 2:
        if not set(w.strip(".") for w in rest) & RANGE_WORDS:
            return None  # two numbers side by side are not a range
        a, b = parts
        # "5 to 6 million km", "$5-6": one side's unit or scale applies to both
        for x, y in ((a, b), (b, a)):
            if x["unit"] is None and y["unit"] is not None:
                x["unit"] = y["unit"]
                x["year"] = False
        if not a["has_scale"] and b["has_scale"]:
            a["value"] *= b["scale"]
            a["tol_pred"] *= b["scale"]
            a["tol_gold"] *= b["scale"]
    units = {p["unit"] for p in parts}
    if len(units) > 1:
        return None
    unit = parts[0]["unit"]
    dim, factor, offset = _unit_info(unit)
    lo, hi = min(p["value"] for p in parts), max(p["value"] for p in parts)
    tol_pred, tol_gold = min(p["tol_pred"] for p in parts), min(p["tol_gold"] for p in parts)
    return Quantity(lo=lo, hi=hi, lo_base=(lo + offset) * factor, hi_base=(hi + offset) * factor,
                    unit=unit, dim=dim, tol_pred=tol_pred, tol_gold=tol_gold,
                    tol_pred_base=tol_pred * factor, tol_gold_base=tol_gold * factor,
                    year=all(p["year"] for p in parts))


def numbers_match(p, g):
    """Does the predicted quantity p agree with the gold quantity g (see the module docstring)?"""
    if p.dim and g.dim and p.dim != g.dim:
        return False
    both_units = bool(p.unit and g.unit)
    if both_units:  # compare in base units; otherwise in the unit the one side wrote
        plo, phi, glo, ghi = p.lo_base, p.hi_base, g.lo_base, g.hi_base
        slack = max(p.tol_pred_base, g.tol_gold_base)
    else:
        plo, phi, glo, ghi = p.lo, p.hi, g.lo, g.hi
        slack = max(p.tol_pred, g.tol_gold)
    slack = max(slack, 1e-9 * max(1.0, abs(glo), abs(ghi)))
    if both_units and p.unit != g.unit and UNITS.get(p.unit) != UNITS.get(g.unit):
        # a converted figure was rounded in its own unit: allow 1% (1 degree for temperatures)
        slack = max(slack, 1.0 if g.dim == "temperature" else 0.01 * max(abs(glo), abs(ghi)))
    if plo == phi:                                   # a number, against a number or a gold range
        return glo - slack <= plo <= ghi + slack
    if glo == ghi:                                   # a predicted range containing the gold number
        width_ok = (phi - plo) <= (YEAR_RANGE_MAX_WIDTH if g.year else RANGE_MAX_WIDTH * abs(glo))
        return plo - slack <= glo <= phi + slack and width_ok
    if glo - slack <= plo and phi <= ghi + slack:    # range inside the gold range
        return True
    inter = max(0.0, min(phi, ghi) - max(plo, glo))
    union = max(phi, ghi) - min(plo, glo)
    return union > 0 and inter / union >= 0.5


def rule_match(pred, answers):
    """True when pred matches any gold alias by the rules (text or numbers)."""
    if pred is None:
        return False
    if isinstance(answers, (str, int, float)):
        answers = [answers]
    pred_n = normalize_answer(pred)
    if not pred_n:
        return False
    pred_q = parse_quantity(pred)
    for gold in answers:
        if gold is None:
            continue
        if _text_match(pred_n, normalize_answer(gold)):
            return True
        if pred_q is not None:
            gold_q = parse_quantity(gold)
            if gold_q is not None and numbers_match(pred_q, gold_q):
                return True
    return False


def score(pred, answers, question=None, judge=None):
    """The scorer (eval metrics and rl.py rewards): 1.0 if pred matches a gold alias, else 0.0.
    pred: the model's answer (None or empty scores 0); answers: the gold aliases; with a `Judge` and the
    question, an answer the rules reject is judged by the LLM (its verdicts are cached)."""
    if pred is None or not str(pred).strip():
        return 0.0
    if rule_match(pred, answers):
        return 1.0
    if judge is not None and question is not None:
        return 1.0 if judge(question, pred, answers) else 0.0
    return 0.0


# ============================================================================ LLM judge

JUDGE_PROMPT = """You grade short answers to questions about images. Decide whether the prediction means \
the same as one of the ground-truth answers.

Question: {question}
Ground-truth answers (matching any one is enough): {answers}
Prediction: {prediction}

Rules:
- Ignore case, punctuation, articles and wording; only the meaning counts.
- A prediction that names the same entity more or less specifically is correct; one that names a \
different or broader entity is incorrect.
- Numbers are correct if they agree after reasonable rounding or a simple unit conversion, or if the \
prediction is a narrow range that contains the ground truth.
- Dates are correct if the parts the question asks for agree.
- Hedged, multiple or self-contradicting answers, refusals and empty predictions are incorrect.

Reply with one word: correct or incorrect."""


def parse_verdict(reply):
    """'correct' -> True, 'incorrect' -> False, anything else -> None (not cached, rules stand)."""
    r = (reply or "").strip().lower()
    if re.search(r"\b(incorrect|not correct|wrong)\b", r):
        return False
    if re.search(r"\bcorrect\b", r):
        return True
    return None


class Judge:
    """An LLM judge behind any OpenAI-compatible /chat/completions endpoint (tools.ChatClient).
    Verdicts are cached in SQLite by (model, prompt) through tools.SearchCache, so a re-run costs
    nothing and is reproducible. The API key, if any, is read from the environment variable named by
    api_key_env."""

    def __init__(self, url, model, cache=None, api_key_env="OPENAI_API_KEY", timeout=60.0, retries=2):
        self.client = tools.ChatClient(url, model, name="judge", api_key_env=api_key_env, timeout=timeout,
                                       retries=retries, backoff=1.0, max_backoff=8.0)
        self.cache = tools.SearchCache(cache) if cache else None
        self.calls = self.hits = self.errors = 0

    def prompt(self, question, pred, answers):
        answers = [answers] if isinstance(answers, str) else answers
        return JUDGE_PROMPT.format(question=str(question).strip(),
                                   answers="; ".join(str(a) for a in answers), prediction=str(pred).strip())

    def __call__(self, question, pred, answers):
        """True / False, or None when the endpoint fails or its reply is not a verdict."""
        text = self.prompt(question, pred, answers)
        name = f"judge {self.client.model}"
        if self.cache is not None:
            hit = self.cache.get(name, text, 0)
            if hit is not None:
                self.hits += 1
                return hit["verdict"]
        self.calls += 1
        try:
            reply, _, _ = self.client.chat([{"role": "user", "content": text}], max_tokens=8, temperature=0)
        except (tools.TransientError, tools.ApiRejected, tools.ApiFatal) as e:
            self.errors += 1
            print(f"warning: judge: {e}; keeping the rule-based score", file=sys.stderr)
            return None
        verdict = parse_verdict(reply)
        if verdict is None:
            self.errors += 1
            print(f"warning: judge reply is not a verdict: {reply[:80]!r}", file=sys.stderr)
        elif self.cache is not None:
            self.cache.put(name, text, 0, {"verdict": verdict, "reply": reply})
        return verdict


# ============================================================================ benchmark loaders

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def read_records(path):
    """Rows of a .jsonl, .json, .csv or .parquet file (parquet needs pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return tools.read_jsonl(path)
    if suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix in (".parquet", ".pq"):  # MMSearch-R1 ships mini_data.pq
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                             "or export the rows to .jsonl first") from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .json, .csv or .parquet / .pq)")


def _rows(obj, *keys):
    """The list of rows in a loaded file: the file itself, or its first list under one of keys."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for k in keys + ("data", "rows", "items", "questions", "annotations"):
            if isinstance(obj.get(k), list):
                return obj[k]
    raise ValueError("expected a list of rows (or a JSON object holding one)")


def _text(x):
    """x as text that can be written as UTF-8: escaped surrogate pairs (an emoji as "\\ud83d\\ude00"
    read by a Python-literal parser) joined, a lone surrogate replaced."""
    return str(x).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _listify(x):
    """A gold field as a flat list of aliases: lists, numpy-ish arrays, '[...]' strings (JSON, or Python
    literals), scalars. Nested lists are flattened: Dyn-VQA's 202410 release groups its aliases as
    [["M3系列"], ["M3", "M3 pro"]]."""
    if x is None:
        return []
    if isinstance(x, str):
        s = x.strip()
        if s.startswith("[") and s.endswith("]"):
            for parse in (json.loads, ast.literal_eval):  # JSON first: it joins surrogate pairs
                try:
                    v = parse(s)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(v, (list, tuple)):
                    return _listify(list(v))
        return [s]
    if isinstance(x, (list, tuple)):
        out = []
        for item in x:
            out.extend(_listify(item) if isinstance(item, (list, tuple)) or hasattr(item, "tolist") else [item])
        return out
    if hasattr(x, "tolist"):
        return _listify(x.tolist())
    return [x]


def _dedupe(answers):
    out, seen = [], set()
    for a in answers:
        s = " ".join(_text(a).split()) if a is not None else ""
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out


def _by_count(answers):
    """Annotator answers, most frequent first (VQA-style 10-answer lists)."""
    counts = Counter(" ".join(str(a).split()) for a in answers if str(a).strip())
    return [a for a, _ in counts.most_common()], dict(counts)


class Images:
    """Finds a benchmark's image files under a folder (by file name, relative path or bare id, in any
    sub-folder), or writes images embedded in the rows (bytes, base64) to save_dir."""

    def __init__(self, root=None, save_dir=None):
        self.root = Path(root) if root else None
        self.save_dir = Path(save_dir) if save_dir else None
        self._index = None

    def _build(self):
        # file name and stem -> every file so named: one benchmark can reuse a name in several folders
        # (Dyn-VQA's four image_1.jpeg, LiveVQA Paper's x1.png per paper), which find tells apart
        self._index = {}
        if self.root is None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"--images {self.root}: not a folder")
        for dirpath, dirnames, files in os.walk(self.root):
            dirnames.sort()  # the same first match on every machine
            for f in sorted(files):
                p = Path(dirpath) / f
                if p.suffix.lower() in IMAGE_EXTS:
                    for key in {f.lower(), p.stem.lower()}:
                        self._index.setdefault(key, []).append(p)

    def _best(self, name, paths):
        """Of the files sharing name's file name, the one whose folders match most of name's own
        (a relative path or a URL's path); the first one if none does."""
        want = [part.lower() for part in Path(name).parts[:-1]]

        def shared(p):
            have = [part.lower() for part in p.relative_to(self.root).parts[:-1]]
            n = 0
            while n < min(len(want), len(have)) and want[-1 - n] == have[-1 - n]:
                n += 1
            return n
        return max(paths, key=shared)  # max keeps the first of equals

    def find(self, *names):
        """The first name that resolves to an image file, or None."""
        if self._index is None:
            self._build()
        for n in names:
            if n is None or str(n).strip() == "":
                continue
            n = str(n).strip()
            if n.startswith(("http://", "https://")):
                n = urlparse(n).path.lstrip("/")  # its folders tell same-named files apart
            if self.root is not None and (self.root / n).is_file():
                return (self.root / n).resolve()
            paths = self._index.get(Path(n).name.lower()) or self._index.get(Path(n).stem.lower())
            if paths:
                return self._best(n, paths).resolve()
        return None

    def save(self, key, data):
        """Write image bytes as save_dir/<key>.<format>; None if the bytes are not an image."""
        from PIL import Image, UnidentifiedImageError
        try:
            fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
        except (UnidentifiedImageError, OSError, ValueError):
            return None
        if self.save_dir is None:
            raise ValueError("embedded image bytes need a save_dir")
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(key))}.{'jpg' if fmt == 'jpeg' else fmt}"
        path.write_bytes(data)
        return path.resolve()

    def resolve(self, key, value):
        """An image field of any shape (file name, URL, path, bytes, {'bytes','path'}, base64, list of
        those) -> a local file path or None."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return next((p for p in (self.resolve(key, v) for v in value) if p is not None), None)
        if isinstance(value, dict):
            if value.get("bytes"):
                return self.resolve(key, value["bytes"])
            return self.find(value.get("path"))
        if isinstance(value, (bytes, bytearray)):
            return self.save(key, bytes(value))
        s = str(value).strip()
        if s.startswith("data:image/") and "," in s:
            s = s.split(",", 1)[1]
        if len(s) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", s):  # base64 image bytes, or a long id
            try:
                path = self.save(key, base64.b64decode(s))
                if path is not None:
                    return path
            except ValueError:
                pass
        return self.find(s)


def make_row(bench, source_id, question, answers, image, missing=None, needs_search=True, **meta):
    """One question row of the design's format; image is an absolute path or None (missing names it)."""
    meta = {"bench": bench, "source_id": str(source_id), **{k: v for k, v in meta.items() if v is not None}}
    if image is None and missing:
        meta["missing_image"] = str(missing)[:100]
    return {"id": f"{bench}-{source_id}", "image": image, "question": " ".join(_text(question).split()),
            "answers": _dedupe(answers), "needs_search": bool(needs_search), "meta": meta}


def _each(items, fn, where):
    """fn(i, item) for each item -> the rows it returns (a row or a list of rows). An item fn fails
    on (a missing field, a wrong type) becomes a {"skipped": why} marker, which convert counts and
    names: one bad record never ends a conversion."""
    rows = []
    for i, item in enumerate(items):
        try:
            got = fn(i, item)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            rows.append({"skipped": f"{where}: record {i + 1}: {type(e).__name__}: {str(e)[:100]}"})
            continue
        rows.extend(got if isinstance(got, list) else [got])
    return rows


def _each_record(srcs, fn):
    """fn(src, i, record) over the records of every source file (see _each)."""
    return [row for src in srcs for row in _each(_rows(read_records(src)), lambda i, r: fn(src, i, r), src)]


def load_infoseek(srcs, images):
    """InfoSeek (Chen et al., 2023). --src: infoseek_val.jsonl / infoseek_test.jsonl / infoseek_human.jsonl,
    one object per line: {"data_id", "image_id", "question", "answer": [aliases], "answer_eval": [...],
    "data_split"}; answer_eval holds alias strings, or for numerical questions
    [{"wikidata": 1.0, "range": [0.9, 1.1]}] (or that dict alone, not in a list; kept as the alias
    "0.9 - 1.1": a number inside it matches). The question types (entity, time, numerical) ship apart, in
    infoseek_val_qtype.jsonl {"data_id", "question_type"}: read when it lies beside the --src file.
    --images: the OVEN/InfoSeek images, files named <image_id>.jpg (any sub-folder)."""
    qtypes = {}

    def one(src, i, r):
        if src not in qtypes:
            qtypes[src] = _infoseek_qtypes(src)
        answers = _listify(r.get("answer"))
        for a in _listify(r.get("answer_eval")):
            if isinstance(a, dict):
                if isinstance(a.get("range"), (list, tuple)) and len(a["range"]) == 2:
                    answers.append(f"{a['range'][0]} - {a['range'][1]}")
                if a.get("wikidata") is not None:
                    answers.append(a["wikidata"])
            else:
                answers.append(a)
        return make_row("infoseek", r["data_id"], r["question"], answers,
                        images.find(r.get("image_id")), missing=r.get("image_id"),
                        image_id=r.get("image_id"), data_split=r.get("data_split"),
                        question_type=r.get("question_type") or qtypes[src].get(r["data_id"]))

    return _each_record(srcs, one)


def _infoseek_qtypes(src):
    """data_id -> question_type from <stem>_qtype.jsonl beside an InfoSeek file ({} when absent)."""
    path = Path(src).with_name(f"{Path(src).stem}_qtype.jsonl")
    if not path.is_file():
        return {}
    rows = [r for r in read_records(path) if isinstance(r, dict) and "data_id" in r]
    return {r["data_id"]: r.get("question_type") for r in rows}


def load_evqa(srcs, images):
    """Encyclopedic-VQA (Mensink et al., 2023). --src: train.csv / val.csv / test.csv with columns
    question, answer (annotator aliases separated by '|'; for multi_answer questions the parts of one
    answer separated by '&&'), dataset_image_ids (up to 5 ids separated by '|'), dataset_name
    (inaturalist / landmarks), question_type (templated, automatic, multi_answer, 2_hop),
    wikipedia_url, encyclopedic_vqa_split. One question per row, with its first image found.
    --images: the Google Landmarks v2 images (a/b/c/<image id>.jpg) and the iNaturalist 2021 images.
    iNaturalist stores its images by UUID (val/<category>/<uuid>.jpg) while the csv names them by iNat's
    numeric image id: give iNat 2021's val.json / train.json ({"images": [{"id", "file_name"}]}), or an
    {id: file_name} JSON, as another --src to map them."""
    questions = [s for s in srcs if Path(s).suffix.lower() != ".json"]
    inat = _inat_files([s for s in srcs if Path(s).suffix.lower() == ".json"])

    def one(src, i, r):
        aliases = [a.strip() for a in str(r.get("answer", "")).split("|")]
        parts = None
        if r.get("question_type") == "multi_answer":
            parts = [[p.strip() for p in a.split("&&") if p.strip()] for a in aliases]
            aliases = [", ".join(p) for p in parts]
        ids = [x.strip() for x in re.split(r"[|,;\s]+", str(r.get("dataset_image_ids", ""))) if x.strip()]
        image = images.find(*(inat.get(x, x) for x in ids))
        split = r.get("encyclopedic_vqa_split") or Path(src).stem
        return make_row("evqa", f"{split}-{i}", r["question"], aliases, image,
                        missing=ids[0] if ids else None, question_type=r.get("question_type"),
                        dataset_name=r.get("dataset_name"), wikipedia_url=r.get("wikipedia_url"),
                        image_ids=ids, answer_parts=parts)

    return _each_record(questions, one)


def _inat_files(paths):
    """iNaturalist image id (as text) -> file name, from iNat 2021 annotation files or {id: name} maps."""
    files = {}
    for path in paths:
        data = read_records(path)
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            data = {im["id"]: im["file_name"] for im in data["images"] if "id" in im and "file_name" in im}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected iNaturalist's {{\"images\": [...]}} or {{id: file_name}}")
        files.update({str(k): str(v) for k, v in data.items()})
    return files


def load_simplevqa(srcs, images):
    """SimpleVQA (Cheng et al., 2025). --src: the release's JSON / JSONL (or the Hugging Face parquet)
    with fields data_id, image, question, answer, language, vqa_category, original_category, source,
    atomic_question, atomic_fact; image is a file name / URL found under --images, or the image itself
    (base64 or parquet bytes), which is written next to --out."""
    def one(src, i, r):
        qid = r.get("data_id", i)
        image = images.resolve(f"simplevqa-{qid}", r.get("image") or r.get("image_path"))
        return make_row("simplevqa", qid, r["question"], _listify(r.get("answer")), image,
                        missing=r.get("image") if isinstance(r.get("image"), str) else None,
                        language=r.get("language"), vqa_category=r.get("vqa_category"),
                        original_category=r.get("original_category"), source=r.get("source"),
                        atomic_question=r.get("atomic_question"))

    return _each_record(srcs, one)


def load_dynvqa(srcs, images):
    """Dyn-VQA (Li et al., 2024; OmniSearch). --src: DynVQA_en.jsonl / DynVQA_zh.jsonl, or the dated
    releases DynVQA_en.202406.jsonl ... (the same question_ids in each, so the date joins the id), one
    object per line: {"image_url", "question", "question_id", "answer", "gloden_query" (sic; "golden_query"
    from 202502)}. answer: aliases in both languages, may hold numbers, is null for some questions, and in
    202410 is a list of alias groups [["M3系列"], ["M3", "M3 pro"]] (flattened; the groups kept in meta).
    --images: the downloaded images, in the folders of their URLs' paths: the releases reuse a file name
    in several folders (Timeqaextracted_images/image_1.jpeg, Freshqa_en_extracted_images/image_1.jpeg)."""
    def one(src, i, r):
        qid = r.get("question_id")
        release = re.search(r"\.(\d{6})$", Path(src).stem)
        url = r.get("image_url") or r.get("image")
        answer = r.get("answer")
        groups = [_listify(g) for g in answer if isinstance(g, list)] if isinstance(answer, list) else []
        return make_row("dynvqa", f"{release[1]}-{qid}" if release else qid, r["question"], _listify(answer),
                        images.find(url), missing=url, image_url=r.get("image_url"),
                        golden_query=r.get("gloden_query") or r.get("golden_query"),
                        language="zh" if str(qid).startswith("zh") else "en",
                        release=release[1] if release else None, answer_groups=groups or None)

    return _each_record(srcs, one)


def load_okvqa(srcs, images):
    """OK-VQA (Marino et al., 2019), VQA-v2 layout, two JSON files given together as --src (or the
    questions file alone, with *annotations*.json beside it):
    OpenEnded_mscoco_val2014_questions.json {"data_subtype": "val2014", "questions": [{"image_id",
    "question", "question_id"}]} and mscoco_val2014_annotations.json {"annotations": [{"question_id",
    "image_id", "answers": [{"answer", "raw_answer", "answer_confidence", "answer_id"}] x10,
    "question_type", "answer_type"}]}. Aliases are the annotators' answers, most frequent first.
    --images: COCO val2014, files named COCO_val2014_<image_id, 12 digits>.jpg."""
    loaded = [read_records(s) for s in srcs]
    qfile = next((d for d in loaded if isinstance(d, dict) and "questions" in d), None)
    afile = next((d for d in loaded if isinstance(d, dict) and "annotations" in d), None)
    if len(loaded) == 1 and qfile is not None and afile is None:
        sibling = _okvqa_annotations(Path(srcs[0]).parent, qfile.get("data_subtype"))
        afile = read_records(sibling) if sibling else None
    if qfile is None or afile is None:
        raise ValueError("okvqa needs the questions JSON and the annotations JSON (give both as --src)")
    subtype = qfile.get("data_subtype") or afile.get("data_subtype") or "val2014"
    ann = {a["question_id"]: a for a in afile["annotations"]}
    def one(i, q):
        a = ann.get(q["question_id"], {})
        answers, counts = _by_count(x.get("answer") for x in a.get("answers", []))
        iid = int(q["image_id"])
        return make_row("okvqa", q["question_id"], q["question"], answers,
                        images.find(f"COCO_{subtype}_{iid:012d}", f"{iid:012d}", str(iid)),
                        missing=f"COCO_{subtype}_{iid:012d}.jpg", image_id=iid,
                        answer_counts=counts, question_type=a.get("question_type"),
                        answer_type=a.get("answer_type"))

    return _each(qfile["questions"], one, srcs[0])


def _okvqa_annotations(folder, subtype):
    """The *annotations*.json in folder for the questions' split: the release ships train2014 and val2014
    side by side, and the first by name (train) would leave every val question without answers."""
    found = sorted(folder.glob("*annotations*.json"))
    return next((f for f in found if subtype and subtype in f.name), found[0] if found else None)


def load_aokvqa(srcs, images):
    """A-OKVQA (Schwenk et al., 2022). --src: aokvqa_v1p0_val.json (the test split has no answers), a
    JSON list of {"split", "image_id", "question_id", "question", "choices", "correct_choice_idx",
    "direct_answers": [10 annotator answers], "difficult_direct_answer", "rationales"}. Aliases: the
    direct answers, most frequent first, then the correct choice.
    --images: COCO 2017 (val2017/), files named <image_id, 12 digits>.jpg."""
    def one(src, i, r):
        answers, counts = _by_count(r.get("direct_answers") or [])
        choices, idx = r.get("choices") or [], r.get("correct_choice_idx")
        if isinstance(idx, int) and 0 <= idx < len(choices) and answers:
            answers.append(choices[idx])
        iid = int(r["image_id"])
        return make_row("aokvqa", r["question_id"], r["question"], answers,
                        images.find(f"{iid:012d}", f"COCO_val2014_{iid:012d}", str(iid)),
                        missing=f"{iid:012d}.jpg", image_id=iid, split=r.get("split"),
                        answer_counts=counts, choices=choices or None, correct_choice_idx=idx,
                        difficult_direct_answer=r.get("difficult_direct_answer"))

    return _each_record(srcs, one)


def _user_text(prompt):
    """The question inside an MMSearch-R1 prompt (a list of chat messages, or plain text)."""
    if isinstance(prompt, str):
        text = prompt
    else:
        msgs = _listify(prompt)
        user = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"] or msgs
        content = user[-1].get("content", "") if user and isinstance(user[-1], dict) else ""
        if isinstance(content, list):  # OpenAI-style content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = str(content)
    return re.sub(r"<image>", " ", text).strip()


def _mmsearch_r1_row(bench, r, i, images):
    """A row of MMSearch-R1's veRL parquet: data_id, prompt, images, reward_model, category, ..."""
    rm = r.get("reward_model") or {}
    if isinstance(rm, str):
        try:
            rm = ast.literal_eval(rm)
        except (ValueError, SyntaxError):
            rm = {"ground_truth": rm}
    answers = _listify(rm.get("ground_truth")) + _listify(rm.get("candidate_answers"))
    qid = r["data_id"] if r.get("data_id") is not None else i
    question = r.get("question") or _user_text(r.get("prompt", ""))
    img_field = r.get("images") if r.get("images") is not None else r.get("image")
    category = r.get("category")
    return make_row(bench, qid, question, answers, images.resolve(f"{bench}-{qid}", img_field),
                    missing=r.get("image_urls") if isinstance(r.get("image_urls"), str) else None,
                    needs_search=category != "search_free", category=category,
                    data_source=r.get("data_source"))


def load_fvqa(srcs, images):
    """FVQA (MMSearch-R1, Wu et al., 2025). --src: fvqa_test.parquet (pyarrow) or the same rows exported
    to JSON / JSONL: {"data_id", "prompt": [{"role": "user", "content": "...question..."}],
    "images": [{"bytes": ..., "path": None}], "reward_model": {"ground_truth", "candidate_answers": a JSON
    list as text, "style"}, "category": "search_required" | "search_free", "data_source", "image_urls"
    (null)}. MMSearch-R1's mini_data.pq has no data_id and no category: ids then come from the file name
    and row number. Images are embedded (written next to --out); a path-only image is looked up under
    --images."""
    return _each_record(srcs, lambda src, i, r: _mmsearch_r1_row("fvqa", r, _row_id(src, i), images))


def _row_id(src, i):
    """The id of a row with no id of its own: MMSearch-R1's mini_data.pq has no data_id column, and two
    such files converted together must not share "0", "1", ..."""
    return f"{Path(src).stem}_{i}"


def load_livevqa(srcs, images):
    """LiveVQA (Fu et al., 2025) as MMSearch-R1 evaluates it. --src: MMSearch-R1's parquet / JSON rows
    (the FVQA layout, see load_fvqa), or LiveVQA's own benchmark.json: a list of {"id", "img_path",
    "level1_qa": {"question", "Ground_Truth_List", ...}, "level2_qa": {...}, "source", "time"} (one question
    per level), or rows {"sample_id", "query", "gt_answer", "image"}. --images: the LiveVQA images
    (News/News_imgs/, Video/Video_images/, Paper/Paper_images/<arxiv id>/x1.png: Paper reuses x1.png,
    x2.png in each paper's folder, so img_path's folder picks the file)."""
    def one(src, i, r):
        if "reward_model" in r or "prompt" in r:
            return _mmsearch_r1_row("livevqa", r, _row_id(src, i), images)
        if "level1_qa" in r:  # one question per level
            rows = []
            for level in ("level1_qa", "level2_qa"):
                qa = r.get(level)
                if qa:
                    img = qa.get("img_path") or r.get("img_path")
                    rows.append(make_row("livevqa", f"{r['id']}-{level[:6]}", qa["question"],
                                         _listify(qa.get("Ground_Truth_List") or qa.get("Ground_Truth")),
                                         images.find(img), missing=img, level=level[:6],
                                         question_type=qa.get("question_type"), source=r.get("source"),
                                         time=r.get("time")))
            return rows
        qid = r.get("sample_id", r.get("id", i))
        img = r.get("image") or r.get("img_path") or r.get("image_path")
        return make_row("livevqa", qid, r.get("query") or r["question"],
                        _listify(r.get("gt_answer") or r.get("answer")),
                        images.resolve(f"livevqa-{qid}", img), missing=img if isinstance(img, str) else None)

    return _each_record(srcs, one)


LOADERS = {"infoseek": load_infoseek, "evqa": load_evqa, "simplevqa": load_simplevqa,
           "dynvqa": load_dynvqa, "okvqa": load_okvqa, "aokvqa": load_aokvqa,
           "fvqa": load_fvqa, "livevqa": load_livevqa}


def convert(bench, srcs, images_dir, out, limit=0, log=print):
    """Benchmark files -> the design's question JSONL at out (image paths relative to it; embedded images
    written to <out folder>/images/<bench>/). Rows without an image file or without answers are skipped
    and counted. Returns the rows written."""
    out = Path(out)
    rows = LOADERS[bench]([Path(s) for s in srcs], Images(images_dir, out.parent / "images" / bench))
    kept, no_image, no_answer, bad = [], [], 0, []
    for r in rows:
        if "skipped" in r:
            bad.append(r["skipped"])
        elif not r["answers"]:
            no_answer += 1
        elif r["image"] is None:
            no_image.append(r["meta"].get("missing_image", r["id"]))
        else:
            r["image"] = Path(os.path.relpath(r["image"], out.parent.resolve())).as_posix()
            kept.append(r)
    if limit:
        kept = kept[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    tools.write_jsonl(out, kept)
    log(f"{bench}: wrote {len(kept)} questions to {out}; skipped {len(no_image)} without an image file"
        + (f" (e.g. {', '.join(map(str, no_image[:3]))})" if no_image else "")
        + f", {no_answer} without answers, {len(bad)} malformed"
        + (f" ({'; '.join(bad[:3])})" if bad else ""))
    return kept


# ============================================================================ inference modes

# The paper's fixed RAG workflow as forced assistant turns (whole-image search, then the question as the
# text query); rollout executes them with the real tools, then the model answers freely. rollout
# replaces {question} with each question's text.
RAG_TURNS = ("<reason>I will search the web with the whole image to identify what it shows.</reason>"
             "<img_search><img></img_search>",
             "<reason>I will search the web with the question.</reason><text_search>{question}</text_search>")


def rag_actions(has_image):
    """The forced turns: no image search for a question without an image."""
    return list(RAG_TURNS) if has_image else list(RAG_TURNS[1:])


def with_budget(tools_, max_calls):
    """The same tools (backends, cache) with another call budget; a search past it is answered with an
    <information> saying no calls are left and asking for the answer."""
    t = copy.copy(tools_)
    t.max_calls = max_calls
    return t


def run_mode(mode, model, processor, tools_, questions, max_turns=6, max_new_tokens=256, batch_size=64,
             seed=0, progress=False, dtype=None):
    """Greedy rollouts of one mode over questions (rows from tools.load_questions); batch_size is the
    number of trajectories rollout keeps in flight; progress: rollout's bar with ETA. Returns one
    Trajectory per question, in order."""
    import rollout
    kw = dict(group_size=1, max_turns=max_turns, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed,
              batch_size=batch_size, progress=progress, dtype=dtype)
    if mode == "agent":
        return rollout.rollout(model, processor, tools_, questions, **kw)
    if mode == "direct":  # one turn, no search at all (the zero budget is a second guard)
        return rollout.rollout(model, processor, with_budget(tools_, 0), questions, **dict(kw, max_turns=1))
    if mode != "rag":
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    out = [None] * len(questions)
    for has_image in (True, False):  # forced turns are per call: one call per kind of question
        idx = [i for i, q in enumerate(questions) if bool(q.get("image")) == has_image]
        if idx:
            forced = rag_actions(has_image)  # the workflow's searches are all it gets, then one answer turn
            trajs = rollout.rollout(model, processor, with_budget(tools_, len(forced)), [questions[i] for i in idx],
                                    forced_actions=forced, **dict(kw, max_turns=len(forced) + 1))
            for i, tr in zip(idx, trajs):
                out[i] = tr
    return out


# ============================================================================ records and metrics

def _action_dict(a):
    return {"kind": a.kind, "arg": a.arg, "box": list(a.box) if a.box else None, "whole": a.whole,
            "reason": a.reason, "error": a.error}


def _obs_dict(o):
    if o is None:  # the last turn (an answer, or cut by the turn budget) has no observation
        return None
    keep = ("id", "title", "text", "url", "image", "score")
    return {"text": o.text, "kind": o.kind, "error": bool(o.error), "box": list(o.box) if o.box else None,
            "results": [{k: r[k] for k in keep if k in r} for r in o.results]}


def traj_record(traj, question, bench, mode, s, judged=False, index=None):
    """A Trajectory -> a plain JSON-able record: what metrics, reports and all_gather_object need."""
    obs = list(traj.observations) + [None] * max(0, len(traj.texts) - len(traj.observations))
    steps = [{"text": t, "action": _action_dict(a), "obs": _obs_dict(o)}
             for t, a, o in zip(traj.texts, traj.actions, obs)]
    rec = {"bench": bench, "mode": mode, "index": index, "qid": question["id"],
           "question": question["question"], "image": question.get("image"),
           "answers": list(question.get("answers", [])), "meta": question.get("meta") or {},
           "answer": traj.answer, "score": float(s), "judged": bool(judged), "finish": traj.finish,
           "turns": int(traj.turns), "gen_tokens": int(traj.gen_tokens),
           # searches by kind as tools.State counts them (n_img_search includes the crops)
           "n_text": int(traj.n_text_search), "n_image": int(traj.n_img_search - traj.n_crop),
           "n_crop": int(traj.n_crop), "n_errors": int(traj.n_tool_errors), "steps": steps}
    return rec


def metrics(records, wall_s=0.0):
    """Aggregate records of one benchmark x mode (see the module docstring for what each means)."""
    n = len(records)

    def mean(f):
        return sum(f(r) for r in records) / n if n else 0.0

    m = {"n": n,
         "accuracy": mean(lambda r: r["score"]),
         "searched": mean(lambda r: (r["n_text"] + r["n_image"] + r["n_crop"]) > 0),
         "text_per_q": mean(lambda r: r["n_text"]),
         "image_per_q": mean(lambda r: r["n_image"]),
         "crop_per_q": mean(lambda r: r["n_crop"]),
         "searches_per_q": mean(lambda r: r["n_text"] + r["n_image"] + r["n_crop"]),
         "turns": mean(lambda r: r["turns"]),
         "gen_tokens": mean(lambda r: r["gen_tokens"]),
         "tool_errors": mean(lambda r: r["n_errors"]),
         "answered": mean(lambda r: r["finish"] == "answer"),
         "judged": sum(1 for r in records if r.get("judged")),
         "wall_s": float(wall_s),
         "s_per_q": float(wall_s) / n if n else 0.0}
    kinds = defaultdict(list)
    for r in records:
        if r.get("meta", {}).get("kind"):
            kinds[r["meta"]["kind"]].append(r["score"])
    if kinds:
        m["by_kind"] = {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(kinds.items())}
    return m


def _pct(x):
    return f"{100 * x:.1f}"


def markdown_table(results):
    """results: {bench: {mode: metrics}} -> Markdown: accuracy in the shape of the paper's Table 1
    (a row per mode, a column per benchmark, then the average), the search behaviour, and accuracy by
    question kind when the questions carry one (the synthetic world)."""
    benches = list(results)
    modes = [m for m in MODES if any(m in results[b] for b in benches)]
    modes += [m for b in benches for m in results[b] if m not in modes]
    lines = ["| Mode | " + " | ".join(benches) + " | Avg |", "|---|" + "---:|" * (len(benches) + 1)]
    for mode in modes:
        accs = [results[b][mode]["accuracy"] for b in benches if mode in results[b]]
        cells = [_pct(results[b][mode]["accuracy"]) if mode in results[b] else "-" for b in benches]
        avg = _pct(sum(accs) / len(accs)) if accs else "-"
        lines.append(f"| {MODE_TITLES.get(mode, mode)} | " + " | ".join(cells) + f" | {avg} |")
    lines += ["", "| Benchmark | Mode | N | Acc | Searched % | Text/q | Image/q | Crop/q | Turns | Tokens/q "
              "| Tool errors/q | Wall s |", "|---|---|" + "---:|" * 10]
    for b in benches:
        for mode in modes:
            if mode not in results[b]:
                continue
            m = results[b][mode]
            lines.append(f"| {b} | {mode} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['searched'])} | "
                         f"{m['text_per_q']:.2f} | {m['image_per_q']:.2f} | {m['crop_per_q']:.2f} | "
                         f"{m['turns']:.2f} | {m['gen_tokens']:.1f} | {m['tool_errors']:.2f} | "
                         f"{m['wall_s']:.1f} |")
    for b in benches:
        kinds = sorted({k for m in results[b].values() for k in m.get("by_kind", {})})
        if not kinds:
            continue
        lines += ["", f"| {b}: accuracy by kind | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for mode in modes:
            bk = results[b].get(mode, {}).get("by_kind", {})
            lines.append(f"| {mode} | " + " | ".join(
                f"{_pct(bk[k]['accuracy'])} (n={bk[k]['n']})" if k in bk else "-" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


# ============================================================================ HTML report

REPORT_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
details{border:1px solid #ddd;border-radius:6px;margin:6px 0;padding:4px 10px;background:#fafafa}
details.ok{border-left:6px solid #2e7d32}details.bad{border-left:6px solid #c62828}
summary{cursor:pointer}.v{font-weight:bold}.ok .v{color:#2e7d32}.bad .v{color:#c62828}
.imgs{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start;margin:8px 0}
.imgs img{border:1px solid #bbb;max-width:384px}figure{margin:0}figcaption{font-size:12px;color:#555}
.step{border-top:1px dashed #ccc;padding:6px 0}.reason{color:#444;font-style:italic}
.action{font-family:monospace;background:#eef;padding:2px 4px}.err{color:#c62828}
pre{white-space:pre-wrap;word-break:break-word;background:#f4f4f4;padding:6px;margin:4px 0}
ol.res li{margin-bottom:4px}.url{color:#666;font-size:12px;word-break:break-all}
"""


def _esc(x):
    return html.escape("" if x is None else str(x), quote=True)


def _data_url(img, max_side=384, min_side=168):
    """A PIL image as an inline JPEG data URL (no server, no files beside the report). Small images
    (the synthetic world's 56 px icons) are enlarged by a whole factor so that they can be read."""
    img = img.convert("RGB")
    if max(img.size) < min_side:
        f = -(-min_side // max(img.size))
        img = img.resize((img.width * f, img.height * f), resample=0)  # nearest: keep pixels sharp
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _boxed(img, boxes):
    """The image with each crop box drawn and numbered."""
    from PIL import ImageDraw
    img = img.convert("RGB").copy()
    d = ImageDraw.Draw(img)
    w = max(2, max(img.size) // 150)
    for i, b in enumerate(boxes, 1):
        d.rectangle(b, outline=(230, 20, 20), width=w)
        d.text((b[0] + w + 1, b[1] + w), str(i), fill=(230, 20, 20))
    return img


def _load_image(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, TypeError):
        return None


def _step_box(step):
    """The crop box a step searched with (the tool's, else the model's), if its search ran."""
    a, o = step.get("action") or {}, step.get("obs")
    if o is None or o.get("error"):
        return None
    box = o.get("box") or (a.get("box") if a.get("kind") == "img_search" else None)
    return tuple(box) if box else None


def _step_html(i, step, image):
    a, o = step.get("action") or {}, step.get("obs")
    kind = a.get("kind", "invalid")
    parts = [f'<div class="step"><b>Turn {i}</b>']
    if a.get("reason"):
        parts.append(f'<div class="reason">{_esc(a["reason"])}</div>')
    if kind == "invalid":
        parts.append(f'<div class="err">invalid action: {_esc(a.get("error"))}</div>')
    else:
        label = {"text_search": "text search", "answer": "answer"}.get(kind, "image search")
        arg = "[whole image]" if a.get("whole") else a.get("arg")
        parts.append(f'<div><span class="action">{_esc(label)}</span> {_esc(arg)}</div>')
    if o is not None:
        box = _step_box(step)
        if box and image is not None:
            crop = image.crop(tuple(box))
            parts.append(f'<div class="imgs"><figure><img alt="crop" src="{_data_url(crop, 256)}">'
                         f'<figcaption>crop {_esc(list(box))}</figcaption></figure></div>')
        if o.get("error"):
            parts.append(f'<div class="err">tool error:</div><pre class="err">{_esc(o.get("text"))}</pre>')
        else:
            items = "".join(f'<li><b>{_esc(r.get("title"))}</b> <span class="url">{_esc(r.get("url"))}'
                            f'</span><div>{_esc(r.get("text"))}</div></li>' for r in o.get("results", []))
            parts.append(f'<div>search returned:</div><ol class="res">{items}</ol>'
                         f'<details><summary>what the model read</summary><pre>{_esc(o.get("text"))}</pre>'
                         '</details>')
    parts.append(f'<details><summary>raw turn</summary><pre>{_esc(step.get("text"))}</pre></details></div>')
    return "".join(parts)


def _record_html(r, open_=False):
    ok = r["score"] >= 1.0
    image = _load_image(r["image"]) if r.get("image") else None
    boxes = [b for b in map(_step_box, r["steps"]) if b]
    imgs = ""
    if image is not None:
        cap = f"image, {len(boxes)} crop box(es) drawn" if boxes else "image"
        imgs = (f'<div class="imgs"><figure><img alt="question image" src="{_data_url(_boxed(image, boxes))}">'
                f'<figcaption>{_esc(cap)}</figcaption></figure></div>')
    elif r.get("image"):
        imgs = f'<div class="err">image not found: {_esc(r["image"])}</div>'
    verdict = ("correct" if ok else "incorrect") + (" (LLM judge)" if r.get("judged") else "")
    steps = "".join(_step_html(i, s, image) for i, s in enumerate(r["steps"], 1))
    answer = _esc(r["answer"]) if r.get("answer") is not None else "<i>(no answer)</i>"
    return (f'<details class="{"ok" if ok else "bad"}"{" open" if open_ else ""}><summary><span class="v">'
            f'{"✓" if ok else "✗"}</span> {_esc(r["qid"])}: {_esc(r["question"])} → <b>{answer}</b></summary>'
            f'{imgs}<div><b>Question:</b> {_esc(r["question"])}</div>'
            f'<div><b>Gold:</b> {_esc("; ".join(map(str, r["answers"])))}</div>{steps}'
            f'<div><b>Answer:</b> {answer} · <b>verdict:</b> {_esc(verdict)} · finish '
            f'{_esc(r["finish"])} · {r["turns"]} turns · {r["gen_tokens"]} tokens</div></details>')


def report_html(records, results=None, title="DeepMMSearch-R1 evaluation", svg=None):
    """One self-contained HTML page: the summary table, then every trajectory (image with crop boxes,
    crops, each reasoning step, query and what came back, the answer and its verdict). All model and web
    text is escaped; images are inlined as base64 data URLs. svg: a picture to show first (the
    pipeline's training curves)."""
    body = [f"<h1>{_esc(title)}</h1>"] + ([svg] if svg else [])
    if results:
        body.append("<table><tr><th>Benchmark</th><th>Mode</th><th>N</th><th>Acc %</th><th>Searched %</th>"
                    "<th>Text/q</th><th>Image/q</th><th>Crop/q</th><th>Turns</th><th>Tokens/q</th>"
                    "<th>Tool errors/q</th></tr>")
        for b, by_mode in results.items():
            for mode, m in by_mode.items():
                body.append(f"<tr><td>{_esc(b)}</td><td>{_esc(mode)}</td><td>{m['n']}</td>"
                            f"<td>{_pct(m['accuracy'])}</td><td>{_pct(m['searched'])}</td>"
                            f"<td>{m['text_per_q']:.2f}</td><td>{m['image_per_q']:.2f}</td>"
                            f"<td>{m['crop_per_q']:.2f}</td><td>{m['turns']:.2f}</td>"
                            f"<td>{m['gen_tokens']:.1f}</td><td>{m['tool_errors']:.2f}</td></tr>")
        body.append("</table>")
    groups = defaultdict(list)
    for r in records:
        groups[(r["bench"], r.get("method") or MODE_TITLES.get(r["mode"], r["mode"]))].append(r)
    for (b, method), rs in groups.items():
        n_ok = sum(r["score"] >= 1.0 for r in rs)
        body.append(f"<h2>{_esc(b)} · {_esc(method)} · {n_ok}/{len(rs)} correct</h2>")
        body.extend(_record_html(r, open_=(i == 0)) for i, r in enumerate(rs))  # first one unfolded
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + _esc(title)
            + f"</title><style>{REPORT_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


# ============================================================================ training curves

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def log_series(path, prefix="step "):
    """{field: [(step, value)]} from the lines of a run's log.txt that start with `prefix` (sft.py's and
    rl.py's one line per step, or "eval step "): a field's first number, or for rl.py's
    "search/q text . img . crop ." the sum (searches per question)."""
    out = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if not line.startswith(prefix):
            continue
        head, *fields = line.split(" | ")
        step = int(head[len(prefix):].split("/")[0])
        for f in fields:
            name, _, rest = f.partition(" ")
            nums = [float(x) for x in _NUMBER.findall(rest)]
            if nums:
                out[name].append((step, sum(nums) if name == "search/q" else nums[0]))
    return out


CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c")


def curves_svg(panels, width=230, height=170):
    """panels: [(title, [(label, [(x, y)])], log_y)] -> one SVG image, the panels side by side, each with
    its own y range (printed at the top and bottom of its axis) and a legend under its title."""
    pad, parts = 34, []
    for i, (title, series, log_y) in enumerate(panels):
        if log_y:
            series = [(label, [(x, math.log10(y)) for x, y in ps if y > 0]) for label, ps in series]
        x0, pts = i * width, [p for _, ps in series for p in ps]
        parts.append(f'<text x="{x0 + pad}" y="14" font-size="11" font-weight="bold">{_esc(title)}</text>')
        for j, (label, _) in enumerate(series):
            parts.append(f'<text x="{x0 + pad + 62 * j}" y="28" font-size="10" fill="{CURVE_COLOURS[j]}">'
                         f'&#9632; {_esc(label)}</text>')
        if not pts:
            continue
        (xa, xb), (ya, yb) = [(min(v), max(v)) for v in zip(*pts)]
        xb, yb = max(xb, xa + 1), yb if yb > ya else ya + 1

        def at(x, y):
            return (f"{x0 + pad + (x - xa) / (xb - xa) * (width - pad - 10):.1f},"
                    f"{height - 20 - (y - ya) / (yb - ya) * (height - 56):.1f}")
        parts.append(f'<polyline points="{at(xa, yb)} {at(xa, ya)} {at(xb, ya)}" fill="none" stroke="#888"/>')
        for y, dy in ((yb, 4), (ya, 0)):
            parts.append(f'<text x="{x0 + pad - 3}" y="{at(xa, y).split(",")[1]}" dy="{dy}" font-size="9" '
                         f'text-anchor="end">{10 ** y if log_y else y:.3g}</text>')
        parts.append(f'<text x="{x0 + width - 10}" y="{height - 6}" font-size="9" text-anchor="end">'
                     f'step {xb:g}</text>')
        for j, (_, ps) in enumerate(series):
            c = CURVE_COLOURS[j]
            if len(ps) > 12:
                parts.append(f'<polyline points="{" ".join(at(x, y) for x, y in ps)}" fill="none" stroke="{c}" '
                             'stroke-width="1.2"/>')
            else:  # a few evaluations: dots joined by a line
                parts.append(f'<polyline points="{" ".join(at(x, y) for x, y in ps)}" fill="none" stroke="{c}"/>')
                parts += [f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" r="2.5" '
                          f'fill="{c}"/>' for x, y in ps]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height}" '
            f'font-family="sans-serif">' + "".join(parts) + "</svg>\n")


def pipeline_curves(sft_dir, rl_dir):
    """The pipeline's picture: SFT loss and held-out agent accuracy, RL reward, accuracy and searches
    per question, per step, from the two runs' log.txt (a missing log leaves its panels empty)."""
    def read(d, prefix):
        f = Path(d) / "log.txt"
        return log_series(f, prefix) if f.is_file() else {}
    sft, sft_eval, rl = read(sft_dir, "step "), read(sft_dir, "eval step "), read(rl_dir, "step ")
    return curves_svg([
        ("SFT loss (log scale)", [("train", sft.get("loss", [])), ("held-out", sft_eval.get("loss", []))], True),
        ("SFT held-out agent accuracy", [("accuracy", sft_eval.get("agent_acc", []))], False),
        ("RL reward and accuracy", [("reward", rl.get("reward", [])), ("accuracy", rl.get("acc", []))], False),
        ("RL searches per question", [("searches", rl.get("search/q", []))], False)])


def write_report(path, records, results=None, title="DeepMMSearch-R1 evaluation", svg=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report_html(records, results, title, svg), encoding="utf-8")
    tmp.replace(path)
    return path


# ============================================================================ running

def bench_name(path, questions):
    """A benchmark's name: its rows' meta.bench (converted benchmarks), else from the file name:
    questions_eval.jsonl -> synthetic, questions_hard.jsonl -> synthetic-hard."""
    b = (questions[0].get("meta") or {}).get("bench") if questions else None
    stem = Path(path).stem
    return b or ("synthetic" if stem == "questions_eval" else stem.replace("questions_", "synthetic-"))


def shard(n, rank, world):
    """Indices of the questions this rank runs: every world-th, from rank."""
    return list(range(rank, n, world))


def gather(obj, world):
    """Every rank's obj, on every rank (torch.distributed.all_gather_object), in rank order."""
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def evaluate(mode, model, processor, tools_, questions, bench, judge=None, rank=0, world=1,
             max_turns=6, max_new_tokens=256, batch_size=64, seed=0, progress=True, dtype=None):
    """Run one mode on this rank's share of questions, score it, gather all ranks' records.
    Returns (records in question order, wall seconds of the slowest rank)."""
    idx = shard(len(questions), rank, world)
    mine = [questions[i] for i in idx]
    if rank == 0 and progress:
        print(f"{bench} / {mode}: {len(questions)} questions on {world} rank(s)", file=sys.stderr, flush=True)
    t0 = time.time()
    trajs = run_mode(mode, model, processor, tools_, mine, max_turns=max_turns, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, seed=seed, progress=(rank == 0 and progress), dtype=dtype)
    records = []
    for i, q, t in zip(idx, mine, trajs):
        s = score(t.answer, q["answers"])
        judged = False
        if s < 1.0 and judge is not None and t.answer:
            s, judged = score(t.answer, q["answers"], question=q["question"], judge=judge), True
        records.append(traj_record(t, q, bench, mode, s, judged=judged, index=i))
    wall = time.time() - t0
    parts = gather((records, wall), world)
    merged = sorted((r for recs, _ in parts for r in recs), key=lambda r: r["index"])
    return merged, max(w for _, w in parts)


def _run_parser():
    p = argparse.ArgumentParser(
        prog="eval.py", description="Evaluate a checkpoint in direct / RAG / agent modes "
        "(`python eval.py convert --help` converts the paper's benchmarks).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--questions", nargs="+", default=[str(HERE / "data" / "questions_eval.jsonl")],
                   help="question JSONL files, one benchmark each")
    p.add_argument("--ckpt", default=None, help="checkpoint folder; none: out/rl, else out/sft, else "
                   "{--data}/tiny")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--limit", type=int, default=0, help="first N questions of each file (0: all)")
    p.add_argument("--data", default=str(HERE / "data"), help="data folder of the local search index")
    tools.add_search_args(p)
    p.add_argument("--cache", default=None, help="SQLite search cache file")
    p.add_argument("--cache_mode", default="rw", help="search cache mode (see tools.SearchCache)")
    p.add_argument("--max_turns", type=int, default=6)
    p.add_argument("--max_new_tokens", type=int, default=256, help="per assistant turn")
    p.add_argument("--batch_size", type=int, default=64, help="questions per rollout batch")
    p.add_argument("--max_pixels", type=int, default=None, help="image size cap (default: the checkpoint's, "
                   "at most 1280x28x28 for real ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge_url", default=None, help="OpenAI-compatible endpoint of an LLM judge, e.g. "
                   "http://127.0.0.1:8000/v1 (key from $OPENAI_API_KEY if set)")
    p.add_argument("--judge_model", default="gpt-4o-mini", help="model name sent to the judge endpoint")
    p.add_argument("--judge_cache", default=str(HERE / "out" / "eval" / "judge_cache.sqlite"),
                   help="SQLite cache of judge verdicts")
    p.add_argument("--out", default=str(HERE / "out" / "eval"),
                   help="folder for metrics.json, table.md, trajectories.jsonl")
    p.add_argument("--report", default=None, help="write a self-contained HTML report of every trajectory")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs=2, metavar=("SFT", "RL"), default=None,
                   help="the pipeline's table: direct and RAG with the SFT checkpoint, the agent with both, "
                   "by question kind (first --questions file)")
    p.set_defaults(cmd="run")
    return p


def _convert_parser():
    doc = "\n\n".join(f"{name}: {' '.join(f.__doc__.split())}" for name, f in LOADERS.items())
    p = argparse.ArgumentParser(
        prog="eval.py convert", description="Convert a downloaded benchmark into the design's question JSONL.",
        epilog="Expected layouts:\n\n" + doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, choices=sorted(LOADERS), help="which benchmark")
    p.add_argument("--src", required=True, nargs="+", help="the benchmark's annotation file(s)")
    p.add_argument("--images", default=None, help="folder holding the benchmark's images (searched "
                   "recursively by file name)")
    p.add_argument("--out", required=True, help="question JSONL to write")
    p.add_argument("--limit", type=int, default=0, help="keep the first N questions (0: all)")
    p.set_defaults(cmd="convert")
    return p


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "convert":
        return _convert_parser().parse_args(argv[1:])
    return _run_parser().parse_args(argv)


def read_questions(path):
    """tools.load_questions, with a missing or unusable file as a clear exit (bad lines are skipped
    with a warning naming path:line)."""
    if not Path(path).is_file():
        sys.exit(f"{path}: not found (python make_data.py writes the synthetic questions)")
    try:
        return tools.load_questions(path)
    except ValueError as e:
        sys.exit(f"eval.py: {e}")


def run(args):
    """Evaluate args.ckpt on every questions file in every mode; rank 0 writes and prints the results."""
    import model as M
    rank, world, device = M.setup_dist()
    question_sets = {q: read_questions(q) for q in args.questions}  # bad input fails before any work
    ckpt = Path(args.ckpt or M.default_checkpoint(args.data))
    mdl, proc = M.load(ckpt, device=device, log=M.print0, max_pixels=args.max_pixels)
    tl = tools.make_tools(args.data, cache=args.cache, cache_mode=args.cache_mode, **tools.search_options(args))
    judge = Judge(args.judge_url, args.judge_model, cache=args.judge_cache) if args.judge_url else None
    results, records = {}, []
    for path in args.questions:
        qs = question_sets[path]
        qs = qs[:args.limit] if args.limit else qs
        bench = bench_name(path, qs)
        for mode in args.modes:
            recs, wall = evaluate(mode, mdl, proc, tl, qs, bench, judge=judge, rank=rank, world=world,
                                  max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
            results.setdefault(bench, {})[mode] = metrics(recs, wall)
            records += recs
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    if rank != 0:
        return results
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "metrics.json").write_text(json.dumps({"checkpoint": str(ckpt), "world_size": world,
                                                  "results": results, "args": vars(args)}, indent=1))
    (out / "table.md").write_text(table)
    tools.write_jsonl(out / "trajectories.jsonl", records)
    print(f"\ncheckpoint {ckpt}\n\n{table}")
    if judge is not None:
        print(f"judge: {judge.calls} calls, {judge.hits} cached, {judge.errors} errors")
    if args.report:
        print(f"report: {write_report(args.report, records, results)}")
    print(f"wrote {out / 'metrics.json'}, {out / 'table.md'}, {out / 'trajectories.jsonl'}")
    return results


# ============================================================================ the pipeline's table

KIND_GROUPS = {"search-free": ("search_free",), "image": ("image",), "image + text": ("image_text",),
               "multi-hop": ("multihop",), "search-required": ("image", "image_text", "multihop"),
               "crop-needed": ("crop",)}


def group_metrics(records):
    """Accuracy and searches per question for each kind group of the synthetic world, and overall."""
    out = {}
    for name, kinds in [*KIND_GROUPS.items(), ("all", None)]:
        rs = [r for r in records if kinds is None or r["meta"].get("kind") in kinds]
        n = max(len(rs), 1)
        out[name] = {"n": len(rs), "accuracy": sum(r["score"] for r in rs) / n,
                     "searches_per_q": sum(r["n_text"] + r["n_image"] + r["n_crop"] for r in rs) / n,
                     "crop_per_q": sum(r["n_crop"] for r in rs) / n}
    return out


# The paper's tool-usage analysis (its Fig. 4): which searches a trajectory made. The first five
# are exclusive; the last (self-reflection: the query refined after a first text search) overlaps them.
USAGE = {"no search": lambda r: r["n_text"] + r["n_image"] + r["n_crop"] == 0,
         "text only": lambda r: r["n_text"] and not r["n_image"] and not r["n_crop"],
         "image only": lambda r: r["n_image"] and not r["n_text"] and not r["n_crop"],
         "image + text": lambda r: r["n_image"] and r["n_text"] and not r["n_crop"],
         "crop": lambda r: r["n_crop"] > 0,
         "2+ text searches": lambda r: r["n_text"] >= 2}


def tool_usage(records):
    """Share of `records` in each USAGE class."""
    return {k: sum(bool(f(r)) for r in records) / max(len(records), 1) for k, f in USAGE.items()}


def tool_usage_table(rows):
    """rows: [(label, tool_usage)] -> Markdown: % of questions in each class."""
    lines = ["| Method | " + " | ".join(USAGE) + " |", "|---|" + "---:|" * len(USAGE)]
    lines += [f"| {label} | " + " | ".join(_pct(u[k]) for k in USAGE) + " |" for label, u in rows]
    return "\n".join(lines) + "\n\nTool usage: % of questions by the searches made (the first five classes " \
        "are exclusive; 2+ text searches is a refined query, the paper's self-reflection).\n"


def paired_bootstrap(a, b, n=10_000, seed=0):
    """Mean of b - a over paired per-question scores, and its 95% percentile interval from `n`
    resamples of the questions (seeded: the same scores give the same interval)."""
    import numpy as np
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))
    lo, hi = np.percentile(d[idx].mean(1), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def agent_values(records, value):
    """The pipeline's two agent rows as {"SFT agent": {qid: value(r)}, "SFT+RL agent": {...}}."""
    return {label: {r["qid"]: value(r) for r in records if r["method"].startswith(label + " (")}
            for label in ("SFT agent", "SFT+RL agent")}


def rl_minus_sft(records):
    """'RL - SFT' line of the pipeline's table: the two agent rows paired by question, or None."""
    sft, rl = agent_values(records, lambda r: r["score"]).values()
    common = sorted(sft.keys() & rl.keys())
    if not common:
        return None
    mean, lo, hi = paired_bootstrap([sft[q] for q in common], [rl[q] for q in common])
    return (f"RL - SFT agent, all {len(common)} questions: {100 * mean:+.1f} points, 95% paired-bootstrap "
            f"interval [{100 * lo:+.1f}, {100 * hi:+.1f}]")


def _words(text):
    return {w for w in tools.tokenize(text or "") if len(w) >= 3}


def wasted_calls(r):
    """(tool calls, wasted calls) of record r. A call is used when its result brought a word (3+
    letters or digits, any case) that neither the question nor an earlier result held, and a later
    action wrote it: a query, a crop's expression, the answer (reasoning does not count). A repeated
    search brings no new word; a failed call none the agent can write; an ignored result is unused."""
    known, used = _words(r["question"]), 0
    steps = r["steps"]
    for i, s in enumerate(steps):
        o = s.get("obs")
        if s["action"]["kind"] not in ("text_search", "img_search") or not o or o["error"]:
            continue
        new = _words(o["text"]) - known
        known |= new
        used += any(new & _words(t["action"]["arg"]) for t in steps[i + 1:])
    calls = r["n_text"] + r["n_image"] + r["n_crop"]
    return calls, calls - used


def wasted_line(records):
    """'Wasted tool calls' line of the pipeline's table for the two agent rows, with RL - SFT over
    the questions paired by id and its 95% interval (the issue's second criterion for RL: as accurate
    with fewer calls whose results went unused), or None."""
    per = agent_values(records, wasted_calls)
    parts = [f"{k} {sum(w for _, w in v.values()) / len(v):.3f} of {sum(c for c, _ in v.values()) / len(v):.2f}"
             for k, v in per.items() if v]
    if not parts:
        return None
    sft, rl = per.values()
    common = sorted(sft.keys() & rl.keys())
    if common and any(sft[q][1] for q in common):
        mean, lo, hi = paired_bootstrap([sft[q][1] for q in common], [rl[q][1] for q in common])
        base = sum(sft[q][1] for q in common) / len(common)
        parts.append(f"RL - SFT {mean:+.3f} ({100 * mean / base:+.0f}%), 95% paired-bootstrap interval "
                     f"[{lo:+.3f}, {hi:+.3f}]")
    return "Wasted tool calls per question (results no later query or answer used), of all calls: " + \
        ", ".join(parts)


def compare_table(rows):
    """rows: [(label, group_metrics)] -> Markdown: accuracy % (searches per question) by kind group."""
    groups = [*KIND_GROUPS, "all"]
    lines = ["| Method | " + " | ".join(f"{g} (n={rows[0][1][g]['n']})" for g in groups) + " |",
             "|---|" + "---:|" * len(groups)]
    for label, gm in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{_pct(gm[g]['accuracy'])} ({gm[g]['searches_per_q']:.2f})" for g in groups) + " |")
    return "\n".join(lines) + "\n\nCells: accuracy % (searches per question), greedy decoding.\n"


def compare(args):
    """The pipeline's table on the held-out entities: direct answer and the RAG workflow with the SFT
    model, then the agent with the SFT model and with the SFT+RL model."""
    import model as M
    qs = read_questions(args.questions[0])
    qs = qs[:args.limit] if args.limit else qs
    tl = tools.make_tools(args.data, cache=args.cache, cache_mode=args.cache_mode, **tools.search_options(args))
    sft_ckpt, rl_ckpt = args.compare
    plan = [("Direct answer (SFT model, no search)", sft_ckpt, "direct"),
            ("RAG workflow (SFT model: whole-image search, then text search)", sft_ckpt, "rag"),
            ("SFT agent (on-demand search)", sft_ckpt, "agent"),
            ("SFT+RL agent (on-demand search)", rl_ckpt, "agent")]
    rows, usage, loaded, all_records = [], [], {}, []
    for label, ckpt, mode in plan:
        if not (Path(ckpt) / "config.json").is_file():
            print(f"skipping {label}: no checkpoint at {ckpt}", file=sys.stderr)
            continue
        if ckpt not in loaded:
            loaded = {ckpt: M.load(ckpt, log=None)}
        mdl, proc = loaded[ckpt]
        recs, wall = evaluate(mode, mdl, proc, tl, qs, bench_name(args.questions[0], qs),
                              max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
        for r in recs:
            r["method"] = label
        rows.append((label, group_metrics(recs)))
        usage.append((label.split(" (")[0], tool_usage(recs)))
        all_records += recs
        print(f"{label}: {_pct(rows[-1][1]['all']['accuracy'])}% in {wall:.0f} s", file=sys.stderr)
    table = compare_table(rows)
    for line in (rl_minus_sft(all_records), wasted_line(all_records)):
        if line:
            table += "\n" + line + "\n"
    table += "\n" + tool_usage_table(usage)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps({"questions": args.questions[0], "sft": sft_ckpt, "rl": rl_ckpt,
                                                  "rows": rows, "tool_usage": usage}, indent=1))
    tools.write_jsonl(out / "compare_trajectories.jsonl", all_records)
    svg = pipeline_curves(sft_ckpt, rl_ckpt)
    (out / "curves.svg").write_text(svg)
    if args.report:
        write_report(args.report, all_records, {}, svg=svg)
    print("\n" + table + f"\nwrote {out / 'compare.md'}, {out / 'curves.svg'} (training curves)")
    return rows


def main(argv=None):
    args = get_args(argv)
    if getattr(args, "compare", None):
        compare(args)
        return
    if args.cmd == "convert":
        try:
            convert(args.bench, args.src, args.images, args.out, limit=args.limit)
        except (FileNotFoundError, ValueError, KeyError) as e:
            sys.exit(f"convert {args.bench}: {type(e).__name__}: {e}")
        return
    run(args)


if __name__ == "__main__":
    main()
