"""rollout.py: batched multi-turn generation that keeps each trajectory's KV cache across tool turns.

    python rollout.py --bench --ckpt out/sft --split questions_hard.jsonl --questions 16 --group 4 \
        --max_turns 6 --max_new_tokens 48        # this engine vs the model.generate re-prefill baseline
    python rollout.py --ckpt out/sft --show 2     # print two trajectories

How it works. The cache has a fixed number of slots; each slot holds one trajectory's keys and values
contiguously from position 0 (`SlotCache`). Every loop iteration feeds each live row the tokens it
has not fed yet: a whole chunk (the prompt, or `<|im_end|>` + a user turn with `<information>` and
images + `<|im_start|>assistant\\n`) for a row whose tool just returned, then one sampled token for
every decoding row. Rows therefore sit at different turns and never re-prefill their conversation.
A row stops at the end of an action tag or at `<|im_end|>`; its tool runs in a thread while the
others decode. Multimodal rotary positions of each chunk continue from the row's last position
(model.mrope_positions), so the cache equals that of one full forward (tests/test_rollout.py checks
tokens and log-probs).

Memory traffic. Live rows are kept in the lowest slots (`live[i]` holds slot i): when one finishes,
the highest live row moves into its slot, one copy per finished trajectory. A decode step is then one
forward over a contiguous range of slots, whose keys and values the attention reads in place (no
gather, no copy per step); rows in that range that are not decoding (waiting on a tool) ride along
as masked dummies. The text decoder runs with our own attention (`slot_attention`) whatever the model
was loaded with (flash-attn reads our 4-D mask as a padding mask); the vision tower keeps its own.
`dtype` is the compute dtype: the KV cache holds it, and forwards run under model.autocast(device,
dtype), the training forward's rule, so fp32 master weights or fp32 LoRA factors over a bf16 base
compute in bf16. Sampling is fp32.

Exactness contract: `Trajectory.token_ids` is the sequence exactly as the model saw it (image tokens
expanded), `loss_mask` is 1 on sampled tokens only, `logprobs` holds log softmax(logits / T) of each
sampled token (the full tempered distribution, which is what training recomputes; top-p only
restricts where samples land). Greedy (temperature 0) records T = 1 log-probs. A question whose image
cannot be used (missing, corrupt, refused by the processor) gets trajectories with no tokens,
finish "error" and an observation that says why; a tool's image the processor refuses is left out of
the observation, which says so.
"""
import argparse
import contextlib
import dataclasses
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

import model as M
import tools as T


# ----------------------------------------------------------------------------- trajectory

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
    sample_index: int = 0  # index within its GRPO group

    @property
    def image_grid_thw(self):
        return torch.cat(self.grids) if self.grids else None

    def item(self):
        """The dict model.collate takes (the same keys as model.render), plus sampling log-probs."""
        return {"input_ids": torch.tensor(self.token_ids), "loss_mask": torch.tensor(self.loss_mask),
                "logprobs": torch.tensor(self.logprobs), "image_grid_thw": self.image_grid_thw,
                "pixel_values": torch.cat(self.pixel_values) if self.pixel_values else None,
                "prompt_len": self.prompt_len}  # what its group shares (model.collate_shared)


# ----------------------------------------------------------------------------- KV cache and attention

class SlotCache:
    """Keys/values of `slots` trajectories, (slots, kv_heads, capacity, head_dim) per layer.
    `begin(rows, q)` says which slots the next forward feeds and where each one's q new tokens go;
    the attention layers then call `update`, which writes them and returns the slots' keys/values up
    to the longest row. The attention mask built by `mask()` hides what a row must not see (other
    rows' lengths, padding), so rows of any length share one forward. `stats` counts forwards by kind
    (decode / prefill, `_gather` when the slots were not contiguous), dummy rows and slot moves."""

    def __init__(self, n_layers, slots, kv_heads, head_dim, dtype, device, capacity=256, max_capacity=1 << 15):
        self.n_layers, self.max_capacity = n_layers, max_capacity
        shape = (slots, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long)  # tokens held per slot (host side)
        self.stats = Counter()

    @property
    def capacity(self):
        return self.k[0].shape[2]

    def _grow(self, need):
        cap = self.capacity
        while cap < need:
            cap *= 2
        if cap > self.max_capacity:
            raise ValueError(f"KV cache would need {need} positions (max {self.max_capacity})")
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                new = t.new_zeros(t.shape[0], t.shape[1], cap, t.shape[3])
                new[:, :, :t.shape[2]] = t
                store[i] = new

    def begin(self, rows, q, dummies=0):
        """Prepare a forward that appends q (padded) tokens to each slot in `rows` (a list)."""
        dev = self.k[0].device
        self.starts = self.lengths[rows].to(dev)  # (b,)
        self.used = int(self.lengths[rows].max()) + q
        if self.used > self.capacity:
            self._grow(self.used)
        # A run of slots is a view of the cache. Any other set is a gather: a copy of those rows'
        # keys and values in every layer. Decode steps never need one (see `_compact`); prefill
        # chunks may, where the copy costs about what the chunk's own attention does.
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self.rows = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=dev)
        self.stats[("decode" if q == 1 else "prefill") + ("" if contiguous else "_gather")] += 1
        self.stats["dummies"] += dummies
        self.write_idx = self.starts[:, None] + torch.arange(q, device=dev)  # (b, q)
        # Flat row numbers of the new keys in a (slots * kv_heads * capacity, head_dim) view of a
        # layer's cache: one index_copy_ per layer writes them all (advanced indexing is far slower).
        slot = torch.tensor(rows, device=dev)[:, None, None]
        kv = self.k[0].shape[1]
        head = torch.arange(kv, device=dev)[None, :, None]
        self.flat_idx = ((slot * kv + head) * self.capacity + self.write_idx[:, None, :]).flatten()  # (b*kv*q,)

    def mask(self):
        """(b, 1, q, used) bool: query i of a row sees key j iff j <= start + i."""
        dev = self.starts.device
        keys = torch.arange(self.used, device=dev)
        return (keys[None, None, :] <= self.write_idx[:, :, None])[:, None]

    def update(self, k, v, layer_idx, *args, **kwargs):
        # k, v: (b, kv_heads, q, head_dim); under autocast over fp32 weights they come out of RoPE in
        # fp32 (cos/sin follow the fp32 residual stream), so they are cast to the cache's dtype
        d, dtype = k.shape[-1], self.k[layer_idx].dtype
        self.k[layer_idx].view(-1, d).index_copy_(0, self.flat_idx, k.reshape(-1, d).to(dtype))
        self.v[layer_idx].view(-1, d).index_copy_(0, self.flat_idx, v.reshape(-1, d).to(dtype))
        sel = self.rows
        return self.k[layer_idx][sel, :, :self.used], self.v[layer_idx][sel, :, :self.used]

    def copy_slot(self, src, dst):
        n = int(self.lengths[src])
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def get_seq_length(self, layer_idx=0):
        return 0  # positions are always passed explicitly; nothing should ask


ROLLOUT_ATTN = "rollout_slots"  # no "flash" in the name: transformers gives such names flash-attn semantics


def slot_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The text decoder's attention during a rollout. query (b, H, q, d); key/value (b, KV, T, d) from
    SlotCache.update (a strided view of the cache, or a gathered copy for a prefill chunk);
    attention_mask (b, 1, q, T) bool from SlotCache.mask(), True: attend (every query sees key 0, so
    no row is fully masked). Returns ((b, q, H, d), None) in the query's dtype.
    Decode (q = 1): grouped-query attention as two matmuls. The H / KV query heads that share a KV head
    are the rows of one product with that head's keys, so each key is read once, in place (batch and
    KV dims fold into one strided batch: no copy), never repeated. Scores come out of the matmul in
    the cache dtype (as in eager attention), softmax runs in fp32. Chunks: SDPA with the bool mask and
    enable_gqa (CUDA picks a kernel that takes a mask, else the math one: both exact)."""
    b, H, q, d = query.shape
    kv, out_dtype = key.shape[1], query.dtype
    query = query.to(key.dtype)  # fp32 out of RoPE under autocast; the cache holds the compute dtype
    scale = scaling or d ** -0.5
    if q == 1:
        s = torch.matmul(query.reshape(b, kv, H // kv, d), key.transpose(-1, -2)).float() * scale  # (b, KV, rep, T)
        p = torch.softmax(s.masked_fill(~attention_mask, float("-inf")), -1).to(value.dtype)
        out = torch.matmul(p, value).reshape(b, 1, H, d)  # (b, KV, rep, d): head h = kv_head * rep + r
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                             enable_gqa=kv != H).transpose(1, 2)
    return out.to(out_dtype), None


@contextlib.contextmanager
def rollout_attention(model):
    """The text decoder runs with slot_attention inside, and gets back what it had on the way out
    (exceptions too). Only the text config changes: it has no sub-configs, and the vision tower's
    blocks read the vision config, so they keep flash-attn or SDPA. No mask is ever built under this
    name: Engine.feed passes the mask mapping itself, and Qwen2_5_VLTextModel builds masks only when
    attention_mask is not a dict."""
    from transformers import AttentionInterface
    AttentionInterface.register(ROLLOUT_ATTN, slot_attention)
    cfg = model.model.language_model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = ROLLOUT_ATTN
    try:
        yield
    finally:
        cfg._attn_implementation = old


# ----------------------------------------------------------------------------- chunks

class ImageError(ValueError):
    """An image file that cannot be read, or an image the processor refuses (size, aspect ratio)."""


def prompt_chunk(processor, question, image):
    """Token ids, images, pixel values and grids of the first user turn + `<|im_start|>assistant\\n`."""
    msgs = [{"role": "user", "content": T.initial_prompt(question["question"], has_image=image is not None)}]
    text, _ = M.conversation_text(msgs, add_generation_prompt=True)
    return encode_chunk(processor, text, [image] if image is not None else [])


def tool_chunk(processor, obs, closed):
    """The user turn that carries an observation. `closed`: the model already sampled `<|im_end|>`."""
    text = ("" if closed else "<|im_end|>") + "\n<|im_start|>user\n" + \
        obs.text.replace(M.IMAGE, M.VISION_BLOCK) + "<|im_end|>\n<|im_start|>assistant\n"
    return encode_chunk(processor, text, list(obs.images))


def encode_chunk(processor, text, images):
    try:
        pv, grid = processor.images(images)
    except Exception as e:  # whatever the image processor objects to, the image is at fault, not the run
        raise ImageError(f"{type(e).__name__}: {str(e)[:200]}") from e
    ids = processor.encode(M.expand_image_pads(text, grid, processor))
    return {"ids": ids, "images": images, "pixel_values": pv, "grid": grid}


def load_image(question):
    from PIL import Image
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


def without_images(obs, why):
    """The observation with its images left out and a line that says so: the model is not told of an
    image it does not get."""
    text = obs.text.replace(M.IMAGE + "\n", "").replace(M.IMAGE, "")
    note = f"The image could not be used ({why}); no image attached.\n"
    return dataclasses.replace(obs, text=text.replace("<information>", "<information>" + note, 1), images=[])


def stop_reason(processor, turn_ids):
    """'tag' if the turn's text ends with an action's closing tag, 'eos' at <|im_end|>, else None."""
    last = turn_ids[-1]
    if last in (processor.im_end_id, processor.pad_id):
        return "eos"
    tail = processor.decode(turn_ids[-8:]).rstrip()
    return "tag" if tail.endswith(T.ACTION_END_TAGS) else None


class StopCheck:
    """stop_reason(processor, turn_ids), decoding only when the last token could end a tag: its own
    text, stripped of trailing whitespace, ends with ">" or is empty, or it is not whole UTF-8 alone.
    Any other last token cannot: byte-level decoding resynchronises at a token that starts a
    character, so the turn's text ends with that token's text, whose last non-space is not ">"
    (every closing tag, and the <|im_end|> / <|endoftext|> tokens, end with ">").
    tests/test_rollout.py checks it against stop_reason on random sequences."""

    def __init__(self, processor):
        self.proc, self.can_end = processor, {}  # token id -> bool, filled as tokens are sampled

    def __call__(self, turn_ids):
        last = turn_ids[-1]
        if last not in self.can_end:
            s = self.proc.decode([last]).rstrip()
            self.can_end[last] = s == "" or s.endswith(">") or "\ufffd" in s
        return stop_reason(self.proc, turn_ids) if self.can_end[last] else None


# ----------------------------------------------------------------------------- sampling

def sample(logits, temperature, top_p, gens):
    """logits (b, V) fp32 -> (tokens (b,), logprobs (b,)). One generator per row, so a row's
    samples do not depend on which other rows share the batch."""
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


# ----------------------------------------------------------------------------- the engine

@dataclass(eq=False)  # rows compare by identity
class Row:
    traj: Trajectory
    image: object
    state: object  # tools.State
    gen: torch.Generator
    slot: int = -1
    pending: list = field(default_factory=list)  # token ids not yet in the cache
    pending_pv: list = field(default_factory=list)  # pixel values of the images among them
    pending_grids: list = field(default_factory=list)
    next_pos: int = 0  # M-RoPE position of the next token
    turn_ids: list = field(default_factory=list)
    future: object = None
    forced: deque = field(default_factory=deque)
    closed: bool = False  # the last turn ended with a sampled <|im_end|>
    finished: bool = False


class Engine:
    """Holds the model, processor, tools and settings of one `rollout` call."""

    def __init__(self, model, processor, tools, max_turns, max_new_tokens, max_total_tokens,
                 temperature, top_p, forced_actions, tool_threads, dtype):
        self.model, self.proc, self.tools = model, processor, tools
        self.max_turns, self.max_new, self.max_total = max_turns, max_new_tokens, max_total_tokens
        self.temperature, self.top_p = temperature, top_p
        self.forced = list(forced_actions or [])
        self.pool = ThreadPoolExecutor(tool_threads) if tool_threads > 0 else None
        self.device, self.dtype = next(model.parameters()).device, dtype
        self.stop = StopCheck(processor)

    def prompt(self, q):
        """(image, prompt chunk, None), or (None, None, why) when the question's image cannot be used."""
        try:
            image = load_image(q)
            return image, prompt_chunk(self.proc, q, image), None
        except ImageError as e:
            name = q["image"] if isinstance(q["image"], (str, os.PathLike)) else "the question's image"
            return None, None, f"<information>error: image {name} could not be used: {e}</information>"

    # -- bookkeeping shared by every way a turn can end
    def add_chunk(self, row, chunk):
        t = row.traj
        t.token_ids += chunk["ids"]
        t.loss_mask += [0] * len(chunk["ids"])
        t.logprobs += [0.0] * len(chunk["ids"])
        if chunk["grid"] is not None:
            t.images += chunk["images"]
            t.pixel_values.append(chunk["pixel_values"])
            t.grids.append(chunk["grid"])
        row.pending += chunk["ids"]
        if chunk["grid"] is not None:
            row.pending_pv.append(chunk["pixel_values"])
            row.pending_grids.append(chunk["grid"])

    def start_turn(self, row):
        """A new assistant turn: forced text (RAG workflow) is fed as a chunk; else the model samples."""
        row.turn_ids = []
        if row.forced:
            text = row.forced.popleft().replace("{question}", row.traj.question["question"])
            ids = self.proc.encode(text)
            self.add_chunk(row, {"ids": ids, "images": [], "pixel_values": None, "grid": None})
            return self.end_turn(row, text, closed=False)
        return None

    def end_turn(self, row, text, closed):
        """Parse the turn and act: finish, or run the tool (in a thread). Returns 'done' or None."""
        t = row.traj
        t.turns += 1
        t.texts.append(text)
        action = T.parse_action(text)
        t.actions.append(action)
        if action.kind == "answer":
            t.answer, t.finish = action.arg, "answer"
            return "done"
        if t.turns >= self.max_turns:
            t.finish = "budget"
            return "done"
        run = lambda: self.tools.execute(action, row.image, row.state)  # noqa: E731
        row.future = self.pool.submit(run) if self.pool else _Done(run)
        row.closed = closed
        return None

    def observe(self, row):
        """The tool returned: record the observation and queue its chunk."""
        t = row.traj
        try:
            obs = row.future.result()
            row.future = None
            try:
                chunk = tool_chunk(self.proc, obs, row.closed)
            except ImageError as e:  # the processor refuses the tool's image (a sliver of a crop): go on without it
                obs = without_images(obs, str(e))
                chunk = tool_chunk(self.proc, obs, row.closed)
        except Exception as e:  # a tool that raised, or text that cannot be encoded, ends this trajectory
            _fail(t, f"<information>error: {type(e).__name__}: {e}</information>")
            return "done"
        t.observations.append(obs)
        st = row.state
        t.n_text_search, t.n_img_search, t.n_crop, t.n_tool_errors = \
            st.n_text_search, st.n_img_search, st.n_crop, st.n_errors
        if len(t.token_ids) + len(chunk["ids"]) >= self.max_total:
            t.finish = "length"
            return "done"
        self.add_chunk(row, chunk)
        return self.start_turn(row)

    def on_token(self, row, tok, lp):
        """Record one sampled token; returns 'done' when the trajectory ended."""
        t = row.traj
        t.token_ids.append(tok)
        t.loss_mask.append(1)
        t.logprobs.append(lp)
        t.gen_tokens += 1
        row.turn_ids.append(tok)
        row.pending = [tok]
        why = self.stop(row.turn_ids)
        if why is None and len(row.turn_ids) < self.max_new:
            if len(t.token_ids) >= self.max_total:
                t.finish = "length"
                return "done"
            return None
        ids = row.turn_ids[:-1] if why == "eos" else row.turn_ids
        return self.end_turn(row, self.proc.decode(ids), closed=why == "eos")

    # -- the model
    def step(self, cache, rows, live=None):
        """Feed `rows`, sample each one's next token, record it (see feed for `live`)."""
        logits = self.feed(cache, rows, live)
        toks, lps = sample(logits, self.temperature, self.top_p, [r.gen for r in rows])
        for r, tok, lp in zip(rows, toks.tolist(), lps.tolist()):
            r.finished = self.on_token(r, tok, lp) == "done"

    def feed(self, cache, rows, live=None):
        """One forward that appends each row's pending tokens to its slot; returns next-token logits
        (len(rows), V) fp32 at each row's last real position.
        Decode step (`live` given, one pending token per row): the forward covers the slot range
        live[lo:hi] that spans `rows`. The other rows in it (waiting on a tool) are dummies: a pad
        token written at their length, where their next real feed writes, and an output nobody reads.
        A prefill feeds exactly `rows`, padded to the longest."""
        dev = self.device
        pvs, grids = [], []
        if live is not None:
            fed = set(rows)
            lo, hi = min(r.slot for r in rows), max(r.slot for r in rows) + 1
            batch = live[lo:hi]
            cache.begin(list(range(lo, hi)), 1, dummies=len(batch) - len(rows))
            ids = torch.tensor([[r.pending[0] if r in fed else self.proc.pad_id] for r in batch])  # (b, 1)
            # a text token sits at the row's next position on all three axes
            pos = torch.tensor([r.next_pos for r in batch]).view(1, -1, 1).expand(3, -1, 1)
            pick = (torch.tensor([b for b, r in enumerate(batch) if r in fed], device=dev), 0)
            for r in rows:
                r.next_pos += 1
        else:
            q = max(len(r.pending) for r in rows)
            cache.begin([r.slot for r in rows], q)
            ids = torch.full((len(rows), q), self.proc.pad_id, dtype=torch.long)
            pos = torch.zeros(3, len(rows), q, dtype=torch.long)
            for b, r in enumerate(rows):
                n = len(r.pending)
                ids[b, :n] = torch.tensor(r.pending)
                grid = torch.cat(r.pending_grids) if r.pending_grids else None
                p, r.next_pos = M.mrope_positions(r.pending, grid, self.proc, start=r.next_pos)
                pos[:, b, :n] = p
                pos[:, b, n:] = p[:, -1:]  # padding: any position, it is masked
                pvs += r.pending_pv
                grids += r.pending_grids
            pick = (torch.arange(len(rows), device=dev), torch.tensor([len(r.pending) - 1 for r in rows], device=dev))
        with M.autocast(dev, self.dtype):
            out = self.model.model(
                input_ids=ids.to(dev), position_ids=pos.to(dev), past_key_values=cache, use_cache=True,
                attention_mask={"full_attention": cache.mask()},
                pixel_values=torch.cat(pvs).to(dev) if pvs else None,  # the patch embedding casts them
                image_grid_thw=torch.cat(grids).to(dev) if grids else None)
            logits = M.policy_logits(self.model.lm_head, out.last_hidden_state[pick], self.model.config)
        for r in rows:
            cache.lengths[r.slot] += len(r.pending)
            r.pending, r.pending_pv, r.pending_grids = [], [], []
        return logits


def _fail(traj, text):
    """End a trajectory with finish "error" and an observation that says why (never a raise)."""
    traj.finish = "error"
    traj.observations.append(T.Observation(text=text, images=[], error=True, kind="error", box=None, results=[]))


class _Done:
    """A finished 'future' for running tools inline (tool_threads=0)."""

    def __init__(self, fn):
        self.value = fn()

    def done(self):
        return True

    def result(self):
        return self.value


@torch.no_grad()
def rollout(model, processor, tools, questions, group_size=1, max_turns=6, max_new_tokens=256,
            temperature=1.0, top_p=1.0, seed=None, forced_actions=None, batch_size=64,
            max_total_tokens=4096, share_prefix=True, tool_threads=None, progress=False, dtype=None):
    """Run every question `group_size` times to the end; returns trajectories, question-major.
    `forced_actions`: assistant turn texts fed (not sampled) before the model takes over, with
    `{question}` replaced (the RAG workflow). `share_prefix`: prefill a group's prompt once and copy.
    `tool_threads`: tools run in that many threads while other rows decode (default: inline for
    the local in-memory indexes, which answer in microseconds; 8 threads for network backends).
    `dtype`: the compute dtype (default: the embeddings', i.e. the base model's); the KV cache holds
    it and forwards run under model.autocast(device, dtype), as the training forward does."""
    if tool_threads is None:
        local = (T.BM25Index, T.LocalImageIndex, type(None))
        tool_threads = 0 if (isinstance(getattr(tools, "text_backend", None), local)
                             and isinstance(getattr(tools, "image_backend", None), local)) else 8
    if batch_size < group_size:
        raise ValueError(f"batch_size {batch_size} < group_size {group_size}: a group must fit")
    was_training = model.training
    model.eval()
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = dtype or model.get_input_embeddings().weight.dtype
    cache = SlotCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, head_dim, dtype,
                      next(model.parameters()).device, max_capacity=2 * max_total_tokens + 1024)  # padding may overshoot
    eng = Engine(model, processor, tools, max_turns, max_new_tokens, max_total_tokens, temperature, top_p,
                 forced_actions, tool_threads, dtype)
    base_seed = seed if seed is not None else int(torch.randint(0, 2 ** 31, ()).item())
    todo = deque(enumerate(questions))
    out = [None] * (len(questions) * group_size)
    live = []  # rows holding a slot; live[i] holds slot i (see _compact)
    bar = _bar(len(out), progress)
    try:
        with rollout_attention(model):
            while todo or live:
                # 1. admit whole groups while slots are free: they take the slots after the live rows
                while todo and len(live) + group_size <= batch_size:
                    qi, q = todo.popleft()
                    live += admit(eng, cache, q, qi, group_size, len(live), base_seed, out, share_prefix)
                    _compact(live, cache, bar)
                # 2. rows whose tool returned get their observation chunk queued
                for r in live:
                    if r.future is not None and r.future.done():
                        r.finished = eng.observe(r) == "done"
                _compact(live, cache, bar)
                # 3. prefill: chunks, in buckets of similar length
                chunks = sorted([r for r in live if len(r.pending) > 1 and r.future is None],
                                key=lambda r: len(r.pending))
                for part in _buckets(chunks):
                    eng.step(cache, part)
                    _compact(live, cache, bar)
                # 4. decode: one token for every row that has one, in one forward over a run of slots
                ready = [r for r in live if len(r.pending) == 1 and r.future is None]
                if ready:
                    eng.step(cache, ready, live)
                    _compact(live, cache, bar)
                elif live and not chunks:
                    time.sleep(0.001)  # every live row waits on a network tool
    finally:
        if eng.pool:
            eng.pool.shutdown(wait=False, cancel_futures=True)
        if bar:
            bar.close()
        model.train(was_training)
    return out


def admit(eng, cache, q, qi, group_size, first, base_seed, out, share_prefix):
    """Start a question's group in slots first, first + 1, ...: prefill its prompt once into the
    leader's slot, then copy the leader's cache to the other rows (each samples its own first token
    from the shared logits). Rows that end at once (a bad image, a prompt over the token budget)
    come back finished."""
    image, chunk, why = eng.prompt(q)
    rows = []
    for g in range(group_size):
        traj = Trajectory(qid=str(q.get("id", qi)), question=q, sample_index=g,
                          prompt_len=len(chunk["ids"]) if chunk else 0)
        gen = torch.Generator().manual_seed(base_seed * 1_000_003 + qi * 1009 + g)
        row = Row(traj=traj, image=image, state=T.State(), gen=gen, slot=first + g, forced=deque(eng.forced))
        cache.lengths[row.slot] = 0
        out[qi * group_size + g] = traj
        rows.append(row)
        if chunk is None:
            _fail(traj, why)
            row.finished = True
        else:
            eng.add_chunk(row, chunk)
    if chunk is None:
        return rows
    if len(chunk["ids"]) >= eng.max_total:  # the prompt alone is over the token budget
        for r in rows:
            r.traj.finish, r.finished = "length", True
        return rows
    if share_prefix and group_size > 1 and not eng.forced:
        leader, followers = rows[0], rows[1:]
        logits = eng.feed(cache, [leader])
        for r in followers:
            cache.copy_slot(leader.slot, r.slot)
            r.pending, r.pending_pv, r.pending_grids, r.next_pos = [], [], [], leader.next_pos
        toks, lps = sample(logits.expand(len(rows), -1), eng.temperature, eng.top_p, [r.gen for r in rows])
        for r, tok, lp in zip(rows, toks.tolist(), lps.tolist()):
            r.finished = eng.on_token(r, tok, lp) == "done"
    else:
        for r in rows:
            r.finished = eng.start_turn(r) == "done"
    return rows


def _compact(live, cache, bar):
    """Drop finished rows from `live` and move the highest live rows into their slots, so that
    live[i] holds slot i again and a decode step is one contiguous run of slots: one copy of a row's
    cache per finished trajectory, instead of a gather of every row in every decode step."""
    keep = [r for r in live if not r.finished]
    if len(keep) == len(live):
        return
    holes = [r.slot for r in live[:len(keep)] if r.finished]
    movers = [r for r in live[len(keep):] if not r.finished]  # as many as there are holes
    for slot, r in zip(holes, movers):
        cache.copy_slot(r.slot, slot)
        r.slot = slot
        cache.stats["moves"] += 1
    for r in live:
        if r.finished:
            r.slot = -1
    if bar:
        bar.update(len(live) - len(keep))
    live[:] = sorted(keep, key=lambda r: r.slot)


def _buckets(rows, max_pad_waste=0.5):
    """Split rows sorted by pending length so that padding wastes at most about half a forward."""
    if not rows:
        return []
    parts, cur = [], [rows[0]]
    for r in rows[1:]:
        if len(r.pending) > 1 and len(cur[0].pending) < max_pad_waste * len(r.pending):
            parts.append(cur)
            cur = []
        cur.append(r)
    return parts + [cur]


def _bar(total, progress):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="rollout", unit="traj")


# ----------------------------------------------------------------------------- baseline

@torch.no_grad()
def rollout_baseline(model, processor, tools, questions, max_turns=6, max_new_tokens=256,
                     max_total_tokens=4096, forced_actions=None, dtype=None):
    """What open peers do, for the benchmark and the parity test: greedy, each turn runs
    `model.generate` over the still-active conversations, re-prefilled from scratch (left-padded),
    with the model's own attention. `dtype` as in rollout."""
    dtype = dtype or model.get_input_embeddings().weight.dtype
    eng = Engine(model, processor, tools, max_turns, max_new_tokens, max_total_tokens, 0.0, 1.0,
                 forced_actions, 0, dtype)
    rows, active = [], []
    for qi, q in enumerate(questions):
        image, chunk, why = eng.prompt(q)
        traj = Trajectory(qid=str(q.get("id", qi)), question=q)
        row = Row(traj=traj, image=image, state=T.State(), gen=None, forced=deque(eng.forced))
        rows.append(row)
        if chunk is None:
            _fail(traj, why)
            continue
        eng.add_chunk(row, chunk)
        traj.prompt_len = len(traj.token_ids)
        if eng.start_turn(row) != "done":
            active.append(row)
    while active:
        for r in list(active):  # tools ran inline; a forced turn may queue another tool at once
            while r.future is not None:
                if eng.observe(r) == "done":
                    active.remove(r)
                    break
        if not active:
            break
        new = _generate_turn(model, processor, [r.traj for r in active], max_new_tokens, dtype)
        still = []
        for r, ids in zip(active, new):
            res = None
            for tok, lp in ids:
                res = eng.on_token(r, tok, lp)
                if res == "done" or r.future is not None:
                    break
            if res != "done":
                still.append(r)
        active = still
    return [r.traj for r in rows]


def _generate_turn(model, processor, trajs, max_new_tokens, dtype):
    """One batched model.generate over whole conversations; returns per row [(token, logprob)]."""
    L = max(len(t.token_ids) for t in trajs)
    ids = torch.full((len(trajs), L), processor.pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, t in enumerate(trajs):
        ids[b, L - len(t.token_ids):] = torch.tensor(t.token_ids)
        att[b, L - len(t.token_ids):] = 1
    pvs = [p for t in trajs for p in t.pixel_values]
    grids = [g for t in trajs for g in t.grids]
    dev = next(model.parameters()).device
    # A fresh config: a real checkpoint's generation_config.json (repetition penalty, top-k) must
    # not change what greedy means here.
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_id,
                           suppress_tokens=[model.config.image_token_id, model.config.video_token_id],
                           eos_token_id=[processor.im_end_id, processor.pad_id],
                           output_logits=True, return_dict_in_generate=True)
    with M.autocast(dev, dtype):
        out = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev),
                             pixel_values=torch.cat(pvs).to(dev) if pvs else None,
                             image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                             mm_token_type_ids=(ids == processor.image_token_id).int().to(dev),
                             generation_config=cfg, stopping_criteria=[StopAtAction(processor, L)])
    seq = out.sequences[:, L:].cpu()
    forbid = [model.config.image_token_id, model.config.video_token_id]
    lps = torch.stack([torch.log_softmax(s.float().index_fill(-1, torch.tensor(forbid, device=s.device),
                                                               float("-inf")), -1) for s in out.logits], 1).cpu()
    res = []
    for b in range(len(trajs)):
        row = []
        for i, tok in enumerate(seq[b].tolist()):
            row.append((tok, lps[b, i, tok].item()))
            if tok in (processor.im_end_id, processor.pad_id) or stop_reason(processor, seq[b, :i + 1].tolist()):
                break
        res.append(row)
    return res


class StopAtAction:
    """generate() stopping criterion: a row is done once its new text ends with an action's closing tag."""

    def __init__(self, processor, prompt_len):
        self.proc, self.L = processor, prompt_len

    def __call__(self, input_ids, scores, **kw):
        return torch.tensor([stop_reason(self.proc, row[self.L:].tolist()) is not None
                             if row.shape[0] > self.L else False for row in input_ids.cpu()],
                            device=input_ids.device)


# ----------------------------------------------------------------------------- CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Batched multi-turn rollout with a KV cache kept across tool turns.")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: out/sft, else data/tiny)")
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


def bench(model, processor, tools, questions, args):
    """The same workload through both engines, greedy, `--runs` times each in turn, the best time of
    each (these machines are noisy); tokens/s and a token-by-token comparison of the last run.
    The engine runs GRPO groups of --group samples (a group's prompt prefilled once, as in rl.py);
    the baseline has no groups: it runs each question --group times."""
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


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = args.ckpt or M.default_checkpoint(args.data)
    model, processor = M.load(ckpt)
    tools = T.make_tools(args.data)
    questions = T.load_questions(f"{args.data}/{args.split}")[:args.questions]
    if args.bench:
        ok = bench(model, processor, tools, questions, args)
        raise SystemExit(0 if ok else 1)
    trajs = rollout(model, processor, tools, questions, group_size=args.group, max_turns=args.max_turns,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                    batch_size=args.batch_size, progress=True)
    for t in trajs[:args.show]:
        print(f"--- {t.qid} finish={t.finish} answer={t.answer!r} gold={t.question.get('answers')}")
        print(processor.decode(t.token_ids[t.prompt_len:]))
    fin = {}
    for t in trajs:
        fin[t.finish] = fin.get(t.finish, 0) + 1
    print(f"{len(trajs)} trajectories, finish: {fin}, mean turns {sum(t.turns for t in trajs) / len(trajs):.2f}")


if __name__ == "__main__":
    main()
