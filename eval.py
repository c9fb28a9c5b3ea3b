"""eval.py: score answers, run direct / RAG / agent inference, report.

    python eval.py            # data/questions_eval.jsonl, newest checkpoint (out/rl, out/sft, data/tiny), 3 modes
    python eval.py --compare out/sft out/rl                 # the pipeline's table (the README's), by question kind
    python eval.py --ckpt out/sft --modes agent --limit 50 --report out/eval/report.html
    python eval.py --questions bench/infoseek.jsonl bench/dynvqa.jsonl --backend http --server_url http://127.0.0.1:8765
    python eval.py --judge_url http://127.0.0.1:8000/v1 --judge_model Qwen2.5-72B-Instruct   # LLM judge
    torchrun --standalone --nproc_per_node=4 eval.py --questions bench/infoseek.jsonl     # shards questions

`score` is the one scorer (rl.py's rewards call it too): 1.0 when the prediction matches a gold alias after
normalisation, or is the gold plus at most two words and no hedge, or both are numbers that agree (rounding, ranges,
units); empty answers score 0. A `Judge` (any OpenAI-compatible endpoint, verdicts cached) decides what the rules
reject, as the paper does. Modes, all through `rollout.rollout`, greedy: direct (one turn, no tools), rag (the paper's
fixed workflow: forced whole-image and question searches, `RAG_TURNS`, then one answer turn), agent (on-demand search).
Outputs (--out): metrics.json, table.md (the paper's Table 1 shape, then the search behaviour), trajectories.jsonl,
with --report one self-contained HTML page; --compare: compare.md, compare.json, compare_trajectories.jsonl, curves.svg.
"""
import argparse
import base64
import copy
import html
import io
import json
import math
import re
import sys
import time
import unicodedata
from collections import defaultdict, namedtuple
from pathlib import Path

import numpy as np
import torch.distributed as dist
from PIL import Image, ImageDraw

import model as M
import rollout
import search
import tools

HERE = Path(__file__).resolve().parent
MODES = ("direct", "rag", "agent")
MODE_TITLES = {"direct": "Direct answer (no search)", "rag": "RAG workflow (image search, then text search)",
               "agent": "Agent (on-demand search)"}


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="eval.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Evaluate a checkpoint in direct / RAG / agent modes "
                                "(benchmarks.py converts the paper's benchmarks).")
    p.add_argument("--questions", nargs="+", default=[str(HERE / "data" / "questions_eval.jsonl")],
                   help="question JSONL files, one benchmark each")
    p.add_argument("--ckpt", help="checkpoint folder; none: out/rl, else out/sft, else {--data}/tiny")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--limit", type=int, default=0, help="first N questions of each file (0: all)")
    p.add_argument("--data", default=str(HERE / "data"), help="data folder of the local search index")
    search.add_search_args(p)
    p.add_argument("--cache", help="SQLite search cache file")
    p.add_argument("--cache_mode", default="rw", help="search cache mode (see tools.SearchCache)")
    p.add_argument("--max_turns", type=int, default=6)
    p.add_argument("--max_new_tokens", type=int, default=256, help="per assistant turn")
    p.add_argument("--batch_size", type=int, default=64, help="questions per rollout batch")
    p.add_argument("--max_pixels", type=int, help="image size cap (default: the checkpoint's)")
    p.add_argument("--judge_url", help="OpenAI-compatible LLM judge endpoint (key: $OPENAI_API_KEY if set)")
    p.add_argument("--judge_model", default="gpt-4o-mini", help="model name sent to the judge endpoint")
    p.add_argument("--out", default=str(HERE / "out" / "eval"), help="folder for the outputs")
    p.add_argument("--report", help="write a self-contained HTML report of every trajectory")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs=2, metavar=("SFT", "RL"), help="the pipeline's table: direct and RAG with "
                   "the SFT checkpoint, the agent with both, by question kind (first --questions file)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- scorer

MAX_EXTRA_WORDS = 2  # "the answer is Paris" / "Eiffel Tower, Paris" pass; long answers go to the judge
HEDGE_WORDS = set("or and not no never nor neither either maybe perhaps possibly probably unlikely unknown unsure "
                  "except but than".split())
RANGE_MAX_WIDTH = 0.25  # a predicted range counts only if narrow: width <= 25% of the gold value
YEAR_RANGE_MAX_WIDTH = 5.0  # the paper's judge accepts "1990-1995" for 1993, not a decade


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
    """The gold itself, or the gold among at most MAX_EXTRA_WORDS more words, none of them a hedge."""
    pt, gt = pred_n.split(), gold_n.split()
    if not gt or not 0 <= len(pt) - len(gt) <= MAX_EXTRA_WORDS:
        return False
    for i in range(len(pt) - len(gt) + 1):  # the first place the gold's words appear
        if pt[i:i + len(gt)] == gt:
            return not set(pt[:i] + pt[i + len(gt):]) & HEDGE_WORDS
    return False


_UNIT_TABLE = [  # (dimension, factor to its base unit, written names ("x(s)": x and xs)[, offset added first])
    ("length", 1e-3, "mm|millimeter(s)|millimetre(s)"), ("length", 1e-2, "cm|centimeter(s)|centimetre(s)"),
    ("length", 1.0, "m|meter(s)|metre(s)"), ("length", 1e3, "km|kilometer(s)|kilometre(s)"),
    ("length", 0.0254, "in|inch|inches"), ("length", 0.3048, "ft|foot|feet"), ("length", 0.9144, "yd|yard(s)"),
    ("length", 1609.344, "mi|mile(s)"), ("mass", 1e-6, "mg|milligram(s)"), ("mass", 1e-3, "g|gram(s)"),
    ("mass", 1.0, "kg|kilogram(s)|kilo(s)"), ("mass", 1e3, "t|tonne(s)|ton(s)|metric ton(s)"),  # ton: metric
    ("mass", 0.45359237, "lb(s)|pound(s)"), ("mass", 0.028349523125, "oz|ounce(s)"),
    ("area", 1.0, "m2|m²|sq m|square meter(s)|square metre(s)"), ("area", 1e4, "ha|hectare(s)"),
    ("area", 1e6, "km2|km²|sq km|square kilometer(s)|square kilometre(s)"), ("area", 4046.8564224, "acre(s)"),
    ("area", 2589988.110336, "mi2|mi²|sq mi|square mile(s)"),
    ("area", 0.09290304, "ft2|ft²|sq ft|square foot|square feet"), ("volume", 1.0, "l|liter(s)|litre(s)"),
    ("volume", 1e-3, "ml|milliliter(s)|millilitre(s)"), ("volume", 3.785411784, "gal|gallon(s)"),
    ("volume", 1e3, "m3|m³|cubic meter(s)|cubic metre(s)"), ("time", 1.0, "s|sec(s)|second(s)"),
    ("time", 60.0, "min(s)|minute(s)"), ("time", 3600.0, "h|hr(s)|hour(s)"), ("time", 86400.0, "day(s)"),
    ("time", 604800.0, "week(s)"), ("time", 31557600.0, "yr(s)|year(s)"),
    ("speed", 1 / 3.6, "km/h|kmh|kph|km per hour|kilometers per hour|kilometres per hour"),
    ("speed", 0.44704, "mph|miles per hour"), ("speed", 1.0, "m/s|meters per second|metres per second"),
    ("speed", 0.514444, "knot(s)|kn"), ("temperature", 1.0, "°c|degree(s) c|degree(s) celsius|celsius", 273.15),
    ("temperature", 5 / 9, "°f|degree(s) f|degree(s) fahrenheit|fahrenheit", 459.67),
    ("temperature", 1.0, "kelvin(s)"), ("percent", 1.0, "%|percent|per cent|pct"), ("angle", 1.0, "°|degree(s)"),
    ("currency:usd", 1.0, "usd|us dollars|dollar(s)"), ("currency:eur", 1.0, "eur|euro(s)"),
    ("currency:gbp", 1.0, "gbp"), ("currency:jpy", 1.0, "jpy|yen"), ("currency:cny", 1.0, "cny|rmb|yuan")]
UNITS = {}  # written unit -> (dimension, factor to its base unit, offset added first)
for _dim, _factor, _names, *_offset in _UNIT_TABLE:
    for _n in _names.split("|"):
        UNITS[_n.replace("(s)", "")] = UNITS[_n.replace("(s)", "s")] = (_dim, _factor, *(_offset or [0.0]))
CURRENCY_SYMBOLS = {"$": "currency:usd", "€": "currency:eur", "£": "currency:gbp", "¥": "currency:jpy"}
SCALES = {"hundred": 1e2, "thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "mln": 1e6, "billion": 1e9,
          "bn": 1e9, "trillion": 1e12}
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
NUMBER_WORDS.update(thirty=30, forty=40, fifty=50, sixty=60, seventy=70, eighty=80, ninety=90, dozen=12)
NUMBER_FILLER = set("about approximately approx around roughly circa ca c nearly almost some estimated an a the ~ ≈ "
                    "is of".split())
RANGE_WORDS = {"-", "to", "and", "between", "from"}
_NUM = r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])\.\d+"
_QTY = re.compile(
    r"(?P<cur>[$€£¥])?\s*(?P<num>" + _NUM + r")"
    r"(?:\s*(?P<scale>hundred|thousand|million|billion|trillion|mln|mn|bn)\b|(?P<k>k)(?![a-z]))?"
    r"(?:\s*(?P<unit>" + "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True)) + r"))?(?![a-z0-9])")
# A number or range lo..hi in `unit` (base unit value: (v + offset) x factor). tol_pred: half the resolution the
# number stands for (a prediction may round the gold); tol_gold: the same, only for a gold written with decimals.
Quantity = namedtuple("Quantity", "lo hi unit dim factor offset tol_pred tol_gold year")


def _parse_one(m):
    """One matched number -> {value, unit, scale, year, tol_pred, tol_gold}."""
    num = m.group("num")
    intpart, _, frac = num.lstrip("+-").replace(",", "").partition(".")
    sig_str = (intpart + frac).lstrip("0")
    sig = len(sig_str) if frac else len(sig_str.rstrip("0"))   # significant digits
    trailing = len(sig_str) - sig                              # zeros ending an integer
    scale = SCALES[m.group("scale")] if m.group("scale") else (1e3 if m.group("k") else 1.0)
    unit = m.group("unit") or m.group("cur")
    year = scale == 1.0 and unit is None and num.isdigit() and 1000 <= int(num) <= 2100
    if year:  # the resolution the number stands for
        res = 1.0
    elif frac:
        res = 10.0 ** -len(frac)
    else:  # 1,200 stands for "1,200 to the nearest hundred"
        res = 10.0 ** trailing if trailing and sig >= 2 else 1.0
    res *= scale
    # One significant digit is too coarse to call a rounding: "2 million" is not 1.6 million, "3.4" is 3.42.
    return {"value": float(num.replace(",", "")) * scale, "unit": unit, "scale": scale, "year": year,
            "tol_pred": res / 2 if (frac or sig >= 2) else 0.0, "tol_gold": res / 2 if frac else 0.0}


def parse_quantity(text):
    """A number or a range of numbers with an optional unit, or None when the text is more than that
    (e.g. "Boeing 747", "May 5, 1990", "1990-05-12")."""
    s = unicodedata.normalize("NFKC", str(text)).lower().strip()
    s = s.replace("\u2212", "-").replace("\u2013", " - ").replace("\u2014", " - ")
    s = re.sub(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", lambda m: str(NUMBER_WORDS[m.group(1)]), s).rstrip(".")
    matches = list(_QTY.finditer(s))
    rest = {w.strip(".") for w in re.findall(r"[^\s,;:!?()]+", _QTY.sub(" ", s))} - {""}
    if not 1 <= len(matches) <= 2 or rest - NUMBER_FILLER - (RANGE_WORDS if len(matches) == 2 else set()):
        return None
    parts = [_parse_one(m) for m in matches]
    if len(parts) == 2:
        if not rest & RANGE_WORDS:
            return None  # two numbers side by side are not a range
        a, b = parts
        for x, y in ((a, b), (b, a)):  # "5 to 6 million km", "$5-6": one side's unit or scale applies to both
            if x["unit"] is None and y["unit"] is not None:
                x["unit"], x["year"] = y["unit"], False
        if a["scale"] == 1.0 and b["scale"] != 1.0:
            a.update({k: a[k] * b["scale"] for k in ("value", "tol_pred", "tol_gold")})
    if len({p["unit"] for p in parts}) > 1:
        return None
    unit = parts[0]["unit"]
    dim, factor, offset = UNITS[unit] if unit in UNITS else (CURRENCY_SYMBOLS.get(unit), 1.0, 0.0)
    return Quantity(min(p["value"] for p in parts), max(p["value"] for p in parts), unit, dim, factor, offset,
                    min(p["tol_pred"] for p in parts), min(p["tol_gold"] for p in parts), all(p["year"] for p in parts))


def numbers_match(p, g):
    """Does the predicted quantity p agree with the gold quantity g?"""
    if p.dim and g.dim and p.dim != g.dim:
        return False
    both_units = bool(p.unit and g.unit)
    if both_units:  # compare in base units; otherwise in the unit the one side wrote
        plo, phi, glo, ghi = [(v + q.offset) * q.factor for q in (p, g) for v in (q.lo, q.hi)]
        slack = max(p.tol_pred * p.factor, g.tol_gold * g.factor)
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
    inter, union = max(0.0, min(phi, ghi) - max(plo, glo)), max(phi, ghi) - min(plo, glo)
    return union > 0 and inter / union >= 0.5


def score(pred, answers, question=None, judge=None):
    """The scorer (eval metrics and rl.py rewards): 1.0 if pred (None or empty: 0) matches a gold alias, else 0.0.
    With a `Judge` and the question, an answer the rules reject is judged by the LLM."""
    if pred is None or not str(pred).strip():
        return 0.0
    pred_n, pred_q = normalize_answer(pred), parse_quantity(pred)
    golds = [answers] if isinstance(answers, (str, int, float)) else answers
    for gold in (g for g in golds if g is not None):
        if _text_match(pred_n, normalize_answer(gold)):
            return 1.0
        if pred_q is not None and (gold_q := parse_quantity(gold)) is not None and numbers_match(pred_q, gold_q):
            return 1.0
    return 1.0 if judge is not None and question is not None and judge(question, pred, golds) else 0.0


# ----------------------------------------------------------------------------- LLM judge

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
    return True if re.search(r"\bcorrect\b", r) else None


class Judge:
    """An LLM judge behind any OpenAI-compatible endpoint (key from $api_key_env, if set), verdicts cached by
    (model, prompt) in a tools.SearchCache."""

    def __init__(self, url, model, cache=None, api_key_env="OPENAI_API_KEY", timeout=60.0, retries=2):
        self.client = tools.ChatClient(url, model, name="judge", api_key_env=api_key_env, timeout=timeout,
                                       retries=retries, backoff=1.0, max_backoff=8.0)
        self.cache = tools.SearchCache(cache) if cache else None
        self.calls = self.hits = self.errors = 0

    def __call__(self, question, pred, answers):
        """True / False, or None when the endpoint fails or its reply is not a verdict."""
        text = JUDGE_PROMPT.format(question=str(question).strip(), answers="; ".join(str(a) for a in answers),
                                   prediction=str(pred).strip())
        name = f"judge {self.client.model}"
        hit = self.cache.get(name, text, 0) if self.cache is not None else None
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
        if (verdict := parse_verdict(reply)) is None:
            self.errors += 1
            print(f"warning: judge reply is not a verdict: {reply[:80]!r}", file=sys.stderr)
        elif self.cache is not None:
            self.cache.put(name, text, 0, {"verdict": verdict, "reply": reply})
        return verdict


# ----------------------------------------------------------------------------- inference modes

# The paper's fixed RAG workflow as forced assistant turns (rollout fills in {question}), then the model answers.
RAG_TURNS = ("<reason>I will search the web with the whole image to identify what it shows.</reason>"
             "<img_search><img></img_search>",
             "<reason>I will search the web with the question.</reason><text_search>{question}</text_search>")


def run_mode(mode, model, processor, tools_, questions, max_turns=6, max_new_tokens=256, batch_size=64,
             seed=0, progress=False, dtype=None):
    """Greedy rollouts of one mode: one Trajectory per question, in order."""
    def with_budget(max_calls):  # the same tools (backends, cache) with another call budget
        t = copy.copy(tools_)
        t.max_calls = max_calls
        return t

    kw = dict(group_size=1, max_turns=max_turns, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed,
              batch_size=batch_size, progress=progress, dtype=dtype)
    if mode == "agent":
        return rollout.rollout(model, processor, tools_, questions, **kw)
    if mode == "direct":  # one turn, no search at all (the zero budget is a second guard)
        return rollout.rollout(model, processor, with_budget(0), questions, **dict(kw, max_turns=1))
    if mode != "rag":
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    out = [None] * len(questions)
    for forced in (list(RAG_TURNS), list(RAG_TURNS[1:])):  # with an image, then without (no image search)
        idx = [i for i, q in enumerate(questions) if bool(q.get("image")) == (len(forced) == 2)]
        if idx:  # the workflow's searches are all it gets, then one answer turn
            trajs = rollout.rollout(model, processor, with_budget(len(forced)), [questions[i] for i in idx],
                                    forced_actions=forced, **dict(kw, max_turns=len(forced) + 1))
            for i, tr in zip(idx, trajs):
                out[i] = tr
    return out


# ----------------------------------------------------------------------------- records and statistics

def traj_record(traj, question, bench, mode, s, judged=False, index=None):
    """A Trajectory -> a plain JSON-able record: what metrics, reports and model.gather need."""
    steps = []
    for text, a, o in zip(traj.texts, traj.actions, list(traj.observations) + [None] * len(traj.texts)):
        action = {"kind": a.kind, "arg": a.arg, "box": list(a.box) if a.box else None, "whole": a.whole,
                  "reason": a.reason, "error": a.error}
        obs = None if o is None else {
            "text": o.text, "kind": o.kind, "error": bool(o.error), "box": list(o.box) if o.box else None,
            "results": [{k: r[k] for k in ("id", "title", "text", "url", "image", "score") if k in r}
                        for r in o.results]}
        steps.append({"text": text, "action": action, "obs": obs})
    return {"bench": bench, "mode": mode, "index": index, "qid": question["id"], "question": question["question"],
            "image": question.get("image"), "answers": list(question.get("answers", [])),
            "meta": question.get("meta") or {}, "answer": traj.answer, "score": float(s), "judged": bool(judged),
            "finish": traj.finish, "turns": int(traj.turns), "gen_tokens": int(traj.gen_tokens),
            "n_text": int(traj.n_text_search), "n_image": int(traj.n_img_search - traj.n_crop),
            "n_crop": int(traj.n_crop), "n_errors": int(traj.n_tool_errors), "steps": steps}


def _calls(r):
    return r["n_text"] + r["n_image"] + r["n_crop"]


# The paper's tool-usage analysis (its Fig. 4). The first five are exclusive; the last (self-reflection) overlaps.
USAGE = {"no search": lambda r: _calls(r) == 0,
         "text only": lambda r: r["n_text"] and not r["n_image"] and not r["n_crop"],
         "image only": lambda r: r["n_image"] and not r["n_text"] and not r["n_crop"],
         "image + text": lambda r: r["n_image"] and r["n_text"] and not r["n_crop"],
         "crop": lambda r: r["n_crop"] > 0, "2+ text searches": lambda r: r["n_text"] >= 2}


def metrics(records, wall_s=0.0):
    """The one aggregate of records (a benchmark x mode, or a kind group): accuracy, search behaviour, turns,
    tokens, errors, wall time, the share in each USAGE class, and accuracy by question kind."""
    n = len(records)

    def mean(f):
        return sum(f(r) for r in records) / n if n else 0.0

    m = {"n": n, "accuracy": mean(lambda r: r["score"]), "searched": mean(lambda r: _calls(r) > 0),
         "text_per_q": mean(lambda r: r["n_text"]), "image_per_q": mean(lambda r: r["n_image"]),
         "crop_per_q": mean(lambda r: r["n_crop"]), "searches_per_q": mean(_calls), "turns": mean(lambda r: r["turns"]),
         "gen_tokens": mean(lambda r: r["gen_tokens"]), "tool_errors": mean(lambda r: r["n_errors"]),
         "answered": mean(lambda r: r["finish"] == "answer"), "judged": sum(r["judged"] for r in records),
         "wall_s": float(wall_s), "s_per_q": float(wall_s) / n if n else 0.0,
         "usage": {k: mean(lambda r, f=f: bool(f(r))) for k, f in USAGE.items()}}
    kinds = defaultdict(list)
    for r in records:
        if r["meta"].get("kind"):
            kinds[r["meta"]["kind"]].append(r["score"])
    if kinds:
        m["by_kind"] = {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(kinds.items())}
    return m


def _pct(x):
    return f"{100 * x:.1f}"


BEHAVIOUR = ["Searched %", "Text/q", "Image/q", "Crop/q", "Turns", "Tokens/q", "Tool errors/q"]


def _behaviour(m):
    """A metrics dict's cells under N, accuracy and BEHAVIOUR."""
    return [m["n"], _pct(m["accuracy"]), _pct(m["searched"])] + [f"{m[k]:.2f}" for k in (
        "text_per_q", "image_per_q", "crop_per_q", "turns")] + [f"{m['gen_tokens']:.1f}", f"{m['tool_errors']:.2f}"]


def _md_table(header, rows, left=1):
    """The lines of a Markdown table, its first `left` columns aligned left, the others right."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * left + "---:|" * (len(header) - left)]
            + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows])


def markdown_table(results):
    """results: {bench: {mode: metrics}} -> Markdown: accuracy in the paper's Table 1 shape (a row per mode, a
    column per benchmark, the average), the search behaviour, accuracy by question kind."""
    benches = list(results)
    modes = [m for m in MODES if any(m in results[b] for b in benches)]
    rows = []
    for mode in modes:
        accs = [results[b][mode]["accuracy"] for b in benches if mode in results[b]]
        rows.append([MODE_TITLES[mode], *(_pct(results[b][mode]["accuracy"]) if mode in results[b] else "-"
                                          for b in benches), _pct(sum(accs) / len(accs))])
    behaviour = [[b, mode, *_behaviour(m), f"{m['wall_s']:.1f}"]
                 for b in benches for mode in modes if (m := results[b].get(mode))]
    lines = (_md_table(["Mode", *benches, "Avg"], rows) + [""]
             + _md_table(["Benchmark", "Mode", "N", "Acc", *BEHAVIOUR, "Wall s"], behaviour, left=2))
    for b in benches:
        if kinds := sorted({k for m in results[b].values() for k in m.get("by_kind", {})}):
            rows = []
            for mode in modes:
                bk = results[b].get(mode, {}).get("by_kind", {})
                rows.append([mode, *(f"{_pct(bk[k]['accuracy'])} (n={bk[k]['n']})" if k in bk else "-" for k in kinds)])
            lines += [""] + _md_table([f"{b}: accuracy by kind", *kinds], rows)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the pipeline's table (--compare)

KIND_GROUPS = {"search-free": ("search_free",), "image": ("image",), "image + text": ("image_text",),
               "multi-hop": ("multihop",), "search-required": ("image", "image_text", "multihop"),
               "crop-needed": ("crop",), "all": None}


def paired_bootstrap(a, b, n=10_000, seed=0):
    """Mean of b - a over paired per-question scores, and its 95% interval from `n` seeded resamples."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    lo, hi = np.percentile(d[np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))].mean(1), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def wasted_calls(r):
    """(tool calls, wasted calls) of record r. A call is used when its result brought a word (3+ characters)
    that neither the question nor an earlier result held, and a later action (not its reasoning) wrote it."""
    def _words(text):
        return {w for w in search.tokenize(text or "") if len(w) >= 3}

    known, used, steps = _words(r["question"]), 0, r["steps"]
    for i, s in enumerate(steps):
        if s["action"]["kind"] in ("text_search", "img_search") and (o := s.get("obs")) and not o["error"]:
            new = _words(o["text"]) - known
            known |= new
            used += any(new & _words(t["action"]["arg"]) for t in steps[i + 1:])
    return _calls(r), _calls(r) - used


def compare_text(rows, records):
    """rows: [(label, {kind group: metrics})] -> the pipeline's Markdown: accuracy (searches per question) by kind
    group; RL - SFT agent and wasted tool calls, paired by question with bootstrap intervals; tool usage."""
    lines = _md_table(["Method", *(f"{g} (n={rows[0][1][g]['n']})" for g in KIND_GROUPS)],
                      [[label, *(f"{_pct(gm[g]['accuracy'])} ({gm[g]['searches_per_q']:.2f})" for g in KIND_GROUPS)]
                       for label, gm in rows])
    text = "\n".join(lines) + "\n\nCells: accuracy % (searches per question), greedy decoding.\n"
    agents = [{r["qid"]: (r["score"], *wasted_calls(r)) for r in records if r["method"].startswith(label + " (")}
              for label in ("SFT agent", "SFT+RL agent")]  # qid -> (score, calls, wasted)
    common = sorted(agents[0].keys() & agents[1].keys())
    sft, rl = ([agent[q] for q in common] for agent in agents)
    if common:
        mean, lo, hi = paired_bootstrap([s[0] for s in sft], [s[0] for s in rl])
        text += (f"\nRL - SFT agent, all {len(common)} questions: {100 * mean:+.1f} points, 95% paired-bootstrap "
                 f"interval [{100 * lo:+.1f}, {100 * hi:+.1f}]\n")
    parts = [f"{k} {sum(v[2] for v in a.values()) / len(a):.3f} of {sum(v[1] for v in a.values()) / len(a):.2f}"
             for k, a in zip(("SFT agent", "SFT+RL agent"), agents) if a]
    if any(s[2] for s in sft):
        mean, lo, hi = paired_bootstrap([s[2] for s in sft], [s[2] for s in rl])
        parts.append(f"RL - SFT {mean:+.3f} ({100 * mean / (sum(s[2] for s in sft) / len(sft)):+.0f}%), 95% "
                     f"paired-bootstrap interval [{lo:+.3f}, {hi:+.3f}]")
    if parts:
        text += "\nWasted tool calls per question (results no later query or answer used), of all calls: " + \
            ", ".join(parts) + "\n"
    lines = _md_table(["Method", *USAGE], [[label.split(" (")[0], *(_pct(gm["all"]["usage"][k]) for k in USAGE)]
                                           for label, gm in rows])
    return text + "\n" + "\n".join(lines) + "\n\nTool usage: % of questions by the searches made (the first " \
        "five classes are exclusive; 2+ text searches is a refined query, the paper's self-reflection).\n"


# ----------------------------------------------------------------------------- HTML report

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
TITLE = "DeepMMSearch-R1 evaluation"


def _esc(x):
    return html.escape("" if x is None else str(x), quote=True)


def _figure(img, alt, caption, max_side=384, min_side=168):
    """A PIL image inlined as a JPEG data URL, small ones (56 px icons) enlarged by a whole factor to be read."""
    img = img.convert("RGB")
    if max(img.size) < min_side:
        f = -(-min_side // max(img.size))
        img = img.resize((img.width * f, img.height * f), resample=0)  # nearest: keep pixels sharp
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return (f'<div class="imgs"><figure><img alt="{alt}" src="data:image/jpeg;base64,'
            f'{base64.b64encode(buf.getvalue()).decode("ascii")}"><figcaption>{caption}</figcaption></figure></div>')


def _step_box(step):
    """The crop box a step's image search used, if the search ran."""
    o = step["obs"]
    return tuple(o["box"]) if o is not None and not o["error"] and o["box"] else None


def _step_html(i, step, image):
    a, o = step["action"], step["obs"]
    parts = [f'<div class="step"><b>Turn {i}</b>'] + ([f'<div class="reason">{_esc(a["reason"])}</div>']
                                                     if a["reason"] else [])
    if a["kind"] == "invalid":
        parts.append(f'<div class="err">invalid action: {_esc(a["error"])}</div>')
    else:
        label = {"text_search": "text search", "answer": "answer"}.get(a["kind"], "image search")
        parts.append(f'<div><span class="action">{_esc(label)}</span> '
                     f'{_esc("[whole image]" if a["whole"] else a["arg"])}</div>')
    if o is not None:
        if (box := _step_box(step)) and image is not None:
            parts.append(_figure(image.crop(box), "crop", f"crop {_esc(list(box))}", 256))
        if o["error"]:
            parts.append(f'<div class="err">tool error:</div><pre class="err">{_esc(o["text"])}</pre>')
        else:
            items = "".join(f'<li><b>{_esc(r.get("title"))}</b> <span class="url">{_esc(r.get("url"))}'
                            f'</span><div>{_esc(r.get("text"))}</div></li>' for r in o["results"])
            parts.append(f'<div>search returned:</div><ol class="res">{items}</ol><details><summary>what the '
                         f'model read</summary><pre>{_esc(o["text"])}</pre></details>')
    return "".join(parts) + f'<details><summary>raw turn</summary><pre>{_esc(step["text"])}</pre></details></div>'


def _record_html(r, open_=False):
    ok, image, imgs = r["score"] >= 1.0, None, ""
    if r["image"]:
        try:
            with Image.open(r["image"]) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, TypeError):  # missing, or not an image: said on the page
            imgs = f'<div class="err">image not found: {_esc(r["image"])}</div>'
    if image is not None:  # the question's image with each crop box drawn and numbered
        boxes, shown = [b for b in map(_step_box, r["steps"]) if b], image.copy()
        draw, w = ImageDraw.Draw(shown), max(2, max(image.size) // 150)
        for k, b in enumerate(boxes, 1):
            draw.rectangle(b, outline=(230, 20, 20), width=w)
            draw.text((b[0] + w + 1, b[1] + w), str(k), fill=(230, 20, 20))
        imgs = _figure(shown, "question image", _esc(f"image, {len(boxes)} crop box(es) drawn" if boxes else "image"))
    steps = "".join(_step_html(i, s, image) for i, s in enumerate(r["steps"], 1))
    answer = _esc(r["answer"]) if r["answer"] is not None else "<i>(no answer)</i>"
    verdict = ("correct" if ok else "incorrect") + (" (LLM judge)" if r["judged"] else "")
    return (f'<details class="{"ok" if ok else "bad"}"{" open" if open_ else ""}><summary><span class="v">'
            f'{"✓" if ok else "✗"}</span> {_esc(r["qid"])}: {_esc(r["question"])} → <b>{answer}</b></summary>'
            f'{imgs}<div><b>Question:</b> {_esc(r["question"])}</div>'
            f'<div><b>Gold:</b> {_esc("; ".join(map(str, r["answers"])))}</div>{steps}'
            f'<div><b>Answer:</b> {answer} · <b>verdict:</b> {_esc(verdict)} · finish '
            f'{_esc(r["finish"])} · {r["turns"]} turns · {r["gen_tokens"]} tokens</div></details>')


def write_report(path, records, results=None, svg=None):
    """One self-contained HTML page at path: svg (training curves), the summary table, then every trajectory
    (image with crop boxes, each step, what came back, the verdict). All text is escaped; images are inlined."""
    body = [f"<h1>{_esc(TITLE)}</h1>"] + ([svg] if svg else [])
    if results:
        body.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in ("Benchmark", "Mode", "N", "Acc %", *BEHAVIOUR))
                    + "</tr>")
        body += ["<tr>" + "".join(f"<td>{c}</td>" for c in [_esc(b), _esc(mode), *_behaviour(m)]) + "</tr>"
                 for b, by_mode in results.items() for mode, m in by_mode.items()]
        body.append("</table>")
    groups = defaultdict(list)
    for r in records:
        groups[(r["bench"], r.get("method") or MODE_TITLES[r["mode"]])].append(r)
    for (b, method), rs in groups.items():
        body.append(f"<h2>{_esc(b)} · {_esc(method)} · {sum(r['score'] >= 1.0 for r in rs)}/{len(rs)} correct</h2>")
        body += [_record_html(r, open_=(i == 0)) for i, r in enumerate(rs)]  # the first one unfolded
    with tools.atomic_path(path) as tmp:
        Path(tmp).write_text("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + _esc(TITLE)
                             + f"</title><style>{REPORT_CSS}</style></head><body>" + "\n".join(body)
                             + "</body></html>\n", encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------- training curves

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c")


def log_series(path, prefix="step "):
    """{field: [(step, value)]} from a log.txt's lines that start with `prefix`: a field's first number, or for
    rl.py's "search/q text . img . crop ." the sum."""
    out = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.startswith(prefix):
            head, *fields = line.split(" | ")
            step = int(head[len(prefix):].split("/")[0])
            for name, _, rest in (f.partition(" ") for f in fields):
                if nums := [float(x) for x in _NUMBER.findall(rest)]:
                    out[name].append((step, sum(nums) if name == "search/q" else nums[0]))
    return out


def curves_svg(panels, width=230, height=170):
    """panels: [(title, [(label, [(x, y)])], log_y)] -> one SVG image, the panels side by side, each with its
    own y range and a legend under its title."""
    pad, parts = 34, []
    for i, (title, series, log_y) in enumerate(panels):
        if log_y:
            series = [(label, [(x, math.log10(y)) for x, y in ps if y > 0]) for label, ps in series]
        x0, pts = i * width, [p for _, ps in series for p in ps]
        parts.append(f'<text x="{x0 + pad}" y="14" font-size="11" font-weight="bold">{_esc(title)}</text>')
        parts += [f'<text x="{x0 + pad + 62 * j}" y="28" font-size="10" fill="{CURVE_COLOURS[j]}">&#9632; '
                  f'{_esc(label)}</text>' for j, (label, _) in enumerate(series)]
        if not pts:
            continue
        (xa, xb), (ya, yb) = [(min(v), max(v)) for v in zip(*pts)]
        xb, yb = max(xb, xa + 1), yb if yb > ya else ya + 1

        def xy(x, y):  # data -> SVG coordinates
            return (f"{x0 + pad + (x - xa) / (xb - xa) * (width - pad - 10):.1f}",
                    f"{height - 20 - (y - ya) / (yb - ya) * (height - 56):.1f}")

        def points(ps):
            return " ".join(",".join(xy(x, y)) for x, y in ps)
        parts.append(f'<polyline points="{points([(xa, yb), (xa, ya), (xb, ya)])}" fill="none" stroke="#888"/>')
        parts += [f'<text x="{x0 + pad - 3}" y="{xy(xa, y)[1]}" dy="{dy}" font-size="9" '
                  f'text-anchor="end">{10 ** y if log_y else y:.3g}</text>' for y, dy in ((yb, 4), (ya, 0))]
        parts.append(f'<text x="{x0 + width - 10}" y="{height - 6}" font-size="9" text-anchor="end">step {xb:g}</text>')
        for j, (_, ps) in enumerate(series):
            c = CURVE_COLOURS[j]
            if len(ps) > 12:
                parts.append(f'<polyline points="{points(ps)}" fill="none" stroke="{c}" stroke-width="1.2"/>')
            else:  # a few evaluations: dots joined by a line
                parts.append(f'<polyline points="{points(ps)}" fill="none" stroke="{c}"/>')
                parts += ['<circle cx="{}" cy="{}" r="2.5" fill="{}"/>'.format(*xy(x, y), c) for x, y in ps]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height}" '
            f'font-family="sans-serif">' + "".join(parts) + "</svg>\n")


def pipeline_curves(sft_dir, rl_dir):
    """The pipeline's training curves from the two runs' log.txt (a missing log leaves its panels empty)."""
    def read(d, prefix):
        return log_series(Path(d) / "log.txt", prefix) if (Path(d) / "log.txt").is_file() else {}
    sft, sft_eval, rl = read(sft_dir, "step "), read(sft_dir, "eval step "), read(rl_dir, "step ")
    return curves_svg([
        ("SFT loss (log scale)", [("train", sft.get("loss", [])), ("held-out", sft_eval.get("loss", []))], True),
        ("SFT held-out agent accuracy", [("accuracy", sft_eval.get("agent_acc", []))], False),
        ("RL reward and accuracy", [("reward", rl.get("reward", [])), ("accuracy", rl.get("acc", []))], False),
        ("RL searches per question", [("searches", rl.get("search/q", []))], False)])


# ----------------------------------------------------------------------------- running

def read_questions(path, limit=0):
    """The first `limit` (0: all) rows of tools.load_questions; a missing or unusable file exits."""
    if not Path(path).is_file():
        sys.exit(f"{path}: not found (python make_data.py writes the synthetic questions)")
    try:
        qs = tools.load_questions(path)
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    return qs[:limit] if limit else qs


def bench_name(path, questions):
    """meta.bench of converted benchmarks, else questions_eval.jsonl -> synthetic, questions_hard -> synthetic-hard."""
    bench, stem = questions[0]["meta"].get("bench") if questions else None, Path(path).stem
    return bench or ("synthetic" if stem == "questions_eval" else stem.replace("questions_", "synthetic-"))


def evaluate(mode, model, processor, tools_, questions, bench, judge=None, rank=0, world=1,
             max_turns=6, max_new_tokens=256, batch_size=64, seed=0, progress=True, dtype=None):
    """Run and score one mode on every world-th question from rank, gather all ranks' records. Returns
    (records in question order, wall seconds of the slowest rank)."""
    mine = questions[rank::world]
    if rank == 0 and progress:
        print(f"{bench} / {mode}: {len(questions)} questions on {world} rank(s)", file=sys.stderr, flush=True)
    t0 = time.time()
    trajs = run_mode(mode, model, processor, tools_, mine, max_turns=max_turns, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, seed=seed, progress=(rank == 0 and progress), dtype=dtype)
    records = []
    for j, (q, t) in enumerate(zip(mine, trajs)):
        s, judged = score(t.answer, q["answers"]), False
        if s < 1.0 and judge is not None and t.answer:
            s, judged = score(t.answer, q["answers"], question=q["question"], judge=judge), True
        records.append(traj_record(t, q, bench, mode, s, judged=judged, index=rank + j * world))
    parts = M.gather((records, time.time() - t0))
    return sorted((r for recs, _ in parts for r in recs), key=lambda r: r["index"]), max(w for _, w in parts)


def run(args):
    """Evaluate args.ckpt on every questions file in every mode; rank 0 writes and prints the results."""
    rank, world, device = M.setup_dist()
    question_sets = {q: read_questions(q, args.limit) for q in args.questions}  # bad input fails before any work
    ckpt = Path(args.ckpt or M.default_checkpoint(args.data))
    mdl, proc = M.load(ckpt, device=device, log=M.print0, max_pixels=args.max_pixels)
    tl, judge, kw = tools_judge_kw(args)
    results, records = {}, []
    for path, qs in question_sets.items():
        bench = bench_name(path, qs)
        for mode in args.modes:
            recs, wall = evaluate(mode, mdl, proc, tl, qs, bench, rank=rank, world=world, **kw)
            results.setdefault(bench, {})[mode] = metrics(recs, wall)
            records += recs
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return results
    out, table = Path(args.out), markdown_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"checkpoint": str(ckpt), "world_size": world, "results": results,
                                                  "args": vars(args)}, indent=1))
    (out / "table.md").write_text(table)
    tools.write_jsonl(out / "trajectories.jsonl", records)
    print(f"\ncheckpoint {ckpt}\n\n{table}")
    judge_line(judge)
    if args.report:
        print(f"report: {write_report(args.report, records, results)}")
    print(f"wrote {out / 'metrics.json'}, {out / 'table.md'}, {out / 'trajectories.jsonl'}")
    return results


def tools_judge_kw(args):
    """The search tools, the LLM judge of --judge_url (verdicts cached in --out; None: rules only), and
    evaluate's keywords."""
    tl = search.make_tools(args.data, cache=args.cache, cache_mode=args.cache_mode, **search.search_options(args))
    judge = Judge(args.judge_url, args.judge_model, cache=str(Path(args.out) / "judge_cache.sqlite")) \
        if args.judge_url else None
    return tl, judge, dict(judge=judge, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, progress=not args.no_progress)


def judge_line(judge):
    if judge is not None:
        print(f"judge: {judge.calls} calls, {judge.hits} cached, {judge.errors} errors")


def compare(args):
    """The pipeline's table: direct answer and the RAG workflow with the SFT model, then the agent with the SFT
    and with the SFT+RL model (a missing checkpoint's rows are left out, with a line that says so)."""
    qs = read_questions(args.questions[0], args.limit)
    (sft, rl), rows, loaded, records = args.compare, [], {}, []
    missing = [c for c in (sft, rl) if not (Path(c) / "config.json").is_file()]
    if len(missing) == 2:
        sys.exit(f"eval.py --compare: no checkpoint at {sft} nor at {rl} (a folder with config.json)")
    tl, judge, kw = tools_judge_kw(args)
    for label, ckpt, mode in [("Direct answer (SFT model, no search)", sft, "direct"),
                              ("RAG workflow (SFT model: whole-image search, then text search)", sft, "rag"),
                              ("SFT agent (on-demand search)", sft, "agent"),
                              ("SFT+RL agent (on-demand search)", rl, "agent")]:
        if ckpt in missing:
            print(f"skipping {label}: no checkpoint at {ckpt}", file=sys.stderr)
            continue
        if ckpt not in loaded:  # one model in memory at a time
            loaded = {ckpt: M.load(ckpt, log=None)}
        recs, wall = evaluate(mode, *loaded[ckpt], tl, qs, bench_name(args.questions[0], qs), **kw)
        records += [dict(r, method=label) for r in recs]
        rows.append((label, {g: metrics([r for r in recs if kinds is None or r["meta"].get("kind") in kinds])
                             for g, kinds in KIND_GROUPS.items()}))
        print(f"{label}: {_pct(rows[-1][1]['all']['accuracy'])}% in {wall:.0f} s", file=sys.stderr)
    out, table, svg = Path(args.out), compare_text(rows, records), pipeline_curves(sft, rl)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps({"questions": args.questions[0], "sft": sft, "rl": rl, "rows": rows,
                                                  "tool_usage": [(label.split(" (")[0], gm["all"]["usage"])
                                                                 for label, gm in rows]}, indent=1))
    tools.write_jsonl(out / "compare_trajectories.jsonl", records)
    (out / "curves.svg").write_text(svg)
    if args.report:
        write_report(args.report, records, {}, svg=svg)
    print("\n" + table + f"\nwrote {out / 'compare.md'}, {out / 'curves.svg'} (training curves)")
    judge_line(judge)
    return rows


def main(argv=None):
    args = get_args(argv)
    return compare(args) if args.compare else run(args)


if __name__ == "__main__":
    main()
