"""A test checkpoint laid out exactly like the hub's Qwen/Qwen2.5-VL-3B-Instruct, with the real Qwen2
vocabulary and random weights of toy size.

What real users load is a hub download: a flat config.json (the pre-v5 layout that transformers 5
converts), sharded safetensors under the old key names (`model.layers.N`, `visual.blocks.N`, no
`lm_head.weight` since the embeddings are tied), Qwen2's 151,643-token byte-level BPE plus 22 added
tokens, and the processor files. Our tiny checkpoint (make_data.build_tiny) is written by our own code
and so cannot catch a mismatch with that layout; this one can.

The BPE ranks come from `qwen_agent/utils/qwen.tiktoken` (pip install --no-deps -r requirements-test.txt):
the same ranks as Qwen2/Qwen2.5's vocab.json, in tiktoken's format. qwen_agent itself is never
imported (its dependencies are not installed); we only read that file.
"""
import base64
import importlib.util
import json
from pathlib import Path

import torch

import model as M

# Qwen2's pre-tokenizer split (a fact of the released tokenizer.json)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The published Qwen2.5-VL-3B-Instruct config.json (transformers_version 4.41.2), every field kept;
# the sizes are shrunk to TOY's.
HUB_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# preprocessor_config.json and generation_config.json as the hub's (the Instruct checkpoints').
HUB_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

HUB_GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 1e-06,
    "transformers_version": "4.49.0",
}

# Toy sizes: 2 decoder layers of 2 heads of the real head size, 128 (mrope_section [16, 24, 24] needs it),
# and a vision tower of 2 blocks (windowed attention, then full).
TOY = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
       "intermediate_size": 512}
TOY_VISION = {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256, "out_hidden_size": 256,
              "fullatt_block_indexes": [1]}

BPE_SIZE = 151643  # ordinary tokens; the added ones start here
# The added tokens after model.SPECIAL_TOKENS, in id order (151657...). Unlike those, the real
# tokenizer marks them special=False: they are ordinary text that is never split.
EXTRA_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def qwen_tiktoken_file():
    """Path of qwen_agent's qwen.tiktoken, or None. find_spec locates the package without importing it."""
    spec = importlib.util.find_spec("qwen_agent")
    for d in (spec.submodule_search_locations or []) if spec else []:
        f = Path(d) / "utils" / "qwen.tiktoken"
        if f.is_file():
            return f
    return None


# ----------------------------------------------------------------------------- tokenizer

def qwen_tokenizer(tiktoken_file):
    """The real Qwen2 tokenizer as a `tokenizers.Tokenizer`, through transformers' own tiktoken converter."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenTikToken(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):  # the `tiktoken` package is not installed; each line is `base64(bytes) rank`
            ranks = {}
            for line in Path(path).read_bytes().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            return ranks

    tok = QwenTikToken(str(tiktoken_file), pattern=QWEN_SPLIT).converted()
    assert tok.get_vocab_size() == BPE_SIZE, f"{tiktoken_file}: {tok.get_vocab_size()} ranks, expected {BPE_SIZE}"
    # as in the hub's tokenizer.json (the converter leaves out the normalizer and sets another post-processor)
    tok.normalizer = normalizers.NFC()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_tokens([AddedToken(t, special=t in M.SPECIAL_TOKENS, normalized=False)
                    for t in M.SPECIAL_TOKENS + EXTRA_TOKENS])
    return tok


def tokenizer_config(template):
    added = {str(BPE_SIZE + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": t in M.SPECIAL_TOKENS}
             for i, t in enumerate(M.SPECIAL_TOKENS + EXTRA_TOKENS)}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
            "additional_special_tokens": M.SPECIAL_TOKENS[1:], "bos_token": None, "chat_template": template,
            "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
            "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def write_tokenizer(out_dir, tiktoken_file):
    """tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, chat_template.json."""
    tok = qwen_tokenizer(tiktoken_file)
    tok.save(str(out_dir / "tokenizer.json"))
    bpe = json.loads(tok.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    template = M.chat_template_text()
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(template))
    _write_json(out_dir / "chat_template.json", {"chat_template": template})


# ----------------------------------------------------------------------------- weights

def hub_key(name):
    """transformers 5 module name -> the hub file's key (the pre-v5 layout, converted back on load)."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def write_weights(out_dir, model, shards=2):
    """bf16 safetensors shards + model.safetensors.index.json, under the hub's key names."""
    from safetensors.torch import save_file
    sd = {hub_key(k): v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}  # tied: stored once
    total = sum(v.numel() * v.element_size() for v in sd.values())
    groups, size = [[] for _ in range(shards)], 0
    for k, v in sd.items():  # fill shards in key order, about total/shards bytes each
        groups[min(size * shards // total, shards - 1)].append(k)
        size += v.numel() * v.element_size()
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# ----------------------------------------------------------------------------- checkpoint

def build_hub_checkpoint(out_dir):
    """Write a random Qwen2.5-VL checkpoint in the hub's layout at TOY size to `out_dir` and return it (about
    10 s on CPU, most of it the tokenizer's 151,643 ranks)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tiktoken_file = qwen_tiktoken_file()
    if tiktoken_file is None:
        raise FileNotFoundError("qwen_agent/utils/qwen.tiktoken not found: "
                                "pip install --no-deps -r requirements-test.txt")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(HUB_CONFIG))  # a deep copy
    config.update(TOY)
    config["vision_config"].update(TOY_VISION)
    _write_json(out_dir / "config.json", config)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(out_dir))
    write_weights(out_dir, model)
    write_tokenizer(out_dir, tiktoken_file)
    _write_json(out_dir / "generation_config.json", HUB_GENERATION)
    _write_json(out_dir / "preprocessor_config.json", HUB_PREPROCESSOR)
    return out_dir


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
