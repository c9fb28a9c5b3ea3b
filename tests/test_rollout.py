"""rollout.py: parity with the re-prefill baseline, exact log-probs, budgets, groups, slot reuse and
compaction, the rollout's own attention, bf16 compute, bad images, stop detection on token ids.

    python3 -m pytest -q tests/test_rollout.py
"""
import itertools
import time
import types

import pytest
import torch
from PIL import Image

import model as M
import rollout as R
import search as S
import tools as T
from conftest import icon

COLOURS = ["red", "blue", "green", "orange"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    rows = []
    for i, c in enumerate(COLOURS):
        icon(c).save(d / f"{c}.png")
        rows.append({"id": f"e{i}", "image": f"{c}.png", "title": f"Entity {c}", "text": f"The {c} one.",
                     "url": f"http://x/{c}"})
    text = S.BM25Index([{"id": r["id"], "title": r["title"], "text": r["text"] + " founded 1843",
                         "url": r["url"]} for r in rows])
    images = S.LocalImageIndex(rows, base_dir=str(d))
    scene = Image.new("RGB", (112, 56), "white")
    scene.paste(icon("red"), (0, 0))
    scene.paste(icon("blue"), (56, 0))
    qs = [{"id": f"q{i}", "image": scene if i % 2 else icon(c), "question": f"Who is the {c} one?",
           "answers": [f"Entity {c}"]} for i, c in enumerate(COLOURS)]
    qs.append({"id": "q_text", "image": None, "question": "When was Entity red founded?", "answers": ["1843"]})
    return text, images, qs


def make_tools(world, **kw):
    text, images, _ = world
    return T.Tools(text, images, attach="crop", **kw)


# Two forced tool turns (a crop search that returns an image, a text search), then free generation.
FORCED = ["<reason>Look closer.</reason><img_search>[0, 0, 56, 56]</img_search>",
          "<reason>Search.</reason><text_search>{question}</text_search>"]
KW = dict(max_turns=4, max_new_tokens=12, max_total_tokens=1024)


def test_greedy_parity_with_generate_baseline(tiny, world):
    model, proc = tiny
    qs = world[2]
    ours = R.rollout(model, proc, make_tools(world), qs, temperature=0.0, forced_actions=FORCED,
                     batch_size=3, **KW)  # 5 questions in 3 slots: finished rows' slots are reused
    base = R.rollout_baseline(model, proc, make_tools(world), qs, forced_actions=FORCED, **KW)
    assert any(t.images and len(t.images) >= 2 for t in ours)  # an observation carried an image
    for a, b in zip(ours, base):
        assert a.turns >= 3
        assert a.token_ids == b.token_ids
        assert a.loss_mask == b.loss_mask
        assert a.finish == b.finish
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_rollout_tokens_are_model_render_of_the_conversation(tiny, world):
    """The rollout's chunks come from model.render: a trajectory's token ids (the question's image, forced
    turns, tools' observations and a crop's image) are model.render of the same conversation, up to the
    last turn's `<|im_end|>\\n`, which the rollout stops before; a turn the model closed itself gets the
    same chunk without its `<|im_end|>`."""
    model, proc = tiny
    forced = FORCED + ["<reason>Done.</reason><answer>Entity red</answer>"]
    trajs = R.rollout(model, proc, make_tools(world), world[2], temperature=0.0, forced_actions=forced, **KW)
    for t in trajs:
        assert t.finish == "answer" and t.turns == 3
        msgs = [{"role": "user", "content": T.initial_prompt(t.question["question"],
                                                             has_image=t.question["image"] is not None)}]
        for text, obs in itertools.zip_longest(t.texts, t.observations):
            msgs += [{"role": "assistant", "content": text}] + ([{"role": "user", "content": obs.text}] if obs else [])
        r = M.render(proc, msgs, t.images)
        ids = r["input_ids"].tolist()
        assert ids[:len(t.token_ids)] == t.token_ids and proc.decode(ids[len(t.token_ids):]) == "<|im_end|>\n"
        assert r["pixel_values"] is None if not t.images else torch.equal(r["pixel_values"], torch.cat(t.pixel_values))
        obs = t.observations[0]
        assert R.tool_chunk(proc, obs, False)["ids"] == [proc.im_end_id] + R.tool_chunk(proc, obs, True)["ids"]
    assert any(len(t.images) == 2 for t in trajs) and any(not t.images for t in trajs)


def test_greedy_groups_equal_the_baseline_on_repeated_questions(tiny, world):
    """What rollout.py --bench compares: a group prefills its prompt once and copies it to its
    members; greedy, each member is the baseline's run of the question alone."""
    model, proc = tiny
    qs = world[2]
    ours = R.rollout(model, proc, make_tools(world), qs, group_size=3, temperature=0.0, batch_size=6, **KW)
    base = R.rollout_baseline(model, proc, make_tools(world), [q for q in qs for _ in range(3)], **KW)
    assert len(ours) == len(base) == 3 * len(qs)
    for a, b in zip(ours, base):
        assert a.token_ids == b.token_ids and a.finish == b.finish and a.gen_tokens > 0
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_equal_full_forward(tiny, world, temperature, top_p):
    """The recorded log-probs are a fresh full forward's at the sampling temperature (top-p only restricts
    where samples land); sampled tokens only are trained on, forced and tool tokens never."""
    model, proc = tiny
    trajs = R.rollout(model, proc, make_tools(world), world[2], group_size=2, temperature=temperature, top_p=top_p,
                      seed=3, forced_actions=FORCED[:1], **KW)
    batch = M.collate([t.item() for t in trajs], proc, extra_keys=("logprobs",))
    with torch.no_grad():
        lp = M.token_logprobs(model, batch, temperature=temperature)
    m = batch["loss_mask"].bool()
    assert m.sum() > 20
    assert torch.allclose(lp[m], batch["logprobs"][m], atol=1e-4), (lp[m] - batch["logprobs"][m]).abs().max()
    for t in trajs:
        assert sum(t.loss_mask) == t.gen_tokens
        n_img = sum(t.token_ids[i] == proc.image_token_id for i in range(len(t.token_ids)))
        assert n_img == sum(proc.n_image_tokens(g) for grids in t.grids for g in grids) if t.images else n_img == 0


def test_shared_prompt_forward_equals_separate_forwards(tiny, world):
    """A group's prompt forwarded once, its continuations (with a tool's crop image) attending to it,
    and identical samples forwarded once: the same log-probs and gradients as one forward per trajectory, within 1e-5 in fp32 (gradients at
    the scale of each tensor's largest entry), with gradient checkpointing too (its backward
    recomputes the layers with the shared attention)."""
    import copy
    model, proc = tiny
    trajs = R.rollout(model, proc, make_tools(world), [world[2][0], world[2][1], world[2][-1]], group_size=3,
                      temperature=1.0, seed=5, forced_actions=FORCED[:1], **KW)
    items = [t.item() for t in trajs]
    items[4] = dict(items[4], prompt_len=0)  # no prompt_len: a prompt of its own
    for i in (0, 1):  # short continuations (each the start of a trajectory), packed into one row
        it, P, n = items[i], items[i]["prompt_len"], int(items[i]["image_grid_thw"][0].prod())
        ids = it["input_ids"][:P + 5]  # every token scored but the image's (log-prob -inf)
        items[i] = dict(it, input_ids=ids, loss_mask=(ids != proc.image_token_id).long(),
                        image_grid_thw=it["image_grid_thw"][:1], pixel_values=it["pixel_values"][:n])
    assert any(t.pixel_values and len(t.pixel_values) > 1 for t in trajs)  # a continuation with an image
    shared = M.use_shared_prompt_attention(copy.deepcopy(model))
    distinct = M.collate_shared(items, proc)["shared"]
    items += [dict(items[2]), dict(items[0])]  # copies of samples (one with a tool's image): forwarded once
    full, part = M.collate(items, proc), M.collate_shared(items, proc)
    assert torch.equal(part["shared"]["input_ids"], distinct["input_ids"])
    lay = part["shared"]["attention_mask"]
    assert lay.plen[1] > items[3]["prompt_len"] + 100  # q1's samples share the forced crop and its image
    assert lay.n == 4 and lay.m <= len(items) - 3  # 3 questions + the item on its own; continuations packed
    assert part["shared"]["image_grid_thw"].shape[0] < full["image_grid_thw"].shape[0]  # the prompt image once
    ckpt = M.use_shared_prompt_attention(copy.deepcopy(model)).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lps, grads = [], []
    w = torch.rand(len(items), 1, generator=torch.Generator().manual_seed(0)) - 0.5  # per item, like advantages
    for m, b in ((model, full), (shared, part), (ckpt, part)):
        m.zero_grad()
        lp = M.token_logprobs(m, b)
        (lp * b["loss_mask"] * w).sum().backward()
        lps.append(lp.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    mask = full["loss_mask"].bool()
    assert mask.sum() > 30
    for lp, g in zip(lps[1:], grads[1:]):
        assert (lps[0][mask] - lp[mask]).abs().max() < 1e-5
        assert g.keys() == grads[0].keys()
        for n in g:
            scale = grads[0][n].abs().max()  # summed over hundreds of tokens: compare at the tensor's scale
            assert (grads[0][n] - g[n]).abs().max() <= 1e-5 * scale + 1e-7, n
    model.zero_grad(set_to_none=True)


def test_kept_image_features_give_the_pixels_log_probs_without_the_tower(tiny, world):
    """keep_features: every image a trajectory saw (the group's prompt image, a tool's crop) comes with
    the vision tower's output; training from it, one forward per trajectory or the shared layout, gives
    the log-probs and decoder gradients of a forward from pixels (within 1e-5 fp32) and never runs the
    tower, which must be frozen for it."""
    import copy
    model, proc = tiny
    trajs = R.rollout(model, proc, make_tools(world), [world[2][0], world[2][1]], group_size=3, temperature=1.0,
                      seed=5, forced_actions=FORCED[:1], keep_features=True, **KW)
    assert all(len(t.image_embeds) == len(t.grids) > 1 for t in trajs)  # the prompt's and the crop's
    feats, pixels = [t.item() for t in trajs], [t.item(pixels=True) for t in trajs]
    assert all(it["pixel_values"] is None for it in feats)  # no copy of the pixels where features stand in
    with pytest.raises(ValueError, match="mixes"):
        M.collate([feats[0], pixels[1]], proc)
    m = M.use_shared_prompt_attention(copy.deepcopy(model)).train()
    m.model.visual.requires_grad_(False)
    calls = []
    m.model.visual.register_forward_pre_hook(lambda *a: calls.append(1))
    out = []
    for collate in (M.collate, M.collate_shared):
        for its in (pixels, feats):
            b = collate(its, proc)
            assert ("image_embeds" in b.get("shared", b)) == (its is feats)
            m.zero_grad()
            n = len(calls)
            lp = M.token_logprobs(m, b)
            assert (len(calls) == n) == (its is feats)
            lp.sum().backward()
            out.append((lp.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    mask = M.collate(feats, proc)["loss_mask"].bool()
    for lp, g in out[1:]:
        assert (out[0][0][mask] - lp[mask]).abs().max() < 1e-5
        assert g.keys() == out[0][1].keys()
        for k in g:
            assert (out[0][1][k] - g[k]).abs().max() <= 1e-5 * out[0][1][k].abs().max() + 1e-7, k
    m.model.visual.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze it"):
        M.token_logprobs(m, M.collate(feats, proc))


def test_shared_prefix_stops_before_an_image_it_cannot_share():
    """A group's shared row ends where its samples part, never inside an image, and at the prompt when
    an image after it differs in pixels (two crops of the same size)."""
    img, P = 9, 3
    proc = types.SimpleNamespace(image_token_id=img, merge=2)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])  # two images of 4 tokens, 16 pixel rows each
    ids = torch.tensor([1, 2, 3, 5, img, img, img, img, 6, 7, 5, img, img, img, img, 6, 8])
    pv = torch.arange(32 * 3, dtype=torch.float32).view(32, 3)
    other = ids.clone()
    other[16] = 4
    assert M._shared_prefix([(ids, grid, pv), (other, grid, pv)], P, proc) == (16, [(2, 32)] * 2)
    bigger = torch.cat([ids[:15], torch.tensor([img, img, img, img, 6, 8])])  # its second image is larger
    big_grid = torch.tensor([[1, 4, 4], [1, 4, 8]])
    L, cuts = M._shared_prefix([(ids, grid, pv), (bigger, big_grid, torch.cat([pv, pv[:16]]))], P, proc)
    assert (L, cuts) == (11, [(1, 16)] * 2)  # back to just before the image whose tokens part
    moved = pv.clone()
    moved[20] += 1  # a pixel of the second image
    assert M._shared_prefix([(ids, grid, pv), (ids, grid, moved)], P, proc) == (P, [(0, 0)] * 2)


def test_group_prefix_sharing_same_as_no_sharing(tiny, world):
    model, proc = tiny
    kw = dict(group_size=3, temperature=1.0, seed=7, **KW)
    a = R.rollout(model, proc, make_tools(world), world[2][:2], share_prefix=True, **kw)
    b = R.rollout(model, proc, make_tools(world), world[2][:2], share_prefix=False, **kw)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert len({tuple(t.token_ids) for t in a[:3]}) > 1  # the group's samples differ


def test_budgets_and_failures_end_cleanly(tiny, world):
    model, proc = tiny
    qs = world[2][:2]
    # A row that never emits an action ends at the turn budget.
    t = R.rollout(model, proc, make_tools(world), qs, temperature=0.0, max_turns=2, max_new_tokens=5)
    assert all(x.finish == "budget" and x.turns == 2 for x in t)
    assert all(x.actions[0].kind == "invalid" and x.observations[0].error for x in t)
    # ...or at the token budget.
    t = R.rollout(model, proc, make_tools(world), qs, temperature=0.0, max_turns=10, max_new_tokens=400,
                  max_total_tokens=400)
    assert all(x.finish == "length" and len(x.token_ids) <= 400 and x.gen_tokens > 0 for x in t)
    t = R.rollout(model, proc, make_tools(world), qs, max_total_tokens=50)  # the prompt alone is over
    assert all(x.finish == "length" and x.gen_tokens == 0 for x in t)
    # A second image search is refused with an observation; a failing backend is an observation too.

    class Broken:
        name = "broken"

        def search(self, *a):
            raise TimeoutError("backend timed out")

    tools = T.Tools(Broken(), world[1], attach="none")
    forced = ["<reason>a</reason><img_search><img></img_search>",
              "<reason>b</reason><img_search><img></img_search>",
              "<reason>c</reason><text_search>x</text_search>",
              "<reason>d</reason><answer>Entity red</answer>"]
    t = R.rollout(model, proc, tools, qs, temperature=0.0, forced_actions=forced, max_turns=6)
    for x in t:
        assert x.finish == "answer" and x.answer == "Entity red" and x.turns == 4
        assert [o.error for o in x.observations] == [False, True, True]
        assert "already used" in x.observations[1].text and "timed out" in x.observations[2].text
        assert x.n_img_search == 1 and x.n_tool_errors == 2 and x.gen_tokens == 0


def test_tool_threads_do_not_change_results(tiny, world):
    model, proc = tiny
    kw = dict(temperature=1.0, seed=5, forced_actions=FORCED, **KW)
    a = R.rollout(model, proc, make_tools(world), world[2], tool_threads=0, **kw)
    b = R.rollout(model, proc, make_tools(world), world[2], tool_threads=3, **kw)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]


# ----------------------------------------------------------------------------- scale: slots, attention, dtype, bad images

@pytest.fixture
def caches(monkeypatch):
    """Every SlotCache a rollout builds, for their stats and dtype."""
    made = []

    class Spy(R.SlotCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(R, "SlotCache", Spy)
    return made


class SlowTools:
    """Every other call answers after 30 ms, in a tool thread: rows wait while others decode."""

    def __init__(self, tools):
        self.tools, self.calls = tools, 0

    def execute(self, action, image, state):
        self.calls += 1
        if self.calls % 2:
            time.sleep(0.03)
        return self.tools.execute(action, image, state)


def test_compacted_slots_and_dummy_rows_change_nothing(tiny, world, caches):
    """Rows finish at different times (prompts of different lengths hit the token budget), so live
    rows move into freed slots; a slow threaded tool leaves rows waiting inside the decode range
    (dummies). Same trajectories as a batch large enough for no reuse, and no decode step gathers."""
    model, proc = tiny
    qs = [{"id": f"q{i}", "image": icon(c) if i % 3 else None, "question": f"Who is the {c} one?" + " please" * 15 * i,
           "answers": []} for i, c in enumerate(COLOURS + COLOURS[:2])]
    kw = dict(group_size=2, temperature=1.0, seed=11, max_turns=6, max_new_tokens=10, max_total_tokens=600,
              forced_actions=FORCED[:1])
    big = R.rollout(model, proc, make_tools(world), qs, batch_size=64, tool_threads=0, **kw)
    assert len({t.turns for t in big}) > 1 and len({len(t.token_ids) for t in big}) > 2  # they end apart
    for bs in (6, 4, 2):
        small = R.rollout(model, proc, SlowTools(make_tools(world)), qs, batch_size=bs, tool_threads=3, **kw)
        for a, b in zip(big, small):
            assert a.token_ids == b.token_ids and a.finish == b.finish
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    stats = [c.stats for c in caches]
    assert all(s["decode_gather"] == 0 and s["decode"] > 0 for s in stats)
    assert sum(s["moves"] for s in stats[1:]) > 0 and sum(s["dummies"] for s in stats[1:]) > 0


def test_rollout_runs_its_own_text_attention_and_restores_it(tiny, world):
    """Whatever attention the model was loaded with (here a text one that must never run during a
    rollout), the text decoder runs slot_attention; the vision tower keeps its own; both come back
    after the rollout, also when it raises."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    model, proc = tiny
    text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
    seen = []

    def refuse(*a, **kw):
        raise AssertionError("the model's own text attention ran inside a rollout")

    def vision(*a, **kw):
        seen.append("vision")
        return sdpa_attention_forward(*a, **kw)

    AttentionInterface.register("test_refuse", refuse)
    AttentionInterface.register("test_vision", vision)
    old = text_cfg._attn_implementation, vision_cfg._attn_implementation
    text_cfg._attn_implementation, vision_cfg._attn_implementation = "test_refuse", "test_vision"
    try:
        t = R.rollout(model, proc, make_tools(world), world[2][:2], temperature=0.0, forced_actions=FORCED, **KW)
        assert seen and all(x.turns >= 3 for x in t)
        assert (text_cfg._attn_implementation, vision_cfg._attn_implementation) == ("test_refuse", "test_vision")

        class Boom:
            def execute(self, *a):
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            R.rollout(model, proc, Boom(), world[2][:1], temperature=0.0, forced_actions=FORCED, **KW)
        assert text_cfg._attn_implementation == "test_refuse"
    finally:
        text_cfg._attn_implementation, vision_cfg._attn_implementation = old


def test_slot_attention_equals_sdpa_with_repeated_heads():
    """Decode matmuls and the SDPA chunk path against plain SDPA over repeated KV heads, on a strided
    view of a cache (as SlotCache.update returns it), fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    b, H, kv, d, T_ = 3, 8, 2, 16, 11
    store = torch.randn(5, kv, 32, d, generator=g)  # (slots, KV, capacity, d)
    bf16 = torch.bfloat16  # measured: 5e-3 (decode), 6e-3 (chunk) against fp32 math on the same bf16 inputs
    for q, dtype, tol in ((1, torch.float32, 1e-5), (4, torch.float32, 1e-5), (1, bf16, 2e-2), (4, bf16, 2e-2)):
        key, value = store[1:1 + b, :, :T_].to(dtype), store[2:2 + b, :, :T_].to(dtype)
        query = torch.randn(b, H, q, d, generator=g)
        mask = (torch.arange(T_)[None, None, :] <= torch.tensor([3, 7, 10])[:, None, None] - q + 1
                + torch.arange(q)[None, :, None])[:, None]  # (b, 1, q, T)
        out, _ = R.slot_attention(None, query, key, value, mask, scaling=d ** -0.5)
        rep = lambda x: x.float().repeat_interleave(H // kv, 1)  # noqa: E731
        ref = torch.nn.functional.scaled_dot_product_attention(query.to(dtype).float(), rep(key), rep(value),
                                                                attn_mask=mask).transpose(1, 2)
        assert out.shape == (b, q, H, d) and out.dtype == torch.float32
        assert (out - ref).abs().max() < tol, (q, dtype, (out - ref).abs().max())


def test_bf16_rollout_matches_a_bf16_forward(tiny, world, caches):
    """dtype=bf16 over fp32 weights (autocast, as on GPU): groups and tools run end to end, the KV
    cache is bf16, and the recorded log-probs are those of a fresh forward under the same autocast,
    closer to it than to the fp32 forward. Measured on the tiny model: max |diff| 0.004, mean 6e-4
    (vs the fp32 forward: mean 1.3e-3); the bounds leave 5x room."""
    model, proc = tiny
    trajs = R.rollout(model, proc, make_tools(world), world[2], group_size=2, temperature=1.0, seed=3,
                      forced_actions=FORCED[:1], dtype=torch.bfloat16, **KW)
    assert caches[-1].k[0].dtype == torch.bfloat16
    assert all(t.turns >= 2 and t.gen_tokens > 0 for t in trajs)
    batch = M.collate([t.item() for t in trajs], proc, extra_keys=("logprobs",))
    with torch.no_grad():
        lp32 = M.token_logprobs(model, batch, temperature=1.0)
        with M.autocast("cpu", torch.bfloat16):
            lp = M.token_logprobs(model, batch, temperature=1.0)
    m = batch["loss_mask"].bool()
    got = batch["logprobs"][m]
    assert torch.isfinite(got).all()
    diff, diff32 = (lp[m] - got).abs(), (lp32[m] - got).abs()
    print(f"bf16 rollout vs bf16 forward: max {diff.max():.4f} mean {diff.mean():.5f}; vs fp32: mean {diff32.mean():.5f}")
    assert diff.max() < 0.02 and diff.mean() < 0.003 and diff.mean() < diff32.mean()


def test_bad_question_images_end_as_errors_and_the_run_goes_on(tiny, world, tmp_path):
    """A missing file, a file that is not an image, a truncated PNG and an image the processor
    refuses (1 x 500 pixels: aspect ratio over 200): that question's trajectories end with finish
    "error", no tokens, and an observation that names the file and the reason; the others run."""
    model, proc = tiny
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    icon("red").save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    Image.new("RGB", (1, 500), "black").save(tmp_path / "sliver.png")
    bad = {"missing.png": "FileNotFoundError", "garbage.png": "UnidentifiedImageError",
           "truncated.png": "truncated", "sliver.png": "aspect ratio"}
    qs = [{"id": name, "image": str(tmp_path / name), "question": "Who is it?", "answers": []} for name in bad]
    qs.insert(2, {"id": "good", "image": str(tmp_path / "good.png"), "question": "Who is it?", "answers": []})
    for trajs, g in ((R.rollout(model, proc, make_tools(world), qs, group_size=2, temperature=1.0, seed=0,
                                batch_size=4, **KW), 2),
                     (R.rollout_baseline(model, proc, make_tools(world), qs, **KW), 1)):
        for q, t in zip([q for q in qs for _ in range(g)], trajs):
            if q["id"] == "good":
                assert t.finish != "error" and t.gen_tokens > 0
                continue
            assert t.finish == "error" and t.token_ids == [] and t.gen_tokens == 0, (q["id"], t.finish)
            (obs,) = t.observations
            assert obs.error and q["image"] in obs.text and bad[q["id"]] in obs.text, obs.text


class SliverTools:
    """A tool whose image the processor refuses (1 x 500 pixels); then it searches text as usual."""

    def __init__(self, tools):
        self.tools = tools

    def execute(self, action, image, state):
        if action.kind == "img_search":
            state.n_img_search += 1
            return T.Observation("<information><image>\nA thin strip.</information>\nGo on.",
                                 images=[Image.new("RGB", (1, 500), "black")], kind="img_search")
        return self.tools.execute(action, image, state)


def test_refused_tool_image_is_left_out_and_the_trajectory_goes_on(tiny, world):
    model, proc = tiny
    qs = world[2][:2]
    forced = FORCED + ["<reason>d</reason><answer>Entity red</answer>"]
    for trajs in (R.rollout(model, proc, SliverTools(make_tools(world)), qs, temperature=0.0, forced_actions=forced, **KW),
                  R.rollout_baseline(model, proc, SliverTools(make_tools(world)), qs, forced_actions=forced, **KW)):
        for t in trajs:
            assert t.finish == "answer" and t.turns == 3 and t.n_img_search == 1
            obs = t.observations[0]
            assert obs.images == [] and "<image>" not in obs.text
            assert "could not be used" in obs.text and "aspect ratio" in obs.text and "A thin strip." in obs.text
            assert len(t.images) == 1  # the question's own image only
            assert "could not be used" in proc.decode(t.token_ids)


def test_stop_check_on_ids_equals_decoding(tiny):
    """StopCheck decodes only when the last token could end a tag; on random sequences rich in tag
    pieces, whitespace, '>' and split multi-byte characters it agrees with stop_reason everywhere."""
    import random
    _, proc = tiny
    rng = random.Random(0)
    pieces = [proc.encode(s) for s in (*T.ACTION_END_TAGS, " ", "\n", " \n\n", ">", "a>", "é", "\u3000", "x</answer>  ")]
    check, n = R.StopCheck(proc), {"tag": 0, "eos": 0, None: 0}
    for _ in range(150):
        seq = []
        while len(seq) < 24:
            seq += rng.choice(pieces) if rng.random() < 0.6 else [rng.randrange(len(proc.tokenizer))]
        for i in range(1, len(seq) + 1):
            why = R.stop_reason(proc, seq[:i])
            assert check(seq[:i]) == why, proc.decode(seq[:i])
            n[why] += 1
    assert n["tag"] > 50 and n[None] > 50 and not all(check.can_end.values()), n  # the fast path did skip
    tail = proc.encode("</answer>\u3000")  # U+3000 is whitespace, in 3 byte tokens: only the whole text says "tag"
    assert "\ufffd" in proc.decode(tail[-1:]) and check(tail) == R.stop_reason(proc, tail) == "tag"
