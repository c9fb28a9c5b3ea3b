"""model.py: one way to load a Qwen2.5-VL model and one way to turn a conversation into tokens.

What must agree between rollout, SFT, RL and eval lives here: loading (a real Qwen2.5-VL folder or
our tiny random checkpoint, through the same code path), `render` (a conversation to token ids and
loss mask: the only place that builds them), M-RoPE positions of any chunk of a sequence, per-token
log-probs, batching (and the layout that forwards a GRPO group's prompt once), LoRA, atomic
checkpoints, torchrun helpers and run logs.

Rendering rule: the text is exactly Qwen2.5-VL's chat template; each `<|image_pad|>` becomes
(t*h*w)/merge^2 copies, as the processor does; a token is trained (loss_mask=1) iff it starts inside
an assistant message's content or is the `<|im_end|>` that closes it. System and user text,
`<information>` tool results (user turns), image tokens and assistant headers never are.
"""
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import (AttentionInterface, AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)
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
# The tiny BPE's split: Qwen2's, but a capitalised word or a number of up to 4 digits is one piece with
# nothing joined to its front, so that a name is the same tokens on a result page (" by Vukuk Brillan")
# as in an action ("<answer>Vukuk Brillan"): a random model cannot learn that they match (measured: it
# copied the first word of a name wrong in most wrong answers). 11% more tokens than Qwen's split.
TINY_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}>]?\p{Ll}+|\p{Lu}\p{L}*|\p{N}{1,4}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s")
CHAT_TEMPLATE_FILE = "qwen2_5_vl_chat_template.jinja"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
CAPTION_PROMPT = "Describe the image."
SHARED_ATTN, CPU_ATTN = "shared_prompt", "sdpa_cpu_decode"  # our attention functions' names in transformers


# ----------------------------------------------------------------------------- loading

class Processor:
    """Tokenizer + image processor, reading and writing the real processor's files (transformers'
    Qwen2_5_VLProcessor also wants a video processor, which imports torchvision)."""

    MAX_PIXELS = 1280 * 28 * 28  # Qwen's recommended cap: at most 1280 image tokens per image

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor, self.merge = tokenizer, image_processor, image_processor.merge_size
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.image_token_id, self.pad_id = ids["<|image_pad|>"], ids["<|endoftext|>"]
        self.im_start_id, self.im_end_id = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision_start_id = ids["<|vision_start|>"]

    @classmethod
    def from_pretrained(cls, path, max_pixels=None):
        """max_pixels: the most pixels an image is resized to. None: the folder's value, capped at
        MAX_PIXELS (the hub's own 12,845,056 would turn one photo into up to 16,384 tokens)."""
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
        """PIL images -> (pixel_values (P, C*t*p*p), image_grid_thw (N, 3)) or (None, None). pixels=False:
        (None, the grids) from the images' sizes alone (the processor's own smart_resize), no pixel touched."""
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
    """One-token attention, grouped-query, as two matmuls: the H / KV query heads that share a KV head
    are the rows of one product with its keys, so each key is read once, never repeated (SDPA with a
    mask copies every head). query (b, H, 1, d), key/value (b, KV, T, d), mask (b, 1, 1, T) bool
    (True: attend) -> (b, 1, H, d). Softmax in fp32."""
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
    """Any local Qwen2.5-VL checkpoint folder (HF layout) -> (model, processor). Defaults: cuda if
    available, bf16 there and fp32 on CPU; max_pixels: see Processor.from_pretrained. Attention:
    flash-attn on CUDA when it imports, else SDPA (on CPU with gqa_decode's decode step)."""
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
    """Qwen2.5-VL's chat template (Qwen2.5-VL-7B-Instruct's), carried so that tiny checkpoints render like real ones."""
    return (HERE / CHAT_TEMPLATE_FILE).read_text()


# ----------------------------------------------------------------------------- the tiny checkpoint

def train_tokenizer(texts, vocab_size=4096):
    """A byte-level BPE with Qwen2's special tokens and our TINY_SPLIT pre-tokenizer, trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(TINY_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=chat_template_text(),
        model_max_length=32768, clean_up_tokenization_spaces=False)


def tiny_config(vocab_size, token_ids, hidden=128, layers=4, heads=4, kv_heads=2):
    """A Qwen2.5-VL config of the real architecture at toy size: patch 14, merge 2, temporal 2, a
    two-block vision tower (windowed attention, then full), M-RoPE sections scaled to the head size."""
    half = hidden // heads // 2
    sec = [half // 4, (half - half // 4) // 2]
    sec.append(half - sum(sec))  # real 7B: [16, 24, 24] for head_dim 128
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec},
                         bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
                         pad_token_id=token_ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True)


def _warmup(model, next_batch, steps, lr, log, name, every):
    """`steps` AdamW steps of next-token loss on the masked tokens of next_batch() (a collated batch)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        b = next_batch()
        loss = -(token_logprobs(model, b) * b["loss_mask"]).sum() / b["loss_mask"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % every == 0:
            log(f"{name} warm-up step {step + 1}/{steps}: loss {loss.item():.3f}")
    return model.eval()


def copy_warmup(model, token_ids, steps, seed=0, batch=16, lr=1e-3, log=None):
    """Give a fresh model the in-context copying every pretrained LM has (induction heads): next-token
    training on `x1..xn SEP x1..xn`, random tokens, n varying per batch (fixed, it learns a positional
    shortcut). Without it SFT on the synthetic world never learns to read a name off the results."""
    g, ids = torch.Generator().manual_seed(seed), torch.as_tensor(token_ids)

    def next_batch():
        n = int(torch.randint(4, 13, (1,), generator=g))
        seq = ids[torch.randint(len(ids), (batch, n), generator=g)]  # (B, n)
        x = torch.cat([seq, seq[:, :1] * 0 + ids[0], seq], 1)  # (B, 2n+1): the separator is ids[0]
        mask, T = torch.zeros_like(x), x.shape[1]
        mask[:, n + 1:] = 1
        return {"input_ids": x, "position_ids": torch.arange(T).view(1, 1, T).expand(3, batch, T),
                "attention_mask": torch.ones_like(x), "loss_mask": mask}
    return _warmup(model, next_batch, steps, lr, log, "copy", 500)


def caption_warmup(model, processor, pairs, steps, seed=0, batch=16, lr=1e-3, log=None):
    """Give a fresh model the sight a pretrained VLM has: next-token training on `pairs` of (PIL image,
    what it shows) as a user turn with the image and an assistant turn (without it the tiny vision
    tower stays near chance on colours and shapes through SFT)."""
    items = [render(processor, [{"role": "user", "content": IMAGE + CAPTION_PROMPT},
                                {"role": "assistant", "content": text}], [im]) for im, text in pairs]
    g = torch.Generator().manual_seed(seed)

    def next_batch():
        return collate([items[i] for i in torch.randint(len(items), (batch,), generator=g).tolist()], processor)
    return _warmup(model, next_batch, steps, lr, log, "caption", 250)


def build_tiny(out_dir, texts, seed=0, vocab_size=4096, copy_steps=0, captions=(), caption_steps=0, log=None,
               **size):
    """Write a random Qwen2.5-VL checkpoint + processor to `out_dir`, loaded by `load()` like a real one
    (`size`: tiny_config's), after copy_steps of copy_warmup and caption_steps of caption_warmup on
    `captions` ((PIL image, text) pairs): two skills of pretraining the synthetic world needs."""
    # the chat template's own words, so that they merge like any frequent text (a real vocabulary has them)
    template = conversation_text([{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}])[0]
    tok = train_tokenizer(list(texts) + [template.replace("<|im_start|>", "").replace("<|im_end|>", "")] * 200,
                          vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(len(tok), ids, **size))
    if copy_steps:
        copy_warmup(model, [i for i in range(len(tok)) if i not in ids.values()], copy_steps, seed, log=log)
    processor = Processor(tok, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=224 * 224))
    if caption_steps:
        caption_warmup(model, processor, captions, caption_steps, seed, log=log)
    save(model, processor, out_dir, {"step": 0, "tiny": True, "seed": seed, "size": size,
                                     "copy_steps": copy_steps, "caption_steps": caption_steps})
    return out_dir


# ----------------------------------------------------------------------------- rendering and positions

def conversation_text(messages, add_generation_prompt=False):
    """The chat template's text, built piece by piece so we know where each message's content lies.
    Returns (text, spans): [(start, end)] of assistant contents, each with its closing `<|im_end|>`.
    tests/test_model.py checks the text against the real template's."""
    text, spans = "", []
    if not messages or messages[0]["role"] != "system":
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {m['role']!r}")
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"].replace(IMAGE, VISION_BLOCK)
        if m["role"] == "assistant":
            spans.append((start, len(text) + len("<|im_end|>")))
        text += "<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), spans


def render(processor, messages, images=(), add_generation_prompt=False, pixels=True):
    """Conversation -> dict(input_ids (T,), loss_mask (T,), pixel_values, image_grid_thw); `images`:
    PIL images, one per `<image>` placeholder, in order. The rollout renders its chunks with it.
    pixels=False: the tokens alone (pixel_values None), as sft.py's scan counts them."""
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
    """3-D rotary positions (3, T) of a sequence chunk that starts at position `start`, as Qwen2.5-VL
    computes them: text advances all three axes together; an image's tokens get (start, start+row,
    start+col) and the text after it resumes at start + max(rows, cols). `image_grid_thw`: the grids of
    this chunk's images. Returns (positions, next_start): chunks computed with the returned next_start
    concatenate to the positions of one full forward, which lets the rollout append to a KV cache."""
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
    """Rendered dicts -> a right-padded batch: input_ids, loss_mask, attention_mask (B, T), position_ids
    (3, B, T), pixel_values (P, D) | None (or image_embeds (image tokens, D): image_key), image_grid_thw
    (N, 3) | None, per-token `extra_keys` (B, T)."""
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
    key = image_key(imgs)
    batch[key] = torch.cat([x[key] for x in imgs]) if imgs else None
    batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in imgs]) if imgs else None
    return batch


def image_key(items):
    """Where the images of `items` (those with images) are: "image_embeds" (the rollout's features, rl.py)
    or "pixel_values"; never a mix."""
    feats = {x.get("image_embeds") is not None for x in items}
    if len(feats) > 1:
        raise ValueError("a batch mixes items with image features and items with pixels")
    return "image_embeds" if feats == {True} else "pixel_values"


def to_device(batch, device):
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) if hasattr(v, "to") else v
            for k, v in batch.items()}


class SharedPrompt:
    """The decoder's mask in a `collate_shared` forward. Rows [0, n) hold the distinct prompts, rows
    [n, n + m) continuations packed end to end. seg (m, T): the prompt row each position continues (-1:
    padding); start (m, T): where its continuation begins. A continuation token attends to the first
    plen[j] keys of its prompt row j, then causally within its continuation; a prompt row, causally.
    The masks are built on the batch's device when the first layer asks, then shared by every layer."""

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
    """The decoder's attention after `use_shared_prompt_attention`. With a SharedPrompt: query (n + m, H,
    T, d), key/value (n + m, KV, T, d); a continuation row's keys are every prompt row's then its own,
    masked to its prompt, so a prompt is computed once and every continuation's gradient flows into it.
    Any other mask: transformers' SDPA."""
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
    """The text decoder on shared_prompt_attention for good (gradient checkpointing's recompute looks it
    up again after any forward-time context ended); the vision tower keeps its own."""
    register_attention(SHARED_ATTN, shared_prompt_attention)
    model.model.language_model.config._attn_implementation = SHARED_ATTN
    return model


def _same_pixels(a, b):
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def _image_cut(ids, L, grid, processor, per=1):
    """(images, pixel rows / per) among a sequence's first L tokens; `grid` (N, 3): its images. per =
    merge^2 counts rows of image features (one per image token) instead."""
    n, k, rows, tokens = int((ids[:L] == processor.image_token_id).sum()), 0, 0, 0
    while tokens < n:
        t, h, w = (int(v) for v in grid[k])
        k, rows, tokens = k + 1, rows + t * h * w, tokens + t * h * w // processor.merge ** 2
    if tokens != n:
        raise ValueError(f"prompt_len ends inside an image ({tokens} image tokens, not {n})")
    return k, rows // per


def _shared_prefix(group, P, processor, per=1):
    """(L, [(images, rows) in it per item]) of a group of (ids, grid, pixels or features) that share their
    first P tokens and pixels: their longest common prefix, cut back so as not to end inside an image,
    and back to P if the images in it differ (crops of the same size)."""
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
    """collate(items)'s tokens, loss masks and extra keys, plus "shared": the forward's inputs laid out so
    that items with the same prompt (first `prompt_len` tokens and their images: a GRPO group; without
    prompt_len an item is a prompt of its own) forward once what they share: one row per group holds
    the prompt and on to where its items part; the distinct continuations are packed end to end into
    rows of the same length (first fit, longest first), positioned after their prefix. token_logprobs
    gives the same log-probs from it (tests/test_rollout.py). Needs use_shared_prompt_attention(model)."""
    batch = collate(items, processor, extra_keys)
    key = image_key([x for x in items if x["image_grid_thw"] is not None])
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
    """The vision tower's output for these images (their image tokens, D), in order: what the model's
    forward puts in place of their <|image_pad|> tokens. The rollout keeps it for training (embed)."""
    return torch.cat(model.model.get_image_features(pixel_values, grid).pooler_output)


def embed(model, input_ids, image_embeds=None):
    """input_ids (B, T) -> the decoder's input (B, T, D): token embeddings, image_embeds (N, D) in the
    image tokens' places in order, as the model's own forward does with pixels."""
    x = model.get_input_embeddings()(input_ids)
    if image_embeds is None:
        return x
    is_img = input_ids == model.config.image_token_id
    if int(is_img.sum()) != len(image_embeds):
        raise ValueError(f"{int(is_img.sum())} image tokens but features for {len(image_embeds)}")
    return x.masked_scatter(is_img[..., None], image_embeds.to(x.device, x.dtype))


def forward_hidden(model, batch):
    """The vision tower (or the batch's image_embeds) + decoder with our positions -> output whose
    last_hidden_state is (B, T, D)."""
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
    """fp32 next-token logits (N, V) of hidden states h (N, D), image and video placeholders made
    impossible (they stand for pixels). Rollout samples from these and training scores with them."""
    if h.device.type == "cpu" and (h.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        # the head in fp32 on CPU (the tests' twin of a bf16 GPU run): a bf16 GEMM with a 151k-long
        # inner dimension, the head's backward, takes 4.3 s there against 0.05 s in fp32
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
    """log p(token_t | tokens_<t) (B, T) for batch["input_ids"], 0 at t=0 and where loss_mask is 0:
    lm_head runs over the masked tokens only, `chunk` at a time (default 2^26 fp32 logits), under
    activation checkpointing with autograd, so the whole batch's logits never exist at once."""
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
    lps, ents = [], []
    for s in range(0, len(targets), chunk):
        args = (model.lm_head, hs[s:s + chunk], targets[s:s + chunk], temperature, model.config)
        lp, ent = (torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                   if torch.is_grad_enabled() else _chunk_logprobs(*args))
        lps.append(lp)
        ents.append(ent)
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    ent_out = torch.zeros_like(out)
    if lps:
        lp, ent = torch.cat(lps), torch.cat(ents).detach()
        if inv is not None:
            lp, ent = lp[inv], ent[inv]
        out, ent_out = out.index_put(idx, lp), ent_out.index_put(idx, ent)
    return (out, ent_out) if return_entropy else out


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """y = W x + (alpha/r) B A x, B = 0 at start (the model unchanged). `enabled = False`: the base
    layer alone, so a LoRA run's KL reference is the policy itself."""

    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.base, self.rank, self.alpha, self.scale, self.enabled = base, rank, alpha, alpha / rank, True
        kw = dict(dtype=torch.float32, device=base.weight.device)  # trainable: fp32 masters over any base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):  # fp32 run or bf16 parameters: match x's dtype
            a, b = a.to(x.dtype), b.to(x.dtype)
        return y + F.linear(F.linear(x, a), b) * self.scale


def add_lora(model, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")):
    """Wrap the language model's linear layers named in `targets`; freeze everything else."""
    model.requires_grad_(False)
    for mod in list(model.model.language_model.modules()):
        for name, child in list(mod.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(mod, name, LoRALinear(child, rank, alpha))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"no linear layer named one of {targets} in the language model")
    return model


def _lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model):
    """The base model, adapters off (the reference policy of a LoRA run, at no memory cost)."""
    mods = [m for _, m in _lora_layers(model)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def _full(t):
    """A parameter as a plain tensor; under FSDP2 an all-gather (every rank calls it, in the same order)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def merged_state_dict(model):
    """The state dict in the original layout, LoRA folded in, every tensor fp32 (bf16 W + dW would round
    most of a small LoRA delta away). A collective under FSDP2; rank 0 gets the dict, others None."""
    sd, first, main = {}, {}, _rank() == 0
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:  # a tied weight (lm_head = embed_tokens): one tensor under both names, so
            if main:        # that save_pretrained stores it once
                sd[k] = sd[first[id(v)]]
            continue
        first[id(v)], v = k, _full(v)
        if main:
            sd[k] = v.cpu().float() if v.is_floating_point() else v.cpu()
    if not main:
        return None
    for name, mod in _lora_layers(model):
        a, b = sd.pop(f"{name}.lora_A"), sd.pop(f"{name}.lora_B")
        sd[f"{name}.weight"] = sd.pop(f"{name}.base.weight") + (b @ a) * mod.scale
        if f"{name}.base.bias" in sd:
            sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    return sd


# The adapter lives in a subfolder: transformers with peft installed attaches an adapter_config.json
# found beside config.json on top of the weights, which would apply the (already merged) LoRA twice.
ADAPTER_DIR, ADAPTER_FILE, ADAPTER_CONFIG = "adapter", "adapter_model.safetensors", "adapter_config.json"


def lora_adapter(model, base=None):
    """(tensors, config) of the LoRA factors in PEFT's layout (fp32), or None without LoRA: a LoRA run's
    exact result. A collective under FSDP2; rank 0 gets the tensors."""
    mods = _lora_layers(model)
    if not mods:
        return None
    tensors = {f"base_model.model.{name}.{k}.weight": _full(getattr(m, k)).float().cpu().contiguous()
               for name, m in mods for k in ("lora_A", "lora_B")}
    targets = sorted({n.rsplit(".", 1)[1] for n, _ in mods})
    return tensors, {"peft_type": "LORA", "task_type": None, "r": mods[0][1].rank, "lora_alpha": mods[0][1].alpha,
                     "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                     "base_model_name_or_path": str(base) if base else None,
                     # a regex: the vision tower has gate/up/down_proj too, which our LoRA leaves alone
                     "target_modules": rf".*language_model.*\.({'|'.join(targets)})"}


def load_adapter(model, path):
    """Load the adapter that `save_checkpoint` wrote (path/adapter/, PEFT layout) into model's LoRA layers."""
    f = Path(path) / ADAPTER_DIR / ADAPTER_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (the LoRA factors of the run)")
    tensors, mods = load_file(str(f)), dict(_lora_layers(model))
    for key, t in tensors.items():
        name, k = key.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".", 1)
        if name not in mods or k not in ("lora_A", "lora_B"):
            raise ValueError(f"{f}: {key} matches no LoRA layer of this model (other base or rank?)")
        with torch.no_grad():
            getattr(mods[name], k).copy_(t)
    if len(tensors) != 2 * len(mods):
        raise ValueError(f"{f}: {len(tensors)} tensors for {len(mods)} LoRA layers")


# ----------------------------------------------------------------------------- checkpoints

TRAIN_STATE = "train_state.pt"  # optimizer, scheduler, RNG, data position: beside the HF files, ignored by loaders
SIDE_FILES = ("log.txt",)  # a run's files in its checkpoint folder that are not part of the checkpoint


def save(model, processor, out_dir, meta, state_dict=None, train_state=None, adapter=None):
    """Atomic checkpoint: fp32 safetensors, processor files, meta.json, and a training run's train state
    and LoRA adapter, written to a temporary folder beside `out_dir` and swapped in as one unit: a kill
    -9 at any moment leaves the old unit or the new one (`recover`). out_dir's SIDE_FILES are kept.
    `state_dict`: a gathered full state dict (FSDP)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary shared folder
    try:
        sd = state_dict if state_dict is not None else merged_state_dict(model)
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = "float32"  # what the tensors are; `dtype="auto"` loaders must not read bf16
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        processor.save_pretrained(tmp)
        if adapter is not None:
            (tmp / ADAPTER_DIR).mkdir()
            save_file(adapter[0], str(tmp / ADAPTER_DIR / ADAPTER_FILE), metadata={"format": "pt"})
            (tmp / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(adapter[1], indent=1))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        # side files -> .keep, out_dir -> .old, tmp -> out_dir, side files back: each step one rename,
        # and `recover` finishes from between any two
        keep, old = _side(out_dir, "keep"), _side(out_dir, "old")
        if out_dir.exists():
            keep.mkdir(exist_ok=True)
            for name in SIDE_FILES:
                if (out_dir / name).exists():
                    os.replace(out_dir / name, keep / name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        recover(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _side(out_dir, what):
    return out_dir.with_name(f".{out_dir.name}.{what}")


def recover(out_dir):
    """Finish a swap that a kill interrupted (rank 0, before anything reads out_dir): the previous unit
    back if the new one never arrived, old and unfinished temporary folders gone, side files back."""
    out_dir = Path(out_dir)
    keep, old = _side(out_dir, "keep"), _side(out_dir, "old")
    if not out_dir.exists() and old.is_dir():
        os.replace(old, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep.is_dir():
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in keep.iterdir():
            os.replace(f, out_dir / f.name)
        keep.rmdir()


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(wrapped, processor, out_dir, meta, optimizer=None, scheduler=None, step=0, extra=None):
    """A training run's checkpoint from any wrapping, one atomic unit (`save`): weights (FSDP2 shards
    gathered, LoRA folded in), the PEFT adapter of a LoRA run, and the train state: optimizer (FSDP2
    shards gathered to rank 0), scheduler, every rank's RNG states, `step` (the data position) and
    `extra` (a picklable dict). A collective: every rank calls it; rank 0 writes."""
    model = unwrap(wrapped)
    sd, adapter, state = merged_state_dict(model), lora_adapter(model, meta.get("base")), None
    if optimizer is not None:
        opt = get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True)) if is_sharded(model) else optimizer.state_dict()
        state = {"step": step, "optimizer": opt, "scheduler": scheduler.state_dict() if scheduler else None,
                 "rng": gather(rng_states()), "extra": extra or {}}
    if _rank() == 0:
        save(model, processor, out_dir, dict(meta, step=step), state_dict=sd, train_state=state, adapter=adapter)
    barrier()
    return Path(out_dir)


def load_train_state(out_dir, optimizer, scheduler, model=None):
    """Restore what save_checkpoint wrote into `optimizer` and `scheduler` (built as for a fresh run) and
    this rank's RNG states -> (step, extra). Memory-mapped: under FSDP2 rank 0 reads the optimizer and
    sends each rank its shard. Another world size keeps all but RNG, which restarts from rank 0's."""
    path = Path(out_dir) / TRAIN_STATE
    s = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # ours: numpy RNG state inside
    if model is not None and is_sharded(unwrap(model)):
        set_optimizer_state_dict(model, optimizer, s["optimizer"] if _rank() == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(s["optimizer"])
    if scheduler is not None and s["scheduler"] is not None:
        scheduler.load_state_dict(s["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(s["rng"]) != world:
        print0(f"warning: {path} was saved by {len(s['rng'])} ranks, now {world}: RNG streams restart from rank 0's")
    set_rng_states(s["rng"][_rank()] if len(s["rng"]) == world else s["rng"][0])
    return s["step"], s["extra"]


# ----------------------------------------------------------------------------- torchrun, precision, logs

def setup_dist():
    """From torchrun's environment (NCCL on CUDA, gloo on CPU), or one process -> (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*a, **kw):
    if _rank() == 0:
        print(*a, **kw, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def reduce(values, op="sum"):
    """Floats summed ("sum") or maxed ("max") over ranks in one all-reduce, on the process group's device
    (NCCL serves CUDA tensors only, gloo CPU ones); unchanged in one process."""
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
    """Append-only log file + stdout on rank 0. The first line (JSON): the run's argv and config, the
    versions it ran with and the git hash."""

    def __init__(self, path, args):
        self.path, self.f = Path(path), None
        if _rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        try:
            git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                 text=True, timeout=5).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            git = "unknown"
        self("# " + json.dumps({"argv": sys.argv, "config": vars(args) if hasattr(args, "__dict__") else args,
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
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------- distributed training

class LogProbs(nn.Module):
    """token_logprobs as a module's forward: DDP synchronises gradients, and FSDP2 gathers the root's
    parameters, only for work inside the wrapped module's forward, so the wrappers go around this."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, temperature=1.0, return_entropy=False):
        out = token_logprobs(self.model, batch, temperature, return_entropy=return_entropy)
        if not torch.is_grad_enabled():
            return out
        # A text-only micro-batch leaves a trainable vision tower without gradients, one with no token
        # to score (an empty trajectory) every parameter, while another rank's may use them: DDP and
        # FSDP2 would reduce different gradients on different ranks, and backward() of a loss with no
        # graph fails. A zero-valued term gives every parameter left out a (zero) gradient.
        lp = out[0] if return_entropy else out
        if not lp.requires_grad:
            idle = self.model
        elif batch.get("shared", batch).get("pixel_values") is None:
            idle = self.model.model.visual
        else:
            return out
        zero = sum((p.sum() for p in idle.parameters() if p.requires_grad), lp.new_zeros(())) * 0.0
        return (lp + zero, out[1]) if return_entropy else lp + zero


def wrap(model, mode="ddp", device=None, dtype=torch.float32):
    """-> w with w(batch, temperature=1.0, return_entropy=False) == token_logprobs(model, ...), gradients
    averaged over ranks. ddp: every rank holds the whole model. fsdp: FSDP2 `fully_shard` on each
    decoder block, then on the root (embeddings, lm_head, norms, vision tower: tied weights share a
    unit), parameters gathered in `dtype`, gradients reduced in fp32 into fp32 shards. none, or no
    process group: no wrapper. `unwrap(w)` is `model` (FSDP2 shards it in place)."""
    root = LogProbs(model)
    if mode == "none" or not dist.is_initialized():
        return root
    device = torch.device(device or next(model.parameters()).device)
    if mode == "ddp":  # every trainable parameter gets a gradient (LogProbs); rotary tables are constants
        return DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False, broadcast_buffers=False)
    if mode != "fsdp":
        raise ValueError(f"unknown wrap mode {mode!r} (ddp | fsdp | none)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    # decoder blocks only: a vision unit would be gathered only by ranks whose micro-batch has images
    for block in model.model.language_model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    # FSDP2 picks its root unit at the first forward; the rollout's call into the decoder blocks
    # (`unsharded`) would make a block a root of its own
    root._get_fsdp_state()._lazy_init()
    return root


def unwrap(wrapped):
    """The Hugging Face model inside a `wrap` result (or the model itself)."""
    m = getattr(wrapped, "module", wrapped)  # DDP keeps it as .module
    return m.model if isinstance(m, LogProbs) else m


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def unsharded(wrapped):
    """Whole parameters on every rank and no collectives, for generation (ranks decode different numbers
    of steps): every FSDP2 unit gathered once in the compute dtype and kept through its forwards, then
    resharded on exit. A no-op for DDP and one process."""
    units = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    for m in units:
        if m is not wrapped:  # the root's forward is never called by the rollout
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield unwrap(wrapped)
    finally:
        for m in units:
            m.reshard()
            if m is not wrapped:
                m.set_reshard_after_forward(True, recurse=False)


def grad_sync(wrapped, enabled):
    """One micro-batch's backward: DDP skips its all-reduce while accumulating (enabled=False); FSDP2
    reduce-scatters every micro-batch anyway (its gradients stay sharded)."""
    return wrapped.no_sync() if not enabled and hasattr(wrapped, "no_sync") else contextlib.nullcontext()


def clip_grad_norm(params, max_norm):
    """Clip to `max_norm` (<= 0: no clipping) -> the global gradient norm (FSDP2: reduced over ranks)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


# ----------------------------------------------------------------------------- a training run's start (sft.py, rl.py)

def start_run(args):
    """-> (rank, world, device, log, resume): torch threads (--threads, 0: torch's default), the process
    group, a checkpoint swap in --out that a kill interrupted finished (rank 0, before anything reads
    it), the run log, and whether --resume finds a train state to continue from (a job script may
    always pass --resume, from its first launch on)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_dist()
    out = Path(args.out)
    if rank == 0:
        recover(out)
    barrier()
    log = RunLog(out / "log.txt", args)
    resume = args.resume and (out / TRAIN_STATE).is_file()
    if args.resume and not resume:
        log(f"--resume: no {out / TRAIN_STATE}, starting fresh")
    return rank, world, device, log, resume


def load_trainable(args, path, resume, device, dtype, log, freeze_vision=True):
    """The model a run trains -> (model, processor): trainable weights in fp32, a LoRA run's frozen base
    in the compute dtype `dtype`. Full fine-tuning resumes from the run's own weights (--out), LoRA
    (--lora_rank, alpha 16) from the base `path` plus the saved adapter. The LoRA factors are drawn
    after torch.manual_seed(--seed), the same on every rank (FSDP2 does not broadcast them)."""
    out = Path(args.out)
    model, processor = load(out if resume and not args.lora_rank else path, device=device,
                            dtype=dtype if args.lora_rank else torch.float32, log=log, max_pixels=args.max_pixels)
    if args.lora_rank:
        torch.manual_seed(args.seed)
        add_lora(model, args.lora_rank)
        if resume:
            load_adapter(model, out)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor
