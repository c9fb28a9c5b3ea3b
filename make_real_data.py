"""make_real_data.py: DeepMMSearchVQA, the paper's SFT data, made with a teacher MLLM and real search.

    # a search service over your index (or --backend serpapi, or --backend local --data DIR)
    python serve.py --data /path/to/index --port 8765 &
    # a teacher: a local vLLM server (no key), or a hosted API (--api_key_env names the key's variable)
    vllm serve Qwen/Qwen2.5-VL-72B-Instruct --port 8000 --limit-mm-per-prompt '{"image": 4}' &
    python make_real_data.py --source infoseek_train.jsonl --images oven_images/ \
        --teacher_url http://127.0.0.1:8000/v1 --teacher_model Qwen/Qwen2.5-VL-72B-Instruct \
        --backend http --server_url http://127.0.0.1:8765 --n_source 200000 --n_sft 10000 --workers 32
    GEMINI_API_KEY=... python make_real_data.py ... --api_key_env GEMINI_API_KEY --workers 16 \
        --teacher_url https://generativelanguage.googleapis.com/v1beta/openai --teacher_model gemini-2.5-pro
    # the same command again resumes after a crash; resample without calling the teacher:
    python make_real_data.py --sample_only --out data_real --n_sft 5000 --seed 1

As in the paper, every source question (InfoSeek, or any question JSONL) is played by a strong MLLM
with real search tools; a conversation is discarded at its first malformed turn or when it runs out
of turns, kept when its final answer is right.

It writes under --out (default data_real/): attempts.jsonl (one line per finished item: the done-set
of a resumed run; an item that failed transiently gets none and is retried), images/, sft.jsonl (kept
trajectories, 50:50 search-required : search-free, each side balanced across knowledge categories),
summary.json (counts, discard reasons, calls and tokens; also printed), search_cache.sqlite,
judge_cache.sqlite. What it simplifies: the paper's teacher is Gemini 2.5 Pro over private search APIs;
ours is any OpenAI-compatible MLLM over our tools.
"""
import argparse
import base64
import contextlib
import dataclasses
import io
import json
import os
import random
import re
import threading
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

# before numpy loads: OpenBLAS threads make the image index's small mat-vecs ~10x slower on 2 busy cores
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import search  # noqa: E402
import tools  # noqa: E402
from benchmarks import Images, load_infoseek, read_records  # noqa: E402
from eval import Judge, score  # noqa: E402
from make_data import save_tool_images  # noqa: E402

ATTEMPTS = "attempts.jsonl"
MAX_TURNS = 10  # assistant turns; a conversation not answered by the last one is discarded
# Knowledge categories the teacher assigns when the source has none (InfoSeek's files carry none).
CATEGORIES = ("animal", "plant", "food", "person", "building", "place", "vehicle", "product", "artwork", "sport",
              "event", "organization", "science", "other")
DISCARD_REASONS = ("invalid_action", "truncated", "turn_limit", "wrong_answer", "gave_up", "tool_refused",
                   "api_rejected", "bad_image")

TEACHER_SYSTEM = (
    "You write demonstrations of answering questions{about} with web search. Each reply is "
    "<reason>your reasoning</reason> followed by exactly one action, with nothing after it:\n"
    "<answer>short answer</answer> (a name, number or date, not a sentence)\n"
    "<text_search>query</text_search>\n"
    "{image_actions}"
    "Answer at once when you are sure; search when the question needs knowledge you may lack.{crop_hint} "
    "At most {max_turns} replies in all. Search results come back inside <information>...</information>.")
TEACHER_IMAGE_ACTIONS = (
    "<img_search><img></img_search> searches the whole image (at most one image search)\n"
    "<img_search>[x1, y1, x2, y2]</img_search> searches a crop; the image is {width}x{height} pixels\n")
TEACHER_EXPRESSION = "<img_search>object description</img_search> searches the object so described\n"
CLASSIFY_PROMPT = ("Which category of knowledge does this question ask about?\nQuestion: {question}\n"
                   "Categories: {categories}.\nReply with one category, nothing else.")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", help="InfoSeek file or question JSONL (the design's format); a category if given")
    p.add_argument("--images", help="InfoSeek/OVEN image folder (files <image_id>.jpg, any sub-folder)")
    p.add_argument("--n_source", type=int, default=0, help="a random (seeded) subset of the source; 0: all")
    p.add_argument("--out", default="data_real")
    p.add_argument("--teacher_url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL")
    p.add_argument("--teacher_model", help="model name the endpoint serves")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="variable holding the API key (vLLM needs none)")
    p.add_argument("--max_tokens", type=int, default=1024, help="per teacher reply")
    p.add_argument("--no_stop", action="store_true", help="send no stop sequences (for APIs that refuse `stop`)")
    p.add_argument("--teacher_max_side", type=int, default=0, help="downscale what the teacher sees (0: never)")
    p.add_argument("--workers", type=int, default=8, help="items played at once (threads)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per API request")
    p.add_argument("--retries", type=int, default=6, help="retries per API request (timeouts, 429, 5xx)")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled each time")
    search.add_search_args(p)
    p.add_argument("--data", default="data", help="local backend: folder with corpus.jsonl and image_index.jsonl")
    p.add_argument("--grounder", help="local GroundingDINO folder, for <img_search>object description</img_search>")
    p.add_argument("--summarizer_url", help="OpenAI-compatible endpoint that summarizes search results")
    p.add_argument("--summarizer_model")
    p.add_argument("--judge_url", help="LLM judge for answers the rules reject (eval.Judge)")
    p.add_argument("--judge_model")
    p.add_argument("--n_sft", type=int, default=10_000, help="size of the sampled SFT set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample_only", action="store_true", help="no teacher calls: resample sft.jsonl from the log")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.sample_only and not (args.source and args.teacher_model):
        p.error("--source and --teacher_model are required (or --sample_only)")
    return args


def teacher_system(size, grounder=False):
    """The teacher's system prompt (never the student's): the protocol and the image's size as the
    teacher sees it (its crop boxes are in those pixels); size None: no image."""
    if size is None:
        return TEACHER_SYSTEM.format(about="", image_actions="", crop_hint="", max_turns=MAX_TURNS)
    actions = TEACHER_IMAGE_ACTIONS.format(width=size[0], height=size[1])
    return TEACHER_SYSTEM.format(
        about=" about an image", image_actions=actions + (TEACHER_EXPRESSION if grounder else ""),
        crop_hint=" Crop when the question is about one object of a larger scene.", max_turns=MAX_TURNS)


def teacher_content(text, images):
    """A user turn for the teacher: each "<image>" of `text` becomes an image_url part, a JPEG re-encoded
    from the decoded pixels (no EXIF rotation: the teacher sees the coordinates the crop will use)."""
    parts = []
    for i, piece in enumerate(text.split("<image>")):
        if i:
            jpeg = io.BytesIO()
            images[i - 1].convert("RGB").save(jpeg, format="JPEG", quality=90)
            url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode("ascii")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def normalise_turn(text, finish_reason, scale=1.0, stop_used=True):
    """The teacher's reply -> (Action in the teacher's pixels, Action in the original's), or (invalid
    Action, None). Text around the reason and the action is dropped; a missing <reason> is invalid."""
    if stop_used and finish_reason == "stop" and not text.rstrip().endswith(tools.ACTION_END_TAGS):
        # OpenAI-style servers drop the stop string they cut at: close the last opened action tag
        start, kind = max((text.rfind(f"<{k}>"), k) for k in tools.ACTION_KINDS)
        if start >= 0 and f"</{kind}>" not in text[start:]:
            text = text.rstrip() + f"</{kind}>"
    action = tools.parse_action(text)
    if action.kind == "invalid":
        return action, None
    if not action.reason:
        return tools.Action("invalid", error="Missing or empty <reason>."), None
    original = dataclasses.replace(action)
    if action.box is not None and scale != 1.0:
        original.box = tuple(int(round(v / scale)) for v in action.box)
    return action, original


def parse_category(reply, categories):
    """The first category a reply names as a word, else "other"."""
    text = " ".join(re.sub(r"[^a-z0-9& ]+", " ", str(reply).lower()).split())
    return next((c for c in categories if re.search(rf"\b{re.escape(c.lower())}\b", text)), "other")


# ----------------------------------------------------------------------------- the source and the log

def load_source(path, images=None, n_source=0, seed=0):
    """Source questions -> (question rows, with meta["category"] when the source has one; stats).
    InfoSeek when its rows have data_id and image_id (`images` holds <image_id>.jpg), else a question
    JSONL. Skips rows without answers, malformed InfoSeek records or their missing images, repeated ids;
    n_source > 0 keeps a seeded random subset of that many, in source order."""
    path = Path(path)
    raw = [r for r in read_records(path) if isinstance(r, dict)]
    fmt = "infoseek" if raw and {"data_id", "image_id"} <= set(raw[0]) else "questions"
    if fmt == "infoseek":  # a category, if any, is only in the raw record
        rows = load_infoseek([path], Images(images))
        category_of = {str(r.get("data_id")): r.get("category") for r in raw}
    else:
        rows = tools.load_questions(path)
    skipped, kept, seen = Counter(), [], set()
    for row in rows:
        if "skipped" in row:  # a record the InfoSeek loader could not read
            skipped["malformed"] += 1
            continue
        row["id"] = str(row["id"])
        if fmt == "infoseek":
            category = category_of.get(row["meta"]["source_id"])
        else:
            category = row["meta"].get("category", row.get("category"))
        if category not in (None, ""):
            row["meta"]["category"] = str(category)
        if not row.get("answers"):
            skipped["no_answers"] += 1
        elif fmt == "infoseek" and row.get("image") is None:
            skipped["no_image"] += 1
        elif row["id"] in seen:
            skipped["duplicate_id"] += 1
        else:
            seen.add(row["id"])
            kept.append(row)
    usable = len(kept)
    if 0 < n_source < len(kept):
        chosen = set(random.Random(f"{seed}-source").sample(range(len(kept)), n_source))
        kept = [r for i, r in enumerate(kept) if i in chosen]
    return kept, {"path": str(path), "format": fmt, "rows": len(rows), "usable": usable, "selected": len(kept),
                  "skipped": {k: skipped[k] for k in ("no_answers", "no_image", "duplicate_id", "malformed")}}


def read_attempts(path):
    """The finished items of previous runs. A last line without its newline (a kill mid-write) is cut
    off, so the next append starts a clean line; a bad line is skipped with a warning (its item redone)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):  # only the last line can lack it
                warnings.warn(f"{path}:{lineno}: partial last line ({len(line)} bytes) removed; its item is redone")
                f.truncate(offset)
            offset += len(line)
    return tools.read_jsonl(path, required=("id", "status"))


def append_record(log, record):
    """One line of the attempts log, one write, flushed: a kill leaves at most a partial last line."""
    log.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.flush()


# ----------------------------------------------------------------------------- one item

@dataclasses.dataclass
class RealContext:
    meter: tools.Meter  # this run's calls, tokens and tool actions, of every client and tool
    teacher: tools.ChatClient
    classifier: tools.ChatClient  # asks a kept question's category when the source has none
    tools: tools.Tools
    out: Path
    max_tokens: int = 1024
    stop: bool = True  # send the action end tags as stop sequences
    teacher_max_side: int = 0
    judge: object = None  # for answers the rules reject


def play_item(q, ctx):
    """Play one question with the teacher and the real tools -> its attempt record (kept or discarded);
    tools.TransientError when it could not be finished (a rerun retries it). The trajectory: the initial
    prompt, then per turn the teacher's reply as Action.render() and the observation as Tools.execute
    returns it. The teacher sees the same conversation (in its own pixels) behind a system prompt."""
    usage = tools.Meter()  # this item's calls and tokens, kept in its record (summed over all runs)

    def discard(reason, turns, detail=""):
        return {"id": q["id"], "status": "discarded", "reason": reason, "turns": turns,
                "detail": str(detail)[:500], "usage": usage.snapshot()}

    image = seen_image = None
    scale = 1.0
    if q.get("image"):
        try:
            with Image.open(q["image"]) as f:
                image = seen_image = f.convert("RGB")
        except (OSError, ValueError) as e:
            return discard("bad_image", 0, f"{type(e).__name__}: {e}")
        if ctx.teacher_max_side and max(image.size) > ctx.teacher_max_side:
            scale = ctx.teacher_max_side / max(image.size)
            seen_image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                      Image.BICUBIC)
    first = tools.initial_prompt(q["question"], has_image=image is not None)
    messages = [{"role": "user", "content": first}]
    system = teacher_system(None if image is None else seen_image.size, ctx.tools.grounder is not None)
    view = [{"role": "system", "content": system},
            {"role": "user", "content": teacher_content(first, [seen_image])}]
    state, attached = tools.State(), []
    for turn in range(1, MAX_TURNS + 1):
        try:
            text, u, finish = ctx.teacher.chat(view, ctx.max_tokens, stop=tools.ACTION_END_TAGS if ctx.stop else None)
        except tools.ApiRejected as e:
            return discard("api_rejected", turn - 1, e)
        usage.add("teacher", calls=1, **u)
        seen, action = normalise_turn(text, finish, scale, stop_used=ctx.stop)
        if action is None:  # truncated: raise --max_tokens
            return discard("truncated" if finish == "length" else "invalid_action", turn,
                           f"{seen.error} | {text[:300]!r}")
        messages.append({"role": "assistant", "content": action.render()})
        view.append({"role": "assistant", "content": seen.render()})
        if action.kind == "answer":
            break
        if turn == MAX_TURNS:
            return discard("turn_limit", turn, f"turn {turn} is a {action.kind}, not an answer")
        calls = state.n_calls
        obs = ctx.tools.execute(action, image, state)
        # refused (n_calls did not move): a second image search, a box outside the image, no calls left;
        # "No results" is a usable observation, a search failed after its retries is transient
        refused = obs.error and state.n_calls == calls
        group = "text_search" if action.kind == "text_search" else "image_search"
        fields = {"calls": 1, "refused": int(refused)}  # calls include the search cache's hits
        if group == "image_search" and not action.whole:
            fields["crops"] = 1
        ctx.meter.add(group, **fields)
        usage.add("tools", **{f"{group}_{k}": v for k, v in fields.items()})
        if obs.error and not refused and obs.text.startswith("<information>Search failed"):
            raise tools.TransientError("search_failed", obs.text[:200])
        if refused:
            return discard("tool_refused", turn, obs.text)
        messages.append({"role": "user", "content": obs.text})
        attached.extend(obs.images)
        view.append({"role": "user", "content": teacher_content(obs.text, obs.images)})

    answer = action.arg
    if answer.strip() == tools.GIVE_UP:
        return discard("gave_up", turn)
    if score(answer, q["answers"], question=q["question"], judge=ctx.judge) != 1.0:
        return discard("wrong_answer", turn, answer)
    category, category_source = q["meta"].get("category"), "meta"
    if category is None:
        category, category_source = classify(q, ctx.classifier, usage), "teacher"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", q["id"])[:120]  # a file name, whatever the id
    paths = save_tool_images(attached, ctx.out, stem)
    n_text, n_img, n_crop = state.n_text_search, state.n_img_search, state.n_crop
    if n_img:  # what the trajectory did, in the synthetic world's words where they fit
        kind = "crop" if n_crop else "image_text" if n_text else "image"
    else:
        kind = "text" if n_text else "search_free"
    return {"id": q["id"], "status": "kept", "reason": "", "turns": turn, "usage": usage.snapshot(),
            "category": category, "category_source": category_source, "needs_search": turn > 1, "kind": kind,
            "n_text_search": n_text, "n_img_search": n_img, "n_crop": n_crop,
            "question": q["question"], "answers": q["answers"], "answer": answer,
            "image": str(Path(q["image"]).resolve()) if q.get("image") else None,
            "tool_images": paths, "messages": messages, "source_meta": q["meta"]}


def classify(q, client, usage):
    prompt = CLASSIFY_PROMPT.format(question=q["question"], categories=", ".join(CATEGORIES))
    try:
        text, u, _ = client.chat([{"role": "user", "content": prompt}], max_tokens=16)
    except tools.ApiRejected as e:  # e.g. a content filter on the question: not worth losing the trajectory
        warnings.warn(f"{q['id']}: category request rejected ({e}); using 'other'")
        return "other"
    usage.add("classify", calls=1, **u)
    return parse_category(text, CATEGORIES)


# ----------------------------------------------------------------------------- sampling

def quotas(avail, k, rng):
    """Split k among categories ({category: n available}) max-min fairly: a small one's rest goes to others."""
    quota = {c: 0 for c in avail}
    remaining = min(k, sum(avail.values()))
    open_ = sorted(c for c in avail if avail[c] > 0)
    while remaining > 0 and open_:
        share = remaining // len(open_)
        if share == 0:  # fewer items left than categories: one more each for a seeded few
            for c in rng.sample(open_, remaining):
                quota[c] += 1
            break
        for c in open_:
            take = min(share, avail[c] - quota[c])
            quota[c] += take
            remaining -= take
        open_ = [c for c in open_ if quota[c] < avail[c]]
    return quota


def sample_sft(kept, n, seed=0):
    """The SFT set from kept records: exactly half search-required (a short side shrinks the whole set),
    each side balanced across categories; the same for a seed whatever the order of `kept` (thread
    timing). Returns (chosen ids in a seeded shuffled order, info)."""
    kept = sorted(kept, key=lambda r: r["id"])
    sides = {side: [r for r in kept if bool(r["needs_search"]) == side] for side in (True, False)}
    total = min(n, 2 * len(sides[True]), 2 * len(sides[False]))
    want = {True: round(total * 0.5), False: total - round(total * 0.5)}
    chosen, by_category = [], {}
    for side, name in ((True, "search_required"), (False, "search_free")):
        groups = {}
        for r in sides[side]:
            groups.setdefault(r["category"], []).append(r["id"])
        quota = quotas({c: len(v) for c, v in groups.items()}, want[side], random.Random(f"{seed}-sft-{side}"))
        for c in sorted(groups):
            random.Random(f"{seed}-sft-{side}-{c}").shuffle(groups[c])
            chosen += groups[c][:quota[c]]
            if quota[c]:
                by_category.setdefault(c, {"search_required": 0, "search_free": 0})[name] = quota[c]
    random.Random(f"{seed}-sft-order").shuffle(chosen)
    return chosen, {"requested": n, "n": len(chosen), "search_required": want[True], "search_free": want[False],
                    "by_category": dict(sorted(by_category.items())), "shortfall": n - total, "seed": seed,
                    "search_share": 0.5}


def write_sft(out, records, n, seed):
    """Sample the kept records into out/sft.jsonl (image paths relative to `out`); returns the info."""
    kept = {r["id"]: r for r in records if r["status"] == "kept"}
    ids, info = sample_sft(kept.values(), n, seed)
    rows = []
    for r in (kept[i] for i in ids):
        images = [Path(os.path.relpath(r["image"], out.resolve())).as_posix()] if r.get("image") else []
        rows.append({"id": r["id"], "images": images + r["tool_images"], "messages": r["messages"],
                     "kind": r["kind"], "needs_search": r["needs_search"], "category": r["category"],
                     "question": r["question"], "answers": r["answers"]})
    tools.write_jsonl(out / "sft.jsonl", rows)
    return info


# ----------------------------------------------------------------------------- the run

def metered(fn, meter, group, field="calls", lock=contextlib.nullcontext()):
    """fn, counting each call in meter[group][field], run inside `lock`."""
    def call(*args):
        meter.add(group, **{field: 1})
        with lock:
            return fn(*args)
    return call


def build_real_context(args, out, meter):
    """The teacher, classifier and judge (one API: one rate gate) and the tools, every call counted."""
    grounder = False  # real photos: GroundingDINO or none, never the synthetic world's
    if args.grounder:  # one torch model shared by the worker threads: one call at a time
        grounder = search.GroundingDinoGrounder(args.grounder)
        grounder.ground = metered(grounder.ground, meter, "grounder", lock=threading.Lock())
    summarizer = None
    if args.summarizer_url:  # tools.ChatSummarizer does not report its token usage: calls are counted
        summarizer = metered(tools.ChatSummarizer(args.summarizer_url, args.summarizer_model or args.teacher_model),
                             meter, "summarizer")
    tk = search.make_tools(args.data, cache=str(out / "search_cache.sqlite"), grounder=grounder,
                          summarizer=summarizer, **search.search_options(args))
    for backend, group in ((tk.text_backend, "text_search"), (tk.image_backend, "image_search")):
        if backend is not None:  # the searches that reach a backend: the search cache's misses
            backend.search = metered(backend.search, meter, group, "backend_calls")
    client = dict(meter=meter, api_key_env=args.api_key_env, timeout=args.timeout, retries=args.retries,
                  backoff=args.backoff, gate=tools.RateGate())
    judge = None
    if args.judge_url:
        judge = metered(Judge(args.judge_url, args.judge_model or args.teacher_model,
                              cache=out / "judge_cache.sqlite", api_key_env=args.api_key_env), meter, "judge")
    return RealContext(
        meter=meter, teacher=tools.ChatClient(args.teacher_url, args.teacher_model, name="teacher", **client),
        classifier=tools.ChatClient(args.teacher_url, args.teacher_model, name="classify", **client),
        tools=tk, out=out, max_tokens=args.max_tokens, stop=not args.no_stop,
        teacher_max_side=args.teacher_max_side, judge=judge)


def play_all(todo, ctx, log, workers, quiet=False):
    """Play `todo` on a bounded thread pool; the main thread alone appends finished records to `log`.
    Returns this run's counts."""
    run = {"attempted": 0, "kept": 0, "discarded": 0, "errors": Counter(), "seconds": 0.0}
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="teacher", unit="item", disable=quiet, dynamic_ncols=True)
    items, pending, shown_bug, interrupted = iter(todo), set(), False, False
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher")
    try:
        while True:
            # at most 2 x workers items in flight or queued: memory stays flat on 200k items
            while len(pending) < 2 * workers and (q := next(items, None)) is not None:
                pending.add(pool.submit(play_item, q, ctx))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    record = future.result()
                except tools.TransientError as e:
                    run["errors"][e.kind] += 1
                except tools.ApiFatal:
                    raise
                except Exception as e:  # a bug on one item must not stop 200k: counted, shown once, redone later
                    run["errors"][f"exception:{type(e).__name__}"] += 1
                    if not shown_bug:
                        shown_bug = True
                        traceback.print_exception(e)
                else:
                    append_record(log, record)
                    run["attempted"] += 1
                    run["kept" if record["status"] == "kept" else "discarded"] += 1
                bar.update(1)
                tokens = ctx.meter.snapshot().get("teacher", {}).get("total_tokens", 0)
                bar.set_postfix(kept=run["kept"], discarded=run["discarded"], errors=sum(run["errors"].values()),
                                tokens=tokens, refresh=False)
    except KeyboardInterrupt:
        interrupted = True  # do not wait for the teacher calls in flight: their items are redone next time
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        bar.close()
    run["errors"] = dict(sorted(run["errors"].items()))
    run["seconds"] = round(time.time() - t0, 2)
    return run


def real_summary(records, source, sample, run, meter, args):
    """summary.json: counts over the whole log, except `this_run` and `cost.this_run` (this process)."""
    kept = [r for r in records if r["status"] == "kept"]
    reasons = Counter(r["reason"] for r in records if r["status"] == "discarded")
    cost_all = tools.Meter()
    for r in records:
        for group, fields in (r.get("usage") or {}).items():
            cost_all.add(group, **fields)
    now = meter.snapshot()
    return {
        "world": "real",
        "args": {k: (tools.public_url(v) if k.endswith("_url") and v else v) for k, v in sorted(vars(args).items())},
        "source": source,
        "attempted": len(records), "kept": len(kept), "discarded": len(records) - len(kept),
        "keep_rate": round(len(kept) / max(len(records), 1), 4),
        "discard_reasons": {k: reasons[k] for k in sorted(set(DISCARD_REASONS) | set(reasons))},
        "kept_search_required": sum(r["needs_search"] for r in kept),
        "kept_search_free": sum(not r["needs_search"] for r in kept),
        "kept_by_category": dict(sorted(Counter(r["category"] for r in kept).items())),
        "kept_by_kind": dict(sorted(Counter(r["kind"] for r in kept).items())),
        "category_source": dict(sorted(Counter(r["category_source"] for r in kept).items())),
        "turns_mean_kept": round(sum(r["turns"] for r in kept) / max(len(kept), 1), 3),
        "sft": sample,
        "this_run": run,
        "cost": {"all_runs": cost_all.snapshot(),
                 "this_run": {"teacher": now.get("teacher", {}), "classify": now.get("classify", {}),
                              "tools": {k: now.get(k, {}) for k in ("text_search", "image_search")},
                              "summarizer": now.get("summarizer", {}), "judge": now.get("judge", {})}},
    }


def print_real_summary(s):
    print(f"source: {s['source'].get('selected', '?')} items of {s['source'].get('path', '?')}; "
          f"attempted {s['attempted']} (this run {s['this_run']['attempted']}), kept {s['kept']} "
          f"({s['keep_rate']:.1%}: {s['kept_search_required']} search-required, {s['kept_search_free']} search-free), "
          f"discarded {s['discarded']}")
    print("discard reasons: " + ", ".join(f"{k} {v}" for k, v in s["discard_reasons"].items()))
    if s["this_run"]["errors"]:
        print("not finished this run (retried by the next): "
              + ", ".join(f"{k} {v}" for k, v in s["this_run"]["errors"].items()))
    print("kept by category: " + ", ".join(f"{k} {v}" for k, v in s["kept_by_category"].items()))
    x = s["sft"]
    print(f"sft.jsonl: {x['n']} of {x['requested']} requested ({x['search_required']} search-required, "
          f"{x['search_free']} search-free, {len(x['by_category'])} categories, seed {x['seed']})")
    t = s["cost"]["this_run"]
    teacher, classifier, tk = t["teacher"], t["classify"], t["tools"]
    print(f"teacher this run: {teacher.get('calls', 0)} calls, {teacher.get('prompt_tokens', 0)} prompt + "
          f"{teacher.get('completion_tokens', 0)} completion tokens, {teacher.get('retries', 0)} retries, "
          f"{teacher.get('rate_limited', 0)} rate-limited, {teacher.get('timeouts', 0)} timeouts; "
          f"classify {classifier.get('calls', 0)} calls, {classifier.get('total_tokens', 0)} tokens; "
          f"search backend calls: text {tk['text_search'].get('backend_calls', 0)}, "
          f"image {tk['image_search'].get('backend_calls', 0)}; "
          f"summarizer {t['summarizer'].get('calls', 0)} calls; judge {t['judge'].get('calls', 0)} calls")


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, meter, source = read_attempts(out / ATTEMPTS), tools.Meter(), {}
    run = {"attempted": 0, "kept": 0, "discarded": 0, "errors": {}, "seconds": 0.0}
    if not args.sample_only:
        questions, source = load_source(args.source, args.images, args.n_source, args.seed)
        done = {r["id"] for r in records}
        todo = [q for q in questions if q["id"] not in done]
        source["done_before"] = len(questions) - len(todo)
        ctx = build_real_context(args, out, meter)
        print(f"make_real_data: {len(todo)} items to play ({source['done_before']} already done) with "
              f"{args.teacher_model} at {tools.public_url(ctx.teacher.endpoint)}, {args.workers} workers, "
              f"{args.backend} search", flush=True)
        with open(out / ATTEMPTS, "a", encoding="utf-8") as log:
            run = play_all(todo, ctx, log, args.workers, args.quiet)
        records = read_attempts(out / ATTEMPTS)
    summary = real_summary(records, source, write_sft(out, records, args.n_sft, args.seed), run, meter, args)
    with tools.atomic_path(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1) + "\n")
    print_real_summary(summary)
    print(f"written to {out}/ ({ATTEMPTS}, sft.jsonl, summary.json)")
    return summary


if __name__ == "__main__":
    main()
