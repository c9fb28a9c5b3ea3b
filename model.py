"""model.py: one way to load a Qwen2.5-VL model and one way to turn a conversation into tokens.

What rollout, SFT, RL and eval must agree on: loading (a real Qwen2.5-VL folder or our tiny one, one code
path), `render` (the only place that builds token ids and loss mask), M-RoPE positions of any chunk,
per-token log-probs, batching (and the layout that forwards a GRPO group's prompt once), torchrun helpers,
precision, run logs. LoRA, checkpoints and DDP / FSDP2: training.py.

Rendering rule: the text is exactly Qwen2.5-VL's chat template; each `<|image_pad|>` becomes
(t*h*w)/merge^2 copies, as the processor does; a token is trained (loss_mask=1) iff it starts inside
an assistant message's content or is the `<|im_end|>` that closes it.
"""
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from transformers import AttentionInterface, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import SizeDict
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

HERE = Path(__file__).resolve().parent
IMAGE = "<image>"  # placeholder for an image inside string message content (design card)
# Qwen2.5-VL's special tokens, in the order of the real vocabulary (ids 151643...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
CHAT_TEMPLATE_FILE = "qwen2_5_vl_chat_template.jinja"
SHARED_ATTN, CPU_ATTN = "shared_prompt", "sdpa_cpu_decode"  # our attention functions' names in transformers


# ----------------------------------------------------------------------------- loading

class Processor:
    """Tokenizer + image processor with the real processor's files (transformers' own also wants a video
    processor, which imports torchvision)."""

    MAX_PIXELS = 1280 * 28 * 28  # Qwen's recommended cap: at most 1280 image tokens per image

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor, self.merge = tokenizer, image_processor, image_processor.merge_size
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.image_token_id, self.pad_id = ids["<|image_pad|>"], ids["<|endoftext|>"]
        self.im_start_id, self.im_end_id = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision_start_id = ids["<|vision_start|>"]

    @classmethod
    def from_pretrained(cls, path, max_pixels=None):
        """max_pixels: the most pixels an image is resized to; None: the folder's value capped at MAX_PIXELS
        (the hub's own 12,845,056 would turn one photo into up to 16,384 tokens)."""
        tok, ip = AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path)
        lo = ip.size.shortest_edge  # this processor keeps min/max pixels as shortest/longest_edge
        hi = max_pixels if max_pixels is not None else min(ip.size.longest_edge, cls.MAX_PIXELS)
        if hi < lo:
            raise ValueError(f"max_pixels={hi} is below min_pixels={lo} of {path}/preprocessor_config.json")
        ip.size = SizeDict(shortest_edge=lo, longest_edge=hi)  # a new object: never mutate a shared default
        if not tok.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template (chat_template.jinja or "
                             "tokenizer_config.json 'chat_template')")
        return cls(tok, ip)

    def save_pretrained(self, out_dir):
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)

    def images(self, images, pixels=True):
        """PIL images -> (pixel_values (P, C*t*p*p), image_grid_thw (N, 3)), or (None, None) without images.
        pixels=False: (None, the grids) from the images' sizes alone (the processor's own smart_resize)."""
        if not images:
            return None, None
        if not pixels:
            ip, patch = self.image_processor, self.image_processor.patch_size
            sizes = [smart_resize(im.height, im.width, factor=patch * self.merge, min_pixels=ip.size.shortest_edge,
                                  max_pixels=ip.size.longest_edge) for im in images]
            return None, torch.tensor([[1, h // patch, w // patch] for h, w in sizes])
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def n_image_tokens(self, grid_thw):
        return int(grid_thw.prod()) // (self.merge ** 2)

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def gqa_decode(query, key, value, mask, scale):
    """One-token grouped-query attention, each key read once (SDPA with a mask copies it per head). query
    (b, H, 1, d), key/value (b, KV, T, d), mask (b, 1, 1, T) bool (True: attend) -> (b, 1, H, d)."""
    b, H, _, d = query.shape
    kv = key.shape[1]
    s = torch.matmul(query.reshape(b, kv, H // kv, d), key.transpose(-1, -2)).float() * scale  # (b, KV, rep, T)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(value.dtype)
    return torch.matmul(p, value).reshape(b, 1, H, d)  # head h = kv_head * rep + r


def _sdpa_cpu_decode(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA on CPU, with decoding steps (model.generate) through gqa_decode."""
    if query.shape[2] != 1 or module.training or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return gqa_decode(query, key, value, attention_mask, kwargs.get("scaling", query.shape[-1] ** -0.5)), None


def register_attention(name, fn):
    """Make `fn` an attention function that transformers finds by `name` (masks built as for SDPA)."""
    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def _check_folder(path):
    """Name the missing or corrupt file instead of letting transformers fail deep inside."""
    path, index, shards = Path(path), Path(path) / "model.safetensors.index.json", ["model.safetensors"]
    for f in (path / "config.json", path / "preprocessor_config.json") + ((index,) if index.is_file() else ()):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a Qwen2.5-VL checkpoint folder needs it)")
        try:
            info = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        if f == index:  # sharded weights
            shards = sorted(set(info.get("weight_map", {}).values()))
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: missing (no tokenizer files)")
    for s in shards:
        if not (path / s).is_file():
            raise FileNotFoundError(f"{path / s}: missing (the weights of {path})")
        try:
            with safe_open(str(path / s), framework="pt") as sf:
                sf.keys()
        except Exception as e:  # safetensors raises several types for a truncated/garbled file
            raise ValueError(f"{path / s}: corrupt safetensors file ({e})") from None


def load(path, device=None, dtype=None, log=print, max_pixels=None):
    """A Qwen2.5-VL checkpoint folder (HF layout) -> (model, processor); default bf16 on CUDA, fp32 on CPU.
    Attention: flash-attn on CUDA if it imports, else SDPA (gqa_decode on CPU)."""
    _check_folder(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    attn = CPU_ATTN
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401  (optional: a CUDA build that many machines lack)
            attn = "flash_attention_2"
        except ImportError:
            attn = "sdpa"
    else:
        register_attention(CPU_ATTN, _sdpa_cpu_decode)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    processor = Processor.from_pretrained(path, max_pixels=max_pixels)
    if log:
        log(f"loaded {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
            f"{dtype}, {device}, attention={attn}")
    return model, processor


def default_checkpoint(data="data"):
    """The checkpoint a command uses when none is named: out/rl, else out/sft, else {data}/tiny."""
    for c in ("out/rl", "out/sft", f"{data}/tiny"):
        if os.path.isfile(os.path.join(c, "config.json")):
            return c
    raise FileNotFoundError("no checkpoint in out/rl, out/sft or data/tiny: run `python make_data.py` "
                            "(and sft.py) first, or pass --ckpt")


def chat_template_text():
    """Qwen2.5-VL-7B-Instruct's chat template, carried so that tiny checkpoints render like real ones."""
    return (HERE / CHAT_TEMPLATE_FILE).read_text()


# ----------------------------------------------------------------------------- rendering and positions

def conversation_text(messages, add_generation_prompt=False):
    """The chat template's text, built piece by piece -> (text, [(start, end)] of the assistant contents,
    each with its closing `<|im_end|>`)."""
    text, spans = "", []
    if not messages or messages[0]["role"] != "system":
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {m['role']!r}")
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"].replace(IMAGE, "<|vision_start|><|image_pad|><|vision_end|>")
        if m["role"] == "assistant":
            spans.append((start, len(text) + len("<|im_end|>")))
        text += "<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), spans


def render(processor, messages, images=(), add_generation_prompt=False, pixels=True):
    """Conversation -> dict(input_ids (T,), loss_mask (T,), pixel_values, image_grid_thw); `images`: PIL
    images, one per `<image>`, in order. pixels=False: the tokens alone (pixel_values None), for counting."""
    text, spans = conversation_text(messages, add_generation_prompt)
    pixel_values, grid = processor.images(list(images), pixels)
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    starts = torch.tensor([s for s, _ in enc["offset_mapping"]], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.long)
    for s, e in spans:
        mask |= ((starts >= s) & (starts < e)).long()
    is_img, n = ids == processor.image_token_id, 0 if grid is None else len(grid)
    if int(is_img.sum()) != n:
        raise ValueError(f"{int(is_img.sum())} image placeholders but {n} images")
    reps = torch.ones_like(ids)  # each image's one <|image_pad|> becomes its t*h*w/merge^2 tokens
    if n:
        reps[is_img] = grid.prod(-1) // processor.merge ** 2
    return {"input_ids": ids.repeat_interleave(reps), "loss_mask": (mask * ~is_img).repeat_interleave(reps),
            "pixel_values": pixel_values, "image_grid_thw": grid}


def mrope_positions(input_ids, image_grid_thw, processor, start=0):
    """Qwen2.5-VL's 3-D rotary positions (3, T) of a chunk starting at `start` (its images' grids given)
    -> (positions, next_start): text advances all three axes; an image's tokens get (start, start+row,
    start+col), the text after it resumes at start + max(rows, cols). Chained chunks = one full forward."""
    ids = torch.as_tensor(input_ids)
    T, merge, is_img = len(ids), processor.merge, (ids == processor.image_token_id).tolist()
    pos, i, k, cur = torch.empty(3, T, dtype=torch.long), 0, 0, start
    while i < T:
        if is_img[i]:
            t, h, w = (int(x) for x in image_grid_thw[k])
            h, w = h // merge, w // merge
            n = t * h * w
            if i + n > T or not all(is_img[i:i + n]):
                raise ValueError(f"image {k}: expected {n} consecutive image tokens at {i}")
            grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pos[:, i:i + n] = cur + torch.stack([g.flatten() for g in grid])
            i, k, cur = i + n, k + 1, cur + max(h, w)
        else:
            j = next((j for j in range(i, T) if is_img[j]), T)
            pos[:, i:j] = torch.arange(cur, cur + j - i)
            i, cur = j, cur + j - i
    return pos, cur


# ----------------------------------------------------------------------------- batching

def collate(items, processor, extra_keys=()):
    """Rendered dicts -> a right-padded batch: input_ids, loss_mask, attention_mask, `extra_keys` (B, T),
    position_ids (3, B, T), pixel_values (P, D) or the rollout's image_embeds | None, image_grid_thw | None."""
    B, T = len(items), max(len(x["input_ids"]) for x in items)
    batch = {"input_ids": torch.full((B, T), processor.pad_id, dtype=torch.long),
             "loss_mask": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "position_ids": torch.zeros(3, B, T, dtype=torch.long),
             **{k: torch.zeros(B, T, dtype=torch.float32) for k in extra_keys}}
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        batch["input_ids"][b, :n] = torch.as_tensor(x["input_ids"])
        batch["loss_mask"][b, :n] = torch.as_tensor(x["loss_mask"])
        batch["attention_mask"][b, :n] = 1
        batch["position_ids"][:, b, :n] = mrope_positions(x["input_ids"], x["image_grid_thw"], processor)[0]
        for k in extra_keys:
            batch[k][b, :n] = torch.as_tensor(x[k], dtype=torch.float32)
    imgs = [x for x in items if x["image_grid_thw"] is not None]
    feats = {x.get("image_embeds") is not None for x in imgs}
    if len(feats) > 1:
        raise ValueError("a batch mixes items with image features and items with pixels")
    key = "image_embeds" if feats == {True} else "pixel_values"
    batch[key] = torch.cat([x[key] for x in imgs]) if imgs else None
    batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in imgs]) if imgs else None
    return batch


def to_device(batch, device):
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) if hasattr(v, "to") else v
            for k, v in batch.items()}


class SharedPrompt:
    """The decoder's mask in a `collate_shared` forward: rows [0, n) hold the distinct prompts, rows [n, n + m)
    continuations packed end to end. seg (m, T): the prompt row each position continues (-1: padding);
    start (m, T): where its continuation begins. A continuation token sees the first plen[j] keys of its
    prompt row j, then causally its continuation; a prompt row, causally. Built once, on the first call."""

    def __init__(self, n, plen, seg, start):
        self.n, (self.m, self.T) = n, seg.shape
        self.plen, self.seg, self.start, self._masks = plen, seg, start, None

    def to(self, device):
        return SharedPrompt(self.n, self.plen.to(device), self.seg.to(device), self.start.to(device))

    def masks(self):
        """(prompt rows' (n, 1, T, T), continuation rows' (m, 1, T, n T + T)) bool, True: attend."""
        if self._masks is None:
            n, m, T, dev = self.n, self.m, self.T, self.seg.device
            keys = torch.arange(T, device=dev)
            causal = keys[None, :] <= keys[:, None]  # (T, T)
            see = (self.seg[:, :, None, None] == torch.arange(n, device=dev)[None, None, :, None]) \
                & (keys[None, None, None, :] < self.plen[None, None, :, None])  # (m, T, n, T)
            own = (keys[None, None, :] >= self.start[:, :, None]) & causal[None]  # (m, T, T)
            self._masks = causal.expand(n, 1, T, T), torch.cat([see.reshape(m, T, n * T), own], -1)[:, None]
        return self._masks


def shared_prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The decoder's attention after `use_shared_prompt_attention` (SDPA for any mask but a SharedPrompt).
    query (n + m, H, T, d), key/value (n + m, KV, T, d): a continuation row's keys are every prompt row's,
    then its own, masked to its prompt; every continuation's gradient flows into its prompt."""
    lay = attention_mask
    if not isinstance(lay, SharedPrompt):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    n, rep = lay.n, query.shape[1] // key.shape[1]
    if rep > 1:  # as transformers' SDPA path does with a mask: enable_gqa takes the slow kernel there
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    prompt_mask, cont_mask = lay.masks()
    out = F.scaled_dot_product_attention(query[:n], key[:n], value[:n], attn_mask=prompt_mask, scale=scaling)
    if lay.m:
        def with_prompts(x):  # (n + m, H, T, d) -> (m, H, n T + T, d): every prompt's keys, then the row's own
            _, H, T, d = x.shape
            return torch.cat([x[:n].transpose(0, 1).reshape(1, H, n * T, d).expand(lay.m, -1, -1, -1), x[n:]], 2)
        out = torch.cat([out, F.scaled_dot_product_attention(query[n:], with_prompts(key), with_prompts(value),
                                                             attn_mask=cont_mask, scale=scaling)])
    return out.transpose(1, 2), None  # (n + m, T, H, d)


def use_shared_prompt_attention(model):
    """The text decoder on shared_prompt_attention for good (gradient checkpointing's recompute looks it up
    after the forward); the vision tower keeps its own."""
    register_attention(SHARED_ATTN, shared_prompt_attention)
    model.model.language_model.config._attn_implementation = SHARED_ATTN
    return model


def _same_pixels(a, b):
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def _image_cut(ids, L, grid, processor, per=1):
    """(images, pixel rows / per) among a sequence's first L tokens, `grid` (N, 3) its images (per = merge^2:
    rows of image features)."""
    n, k, rows, tokens = int((ids[:L] == processor.image_token_id).sum()), 0, 0, 0
    while tokens < n:
        t, h, w = (int(v) for v in grid[k])
        k, rows, tokens = k + 1, rows + t * h * w, tokens + t * h * w // processor.merge ** 2
    if tokens != n:
        raise ValueError(f"prompt_len ends inside an image ({tokens} image tokens, not {n})")
    return k, rows // per


def _shared_prefix(group, P, processor, per=1):
    """(L, [(images, rows) in it per item]) of (ids, grid, pixels or features) sharing their first P tokens
    and pixels: their longest common prefix, not ending inside an image, back to P if its images differ."""
    ids0, grid0, pv0 = group[0]
    L = min(len(ids) for ids, _, _ in group)
    for ids, _, _ in group[1:]:
        d = (ids[:L] != ids0[:L]).nonzero()
        L = int(d[0]) if len(d) else L
    while L > P and ids0[L - 1] == processor.image_token_id:
        L -= 1
    cuts = [_image_cut(ids0, L, grid, processor, per) for _, grid, _ in group]
    if any(k and not (torch.equal(grid[:k], grid0[:k]) and _same_pixels(pv[:rows], pv0[:rows]))
           for (_, grid, pv), (k, rows) in zip(group, cuts)):
        L, cuts = P, [_image_cut(ids0, P, grid, processor, per) for _, grid, _ in group]
    return L, cuts


def collate_shared(items, processor, extra_keys=()):
    """collate(items) plus "shared": the forward's inputs laid out so that items with the same prompt (first
    `prompt_len` tokens and their images: a GRPO group; else each item its own) forward once what they share.
    One row per group holds the prompt and on to where its items part; the distinct continuations are packed
    end to end into rows of one length (first fit, longest first). token_logprobs reads the same log-probs
    from it. Needs use_shared_prompt_attention(model)."""
    batch = collate(items, processor, extra_keys)
    key = "image_embeds" if "image_embeds" in batch else "pixel_values"
    per = processor.merge ** 2 if key == "image_embeds" else 1  # an image's pixel rows per feature row
    for k in (key, "image_grid_thw", "position_ids", "attention_mask"):
        del batch[k]  # the forward reads them from "shared": no second copy of the pixels to the device
    groups = []  # (prompt ids, prompt pixels, [(item, ids, grid, pixels)]), in order of first appearance
    for b, x in enumerate(items):
        ids, grid, pv = torch.as_tensor(x["input_ids"]), x["image_grid_thw"], x[key]
        P = min(int(x.get("prompt_len") or len(ids)), len(ids))
        k, n_pv = _image_cut(ids, P, grid, processor, per)
        head = pv[:n_pv] if k else None
        g = next((g for g in groups if torch.equal(g[0], ids[:P]) and _same_pixels(g[1], head)), None)
        if g is None:
            groups.append(g := (ids[:P], head, []))
        g[2].append((b, ids, grid, pv))
    # rows: [(item, prompt row j, ids, grid, pixels)] per row, prompts first; starts: item -> (its
    # prompt row, shared length); copies: (item, the identical item whose continuation it reads)
    rows, conts, starts, copies = [], [], {}, []
    for j, (head_ids, _, members) in enumerate(groups):
        L, cuts = _shared_prefix([m[1:] for m in members], len(head_ids), processor, per)
        (k, n_pv), (b, ids, grid, pv) = cuts[0], members[0]
        rows.append([(b, j, ids[:L], grid[:k] if k else None, pv[:n_pv] if k else None)])
        seen = []
        for (b, ids, grid, pv), (k, n_pv) in zip(members, cuts):
            starts[b] = (j, L)
            if L < len(ids):
                rest = grid is not None and k < len(grid)
                cont = (b, j, ids[L:], grid[k:] if rest else None, pv[n_pv:] if rest else None)
                twin = next((c for c in seen if torch.equal(c[2], cont[2]) and _same_pixels(c[4], cont[4])), None)
                if twin is None:
                    seen.append(cont)
                    conts.append(cont)
                else:  # the same sample twice: forwarded once, read by both
                    copies.append((b, twin[0]))
    # rows a multiple of 16 long: CUDA's memory-efficient SDPA kernel wants masks aligned to 16 keys
    T = -(-max(len(c[2]) for c in [r[0] for r in rows] + conts) // 16) * 16
    n, free = len(rows), []
    for c in sorted(conts, key=lambda c: -len(c[2])):  # first fit, longest first
        r = next((r for r, f in enumerate(free) if f >= len(c[2])), None)
        if r is None:
            r = len(free)
            free.append(T)
            rows.append([])
        free[r] -= len(c[2])
        rows[n + r].append(c)
    m = len(free)
    ids = torch.full((n + m, T), processor.pad_id, dtype=torch.long)
    pos = torch.zeros(3, n + m, T, dtype=torch.long)
    seg, start = torch.full((m, T), -1, dtype=torch.long), torch.arange(T).repeat(m, 1)
    src = torch.zeros(batch["input_ids"].shape, dtype=torch.long)  # src[b, t]: flat row * T + column of b's t
    nxt, pvs, grids = [], [], []  # nxt[j]: the position after prompt row j
    for r, segments in enumerate(rows):
        o = 0
        for b, j, row_ids, grid, pv in segments:
            L = len(row_ids)
            ids[r, o:o + L] = row_ids
            pos[:, r, o:o + L], end = mrope_positions(row_ids, grid, processor, start=nxt[j] if r >= n else 0)
            if r < n:
                nxt.append(end)
            else:
                seg[r - n, o:o + L], start[r - n, o:o + L] = j, o
                src[b, starts[b][1]:starts[b][1] + L] = r * T + o + torch.arange(L)
            if grid is not None:
                pvs.append(pv)
                grids.append(grid)
            o += L
    for b, (j, P) in starts.items():
        src[b, :P] = j * T + torch.arange(P)
    for b, b0 in copies:
        src[b] = src[b0]
    batch["shared"] = {"input_ids": ids, "position_ids": pos, "src": src,
                       key: torch.cat(pvs) if pvs else None,
                       "image_grid_thw": torch.cat(grids) if grids else None,
                       "attention_mask": SharedPrompt(n, torch.tensor([len(r[0][2]) for r in rows[:n]]), seg, start)}
    return batch


# ----------------------------------------------------------------------------- log-probs

def image_features(model, pixel_values, grid):
    """The vision tower's output (image tokens, D) for these images: what replaces their <|image_pad|>s."""
    return torch.cat(model.model.get_image_features(pixel_values, grid).pooler_output)


def embed(model, input_ids, image_embeds=None):
    """input_ids (B, T) -> the decoder's input (B, T, D), image_embeds (N, D) in the image tokens' places."""
    x = model.get_input_embeddings()(input_ids)
    if image_embeds is None:
        return x
    is_img = input_ids == model.config.image_token_id
    if int(is_img.sum()) != len(image_embeds):
        raise ValueError(f"{int(is_img.sum())} image tokens but features for {len(image_embeds)}")
    return x.masked_scatter(is_img[..., None], image_embeds.to(x.device, x.dtype))


def forward_hidden(model, batch):
    """Vision tower (or the batch's image_embeds) + decoder with our positions -> last_hidden_state (B, T, D)."""
    pv, feats, mask = batch.get("pixel_values"), batch.get("image_embeds"), batch.get("attention_mask")
    if isinstance(mask, SharedPrompt):
        if model.model.language_model.config._attn_implementation != SHARED_ATTN:
            raise ValueError("a collate_shared batch needs model.use_shared_prompt_attention(model) first")
        mask = {"full_attention": mask}  # a mapping: the decoder passes it through instead of building one
    if feats is None:
        return model.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                           pixel_values=None if pv is None else pv.to(next(model.parameters()).dtype),
                           image_grid_thw=batch.get("image_grid_thw"))
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.model.visual.parameters()):
        raise ValueError("image_embeds bypass the vision tower, which then learns nothing: freeze it")
    return model.model(inputs_embeds=embed(model, batch["input_ids"], feats), attention_mask=mask,
                       position_ids=batch["position_ids"])


def policy_logits(lm_head, h, config):
    """fp32 next-token logits (N, V) of h (N, D), image and video placeholders impossible: what rollout
    samples from and training scores with."""
    if h.device.type == "cpu" and (h.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        # fp32 head on CPU: the bf16 GEMM of its backward (151k inner dimension) takes 4.3 s there, fp32 0.05 s
        with torch.autocast("cpu", enabled=False):
            logits = F.linear(h.float(), lm_head.weight.float())
    else:
        logits = lm_head(h).float()
    logits[..., [config.image_token_id, config.video_token_id]] = float("-inf")
    return logits


def _chunk_logprobs(lm_head, h, targets, temperature, config):
    logits = policy_logits(lm_head, h, config).div_(temperature)  # (N, V) fp32, one chunk only
    logz = torch.logsumexp(logits, -1)
    lp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.no_grad():  # entropy is logged, never trained: no (N, V) buffers kept for its backward
        p = (logits - logz[:, None]).exp_()
        ent = logz - p.mul_(logits.clamp(min=torch.finfo(logits.dtype).min)).sum(-1)  # 0 x -inf would be nan
    return lp, ent


def token_logprobs(model, batch, temperature=1.0, chunk=None, return_entropy=False):
    """log p(token_t | tokens_<t) (B, T), 0 at t=0 and where loss_mask is 0. lm_head runs on masked tokens only,
    `chunk` at a time (default 2^26 fp32 logits), checkpointed: the batch's logits never exist at once."""
    ids = batch["input_ids"]
    want = batch.get("loss_mask", torch.ones_like(ids)).bool().clone()
    want[:, 0] = False
    idx = want.nonzero(as_tuple=True)
    shared, targets, inv = batch.get("shared"), ids[idx], None  # targets (N,)
    if shared is None:
        hs = forward_hidden(model, batch).last_hidden_state[idx[0], idx[1] - 1]  # (N, D): what predicts t
    else:  # a (state, target) pair that several items share (copies of a sample) goes through lm_head once
        h = forward_hidden(model, shared).last_hidden_state  # (n + m, T', D)
        V = model.lm_head.out_features
        key, inv = torch.unique(shared["src"][idx[0], idx[1] - 1] * V + targets, return_inverse=True)
        hs, targets = h.flatten(0, 1)[key // V], key % V
    chunk = chunk or max(1, min(1024, 2 ** 26 // model.lm_head.out_features))
    step = (partial(torch.utils.checkpoint.checkpoint, _chunk_logprobs, use_reentrant=False)
            if torch.is_grad_enabled() else _chunk_logprobs)
    parts = [step(model.lm_head, hs[s:s + chunk], targets[s:s + chunk], temperature, model.config)
             for s in range(0, len(targets), chunk)]
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    ent_out = torch.zeros_like(out)
    if parts:
        lp, ent = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).detach()
        if inv is not None:
            lp, ent = lp[inv], ent[inv]
        out, ent_out = out.index_put(idx, lp), ent_out.index_put(idx, ent)
    return (out, ent_out) if return_entropy else out


# ----------------------------------------------------------------------------- torchrun, precision, logs

def setup_dist():
    """torchrun's environment (NCCL on CUDA, gloo on CPU) or one process -> (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*a, **kw):
    if get_rank() == 0:
        print(*a, **kw, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def reduce(values, op="sum"):
    """Floats summed ("sum") or maxed ("max") over ranks in one all-reduce."""
    values = [float(v) for v in values]
    if not dist.is_initialized():
        return values
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def gather(obj):
    """Every rank's picklable obj, on every rank, in rank order ([obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RunLog:
    """Append-only log file + stdout, on rank 0. Its first line (JSON): argv, config, versions, git hash."""

    def __init__(self, path, args):
        self.f = None
        if get_rank() != 0:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")
        try:
            git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                 text=True, timeout=5).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            git = "unknown"
        self("# " + json.dumps({"argv": sys.argv, "config": vars(args),
                                "python": platform.python_version(), "torch": torch.__version__,
                                "transformers": transformers.__version__, "git": git,
                                "time": datetime.datetime.now().isoformat(timespec="seconds")}, default=str))

    def __call__(self, line):
        if self.f:
            print(line, flush=True)
            self.f.write(line + "\n")
            self.f.flush()


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(precision, device):
    """--precision -> torch dtype; None: bf16 on CUDA, fp32 on CPU."""
    return PRECISIONS[precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")]


def autocast(device, dtype):
    """Matmuls in `dtype` over fp32 master weights (CPU too: the tests run the GPU's dtype path)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
