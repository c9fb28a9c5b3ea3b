"""rollout.py: batched multi-turn generation that keeps each trajectory's KV cache across tool turns.

    python rollout.py --ckpt out/sft --show 2     # print two trajectories
    python rollout.py --bench --ckpt out/sft --split questions_hard.jsonl --questions 16 --group 4 \
        --max_turns 6 --max_new_tokens 48        # this engine vs the model.generate re-prefill baseline

nanochat's engine with tool turns: each trajectory is a row of the batch and a slot of the KV cache, in
one of three phases (Engine holds the transitions, `rollout` the loop):
  FEED  its `pending` tokens go into its slot, then it samples a token. A chunk (the prompt; a turn's end,
        the tool's observation and its images, the next assistant header; a forced turn of the RAG
        workflow) comes from model.render, has mask 0 and is prefilled with rows of similar length; single
        tokens of all rows are decoded in one forward.
  TOOL  its turn ended with an action: the tool runs (in a thread for network backends) while the others
        decode, and its observation is the next chunk.
  DONE  an answer, a budget (turns, tokens), or an error (the question's image unusable, a tool raised).
Nothing is re-prefilled: a group's prompt is prefilled once and copied to its rows, and a chunk's M-RoPE
positions continue from the row's last. Live rows hold the lowest slots (`compact`), so a decode step
reads one run of slots in place; rows in it that wait on a tool ride along as masked dummies.

Exactness (tests/test_rollout.py): `token_ids` are model.render of the conversation; `loss_mask` is 1 on
sampled tokens only; `logprobs` are log softmax(logits / T) of each sampled token, what training
recomputes (top-p only restricts where samples land; greedy records T = 1).
"""
import argparse
import dataclasses
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import GenerationConfig

import model as M
import search as S
import tools as T

FEED, TOOL, DONE = "feed", "tool", "done"  # a row's phase


@dataclass
class Trajectory:
    qid: str
    question: dict
    token_ids: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    images: list = field(default_factory=list)  # PIL images in the order their tokens appear
    pixel_values: list = field(default_factory=list)  # per chunk with images: (P, D) tensors
    grids: list = field(default_factory=list)  # per chunk with images: (n, 3) tensors
    image_embeds: list = field(default_factory=list)  # per chunk fed, with keep_features: the tower's output
    actions: list = field(default_factory=list)
    observations: list = field(default_factory=list)
    texts: list = field(default_factory=list)  # assistant turn texts, as decoded
    answer: str | None = None
    n_text_search: int = 0
    n_img_search: int = 0
    n_crop: int = 0
    n_tool_errors: int = 0
    turns: int = 0
    finish: str = ""
    gen_tokens: int = 0
    prompt_len: int = 0

    def item(self, pixels=False):
        """The dict model.collate takes, plus log-probs and prompt_len (what its group shares). Kept image
        features replace the pixels (training then skips the vision tower), unless `pixels`."""
        feats = bool(self.grids) and len(self.image_embeds) == len(self.grids) and not pixels
        return {"input_ids": torch.tensor(self.token_ids), "loss_mask": torch.tensor(self.loss_mask),
                "logprobs": torch.tensor(self.logprobs),
                "image_grid_thw": torch.cat(self.grids) if self.grids else None,
                "pixel_values": torch.cat(self.pixel_values) if self.pixel_values and not feats else None,
                "image_embeds": torch.cat(self.image_embeds) if feats else None,
                "prompt_len": self.prompt_len}


# ----------------------------------------------------------------------------- KV cache and attention

class SlotCache:
    """Keys/values of `slots` rows, (slots, KV heads, capacity, head dim) per layer, each from position 0.
    A forward calls `begin(rows, q)` (q new tokens per row, written at its length), then each attention
    layer `update` (transformers' Cache interface). stats: forwards by kind, dummy rows, slot moves."""

    def __init__(self, n_layers, slots, kv_heads, head_dim, dtype, device, capacity=256, max_capacity=1 << 15):
        self.k = [torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.lengths = torch.zeros(slots, dtype=torch.long)  # tokens held per slot (host side)
        self.max_capacity, self.stats = max_capacity, Counter()

    def begin(self, rows, q, dummies=0):
        """-> mask (b, 1, q, used) bool: query i of a row sees key j iff j <= the row's length + i."""
        dev, (_, kv, cap, _) = self.k[0].device, self.k[0].shape
        self.used = int(self.lengths[rows].max()) + q
        if self.used > cap:
            while cap < self.used:
                cap *= 2
            if cap > self.max_capacity:
                raise ValueError(f"KV cache would need {self.used} positions (max {self.max_capacity})")
            for store in (self.k, self.v):
                store[:] = [torch.cat([t, t.new_zeros(*t.shape[:2], cap - t.shape[2], t.shape[3])], 2) for t in store]
        # A run of slots is a view of the cache, any other set a gather (a copy of those rows in every layer):
        # decode steps never need one (see `compact`), a prefill chunk may.
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self.rows = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=dev)
        self.stats[("decode" if q == 1 else "prefill") + ("" if contiguous else "_gather")] += 1
        self.stats["dummies"] += dummies
        write = self.lengths[rows].to(dev)[:, None] + torch.arange(q, device=dev)  # (b, q)
        # the new keys' rows in a (slots * KV * capacity, head dim) view of a layer: one index_copy_ each
        slot, head = torch.tensor(rows, device=dev)[:, None, None], torch.arange(kv, device=dev)[None, :, None]
        self.flat_idx = ((slot * kv + head) * cap + write[:, None, :]).flatten()  # (b * KV * q,)
        return (torch.arange(self.used, device=dev)[None, None, :] <= write[:, :, None])[:, None]

    def update(self, k, v, layer_idx, *args, **kwargs):
        # k, v (b, KV, q, d); under autocast over fp32 weights they leave RoPE in fp32: cast to the cache's dtype
        d, dtype = k.shape[-1], self.k[layer_idx].dtype
        self.k[layer_idx].view(-1, d).index_copy_(0, self.flat_idx, k.reshape(-1, d).to(dtype))
        self.v[layer_idx].view(-1, d).index_copy_(0, self.flat_idx, v.reshape(-1, d).to(dtype))
        return self.k[layer_idx][self.rows, :, :self.used], self.v[layer_idx][self.rows, :, :self.used]

    def copy_slot(self, src, dst):
        n = int(self.lengths[src])
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def get_seq_length(self, layer_idx=0):
        return 0  # positions are always passed explicitly


ROLLOUT_ATTN = "rollout_slots"  # no "flash" in the name: transformers gives such names flash-attn semantics


def slot_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The text decoder's attention in a rollout: query (b, H, q, d), key/value (b, KV, T, d) from
    SlotCache.update, mask (b, 1, q, T) -> ((b, q, H, d), None) in the query's dtype. Decode runs
    model.gqa_decode (each cached key read once, in place), chunks SDPA with enable_gqa."""
    out_dtype, scale = query.dtype, scaling or query.shape[-1] ** -0.5
    query = query.to(key.dtype)  # fp32 out of RoPE under autocast; the cache holds the compute dtype
    if query.shape[2] == 1:
        out = M.gqa_decode(query, key, value, attention_mask, scale)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                             enable_gqa=key.shape[1] != query.shape[1]).transpose(1, 2)
    return out.to(out_dtype), None


# ----------------------------------------------------------------------------- chunks, stops, sampling

class ImageError(ValueError):
    """An image file that cannot be read, or an image the processor refuses (size, aspect ratio)."""


def prompt_chunk(processor, question, image):
    """The first user turn (the question, its image) and the assistant header, as model.render gives them."""
    msgs = [{"role": "user", "content": T.initial_prompt(question["question"], has_image=image is not None)}]
    return _render_chunk(processor, msgs, [image] if image is not None else [])


def tool_chunk(processor, obs, closed):
    """What follows a turn's content once its tool returned: the turn's end and a user turn with the
    observation, from the token that closes the turn on, or after it when the model sampled it (`closed`)."""
    msgs = [{"role": "assistant", "content": ""}, {"role": "user", "content": obs.text}]
    return _render_chunk(processor, msgs, list(obs.images), after_turn=closed)


def _render_chunk(processor, messages, images, after_turn=None):
    """model.render with the assistant header to follow -> a chunk dict; after_turn: start at the closing
    token of the first assistant turn (the first one render trains; True: after it)."""
    try:
        r = M.render(processor, messages, images, add_generation_prompt=True)
    except Exception as e:  # whatever the image processor objects to, the image is at fault, not the run
        if not images:
            raise
        raise ImageError(f"{type(e).__name__}: {str(e)[:200]}") from e
    start = 0 if after_turn is None else int(r["loss_mask"].argmax()) + after_turn
    return {"ids": r["input_ids"][start:].tolist(), "images": images, "pixel_values": r["pixel_values"],
            "grid": r["image_grid_thw"]}


def load_image(question):
    img = question.get("image")
    if not img:
        return None
    if isinstance(img, Image.Image):
        return img
    try:
        with Image.open(img) as f:
            return f.convert("RGB")
    except Exception as e:  # missing, not an image, truncated, a decompression bomb...
        raise ImageError(f"{type(e).__name__}: {str(e)[:200]}") from e


def stop_reason(processor, turn_ids):
    """'tag' if the turn's text ends with an action's closing tag, 'eos' at <|im_end|>, else None."""
    if turn_ids[-1] in (processor.im_end_id, processor.pad_id):
        return "eos"
    return "tag" if processor.decode(turn_ids[-8:]).rstrip().endswith(T.ACTION_END_TAGS) else None


class StopCheck:
    """stop_reason, decoding only when the last token could end a tag: its text, right-stripped, is empty,
    ends with ">" or is not whole UTF-8. Otherwise the turn's text ends with that token's text (byte-level
    decoding resynchronises at a token that starts a character), so no tag or <|im_end|> ends it."""

    def __init__(self, processor):
        self.proc, self.can_end = processor, {}  # token id -> bool, filled as tokens are sampled

    def __call__(self, turn_ids):
        last = turn_ids[-1]
        if last not in self.can_end:
            s = self.proc.decode([last]).rstrip()
            self.can_end[last] = s == "" or s.endswith(">") or "\ufffd" in s
        return stop_reason(self.proc, turn_ids) if self.can_end[last] else None


def sample(logits, temperature, top_p, gens):
    """logits (b, V) fp32 -> (tokens (b,), logprobs (b,)). A generator per row: its samples do not depend
    on which rows share the batch."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)  # (b, V)
    probs = logp.exp()
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(cdf.device) * cdf[:, -1]
    tok = torch.searchsorted(cdf, u[:, None]).clamp_max(cdf.shape[1] - 1)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


# ----------------------------------------------------------------------------- the rows' state machine

@dataclass(eq=False)  # rows compare by identity
class Row:
    traj: Trajectory
    image: object  # the question's image (PIL) or None
    tools_state: T.State
    gen: torch.Generator | None
    slot: int = -1
    phase: str = FEED
    pending: list = field(default_factory=list)  # token ids not yet in the cache
    pending_pv: list = field(default_factory=list)  # pixel values and grids of the images among them
    pending_grids: list = field(default_factory=list)
    next_pos: int = 0  # M-RoPE position of the next token
    turn_ids: list = field(default_factory=list)  # sampled in this assistant turn
    future: Future | None = None  # the tool's observation
    closed: bool = False  # the turn ended with a sampled <|im_end|>


class Engine:
    """The model, processor, tools and settings of one `rollout` call, and the phase transitions of a row."""

    def __init__(self, model, processor, tools, max_turns, max_new_tokens, max_total_tokens,
                 temperature, top_p, forced_actions, tool_threads, dtype, keep_features=False):
        self.model, self.proc, self.tools, self.keep_features = model, processor, tools, keep_features
        self.max_turns, self.max_new, self.max_total = max_turns, max_new_tokens, max_total_tokens
        self.temperature, self.top_p, self.forced = temperature, top_p, list(forced_actions or [])
        self.pool = ThreadPoolExecutor(tool_threads) if tool_threads > 0 else None
        self.device, self.dtype, self.stop = next(model.parameters()).device, dtype, StopCheck(processor)

    def new_rows(self, q, qi, gens):
        """Question q's rows, one per generator, its prompt appended (DONE if its image cannot be used)."""
        try:
            image = load_image(q)
            chunk = prompt_chunk(self.proc, q, image)
        except ImageError as e:
            name = q["image"] if isinstance(q["image"], (str, os.PathLike)) else "the question's image"
            image, chunk, why = None, None, f"<information>error: image {name} could not be used: {e}</information>"
        rows = [Row(Trajectory(qid=str(q.get("id", qi)), question=q), image, T.State(), g) for g in gens]
        for row in rows:
            if chunk is None:
                self.finish(row, "error", why)
            else:
                self.append(row, chunk)
                row.traj.prompt_len = len(chunk["ids"])
        return rows

    def append(self, row, chunk):
        """Tokens the model does not sample (mask 0), to be fed: a prompt, an observation, a forced turn."""
        t, n = row.traj, len(chunk["ids"])
        t.token_ids += chunk["ids"]
        t.loss_mask += [0] * n
        t.logprobs += [0.0] * n
        row.pending += chunk["ids"]
        if chunk["grid"] is not None:
            t.images += chunk["images"]
            t.pixel_values.append(chunk["pixel_values"])
            t.grids.append(chunk["grid"])
            row.pending_pv.append(chunk["pixel_values"])
            row.pending_grids.append(chunk["grid"])

    def start_turn(self, row):
        """A new assistant turn: the next forced text if any (it acts at once), else the model samples."""
        row.turn_ids, row.phase = [], FEED
        if row.traj.turns < len(self.forced):  # forced turns come first
            text = self.forced[row.traj.turns].replace("{question}", row.traj.question["question"])
            self.append(row, {"ids": self.proc.encode(text), "images": [], "pixel_values": None, "grid": None})
            self.end_turn(row, text, closed=False)

    def on_token(self, row, tok, lp):
        """A sampled token: FEED on, or the turn ends (a stop, max_new_tokens), or the row (token budget)."""
        t = row.traj
        t.token_ids.append(tok)
        t.loss_mask.append(1)
        t.logprobs.append(lp)
        t.gen_tokens += 1
        row.turn_ids.append(tok)
        row.pending = [tok]
        why = self.stop(row.turn_ids)
        if why is not None or len(row.turn_ids) >= self.max_new:
            ids = row.turn_ids[:-1] if why == "eos" else row.turn_ids
            self.end_turn(row, self.proc.decode(ids), closed=why == "eos")
        elif len(t.token_ids) >= self.max_total:
            self.finish(row, "length")

    def end_turn(self, row, text, closed):
        """Parse the turn's action: an answer or the turn budget ends the row (DONE), else its tool runs (TOOL)."""
        t = row.traj
        t.turns += 1
        t.texts.append(text)
        action = T.parse_action(text)
        t.actions.append(action)
        if action.kind == "answer":
            t.answer = action.arg
            self.finish(row, "answer")
        elif t.turns >= self.max_turns:
            self.finish(row, "budget")
        else:
            run = lambda: self.tools.execute(action, row.image, row.tools_state)  # noqa: E731
            if self.pool:
                row.future = self.pool.submit(run)
            else:  # local indexes answer in microseconds: run it now
                row.future = Future()
                row.future.set_result(run())
            row.phase, row.closed = TOOL, closed

    def observe(self, row):
        """The tool returned: its observation's chunk is appended and a new turn starts, or the row ends."""
        t, st = row.traj, row.tools_state
        try:
            obs, row.future = row.future.result(), None
            try:
                chunk = tool_chunk(self.proc, obs, row.closed)
            except ImageError as e:  # the processor refuses the tool's image (a sliver of a crop): leave it out
                text = obs.text.replace(M.IMAGE + "\n", "").replace(M.IMAGE, "")
                note = f"<information>The image could not be used ({e}); no image attached.\n"
                obs = dataclasses.replace(obs, text=text.replace("<information>", note, 1), images=[])
                chunk = tool_chunk(self.proc, obs, row.closed)
        except Exception as e:  # a tool that raised, or text that cannot be encoded, ends this trajectory
            return self.finish(row, "error", f"<information>error: {type(e).__name__}: {e}</information>")
        t.observations.append(obs)
        t.n_text_search, t.n_img_search, t.n_crop, t.n_tool_errors = \
            st.n_text_search, st.n_img_search, st.n_crop, st.n_errors
        if len(t.token_ids) + len(chunk["ids"]) >= self.max_total:
            return self.finish(row, "length")
        self.append(row, chunk)
        self.start_turn(row)

    def finish(self, row, why, error=None):
        """DONE; an error comes with an observation that says why (never a raise)."""
        if error:
            row.traj.observations.append(T.Observation(error, error=True, kind="error"))
        row.traj.finish, row.phase = why, DONE

    # -- the model
    def step(self, rows, logits):
        """Sample each row's next token from its logits (len(rows), V), record it."""
        toks, lps = sample(logits, self.temperature, self.top_p, [r.gen for r in rows])
        for r, tok, lp in zip(rows, toks.tolist(), lps.tolist()):
            self.on_token(r, tok, lp)

    def feed(self, cache, rows, live=None):
        """One forward appending each row's pending tokens to its slot -> fp32 logits (len(rows), V) at each
        row's last position. Prefill: `rows`, right-padded. Decode (`live` given): the run of slots spanning
        `rows`; the others in it are dummies (a pad written where their next token goes, its output unread)."""
        dev, pvs, grids = self.device, [], []
        if live is not None:
            fed, lo, hi = set(rows), min(r.slot for r in rows), max(r.slot for r in rows) + 1
            batch = live[lo:hi]
            mask = cache.begin(list(range(lo, hi)), 1, dummies=len(batch) - len(rows))
            ids = torch.tensor([[r.pending[0] if r in fed else self.proc.pad_id] for r in batch])  # (b, 1)
            pos = torch.tensor([r.next_pos for r in batch]).view(1, -1, 1).expand(3, -1, 1)  # text: all 3 axes
            pick = (torch.tensor([b for b, r in enumerate(batch) if r in fed], device=dev), 0)
            for r in rows:
                r.next_pos += 1
        else:
            q = max(len(r.pending) for r in rows)
            mask = cache.begin([r.slot for r in rows], q)
            ids = torch.full((len(rows), q), self.proc.pad_id, dtype=torch.long)
            pos = torch.zeros(3, len(rows), q, dtype=torch.long)
            for b, r in enumerate(rows):
                n = len(r.pending)
                ids[b, :n] = torch.tensor(r.pending)
                p, r.next_pos = M.mrope_positions(r.pending, torch.cat(r.pending_grids) if r.pending_grids else None,
                                                  self.proc, start=r.next_pos)
                pos[:, b, :n], pos[:, b, n:] = p, p[:, -1:]  # padding: any position, it is masked
                pvs += r.pending_pv
                grids += r.pending_grids
            pick = (torch.arange(len(rows), device=dev), torch.tensor([len(r.pending) - 1 for r in rows], device=dev))
        with M.autocast(dev, self.dtype):
            feats = M.image_features(self.model, torch.cat(pvs).to(dev), torch.cat(grids).to(dev)) if pvs else None
            out = self.model.model(inputs_embeds=M.embed(self.model, ids.to(dev), feats), position_ids=pos.to(dev),
                                   past_key_values=cache, use_cache=True, attention_mask={"full_attention": mask})
            logits = M.policy_logits(self.model.lm_head, out.last_hidden_state[pick], self.model.config)
        if feats is not None and self.keep_features:  # on the host, like the pixels; each chunk's own
            feats, o = feats.cpu(), 0
            for r in rows:
                for g in r.pending_grids:
                    n = int(g.prod(-1).sum()) // self.proc.merge ** 2
                    r.traj.image_embeds.append(feats[o:o + n])
                    o += n
        for r in rows:
            cache.lengths[r.slot] += len(r.pending)
            r.pending, r.pending_pv, r.pending_grids = [], [], []
        return logits

    def admit(self, cache, q, qi, group_size, first, base_seed, share_prefix):
        """A question's group into slots first, first + 1, ...: its prompt prefilled once into the first
        row's slot and copied to the others, each sampling its first token from the shared logits."""
        rows = self.new_rows(q, qi, [torch.Generator().manual_seed(base_seed * 1_000_003 + qi * 1009 + g)
                                     for g in range(group_size)])
        for g, row in enumerate(rows):
            row.slot, cache.lengths[first + g] = first + g, 0
            if row.phase != DONE and row.traj.prompt_len >= self.max_total:
                self.finish(row, "length")  # the prompt alone is over the token budget
        if rows[0].phase == DONE:
            return rows
        if share_prefix and group_size > 1 and not self.forced:
            logits = self.feed(cache, rows[:1])
            for r in rows[1:]:
                cache.copy_slot(rows[0].slot, r.slot)
                r.pending, r.pending_pv, r.pending_grids, r.next_pos = [], [], [], rows[0].next_pos
                r.traj.image_embeds = list(rows[0].traj.image_embeds)
            self.step(rows, logits.expand(len(rows), -1))
        else:
            for r in rows:
                self.start_turn(r)
        return rows


# ----------------------------------------------------------------------------- the loop

def compact(live, cache, bar=None):
    """Drop DONE rows from `live` and move the highest live rows into their slots, so that live[i] holds
    slot i again: one copy of a row's cache per finished trajectory, never a gather in a decode step."""
    keep = [r for r in live if r.phase != DONE]
    holes = [r.slot for r in live[:len(keep)] if r.phase == DONE]
    for slot, r in zip(holes, [r for r in live[len(keep):] if r.phase != DONE]):  # as many movers as holes
        cache.copy_slot(r.slot, slot)
        r.slot = slot
        cache.stats["moves"] += 1
    if bar:
        bar.update(len(live) - len(keep))
    live[:] = sorted(keep, key=lambda r: r.slot)


def buckets(rows):
    """Split rows sorted by pending length so that padding wastes at most about half a forward."""
    parts = []
    for r in rows:
        if not parts or (len(r.pending) > 1 and len(parts[-1][0].pending) < 0.5 * len(r.pending)):
            parts.append([])
        parts[-1].append(r)
    return parts


@torch.no_grad()
def rollout(model, processor, tools, questions, group_size=1, max_turns=6, max_new_tokens=256,
            temperature=1.0, top_p=1.0, seed=None, forced_actions=None, batch_size=64,
            max_total_tokens=4096, share_prefix=True, tool_threads=None, progress=False, dtype=None,
            keep_features=False):
    """Run every question `group_size` times to the end -> trajectories, question-major.
    forced_actions: assistant turns fed before the model takes over, `{question}` replaced (the RAG
    workflow). share_prefix: prefill a group's prompt once. tool_threads: default 0 (inline) for the local
    in-memory indexes, 8 for network backends. dtype: the compute dtype of the cache and forwards
    (model.autocast; default: the embeddings'); sampling is fp32. keep_features: keep each image's
    vision-tower output for training (Trajectory.item)."""
    if tool_threads is None:
        local = (S.BM25Index, S.LocalImageIndex, type(None))
        tool_threads = 0 if (isinstance(getattr(tools, "text_backend", None), local)
                             and isinstance(getattr(tools, "image_backend", None), local)) else 8
    if batch_size < group_size:
        raise ValueError(f"batch_size {batch_size} < group_size {group_size}: a group must fit")
    was_training, cfg = model.training, model.config.text_config
    model.eval()
    dtype = dtype or model.get_input_embeddings().weight.dtype
    cache = SlotCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads,
                      getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, dtype,
                      next(model.parameters()).device,
                      max_capacity=2 * max_total_tokens + 1024)  # padding may overshoot
    eng = Engine(model, processor, tools, max_turns, max_new_tokens, max_total_tokens, temperature, top_p,
                 forced_actions, tool_threads, dtype, keep_features)
    base_seed = seed if seed is not None else int(torch.randint(0, 2 ** 31, ()).item())
    todo, out, live = deque(enumerate(questions)), [], []  # live[i] holds slot i (see compact)
    bar = tqdm(total=len(questions) * group_size, desc="rollout", unit="traj") if progress else None
    # the text decoder runs slot_attention (Engine.feed passes the mask itself), the vision tower its own
    M.register_attention(ROLLOUT_ATTN, slot_attention)
    text_cfg = model.model.language_model.config
    old_attn, text_cfg._attn_implementation = text_cfg._attn_implementation, ROLLOUT_ATTN
    try:
        while todo or live:
            while todo and len(live) + group_size <= batch_size:  # whole groups into the free slots
                qi, q = todo.popleft()
                rows = eng.admit(cache, q, qi, group_size, len(live), base_seed, share_prefix)
                out += [r.traj for r in rows]
                live += rows
                compact(live, cache, bar)
            for r in live:  # TOOL -> FEED (the observation's chunk) or DONE
                if r.phase == TOOL and r.future.done():
                    eng.observe(r)
            compact(live, cache, bar)
            chunks = sorted((r for r in live if r.phase == FEED and len(r.pending) > 1), key=lambda r: len(r.pending))
            for part in buckets(chunks):  # prefill: chunks, in buckets of similar length
                eng.step(part, eng.feed(cache, part))
                compact(live, cache, bar)
            ready = [r for r in live if r.phase == FEED and len(r.pending) == 1]
            if ready:  # decode: one token each, one forward over a run of slots
                eng.step(ready, eng.feed(cache, ready, live))
                compact(live, cache, bar)
            elif live and not chunks:
                time.sleep(0.001)  # every live row waits on a network tool
    finally:
        text_cfg._attn_implementation = old_attn
        if eng.pool:
            eng.pool.shutdown(wait=False, cancel_futures=True)
        if bar:
            bar.close()
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- baseline and bench

@torch.no_grad()
def rollout_baseline(model, processor, tools, questions, max_turns=6, max_new_tokens=256,
                     max_total_tokens=4096, forced_actions=None, dtype=None):
    """What open peers do, for the bench and the parity test: greedy, each turn a `model.generate` over
    the still-active conversations, re-prefilled from scratch (left-padded), the model's own attention."""
    dtype = dtype or model.get_input_embeddings().weight.dtype
    eng = Engine(model, processor, tools, max_turns, max_new_tokens, max_total_tokens, 0.0, 1.0,
                 forced_actions, 0, dtype)
    rows = [r for qi, q in enumerate(questions) for r in eng.new_rows(q, qi, [None])]
    for r in rows:
        if r.phase != DONE:
            eng.start_turn(r)
    while True:
        for r in rows:  # tools ran inline; a forced turn may act again at once
            while r.phase == TOOL:
                eng.observe(r)
        active = [r for r in rows if r.phase == FEED]
        if not active:
            return [r.traj for r in rows]
        seq, lps = _generate_turn(model, processor, [r.traj for r in active], max_new_tokens, dtype)
        for r, toks, lp in zip(active, seq.tolist(), lps):
            for i, tok in enumerate(toks):  # up to the turn's end (its stop, max_new_tokens) or the token budget
                eng.on_token(r, tok, lp[i, tok].item())
                if r.phase != FEED:
                    break


def _generate_turn(model, processor, trajs, max_new_tokens, dtype):
    """One batched model.generate over whole conversations -> new tokens (b, n), their log-probs (b, n, V)."""
    L, dev = max(len(t.token_ids) for t in trajs), next(model.parameters()).device
    ids = torch.full((len(trajs), L), processor.pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, t in enumerate(trajs):
        ids[b, L - len(t.token_ids):], att[b, L - len(t.token_ids):] = torch.tensor(t.token_ids), 1
    pvs, grids = [p for t in trajs for p in t.pixel_values], [g for t in trajs for g in t.grids]
    forbid = [model.config.image_token_id, model.config.video_token_id]
    # a fresh config: a checkpoint's generation_config.json (repetition penalty, top-k) must not change greedy
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_id,
                           suppress_tokens=forbid, eos_token_id=[processor.im_end_id, processor.pad_id],
                           output_logits=True, return_dict_in_generate=True)

    def stop_at_action(input_ids, scores, **kw):  # a row is done once its new text ends with an action's tag
        return torch.tensor([len(row) > L and stop_reason(processor, row[L:].tolist()) is not None
                             for row in input_ids.cpu()], device=input_ids.device)
    with M.autocast(dev, dtype):
        out = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev),
                             pixel_values=torch.cat(pvs).to(dev) if pvs else None,
                             image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                             mm_token_type_ids=(ids == processor.image_token_id).int().to(dev),
                             generation_config=cfg, stopping_criteria=[stop_at_action])
    lps = torch.stack([torch.log_softmax(s.float().index_fill(-1, torch.tensor(forbid, device=s.device),
                                                               float("-inf")), -1) for s in out.logits], 1).cpu()
    return out.sequences[:, L:].cpu(), lps


def bench(model, processor, tools, questions, args):
    """Both engines greedy on the same workload, `--runs` times each in turn, the best time of each (these
    machines are noisy), and a token-by-token comparison. The engine runs groups of --group samples (the
    prompt prefilled once, as in rl.py), the baseline each question --group times."""
    kw = dict(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens)
    qs = [q for q in questions for _ in range(args.group)]
    rollout(model, processor, tools, questions[:2], temperature=0.0, **kw)  # warm-up
    t_ours = t_base = float("inf")
    for _ in range(args.runs):
        t0 = time.perf_counter()
        ours = rollout(model, processor, tools, questions, group_size=args.group, temperature=0.0,
                       batch_size=args.batch_size, **kw)
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        base = rollout_baseline(model, processor, tools, qs, **kw)
        t_base = min(t_base, time.perf_counter() - t0)
    n_ours, n_base = sum(t.gen_tokens for t in ours), sum(t.gen_tokens for t in base)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ours, base))
    turns = sum(t.turns for t in ours) / len(ours)
    calls = sum(t.n_text_search + t.n_img_search for t in ours) / len(ours)
    print(f"workload: {len(qs)} trajectories ({len(questions)} questions x group {args.group}), {turns:.1f} turns "
          f"and {calls:.1f} tool calls each, {n_ours} generated tokens, batch {args.batch_size}; best of {args.runs}")
    print(f"engine   : {n_ours / t_ours:8.1f} tok/s ({t_ours:.2f} s)")
    print(f"baseline : {n_base / t_base:8.1f} tok/s ({t_base:.2f} s)  model.generate, re-prefilled every turn")
    print(f"speed-up : {(n_ours / t_ours) / (n_base / t_base):.2f}x; identical trajectories: {same}/{len(qs)}")
    return same == len(qs)


# ----------------------------------------------------------------------------- CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Batched multi-turn rollout with a KV cache kept across tool turns.")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: out/rl, else out/sft, else data/tiny)")
    p.add_argument("--data", default="data", help="synthetic world folder (questions, search indexes)")
    p.add_argument("--split", default="questions_eval.jsonl")
    p.add_argument("--questions", type=int, default=16, help="number of questions")
    p.add_argument("--group", type=int, default=1, help="samples per question (GRPO group size)")
    p.add_argument("--max_turns", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=48, help="per assistant turn")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=0, help="print this many trajectories")
    p.add_argument("--bench", action="store_true", help="time this engine against the re-prefill baseline")
    p.add_argument("--runs", type=int, default=3, help="--bench: runs of each, the best time counts")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest for the tiny "
                   "model: its decode steps are too small to split, and a busy second core stalls both)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = M.load(args.ckpt or M.default_checkpoint(args.data))
    tools = S.make_tools(args.data)
    questions = T.load_questions(f"{args.data}/{args.split}")[:args.questions]
    if args.bench:
        raise SystemExit(0 if bench(model, processor, tools, questions, args) else 1)
    trajs = rollout(model, processor, tools, questions, group_size=args.group, max_turns=args.max_turns,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                    batch_size=args.batch_size, progress=True)
    for t in trajs[:args.show]:
        print(f"--- {t.qid} finish={t.finish} answer={t.answer!r} gold={t.question.get('answers')}")
        print(processor.decode(t.token_ids[t.prompt_len:]))
    print(f"{len(trajs)} trajectories, finish: {dict(Counter(t.finish for t in trajs))}, "
          f"mean turns {sum(t.turns for t in trajs) / len(trajs):.2f}")


if __name__ == "__main__":
    main()
