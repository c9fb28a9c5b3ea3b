"""The real DeepMMSearchVQA pipeline (`make_real_data.py`) against a scripted teacher.

    python -m pytest -q tests/test_make_data_real.py

Offline: the teacher is a fake OpenAI-compatible server on 127.0.0.1 (stdlib http.server, port 0)
that plays a script per question (good trajectories, a malformed action, a wrong answer, a turn-limit
hit, timeouts, HTTP 429 with Retry-After, 500, 400); search runs on the local backends over a tiny
world written here (three icons, a few pages).
"""
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import make_data  # noqa: E402
import make_real_data  # noqa: E402
import search  # noqa: E402
import tools  # noqa: E402

KEY_ENV, KEY = "FAKE_TEACHER_KEY", "sk-test-7f3a9c-DO-NOT-LEAK"
CLIENT_TIMEOUT, SLOW = 0.75, 1.5  # a "timeout" reply takes SLOW seconds; the client waits CLIENT_TIMEOUT

ENTITIES = {  # name, icon look, founding year
    "a": ("Brill Tavon", dict(category="circle", colour="red", colour2="blue", mark="dot"), "1912"),
    "b": ("Kesta Morn", dict(category="square", colour="green", colour2="yellow", mark="bar"), "1888"),
    "c": ("Drava Lune", dict(category="triangle", colour="purple", colour2="orange", mark="x"), "1907"),
}


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # requests honours *_PROXY variables: loopback traffic must never leave through a proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, KEY)


# ---------------------------------------------------------------------------------------------
# The tiny world: search index + source questions in InfoSeek's format
# ---------------------------------------------------------------------------------------------

def A(reason, kind, arg):
    return f"<reason>{reason}</reason>\n<{kind}>{arg}</{kind}>"


def first_title(text):
    """The first result's title in an observation ("<information>Title: snippet...")."""
    m = re.search(r"<information>([^:\n]+):", text)
    return m.group(1) if m else ""


# Per question: image id, question, answers, category (None: the teacher classifies), what the fake
# teacher does on its first request ("timeout_once", "429_once", "500_once", "400", "timeout_always"),
# and a reply function (turn, conversation) -> text or (text, finish_reason).
def crop_reply(turn, conv):
    if turn == 1:  # the right half of the image, in the pixels the teacher sees (its size is in the system prompt)
        w, h = map(int, re.search(r"the image is (\d+)x(\d+) pixels", conv["system"]).groups())
        return f"Sure. <reason> The right object. </reason>  <img_search>[{w // 2},0,{w},{h}]</img_search>\n"
    if turn == 2:
        return A("I know what it is now.", "text_search", f"{first_title(conv['last'])} founding year")
    year = re.search(r"founded in (\d+)", conv["last"]).group(1)
    return A(f"It was founded in {year}.", "answer", year)


QUESTIONS = {
    "q01": ("img_a", "What shape is this object?", ["circle"], "object", None,
            lambda t, c: A("I can see a circle.", "answer", "circle")),
    "q02": ("img_b", "What is this object called?", ["Kesta Morn"], None, None,
            lambda t, c: A("Identify it.", "img_search", "<img>") if t == 1 else
            A("The image is it.", "answer", first_title(c["last"]))),
    "q03": ("scene_ac", "When was the object on the right founded?", ["1907"], "building", None, crop_reply),
    "q04": ("img_a", "What colour is the dot?", ["blue"], "object", None, lambda t, c: "The dot is blue."),
    "q05": ("img_b", "Who makes this object?", ["Nobody"], "product", None,
            lambda t, c: A("Search more.", "text_search", "Kesta Morn maker")),
    "q06": ("img_c", "When was this founded?", ["1907"], "building", None,
            lambda t, c: A("Identify it.", "img_search", "<img>") if t == 1 else A("A guess.", "answer", "1950")),
    "q07": ("img_c", "Who designed this object?", ["Ann Smith"], "person", None,
            lambda t, c: A("I cannot tell.", "answer", tools.GIVE_UP)),
    "q08": ("img_a", "What is the main colour of this object?", ["red"], "object", "timeout_once",
            lambda t, c: A("It is red.", "answer", "red")),
    "q09": ("img_b", "What is the founding year of this object?", ["1888"], "building", "429_once",
            lambda t, c: [A("Identify it.", "img_search", "<img>"),
                          A("Found it.", "text_search", f"{first_title(c['last'])} founding year"),
                          A("Read it.", "answer", "1888")][t - 1]),
    "q10": ("img_c", "What shape is this?", ["triangle"], None, "500_once",
            lambda t, c: A("A triangle.", "answer", "triangle")),
    "q11": ("img_a", "Describe this object.", ["a circle"], "object", "400", None),
    "q12": ("img_c", "What is this object's name?", ["Drava Lune"], "product", None,
            lambda t, c: A("Identify it.", "img_search", "<img>") if t == 1 else
            A("Again, closer.", "img_search", "[0, 0, 56, 56]")),
    "q13": ("img_b", "Which shape is this object?", ["square"], "animal", None,
            lambda t, c: ("<reason>It is a square.</reason>\n<answer>square", "stop")),  # cut at a stop sequence
    "q14": ("img_a", "Where is this object based?", ["Oslo"], "place", "timeout_always",
            lambda t, c: A("Oslo.", "answer", "Oslo")),
}
CLASSIFY_REPLIES = {"What is this object called?": "Category: Product.", "What shape is this?": "place"}

EXPECTED = {"kept": {"q01", "q02", "q03", "q08", "q09", "q10", "q13"},
            "discarded": {"q04": "invalid_action", "q05": "turn_limit", "q06": "wrong_answer", "q07": "gave_up",
                          "q11": "api_rejected", "q12": "tool_refused"},
            "transient": {"q14"}}
SEARCH_REQUIRED = {"q02", "q03", "q09"}


def qid(short):
    return f"infoseek-{short}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """search/ (corpus.jsonl, image_index.jsonl, icons) and src/ (infoseek.jsonl + images/)."""
    root = tmp_path_factory.mktemp("real")
    search, src = root / "search", root / "src"
    (search / "images").mkdir(parents=True)
    (src / "images").mkdir(parents=True)
    corpus, index, icons = [], [], {}
    for key, (name, look, year) in ENTITIES.items():
        icons[key] = make_data.render_icon(look)
        icons[key].save(search / "images" / f"{key}.png")
        icons[key].save(src / "images" / f"img_{key}.png")
        index.append({"id": f"i-{key}", "image": f"images/{key}.png", "title": name,
                      "text": f"{name} is a {look['category']}.", "url": f"https://t.local/{key}"})
        corpus += [{"id": f"p-{key}", "title": name, "text": f"{name} is a {look['colour']} {look['category']}.",
                    "url": f"https://t.local/{key}"},
                   {"id": f"f-{key}", "title": f"{name} founding year", "text": f"{name} was founded in {year}.",
                    "url": f"https://t.local/{key}/founded"}]
    make_data.render_scene([icons["a"], icons["c"]]).save(src / "images" / "scene_ac.png")
    tools.write_jsonl(search / "corpus.jsonl", corpus)
    tools.write_jsonl(search / "image_index.jsonl", index)
    rows = []
    for short, (image_id, question, answers, category, _, _) in QUESTIONS.items():
        row = {"data_id": short, "image_id": image_id, "question": question, "answer": answers,
               "answer_eval": answers, "data_split": "train"}
        if category:
            row["category"] = category
        rows.append(row)
    rows.append(dict(rows[0]))  # a repeated id: played once
    rows.append({"data_id": "q99", "image_id": "no_such_image", "question": "?", "answer": ["x"]})
    rows.append({"data_id": "q98", "image_id": "img_a", "answer": ["x"]})  # no question: malformed
    tools.write_jsonl(src / "infoseek.jsonl", rows)
    return root


# ---------------------------------------------------------------------------------------------
# The fake teacher
# ---------------------------------------------------------------------------------------------

class FakeTeacher:
    def __init__(self, delay=0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.log = []  # dicts: question, turn, status, kind ("teacher" | "classify"), time, usage
        self.first_done = set()

    def question_of(self, text):
        m = re.search(r"Question: (.*)$", text)
        short = next(k for k, v in QUESTIONS.items() if m and v[1] == m.group(1).strip())
        return short

    def respond(self, handler, body):
        if handler.headers.get("Authorization") != f"Bearer {KEY}":
            return 401, {"error": "bad key"}, {}
        msgs = body["messages"]
        if msgs[0]["role"] == "user" and isinstance(msgs[0]["content"], str):  # a category request
            assert msgs[0]["content"].startswith(make_real_data.CLASSIFY_PROMPT.split("{")[0])
            question = re.search(r"Question: (.*)\n", msgs[0]["content"]).group(1)
            reply = CLASSIFY_REPLIES[question]
            self.record(question=question, turn=0, status=200, kind="classify", usage=(20, 3))
            return 200, completion(reply, "stop", 20, 3), {}
        assert msgs[0]["role"] == "system" and [m["role"] for m in msgs[1:]] == ["user", "assistant"] * (
            (len(msgs) - 2) // 2) + ["user"], "the teacher sees the whole conversation"
        parts = msgs[1]["content"]
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        text1 = "".join(p.get("text", "") for p in parts)
        short = self.question_of(text1)
        turn = (len(msgs) - 2) // 2 + 1
        last = "".join(p.get("text", "") for p in msgs[-1]["content"]) if turn > 1 else ""
        _, _, _, _, first, script = QUESTIONS[short]
        with self.lock:
            is_first = short not in self.first_done
            self.first_done.add(short)
        if self.delay:
            time.sleep(self.delay)
        if first == "timeout_always" or (first == "timeout_once" and is_first):
            self.record(question=short, turn=turn, status="timeout", kind="teacher")
            time.sleep(SLOW)
            return 200, completion("<reason>late</reason>\n<answer>late</answer>", "stop", 1, 1), {}
        if first == "429_once" and is_first:
            self.record(question=short, turn=turn, status=429, kind="teacher")
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"}
        if first == "500_once" and is_first:
            self.record(question=short, turn=turn, status=500, kind="teacher")
            return 500, {"error": "boom"}, {}
        if first == "400":
            self.record(question=short, turn=turn, status=400, kind="teacher")
            return 400, {"error": {"message": "content policy"}}, {}
        reply = script(turn, {"system": msgs[0]["content"], "last": last})
        text, finish = reply if isinstance(reply, tuple) else (reply, "stop")
        usage = (100 + 10 * turn, len(text.split()))
        self.record(question=short, turn=turn, status=200, kind="teacher", usage=usage)
        return 200, completion(text, finish, *usage), {}

    def record(self, **row):
        with self.lock:
            self.log.append(dict(row, time=time.time()))

    def rows(self, **where):
        with self.lock:
            return [r for r in self.log if all(r.get(k) == v for k, v in where.items())]


def completion(text, finish, prompt_tokens, completion_tokens):
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}


@contextlib.contextmanager
def serve(teacher):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions", self.path
                status, reply, headers = teacher.respond(self, body)
            except AssertionError as e:  # a broken request shows up as a 422 (and a discard), not a hang
                status, reply, headers = 422, {"error": str(e)}, {}
            data = json.dumps(reply).encode()
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def argv(world, out, url, *extra):
    return ["--source", str(world / "src" / "infoseek.jsonl"),
            "--images", str(world / "src" / "images"),
            "--out", str(out), "--teacher_url", url, "--teacher_model", "fake-teacher", "--api_key_env", KEY_ENV,
            "--backend", "local", "--data", str(world / "search"), "--workers", "4", "--timeout", str(CLIENT_TIMEOUT),
            "--retries", "2", "--backoff", "0.01", "--n_sft", "100", "--quiet", *extra]


def lines_of(path):
    """Every line of a JSONL file parsed strictly (the file ends with a newline)."""
    data = Path(path).read_text(encoding="utf-8")
    assert data == "" or data.endswith("\n")
    return [json.loads(line) for line in data.splitlines()]


def check_log(out):
    rows = lines_of(out / make_real_data.ATTEMPTS)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "no item is written twice"
    expected = {qid(k) for k in EXPECTED["kept"] | set(EXPECTED["discarded"])}
    assert set(ids) == expected, "no item is lost"
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted run: (out, summary, printed, teacher)."""
    out = tmp_path_factory.mktemp("ref") / "data_real"
    teacher = FakeTeacher()
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, serve(teacher) as url, contextlib.redirect_stdout(buffer):
        mp.setenv(KEY_ENV, KEY)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        summary = make_real_data.main(argv(world, out, url))
    return out, summary, buffer.getvalue(), teacher


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def test_kept_and_discarded_counts_and_reasons(reference):
    out, summary, printed, teacher = reference
    rows = check_log(out)
    for short in EXPECTED["kept"]:
        assert rows[qid(short)]["status"] == "kept", (short, rows[qid(short)])
    for short, reason in EXPECTED["discarded"].items():
        assert (rows[qid(short)]["status"], rows[qid(short)]["reason"]) == ("discarded", reason), short
    assert summary["kept"] == 7 and summary["discarded"] == 6 and summary["attempted"] == 13
    assert summary["discard_reasons"] == {"api_rejected": 1, "bad_image": 0, "gave_up": 1, "invalid_action": 1,
                                          "tool_refused": 1, "truncated": 0, "turn_limit": 1, "wrong_answer": 1}
    assert summary["this_run"]["errors"] == {"api_error": 1}  # q14 always times out: no line, retried next run
    assert summary["source"]["skipped"] == {"no_answers": 0, "no_image": 1, "duplicate_id": 1, "malformed": 1}
    assert summary["kept_search_required"] == 3 and summary["kept_search_free"] == 4
    assert summary["category_source"] == {"meta": 5, "teacher": 2}
    assert json.loads((out / "summary.json").read_text()) == summary
    # the printed summary names every discard reason with its count
    line = next(l for l in printed.splitlines() if l.startswith("discard reasons:"))
    for reason, n in summary["discard_reasons"].items():
        assert f"{reason} {n}" in line
    assert "api_error 1" in printed
    # the turn limit: ten teacher turns, the tenth not an answer; nothing after it
    assert rows[qid("q05")]["turns"] == 10 and max(r["turn"] for r in teacher.rows(question="q05")) == 10


def test_retries_timeouts_and_rate_limits(reference):
    _, summary, _, teacher = reference
    q8 = teacher.rows(question="q08")  # timed out once, then answered
    assert [r["status"] for r in q8] == ["timeout", 200]
    q9 = teacher.rows(question="q09")
    assert [r["status"] for r in q9][:2] == [429, 200]
    assert q9[1]["time"] - q9[0]["time"] >= 0.9, "Retry-After: 1 is respected"
    assert [r["status"] for r in teacher.rows(question="q10")][:2] == [500, 200]
    assert len(teacher.rows(question="q11")) == 1, "a 400 is not retried"
    assert len(teacher.rows(question="q14")) == 3, "a timeout is retried --retries times"
    t = summary["cost"]["this_run"]["teacher"]
    assert t["rate_limited"] == 1 and t["server_errors"] == 1 and t["rejected"] == 1
    assert t["timeouts"] == 4 and t["failed"] == 1
    # tokens are the API's `usage`, summed: teacher and category requests apart
    ok = teacher.rows(kind="teacher", status=200)
    assert t["calls"] == len(ok)
    assert t["prompt_tokens"] == sum(r["usage"][0] for r in ok)
    assert t["completion_tokens"] == sum(r["usage"][1] for r in ok)
    c = summary["cost"]["this_run"]["classify"]
    assert c["calls"] == 2 == len(teacher.rows(kind="classify")), "only kept items without a category are classified"
    assert summary["cost"]["all_runs"]["classify"]["total_tokens"] == 2 * 23
    tools_cost = summary["cost"]["this_run"]["tools"]
    # the crop of q03 is pixel for pixel img_c: the cache answers it (2 distinct images searched, 2 queries)
    assert tools_cost["text_search"]["backend_calls"] >= 2 and tools_cost["image_search"]["backend_calls"] >= 2
    # q03: crop + text; q05: 9 text searches; q06: 1 image; q09: image + text; q02: image; q12: image + refused image
    assert tools_cost["text_search"]["calls"] == 11 and tools_cost["image_search"]["calls"] == 6
    assert tools_cost["image_search"]["crops"] == 2 and tools_cost["image_search"]["refused"] == 1
    assert summary["cost"]["all_runs"]["tools"]["text_search_calls"] == 11


def test_trajectories_in_the_design_format(reference, world):
    out, summary, _, _ = reference
    rows = check_log(out)
    fresh = search.make_tools(str(world / "search"))
    for short in EXPECTED["kept"]:
        r = rows[qid(short)]
        msgs = r["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert msgs[0]["content"] == tools.initial_prompt(QUESTIONS[short][1], has_image=True)
        assert msgs[0]["content"].startswith("<image>\n")
        actions = [tools.parse_action(m["content"]) for m in msgs[1::2]]
        for m, a in zip(msgs[1::2], actions):
            assert a.kind != "invalid" and m["content"] == a.render(), "normalised: <reason> + one action"
        assert [a.kind for a in actions][-1] == "answer" and "answer" not in [a.kind for a in actions][:-1]
        assert r["needs_search"] == (short in SEARCH_REQUIRED) == (len(actions) > 1)
        # observations are Tools.execute's text, exactly: replay them through fresh tools
        image = Image.open(r["image"]).convert("RGB")
        state = tools.State()
        for i in range(1, len(msgs) - 1, 2):
            assert fresh.execute(tools.parse_action(msgs[i]["content"]), image, state).text == msgs[i + 1]["content"]
    crop = rows[qid("q03")]["messages"]
    assert crop[1]["content"] == "<reason>The right object.</reason>\n<img_search>[56, 0, 112, 56]</img_search>"
    assert crop[3]["content"].endswith("<text_search>Drava Lune founding year</text_search>")
    assert rows[qid("q13")]["messages"][1]["content"].endswith("<answer>square</answer>")  # closed after a stop cut
    assert rows[qid("q02")]["category"] == "product" and rows[qid("q10")]["category"] == "place"


def test_sft_sample_balanced_and_loadable(reference, tmp_path):
    out, summary, _, _ = reference
    sft = lines_of(out / "sft.jsonl")
    # 50:50 holds exactly: 3 search-required kept, so 3 + 3 (of 4 search-free)
    assert summary["sft"]["n"] == len(sft) == 6 and summary["sft"]["shortfall"] == 94
    assert sum(r["needs_search"] for r in sft) == 3
    free = [r["category"] for r in sft if not r["needs_search"]]
    assert sorted(free) == ["animal", "object", "place"], "search-free side: one per category"
    assert summary["sft"]["by_category"]["building"]["search_required"] == 2
    for r in sft:
        assert set(r) >= {"id", "images", "messages", "kind", "needs_search", "category", "answers"}
        assert sum(m["content"].count("<image>") for m in r["messages"]) == len(r["images"])
        assert all((out / p).is_file() for p in r["images"])
    assert {r["kind"] for r in sft} >= {"search_free", "crop", "image_text"}
    # deterministic for a seed: resampling from the log writes the same rows; another seed, another order
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    resample = ["--sample_only", "--out", str(copy), "--n_sft", "100"]
    with contextlib.redirect_stdout(io.StringIO()):
        make_real_data.main(resample)
        assert lines_of(copy / "sft.jsonl") == [dict(r, images=[img_path(out, copy, p) for p in r["images"]])
                                                for r in sft]
        make_real_data.main(resample + ["--seed", "3"])
    assert [r["id"] for r in lines_of(copy / "sft.jsonl")] != [r["id"] for r in sft]


def img_path(out, copy, p):
    """An image path of out/sft.jsonl as written into copy/sft.jsonl (source images stay where they are)."""
    return p if (copy / p).is_file() and p.startswith("images/") else os.path.relpath(out / p, copy)


def test_key_never_written_or_printed(reference):
    out, _, printed, _ = reference
    assert KEY not in printed
    for p in out.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in repr(make_real_data.tools.ChatClient("http://127.0.0.1:1/v1", "m", make_real_data.tools.Meter(), api_key_env=KEY_ENV))


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

def same_outcome(out, reference_out):
    rows, ref = check_log(out), check_log(reference_out)
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        k: (r["status"], r["reason"]) for k, r in ref.items()}
    sft, ref_sft = lines_of(out / "sft.jsonl"), lines_of(reference_out / "sft.jsonl")
    assert [(r["id"], r["messages"]) for r in sft] == [(r["id"], r["messages"]) for r in ref_sft]


def test_crash_midway_then_resume(world, reference, tmp_path, monkeypatch):
    out = tmp_path / "data_real"
    teacher = FakeTeacher()
    original, written = make_real_data.append_record, []

    def crashing(log, record):
        if len(written) == 5:
            raise RuntimeError("injected crash after 5 items")
        original(log, record)
        written.append(record["id"])

    monkeypatch.setattr(make_real_data, "append_record", crashing)
    with serve(teacher) as url, contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(RuntimeError, match="injected crash"):
            make_real_data.main(argv(world, out, url))
        assert [r["id"] for r in lines_of(out / make_real_data.ATTEMPTS)] == written
        monkeypatch.setattr(make_real_data, "append_record", original)
        n_before = len(teacher.log)
        make_real_data.main(argv(world, out, url))
    asked_again = {r["question"] for r in teacher.log[n_before:]}
    assert not asked_again & {w.split("-")[1] for w in written}, "finished items are not played again"
    same_outcome(out, reference[0])


def test_killed_process_then_resume(world, reference, tmp_path):
    out = tmp_path / "data_real"
    log = out / make_real_data.ATTEMPTS
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with serve(FakeTeacher(delay=0.15)) as url:
        proc = subprocess.Popen([sys.executable, str(ROOT / "make_real_data.py"), *argv(world, out, url, "--workers", "2")],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 20
            while time.time() < deadline and (not log.exists() or log.read_bytes().count(b"\n") < 3):
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
            proc.stderr.close()
    n_done = log.read_bytes().count(b"\n")
    assert 3 <= n_done < 13
    with open(log, "ab") as f:  # as if killed in the middle of a write: half a line
        f.write(b'{"id": "infoseek-q03", "status": "ke')
    with serve(FakeTeacher()) as url, contextlib.redirect_stdout(io.StringIO()):
        with pytest.warns(UserWarning, match="partial last line"):
            summary = make_real_data.main(argv(world, out, url))
    assert summary["source"]["done_before"] == n_done
    same_outcome(out, reference[0])


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

def test_questions_source_and_downscaled_teacher_image(world, tmp_path):
    """A question JSONL in the design's format; the teacher sees the image at half size and its crop box
    is scaled back to the original pixels in the trajectory."""
    src = tmp_path / "questions.jsonl"
    tools.write_jsonl(src, [{"id": "q03", "image": str(world / "src" / "images" / "scene_ac.png"),
                             "question": QUESTIONS["q03"][1], "answers": ["1907"], "needs_search": True,
                             "meta": {"category": "building"}}])
    out = tmp_path / "out"
    args = argv(world, out, "URL", "--teacher_max_side", "56")
    args[args.index("--source") + 1] = str(src)
    with serve(FakeTeacher()) as url, contextlib.redirect_stdout(io.StringIO()):
        args[args.index("URL")] = url
        summary = make_real_data.main(args)
    assert summary["source"]["format"] == "questions" and summary["kept"] == 1
    msgs = lines_of(out / make_real_data.ATTEMPTS)[0]["messages"]
    assert msgs[1]["content"].endswith("<img_search>[56, 0, 112, 56]</img_search>")


def records(n, seed=0):
    rng = random.Random(seed)
    cats = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5  # skewed
    return [{"id": f"r{i:04d}", "category": rng.choice(cats), "needs_search": rng.random() < 0.7} for i in range(n)]


def test_sample_sft_deterministic_balanced():
    rows = records(2000)
    ids, info = make_real_data.sample_sft(rows, 800, seed=1)
    assert len(ids) == len(set(ids)) == 800 and info["search_required"] == info["search_free"] == 400
    shuffled = rows[:]
    random.Random(9).shuffle(shuffled)
    assert make_real_data.sample_sft(shuffled, 800, seed=1)[0] == ids, "independent of the log's order"
    assert make_real_data.sample_sft(rows, 800, seed=2)[0] != ids
    by_id = {r["id"]: r for r in rows}
    for side in (True, False):  # max-min fair: a category below the top count has given all it has
        avail = {c: sum(r["category"] == c and r["needs_search"] == side for r in rows) for c in "abcd"}
        counts = {c: sum(by_id[i]["category"] == c and by_id[i]["needs_search"] == side for i in ids) for c in "abcd"}
        top = max(counts.values())
        assert all(counts[c] == avail[c] or counts[c] >= top - 1 for c in "abcd"), (avail, counts)
        assert counts["d"] == avail["d"] < top  # the skew is real: d is short on both sides
    # one side short: the set shrinks, the ratio holds
    ids, info = make_real_data.sample_sft(rows[:100], 1000, seed=0)
    assert info["search_required"] == info["search_free"] == sum(not r["needs_search"] for r in rows[:100])


def test_read_attempts_cuts_a_partial_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": "x", "status": "kept"}\nnot json\n{"id": "y", "status": "discarded"}\n{"id": "z", "st')
    with pytest.warns(UserWarning):
        rows = make_real_data.read_attempts(path)
    assert [r["id"] for r in rows] == ["x", "y"]
    assert path.read_bytes().endswith(b'"discarded"}\n')
    with open(path, "a", encoding="utf-8") as log:
        make_real_data.append_record(log, {"id": "z", "status": "kept"})
    with pytest.warns(UserWarning, match="bad JSONL line"):
        assert [r["id"] for r in make_real_data.read_attempts(path)] == ["x", "y", "z"]


def test_wrong_key_stops_the_run(world, tmp_path, monkeypatch):
    """HTTP 401 means every request will fail: stop, rather than mark every item as done."""
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    out = tmp_path / "out"
    with serve(FakeTeacher()) as url, contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(make_real_data.tools.ApiFatal, match="HTTP 401") as err:
            make_real_data.main(argv(world, out, url))
    assert "sk-wrong" not in str(err.value)
    assert lines_of(out / make_real_data.ATTEMPTS) == []


def test_small_helpers():
    assert make_real_data.parse_category("Category: Place.", ("place", "other")) == "place"
    assert make_real_data.parse_category("no idea", ("place", "other")) == "other"
    seen, original = make_real_data.normalise_turn("<reason>r</reason><img_search>[10,0,20,10]", "stop", scale=0.5)
    assert seen.box == (10, 0, 20, 10) and original.box == (20, 0, 40, 20)
    bad, none = make_real_data.normalise_turn("<answer>x</answer>", "stop")
    assert bad.kind == "invalid" and none is None  # no <reason>: not a demonstration
    image, text = make_real_data.teacher_content("<image>\nhi", [Image.new("RGB", (8, 8))])
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert text == {"type": "text", "text": "\nhi"}
