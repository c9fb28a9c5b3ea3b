"""model.py: one way to load a Qwen2.5-VL model and one way to turn a conversation into tokens.

Everything that must agree between rollout, SFT, RL and eval lives here: loading (a real
Qwen2.5-VL-3B/7B-Instruct folder or our tiny random checkpoint, through the same code path),
rendering a multi-turn, multi-image conversation to token ids + loss mask, the multimodal
rotary positions (M-RoPE) of any chunk of a sequence, per-token log-probs, batching (and the
shared-prompt layout that forwards a GRPO group's prompt once), LoRA, atomic checkpoints, torchrun
setup and run logs.

    python model.py --tiny out/tiny_demo      # build a tiny checkpoint and generate from it
    python model.py --check /path/to/Qwen2.5-VL-3B-Instruct   # load a real folder, render, generate

Rendering rule (the one the loss depends on): the text is exactly what Qwen2.5-VL's chat template
produces; each `<|image_pad|>` is expanded to (t*h*w)/merge^2 copies as the processor does; a token
is trained (loss_mask=1) iff it starts inside an assistant message's content or is the `<|im_end|>`
that closes an assistant message. System and user text, `<information>` tool results (they live in
user turns), image tokens and `<|im_start|>assistant\\n` headers are never trained on.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

HERE = Path(__file__).resolve().parent
IMAGE = "<image>"  # placeholder for an image inside string message content (design card)
# Qwen2.5-VL's special tokens, in the order of the real vocabulary (ids 151643...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# The tiny BPE's split: Qwen2's, except that a capitalised word or a number stands alone (no space
# or bracket joined to its front) and a number of up to 4 digits is one piece. A name or a year is
# then the same tokens on a result page (" by Vukuk Brillan") as in an action ("<answer>Vukuk
# Brillan"). A pretrained model knows that " Vukuk" and ">Vukuk" are one word; a random one cannot
# learn it for a word it never saw in that place (measured: it copied the first word of a name wrong
# in most wrong answers). 11% more tokens than Qwen's split on sft.jsonl.
TINY_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}>]?\p{Ll}+|\p{Lu}\p{L}*|\p{N}{1,4}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s")
CHAT_TEMPLATE_FILE = "qwen2_5_vl_chat_template.jinja"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
CAPTION_PROMPT = "Describe the image."


# ----------------------------------------------------------------------------- processor

class Processor:
    """Tokenizer + image processor. transformers' Qwen2_5_VLProcessor also wants a video
    processor, which imports torchvision; we need images only, so this small class holds the
    two parts and reads/writes the same files as the real processor."""

    MAX_PIXELS = 1280 * 28 * 28  # Qwen's recommended cap: at most 1280 image tokens per image

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge = image_processor.merge_size
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.image_token_id = ids["<|image_pad|>"]
        self.im_start_id = ids["<|im_start|>"]
        self.im_end_id = ids["<|im_end|>"]
        self.vision_start_id = ids["<|vision_start|>"]
        self.vision_end_id = ids["<|vision_end|>"]
        self.pad_id = ids["<|endoftext|>"]

    @classmethod
    def from_pretrained(cls, path, max_pixels=None):
        """max_pixels: the most pixels an image is resized to (so at most max_pixels / 28^2 image
        tokens). None: the folder's value, capped at Qwen's recommended 1280*28*28; the hub's own
        12,845,056 would turn one photo into up to 16,384 tokens."""
        from transformers import AutoTokenizer
        from transformers.image_utils import SizeDict
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        tok = AutoTokenizer.from_pretrained(path)
        ip = Qwen2VLImageProcessorPil.from_pretrained(path)
        # this processor keeps min/max pixels as size.shortest_edge / size.longest_edge
        lo, hi = ip.size.shortest_edge, ip.size.longest_edge
        hi = max_pixels if max_pixels is not None else min(hi, cls.MAX_PIXELS)
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

    def images(self, images):
        """PIL images -> (pixel_values (P, C*t*p*p), image_grid_thw (N, 3)) or (None, None)."""
        if not images:
            return None, None
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def n_image_tokens(self, grid_thw):
        return int(grid_thw.prod()) // (self.merge ** 2)

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------- loading

CPU_ATTN = "sdpa_cpu_decode"


def _sdpa_cpu_decode(module, query, key, value, attention_mask, **kwargs):
    """SDPA, except for one-token decoding steps: there, grouped-query attention as two matmuls.
    transformers' SDPA path copies every key/value head `n_rep` times when a mask is given (as it is
    for batched rows of different lengths), which dominates a CPU decode step; this reads them once.
    query (b, H, 1, d), key/value (b, KV, T, d), attention_mask (b, 1, 1, T) bool (True: attend)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    b, H, q, d = query.shape
    kv = key.shape[1]
    if q != 1 or module.training or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    s = torch.matmul(query.view(b, kv, H // kv, d), key.transpose(-1, -2))  # (b, KV, rep, T)
    s = (s * kwargs.get("scaling", d ** -0.5)).masked_fill(~attention_mask, float("-inf"))
    out = torch.matmul(torch.softmax(s, -1), value)  # (b, KV, rep, d)
    return out.view(b, H, 1, d).transpose(1, 2), None  # (b, 1, H, d) like SDPA's output


def _register_cpu_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(CPU_ATTN, _sdpa_cpu_decode)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_ATTN, sdpa_mask)


def attn_implementation(device):
    """flash_attention_2 when flash-attn imports and we are on CUDA, else PyTorch SDPA (on CPU with
    the grouped decode step above)."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    _register_cpu_attention()
    return CPU_ATTN


def _check_folder(path):
    """Name the missing or corrupt file instead of letting transformers fail deep inside."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    for name in ("config.json", "preprocessor_config.json"):
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a Qwen2.5-VL checkpoint folder needs it)")
        try:
            json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: missing (no tokenizer files)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: corrupt index ({e})") from None
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path / 'model.safetensors'}: missing (no weights in {path})")
    for s in shards:
        f = path / s
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing weight shard")
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except Exception as e:  # safetensors raises several types for a truncated/garbled file
            raise ValueError(f"{f}: corrupt safetensors file ({e})") from None


def load(path, device=None, dtype=None, log=print, max_pixels=None):
    """Load any local Qwen2.5-VL checkpoint folder (HF layout) -> (model, processor).
    device: default cuda if available else cpu; dtype: default bf16 on CUDA, fp32 on CPU;
    max_pixels: see Processor.from_pretrained."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    _check_folder(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    attn = attn_implementation(device)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    processor = Processor.from_pretrained(path, max_pixels=max_pixels)
    if log:
        log(f"loaded {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
            f"{dtype}, {device}, attention={attn}")
    return model, processor


def default_checkpoint(data="data"):
    """The checkpoint a command uses when none is named: out/rl, else out/sft, else {data}/tiny
    (the pipeline's outputs, relative to the working directory, newest stage first)."""
    for c in ("out/rl", "out/sft", f"{data}/tiny"):
        if os.path.isfile(os.path.join(c, "config.json")):
            return c
    raise FileNotFoundError("no checkpoint in out/rl, out/sft or data/tiny: run `python make_data.py` "
                            "(and sft.py) first, or pass --ckpt")


def chat_template_text():
    """The real Qwen2.5-VL chat template (as shipped with Qwen2.5-VL-7B-Instruct), which we carry
    next to this file so that tiny checkpoints render conversations exactly like real ones."""
    return (HERE / CHAT_TEMPLATE_FILE).read_text()


def train_tokenizer(texts, vocab_size=4096, split=TINY_SPLIT):
    """A byte-level BPE with Qwen2's special tokens and the pre-tokenizer `split`, trained on `texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=chat_template_text(),
        model_max_length=32768, clean_up_tokenization_spaces=False)


def tiny_config(vocab_size, token_ids, hidden=128, layers=4, heads=4, kv_heads=2, ffn=None,
                vision_hidden=64, vision_depth=2, vision_heads=2):
    """A Qwen2.5-VL config of the real architecture at toy size: patch 14, merge 2, temporal 2,
    windowed vision attention with full-attention blocks, M-RoPE sections scaled to the head size."""
    from transformers import Qwen2_5_VLConfig
    half = hidden // heads // 2
    sec = [half // 4, (half - half // 4) // 2]
    sec.append(half - sum(sec))  # real 7B: [16, 24, 24] for head_dim 128
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec},
                         bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
                         pad_token_id=token_ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_heads, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1]),
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
    model.eval()
    return model


def copy_warmup(model, token_ids, steps, seed=0, batch=16, lr=1e-3, log=None):
    """Give a freshly initialised model the in-context copying every pretrained LM has (induction
    heads): next-token training on `x1..xn SEP x1..xn` with random tokens and n varying per batch.
    Measured on the tiny model: with n fixed it learns a positional shortcut in 200 steps; with n
    varying, true copying appears between steps 600 and 1600 (loss 7.4 -> 0.03 by 2000). Without
    it, SFT on the synthetic world never learns to read a name off the search results."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(token_ids)

    def next_batch():
        n = int(torch.randint(4, 13, (1,), generator=g))
        seq = ids[torch.randint(len(ids), (batch, n), generator=g)]  # (B, n)
        x = torch.cat([seq, seq[:, :1] * 0 + ids[0], seq], 1)  # (B, 2n+1): the separator is ids[0]
        T = x.shape[1]
        mask = torch.zeros_like(x)
        mask[:, n + 1:] = 1
        return {"input_ids": x, "position_ids": torch.arange(T).view(1, 1, T).expand(3, batch, T),
                "attention_mask": torch.ones_like(x), "loss_mask": mask}
    return _warmup(model, next_batch, steps, lr, log, "copy", 500)


def caption_warmup(model, processor, pairs, steps, seed=0, batch=16, lr=1e-3, log=None):
    """Give a freshly initialised model the sight a pretrained VLM has: next-token training on
    `pairs` of (PIL image, what it shows), as one user turn with the image and one assistant turn.
    Without it the tiny vision tower stays near chance on colours and shapes through SFT, where
    the answer to a look question is one token in a trajectory of hundreds."""
    items = [render(processor, [{"role": "user", "content": IMAGE + CAPTION_PROMPT},
                                {"role": "assistant", "content": text}], [im]) for im, text in pairs]
    g = torch.Generator().manual_seed(seed)

    def next_batch():
        return collate([items[i] for i in torch.randint(len(items), (batch,), generator=g).tolist()], processor)
    return _warmup(model, next_batch, steps, lr, log, "caption", 250)


def build_tiny(out_dir, texts, seed=0, vocab_size=4096, min_pixels=28 * 28, max_pixels=224 * 224,
               copy_steps=0, captions=(), caption_steps=0, log=None, **size):
    """Write a randomly initialised Qwen2.5-VL checkpoint + processor to `out_dir`, loadable by
    `load()` exactly like a real one. `size`: hidden, layers, heads, kv_heads, ffn, vision_* (tiny_config).
    Two skills of pretraining the synthetic world's tasks cannot do without come first:
    copy_steps > 0 teaches it to copy (`copy_warmup`), caption_steps > 0 to see (`caption_warmup`
    on `captions`, (PIL image, text) pairs)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    # The chat template's own words, so that they merge like any frequent text (a real vocabulary has them).
    template = conversation_text([{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}])[0]
    tok = train_tokenizer(list(texts) + [template.replace("<|im_start|>", "").replace("<|im_end|>", "")] * 200,
                          vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(len(tok), ids, **size))
    if copy_steps:
        copy_warmup(model, [i for i in range(len(tok)) if i not in ids.values()], copy_steps, seed, log=log)
    processor = Processor(tok, Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels))
    if caption_steps:
        caption_warmup(model, processor, captions, caption_steps, seed, log=log)
    save(model, processor, out_dir, {"step": 0, "tiny": True, "seed": seed, "size": size,
                                     "copy_steps": copy_steps, "caption_steps": caption_steps})
    return out_dir


# ----------------------------------------------------------------------------- rendering

def to_template_messages(messages):
    """Design-format messages (string content with `<image>` placeholders) -> the list-of-parts
    form the chat template understands."""
    out = []
    for m in messages:
        parts = []
        for i, piece in enumerate(m["content"].split(IMAGE)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def conversation_text(messages, add_generation_prompt=False):
    """The chat template's text, built piece by piece so we know where each message's content lies.
    Returns (text, spans) with spans = [(start, end)] of assistant contents. tests/test_model.py
    checks that the text equals the real template's output."""
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
            spans.append((start, len(text) + len("<|im_end|>")))  # the closing <|im_end|> is trained
        text += "<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text, spans


def expand_image_pads(text, grid_thw, processor):
    """Replace the i-th `<|image_pad|>` by n_i copies (n_i = t*h*w / merge^2), as the processor does."""
    pieces = text.split("<|image_pad|>")
    n = 0 if grid_thw is None else len(grid_thw)
    if len(pieces) - 1 != n:
        raise ValueError(f"{len(pieces) - 1} image placeholders but {n} images")
    out = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        out += "<|image_pad|>" * processor.n_image_tokens(grid_thw[i]) + piece
    return out


def render(processor, messages, images=(), add_generation_prompt=False):
    """Conversation -> dict(input_ids (T,), loss_mask (T,), pixel_values, image_grid_thw).
    `images` are PIL images, one per `<image>` placeholder, in order."""
    text, spans = conversation_text(messages, add_generation_prompt)
    pixel_values, grid_thw = processor.images(list(images))
    text, spans = _expand_with_spans(text, spans, grid_thw, processor)
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    starts = torch.tensor([s for s, _ in enc["offset_mapping"]], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.long)
    for s, e in spans:
        mask |= ((starts >= s) & (starts < e)).long()
    mask[ids == processor.image_token_id] = 0  # an assistant turn never holds images, but be sure
    return {"input_ids": ids, "loss_mask": mask, "pixel_values": pixel_values, "image_grid_thw": grid_thw}


def _expand_with_spans(text, spans, grid_thw, processor):
    """expand_image_pads, shifting the assistant spans by the characters inserted before them."""
    expanded = expand_image_pads(text, grid_thw, processor)
    if grid_thw is None:
        return expanded, spans
    pad, shifted = "<|image_pad|>", []
    for s, e in spans:
        before = text[:s].count(pad)
        extra = sum(processor.n_image_tokens(grid_thw[i]) - 1 for i in range(before)) * len(pad)
        shifted.append((s + extra, e + extra))
    return expanded, shifted


# ----------------------------------------------------------------------------- positions

def mrope_positions(input_ids, image_grid_thw, processor_or_merge, image_token_id=None, start=0):
    """3-D rotary positions (3, T) of one sequence chunk that starts at position `start`, as
    Qwen2.5-VL computes them for the whole sequence: text tokens advance all three axes together;
    an image's tokens get (start, start+row, start+col) and the text after it resumes at
    start + max(rows, cols). `image_grid_thw` holds the grids of the images in this chunk, in order.
    Returns (positions, next_start). Chunks computed with the returned next_start concatenate to
    exactly the positions of one full forward, which is what lets rollout append to a KV cache."""
    if isinstance(processor_or_merge, Processor):
        merge, image_token_id = processor_or_merge.merge, processor_or_merge.image_token_id
    else:
        merge = processor_or_merge
    ids = torch.as_tensor(input_ids)
    T = ids.shape[0]
    pos = torch.empty(3, T, dtype=torch.long)
    is_img = (ids == image_token_id).tolist()
    i, k, cur = 0, 0, start
    while i < T:
        if not is_img[i]:
            j = i
            while j < T and not is_img[j]:
                j += 1
            pos[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
        else:
            t, h, w = (int(x) for x in image_grid_thw[k])
            h, w, n = h // merge, w // merge, t * (h // merge) * (w // merge)
            if i + n > T or not all(is_img[i:i + n]):
                raise ValueError(f"image {k}: expected {n} consecutive image tokens at {i}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pos[0, i:i + n] = cur + tt.flatten()
            pos[1, i:i + n] = cur + hh.flatten()
            pos[2, i:i + n] = cur + ww.flatten()
            cur += max(h, w)
            k, j = k + 1, i + n
        i = j
    return pos, cur


# ----------------------------------------------------------------------------- batching

def collate(items, processor, extra_keys=()):
    """List of rendered dicts -> a right-padded training batch:
    input_ids (B, T), loss_mask (B, T), attention_mask (B, T), position_ids (3, B, T),
    pixel_values (P, D) | None, image_grid_thw (N, 3) | None, plus per-token `extra_keys` (B, T)."""
    B, T = len(items), max(len(x["input_ids"]) for x in items)
    batch = {"input_ids": torch.full((B, T), processor.pad_id, dtype=torch.long),
             "loss_mask": torch.zeros(B, T, dtype=torch.long),
             "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "position_ids": torch.zeros(3, B, T, dtype=torch.long)}
    for k in extra_keys:
        batch[k] = torch.zeros(B, T, dtype=torch.float32)
    pvs, grids = [], []
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        batch["input_ids"][b, :n] = torch.as_tensor(x["input_ids"])
        batch["loss_mask"][b, :n] = torch.as_tensor(x["loss_mask"])
        batch["attention_mask"][b, :n] = 1
        batch["position_ids"][:, b, :n] = mrope_positions(x["input_ids"], x["image_grid_thw"], processor)[0]
        for k in extra_keys:
            batch[k][b, :n] = torch.as_tensor(x[k], dtype=torch.float32)
        if x["image_grid_thw"] is not None:
            pvs.append(x["pixel_values"])
            grids.append(x["image_grid_thw"])
    batch["pixel_values"] = torch.cat(pvs) if pvs else None
    batch["image_grid_thw"] = torch.cat(grids) if grids else None
    return batch


def to_device(batch, device):
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) if hasattr(v, "to") else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- shared-prompt forward

SHARED_ATTN = "shared_prompt"


class SharedPrompt:
    """What the text decoder gets for its mask in a `collate_shared` forward. Rows [0, n) hold the
    distinct prompts; rows [n, n + m) hold continuations packed end to end, all right-padded to T.
    seg (m, T): the prompt row that each position continues (-1: padding); start (m, T): where its
    continuation begins in the row. A continuation token attends to the first plen[j] keys of its
    prompt row j, then causally within its own continuation; a prompt row attends causally (its
    padding comes after every real key). The masks are built on the batch's device when the first
    layer asks, and shared by every layer of the forward."""

    def __init__(self, n, plen, seg, start):
        self.n, (self.m, self.T) = n, seg.shape
        self.plen, self.seg, self.start = plen, seg, start
        self._masks = None

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
    """The text decoder's attention once `use_shared_prompt_attention` is on. With a SharedPrompt
    layout: query (n + m, H, T, d), key/value (n + m, KV, T, d); a continuation row's keys are every
    prompt row's followed by its own, masked to its own prompt, so a prompt is computed once for its
    group and gradients from every continuation flow back into it. Any other mask: transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    lay = attention_mask
    if not isinstance(lay, SharedPrompt):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    n, rep = lay.n, query.shape[1] // key.shape[1]
    if rep > 1:  # as transformers' SDPA path does with a mask: enable_gqa takes the slow kernel there
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)

    prompt_mask, cont_mask = lay.masks()
    out = attend(query[:n], key[:n], value[:n], prompt_mask)
    if lay.m:
        def with_prompts(x):  # (n + m, H, T, d) -> (m, H, n T + T, d): every prompt's keys, then the row's own
            _, H, T, d = x.shape
            return torch.cat([x[:n].transpose(0, 1).reshape(1, H, n * T, d).expand(lay.m, -1, -1, -1), x[n:]], 2)
        out = torch.cat([out, attend(query[n:], with_prompts(key), with_prompts(value), cont_mask)])
    return out.transpose(1, 2), None  # (n + m, T, H, d)


def use_shared_prompt_attention(model):
    """Switch the text decoder to shared_prompt_attention, for good: a layer that gradient
    checkpointing recomputes in the backward looks its attention up again, after any forward-time
    context would have ended. The vision tower keeps its own (flash-attn or SDPA); with flash-attn
    the decoder's training forwards run SDPA with masks instead (the memory-efficient kernel)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(SHARED_ATTN, shared_prompt_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_ATTN, sdpa_mask)
    model.model.language_model.config._attn_implementation = SHARED_ATTN
    return model


def _prompt_images(grid, n_tokens, merge):
    """(images, pixel rows) of the first images in `grid` (N, 3) that hold n_tokens image tokens."""
    k = rows = tokens = 0
    while tokens < n_tokens:
        t, h, w = (int(v) for v in grid[k])
        k, rows, tokens = k + 1, rows + t * h * w, tokens + t * h * w // merge ** 2
    if tokens != n_tokens:
        raise ValueError(f"prompt_len ends inside an image ({tokens} image tokens, not {n_tokens})")
    return k, rows


def _shared_prefix(group, img, merge):
    """(L, [(images, pixel rows) per item]): how many first tokens the items of a group (the same
    prompt, tokens and pixels) share, and how many of each item's images and pixel rows lie in them.
    The longest common prefix of their tokens, cut back so as not to end inside an image, and back to
    the prompt if the images in it differ (a crop of the same size)."""
    ids, P = [e[1] for e in group], group[0][5]
    L = min(len(t) for t in ids)
    for t in ids[1:]:
        d = (t[:L] != ids[0][:L]).nonzero()
        L = int(d[0]) if len(d) else L
    while L > P and ids[0][L - 1] == img:
        L -= 1

    def cuts(L):
        n = int((ids[0][:L] == img).sum())
        return [_prompt_images(e[2], n, merge) if e[2] is not None else (0, 0) for e in group]
    c = cuts(L)
    grid0, pv0 = group[0][2], group[0][3]
    if any(k and not (torch.equal(e[2][:k], grid0[:k]) and _same_pixels(e[3][:rows], pv0[:rows]))
           for e, (k, rows) in zip(group, c)):
        L, c = P, cuts(P)
    return L, c


def collate_shared(items, processor, extra_keys=()):
    """collate(items)'s tokens, loss masks and extra keys, plus "shared": the forward's inputs laid out
    so that items with the same prompt (the first `prompt_len` tokens and the images among them: a GRPO
    group) forward it once, with everything else its items have in common. Each group is one row: the
    prefix its items share (the prompt, and on up to where they part). The items' distinct
    continuations are packed end to end into rows of the same length (first fit, longest first),
    positioned after their prefix: P + G x R tokens and one vision pass per prompt image for a group,
    instead of G x (P + R) and G, and less when the samples agree. token_logprobs reads "shared" when
    it is there and gives the same log-probs (tests/test_rollout.py). An item without `prompt_len` is
    a prompt of its own. Needs use_shared_prompt_attention(model)."""
    batch = collate(items, processor, extra_keys)
    for k in ("pixel_values", "image_grid_thw", "position_ids", "attention_mask"):
        del batch[k]  # the forward reads them from "shared": no second copy of the pixels to the device
    merge, img = processor.merge, processor.image_token_id
    # groups: items with the same prompt (tokens and pixels); a confident policy's samples often part
    # only at the answer. prompts: a group's row (ids, grid, pixels); conts: (item, row, ids, grid,
    # pixels); starts: item -> (row, length of the shared prefix)
    groups, index = [], {}
    for b, x in enumerate(items):
        ids, grid, pv = torch.as_tensor(x["input_ids"]), x["image_grid_thw"], x["pixel_values"]
        P = min(int(x.get("prompt_len") or len(ids)), len(ids))
        k, rows = _prompt_images(grid, int((ids[:P] == img).sum()), merge) if grid is not None else (0, 0)
        head_pv = pv[:rows] if k else None
        same = index.setdefault(tuple(ids[:P].tolist()), [])
        g = next((g for g in same if _same_pixels(groups[g][0][4], head_pv)), None)
        if g is None:
            g = len(groups)
            same.append(g)
            groups.append([])
        groups[g].append((b, ids, grid, pv, head_pv, P))
    prompts, conts, starts, copies = [], [], {}, []  # copies: (item, the identical item it reads)
    for j, group in enumerate(groups):
        L, cuts = _shared_prefix(group, img, merge)
        _, ids, grid, pv = group[0][:4]
        k, rows = cuts[0]
        prompts.append((ids[:L], grid[:k] if k else None, pv[:rows] if k else None))
        seen = {}
        for (b, ids, grid, pv, _, _), (k, rows) in zip(group, cuts):
            starts[b] = (j, L)
            if L < len(ids):
                rest = grid is not None and k < len(grid)
                cont = (b, j, ids[L:], grid[k:] if rest else None, pv[rows:] if rest else None)
                twins = seen.setdefault(tuple(cont[2].tolist()), [])
                c0 = next((c for c in twins if _same_pixels(c[4], cont[4])), None)
                if c0 is None:
                    twins.append(cont)
                    conts.append(cont)
                else:  # the same sample twice: forwarded once, read by both
                    copies.append((b, c0[0]))
    # rows a multiple of 16 long: CUDA's memory-efficient SDPA kernel wants masks aligned to 16 keys
    T = -(-max(len(r[0]) for r in prompts + [c[2:] for c in conts]) // 16) * 16
    bins = []  # [free, [conts]]: first fit, longest first
    for c in sorted(conts, key=lambda c: -len(c[2])):
        fit = next((bn for bn in bins if bn[0] >= len(c[2])), None)
        if fit is None:
            fit = [T, []]
            bins.append(fit)
        fit[0] -= len(c[2])
        fit[1].append(c)
    n, m = len(prompts), len(bins)
    ids = torch.full((n + m, T), processor.pad_id, dtype=torch.long)
    pos = torch.zeros(3, n + m, T, dtype=torch.long)
    seg, start = torch.full((m, T), -1, dtype=torch.long), torch.arange(T).repeat(m, 1)
    src = torch.zeros(batch["input_ids"].shape, dtype=torch.long)  # src[b, t]: flat row * T + column of b's t
    nxt, pvs, grids = [], [], []
    for j, (row_ids, grid, pv) in enumerate(prompts):
        ids[j, :len(row_ids)] = row_ids
        p, end = mrope_positions(row_ids, grid, processor)
        pos[:, j, :len(row_ids)] = p
        nxt.append(end)
        if grid is not None:
            pvs.append(pv)
            grids.append(grid)
    for r, (_, part) in enumerate(bins):
        o = 0
        for b, j, row_ids, grid, pv in part:
            L, P = len(row_ids), starts[b][1]
            ids[n + r, o:o + L] = row_ids
            pos[:, n + r, o:o + L] = mrope_positions(row_ids, grid, processor, start=nxt[j])[0]
            seg[r, o:o + L], start[r, o:o + L] = j, o
            src[b, P:P + L] = (n + r) * T + o + torch.arange(L)
            if grid is not None:
                pvs.append(pv)
                grids.append(grid)
            o += L
    for b, (j, P) in starts.items():
        src[b, :P] = j * T + torch.arange(P)
    for b, b0 in copies:
        src[b] = src[b0]
    batch["shared"] = {"input_ids": ids, "position_ids": pos, "src": src,
                       "pixel_values": torch.cat(pvs) if pvs else None,
                       "image_grid_thw": torch.cat(grids) if grids else None,
                       "attention_mask": SharedPrompt(n, torch.tensor([len(p[0]) for p in prompts]), seg, start)}
    return batch


def _same_pixels(a, b):
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


# ----------------------------------------------------------------------------- log-probs

def forward_hidden(model, batch, past_key_values=None, use_cache=False):
    """Run the vision tower + decoder with our own positions; returns the model output whose
    last_hidden_state is (B, T, D). lm_head is applied by the caller, where it is needed only."""
    pv = batch.get("pixel_values")
    dtype = next(model.parameters()).dtype
    mask = batch.get("attention_mask")
    if isinstance(mask, SharedPrompt):
        if model.model.language_model.config._attn_implementation != SHARED_ATTN:
            raise ValueError("a collate_shared batch needs model.use_shared_prompt_attention(model) first")
        mask = {"full_attention": mask}  # a mapping: the decoder passes it through instead of building one
    return model.model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch["position_ids"],
                       pixel_values=None if pv is None else pv.to(dtype),
                       image_grid_thw=batch.get("image_grid_thw"),
                       past_key_values=past_key_values, use_cache=use_cache)


def policy_logits(lm_head, h, config):
    """fp32 next-token logits of hidden states h (N, D) -> (N, V), with the image and video
    placeholder tokens made impossible: they stand for pixels and must never be sampled. Rollout
    samples from these logits and training scores with them, so both see one distribution."""
    if h.device.type == "cpu" and (h.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        # On CPU (the tests' twin of a bf16 GPU run) the head runs in fp32: a bf16 GEMM with a
        # 151k-long inner dimension, the head's backward, takes 4.3 s there against 0.05 s in fp32.
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
    """log p(token_t | tokens_<t) for each position t of batch["input_ids"] (B, T); 0 at t=0.
    Only positions with loss_mask=1 are computed when the batch has a loss_mask (the rest are 0):
    lm_head runs over those tokens only, `chunk` at a time (default: 2^26 logits, 256 MB in fp32,
    441 tokens of Qwen's 151k vocabulary), with activation checkpointing under autograd, so fp32
    logits of the whole batch (B*T*V) never exist at once."""
    ids = batch["input_ids"]
    want = batch.get("loss_mask", torch.ones_like(ids)).bool().clone()
    want[:, 0] = False
    idx = want.nonzero(as_tuple=True)
    shared, targets, inv = batch.get("shared"), ids[idx], None  # targets (N,)
    if shared is None:
        h = forward_hidden(model, batch).last_hidden_state  # (B, T, D)
        hs = h[idx[0], idx[1] - 1]  # (N, D) the state that predicts token t
    else:  # a (state, target) pair that several items share (copies of a sample) goes through lm_head once
        h = forward_hidden(model, shared).last_hidden_state  # (n + m, T', D)
        V = model.lm_head.out_features
        key, inv = torch.unique(shared["src"][idx[0], idx[1] - 1] * V + targets, return_inverse=True)
        hs, targets = h.flatten(0, 1)[key // V], key % V
    chunk = chunk or max(1, min(1024, 2 ** 26 // model.lm_head.out_features))
    lps, ents = [], []
    for s in range(0, len(targets), chunk):
        args = (model.lm_head, hs[s:s + chunk], targets[s:s + chunk], temperature, model.config)
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    ent_out = torch.zeros_like(out)
    if lps:
        lp, ent = torch.cat(lps), torch.cat(ents).detach()
        if inv is not None:
            lp, ent = lp[inv], ent[inv]
        out = out.index_put(idx, lp)
        ent_out = ent_out.index_put(idx, ent)
    return (out, ent_out) if return_entropy else out


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """y = W x + (alpha/r) B A x, with B = 0 at start so the model is unchanged at initialisation.
    `enabled = False` gives the base layer alone: the LoRA run's KL reference is the policy itself."""

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


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, rank=8, alpha=16, targets=LORA_TARGETS):
    """Wrap the language model's linear layers named in `targets`; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    lm = model.model.language_model
    for name, mod in list(lm.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(mod, child_name, LoRALinear(child, rank, alpha))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"no linear layer named one of {targets} in the language model")
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """The base model, adapters off (the reference policy of a LoRA run, at no memory cost)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def _full(t):
    """A parameter as a plain tensor; under FSDP2 an all-gather (every rank must call it, in the same order)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def merged_state_dict(model):
    """The model's state dict in the original layout, LoRA folded into the base weights, every tensor
    fp32 (a bf16 W + dW would round most of a small LoRA delta away). A collective under FSDP2: each
    sharded tensor is gathered in turn; rank 0 returns the dict, other ranks None."""
    sd, first, main = {}, {}, _rank() == 0
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:  # a tied weight (lm_head = embed_tokens): one tensor under both names, so
            if main:        # that save_pretrained stores it once
                sd[k] = sd[first[id(v)]]
            continue
        first[id(v)] = k
        v = _full(v)
        if main:
            sd[k] = v.cpu().float() if v.is_floating_point() else v.cpu()
    if not main:
        return None
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            a, b = sd.pop(f"{name}.lora_A"), sd.pop(f"{name}.lora_B")
            sd[f"{name}.weight"] = sd.pop(f"{name}.base.weight") + (b @ a) * mod.scale
            if f"{name}.base.bias" in sd:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    return sd


# The adapter lives in a subfolder: transformers with peft installed attaches an adapter_config.json
# found beside config.json on top of the weights, which would apply the (already merged) LoRA twice.
ADAPTER_DIR, ADAPTER_FILE, ADAPTER_CONFIG = "adapter", "adapter_model.safetensors", "adapter_config.json"


def lora_adapter(model, base=None):
    """(tensors, config) of the LoRA factors in PEFT's layout (fp32), or None without LoRA; the
    exact form of a LoRA run's result (merged weights are its approximation in one file). A
    collective under FSDP2; rank 0 gets the tensors."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not mods:
        return None
    tensors = {}
    for name, m in mods:
        for k in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{name}.{k}.weight"] = _full(getattr(m, k)).float().cpu().contiguous()
    targets = sorted({n.rsplit(".", 1)[1] for n, _ in mods})
    config = {"peft_type": "LORA", "task_type": None, "r": mods[0][1].rank, "lora_alpha": mods[0][1].alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": str(base) if base else None,
              # a regex: the vision tower has gate/up/down_proj too, which our LoRA leaves alone
              "target_modules": rf".*language_model.*\.({'|'.join(targets)})"}
    return tensors, config


def load_adapter(model, path):
    """Load the PEFT-layout adapter of a checkpoint written by `save_checkpoint` (path/adapter/)
    into the LoRALinear layers of `model`."""
    f = Path(path) / ADAPTER_DIR / ADAPTER_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (the LoRA factors of the run)")
    tensors = load_file(str(f))
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
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
    """Atomic checkpoint: safetensors (fp32) + processor files + meta.json, and for a training run its
    train state and LoRA adapter, all written to a temporary folder beside `out_dir` and swapped in,
    so that weights, adapter and train state are one unit. A kill -9 at any moment leaves the old unit
    or the new one (`recover` finishes an interrupted swap). Files of out_dir that are not part of the
    unit (log.txt) are carried over. `state_dict`: a gathered full state dict (FSDP)."""
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
        _fsync_dir(tmp)
        _swap(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync_dir(d):
    for f in Path(d).rglob("*"):  # data on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _side(out_dir, what):
    return out_dir.with_name(f".{out_dir.name}.{what}")


def _swap(tmp, out_dir):
    """out_dir's side files (the log) -> .keep; out_dir -> .old; tmp -> out_dir; side files back.
    Every step is one rename, and `recover` knows how to finish from between any two."""
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


def recover(out_dir):
    """Finish a swap that a kill interrupted (run by rank 0 before anything reads out_dir): bring
    back the previous unit if the new one never arrived, drop the old one and unfinished temporary
    folders, and put the side files back."""
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


# ----------------------------------------------------------------------------- distributed, logs

def setup_dist():
    """From torchrun's environment (NCCL on CUDA, gloo on CPU), or one process.
    Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **kw):
    if is_main():
        print(*a, **kw, flush=True)


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header(args):
    """What every run writes first: its config, the versions it ran with and the git hash."""
    import transformers
    return {"argv": sys.argv, "config": vars(args) if hasattr(args, "__dict__") else args,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "git": git_hash(),
            "time": datetime.datetime.now().isoformat(timespec="seconds")}


class RunLog:
    """Append-only log file + stdout on rank 0. The first line is the run header (JSON)."""

    def __init__(self, path, args):
        self.path = Path(path)
        if is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a")
            self("# " + json.dumps(run_header(args), default=str))
        else:
            self.f = None

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


# ----------------------------------------------------------------------------- distributed training

class LogProbs(nn.Module):
    """token_logprobs as a module's forward. DDP synchronises gradients, and FSDP2 gathers the
    root's parameters, only for work done inside the wrapped module's forward; token_logprobs calls
    model.model and model.lm_head directly, so the wrappers go around this module instead."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, temperature=1.0, return_entropy=False):
        out = token_logprobs(self.model, batch, temperature, return_entropy=return_entropy)
        if not torch.is_grad_enabled():
            return out
        # A text-only micro-batch leaves a trainable vision tower without gradients, and one with no
        # token to score (an empty trajectory) leaves every parameter without, while another rank's
        # micro-batch may use them: DDP and FSDP2 would then reduce different sets of gradients on
        # different ranks, and backward() of a loss with no graph fails. A zero-valued term gives
        # every parameter left out a (zero) gradient.
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
    """-> a module w with w(batch, temperature=1.0, return_entropy=False) == token_logprobs(model, ...)
    whose gradients are averaged over ranks.
      ddp:  DistributedDataParallel, every rank holds the whole model.
      fsdp: FSDP2, `fully_shard` on each decoder block, then on the root (which keeps embeddings,
            lm_head, norms and the vision tower, so tied weights share a group); parameters are
            gathered in `dtype` (the compute precision), gradients reduced in fp32 into fp32 shards.
      none: no wrapper. Without an initialised process group every mode is "none".
    `unwrap(w)` gives back `model` (FSDP2 shards it in place: its parameters become DTensors)."""
    root = LogProbs(model)
    if mode == "none" or not dist.is_initialized():
        return root
    device = torch.device(device or next(model.parameters()).device)
    if mode == "ddp":
        # Every trainable parameter gets a gradient on every micro-batch (LogProbs gives a text-only
        # one's vision tower zero ones), so DDP needs no search for unused parameters, and forwards
        # need no buffer broadcast (the rotary tables are constants): the only collectives are the
        # backward's gradient all-reduces, which every rank runs in the same order.
        return DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False, broadcast_buffers=False)
    if mode == "fsdp":
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
        # Decoder blocks only: the vision tower stays in the root unit, gathered on every forward.
        # A vision block of its own would be gathered only by ranks whose micro-batch has images,
        # and a text-only micro-batch on another rank would then mismatch the collectives.
        for block in model.model.language_model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(root, mesh=mesh, mp_policy=mp)
        # FSDP2 decides which unit is the root at the first forward through it. The rollout calls
        # the decoder blocks directly (see `unsharded`), which would make a block a root of its own.
        root._get_fsdp_state()._lazy_init()
        return root
    raise ValueError(f"unknown wrap mode {mode!r} (ddp | fsdp | none)")


def unwrap(wrapped):
    """The Hugging Face model inside a `wrap` result (or the model itself)."""
    m = getattr(wrapped, "module", wrapped)  # DDP keeps it as .module
    return m.model if isinstance(m, LogProbs) else m


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def unsharded(wrapped):
    """Whole parameters on every rank, no collectives, for generation: ranks then decode different
    numbers of steps without deadlocking. Under FSDP2 every unit is all-gathered once (in the compute
    dtype) and kept gathered through its forwards (no reshard after forward), then resharded on exit.
    A no-op for DDP and single processes. Costs one full copy of the weights per rank while inside."""
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
    """Context for one micro-batch's backward: DDP skips its all-reduce while accumulating
    (enabled=False). FSDP2 reduce-scatters every micro-batch anyway: its gradients stay sharded,
    so accumulation costs no full-size gradient memory."""
    if not enabled and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm):
    """Clip to `max_norm` (<= 0: no clipping) and return the global gradient norm as a float;
    under FSDP2 the norm of the sharded gradients is reduced over ranks."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


def reduce(values, op="sum"):
    """Floats summed (op "sum") or maxed ("max") over ranks in one all-reduce; unchanged in one
    process. The one place that reduces across ranks: the tensor lives on the process group's
    device (NCCL serves CUDA tensors only, gloo CPU ones)."""
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


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- training checkpoints

def rng_states():
    import random
    import numpy as np
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s):
    import random
    import numpy as np
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(wrapped, processor, out_dir, meta, optimizer=None, scheduler=None, step=0, extra=None):
    """A training run's checkpoint, from any wrapping, as one atomic unit (`save`): the weights (FSDP2
    shards gathered, LoRA folded in), the PEFT adapter of a LoRA run, and the train state: optimizer
    (gathered from FSDP2 shards to rank 0), scheduler, every rank's RNG states, `step` (the data
    position) and `extra` (any picklable dict). A collective: every rank calls it; rank 0 writes."""
    model = unwrap(wrapped)
    sd = merged_state_dict(model)
    adapter = lora_adapter(model, meta.get("base"))
    state = None
    if optimizer is not None:
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            opt = get_optimizer_state_dict(wrapped, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt = optimizer.state_dict()
        rngs = [rng_states()]
        if dist.is_initialized():
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, rng_states())
        state = {"step": step, "optimizer": opt, "scheduler": scheduler.state_dict() if scheduler else None,
                 "rng": rngs, "extra": extra or {}}
    if _rank() == 0:
        save(model, processor, out_dir, dict(meta, step=step), state_dict=sd, train_state=state, adapter=adapter)
    barrier()
    return Path(out_dir)


def load_train_state(out_dir, optimizer, scheduler, model=None):
    """Restore what save_checkpoint wrote into `optimizer` and `scheduler` (built as for a fresh
    run, over the same parameters) and this rank's RNG states. Returns (step, extra). The file is
    memory-mapped: under FSDP2 only rank 0 reads the optimizer tensors and sends each rank its
    shard, so no rank holds a second full copy. A different world size keeps everything but RNG,
    which falls back to rank 0's, with a warning."""
    path = Path(out_dir) / TRAIN_STATE
    s = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # ours: numpy RNG state inside
    if model is not None and is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
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


# ----------------------------------------------------------------------------- CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tiny", help="build a tiny checkpoint in this folder and generate from it")
    g.add_argument("--check", help="load this checkpoint folder, render a conversation, generate")
    p.add_argument("--max_new_tokens", type=int, default=24)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    path = args.check
    if args.tiny:
        texts = ["<reason>I need to search.</reason><text_search>a query</text_search>",
                 "<information>Some result text.</information>", "<answer>Paris</answer>"] * 50
        path = build_tiny(args.tiny, texts)
    model, processor = load(path)
    from PIL import Image
    msgs = [{"role": "user", "content": "<image>\nWhat is shown?"}]
    r = render(processor, msgs, [Image.new("RGB", (56, 56), "red")], add_generation_prompt=True)
    b = to_device(collate([r], processor), model.device)
    out = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                         mm_token_type_ids=(b["input_ids"] == processor.image_token_id).int(),
                         max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"prompt tokens {b['input_ids'].shape[1]}, generated: "
          f"{processor.decode(out[0, b['input_ids'].shape[1]:].tolist())!r}")


if __name__ == "__main__":
    main()
