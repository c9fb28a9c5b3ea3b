"""A checkpoint laid out exactly like the hub's Qwen2.5-VL-3B-Instruct, with the real Qwen2 vocabulary
(tests/hub.py): tokenizer ids, loading under the hub's key names, rendering with the real ids, the
image-token cap, and a saved checkpoint that transformers reloads.

    python3 -m pip install --no-deps -r requirements-test.txt   # the vocabulary file, once
    python3 -m pytest -q tests/test_real_layout.py
"""
import json
import math

import pytest
import torch
from PIL import Image

import eval as E
import model as M
import rl
import rollout as R
import sft
import search as S
import tools as T
import training
from tests.conftest import template_messages, write_world
from tests.dist_entry import token_reward
from tests.test_sft import write_sft

# The real ids of the added tokens, in order: model.SPECIAL_TOKENS then the eight non-special ones.
ADDED = M.SPECIAL_TOKENS + ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                            "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
PHOTO, SMALL = Image.new("RGB", (1024, 768), "gray"), Image.new("RGB", (20, 30), "red")
CONV = [
    {"role": "user", "content": "<image>\n这是什么？ What is shown here?"},
    {"role": "assistant", "content": "<reason>I should search with the image.</reason><img_search><img></img_search>"},
    {"role": "user", "content": "<information>A grey card 🃏, from Orvale.</information>\n<image>\nAnd this one?"},
    {"role": "assistant", "content": "<reason>Both are from Orvale.</reason><answer>Orvale</answer>"},
]


@pytest.fixture(scope="module")
def hub(hub_dir):
    return M.load(hub_dir, log=None)


def v5_name(hub_key):
    """The hub file's key -> transformers 5's module name (what its loader converts it to)."""
    if hub_key.startswith("visual."):
        return "model." + hub_key
    return hub_key.replace("model.", "model.language_model.", 1)


def test_tokenizer_has_the_real_ids(hub):
    tok = hub[1].tokenizer
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert [tok.convert_tokens_to_ids(t) for t in ADDED] == list(range(151643, 151665))
    assert len(tok) == 151665 and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok.added_tokens_decoder[151645].special and not tok.added_tokens_decoder[151657].special
    text = "  Hello,  世界！ 你好吗？🎉👍🏽 tabs\tand\n\n  spaces   "
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_load_maps_every_hub_weight(hub_dir, hub):
    from safetensors import safe_open
    sd = hub[0].state_dict()
    written = {}
    for f in sorted(hub_dir.glob("model-*-of-*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            written.update({v5_name(k): sf.get_tensor(k) for k in sf.keys()})
    assert set(sd) == set(written) | {"lm_head.weight"}  # nothing missing, nothing unexpected
    for k, v in written.items():
        assert torch.equal(sd[k], v.float()), k
    assert hub[0].lm_head.weight.data_ptr() == hub[0].model.language_model.embed_tokens.weight.data_ptr()


def test_render_equals_official_template_with_real_ids(hub):
    proc = hub[1]
    r = M.render(proc, CONV, [PHOTO, SMALL])
    # What the real processor does: smart_resize to multiples of 28 within [3136, max_pixels], then one
    # token per 2x2 patches. 1024x768 -> 1036x756 (74x54 patches, 999 tokens); 20x30 is scaled up to
    # at least 3136 pixels -> 56x84 (4x6 patches, 6 tokens).
    assert r["image_grid_thw"].tolist() == [[1, 54, 74], [1, 6, 4]]
    text = proc.tokenizer.apply_chat_template(template_messages(CONV), tokenize=False)
    head, mid, tail = text.split("<|image_pad|>")
    ref = proc.tokenizer(head + "<|image_pad|>" * 999 + mid + "<|image_pad|>" * 6 + tail,
                         add_special_tokens=False)["input_ids"]
    assert r["input_ids"].tolist() == ref
    ids = r["input_ids"]
    assert (ids == 151655).sum() == 999 + 6 and (ids == 151644).sum() == 5 and (ids == 151645).sum() == 5
    assert ids[:3].tolist() == [151644, 8948, 198]  # <|im_start|> system \n, as the real model sees it


def test_max_pixels_caps_image_tokens(hub_dir, hub, tiny_dir):
    big = Image.new("RGB", (2048, 1536), "blue")
    assert hub[1].image_processor.size.longest_edge == 1280 * 28 * 28  # the hub's 12,845,056, capped
    _, grid = hub[1].images([big])
    assert hub[1].n_image_tokens(grid[0]) <= 1280
    small = M.Processor.from_pretrained(hub_dir, max_pixels=256 * 28 * 28)
    _, grid = small.images([big])
    assert small.n_image_tokens(grid[0]) <= 256
    assert M.Processor.from_pretrained(tiny_dir).image_processor.size.longest_edge == 224 * 224  # kept


def test_saved_checkpoint_reloads_in_transformers(hub, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, proc = hub
    training.save(model, proc, tmp_path / "ck", {"step": 0})
    m2, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ck", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd, sd2 = model.state_dict(), m2.state_dict()
    assert set(sd) == set(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k].to(sd[k].dtype)), k


# ----------------------------------------------------------------------------- the pipeline on it

def test_rollout_in_bf16_with_tools(hub, tmp_path):
    model, proc = hub
    d = write_world(tmp_path)
    qs = T.load_questions(d / "rl.jsonl")[:2]
    trajs = R.rollout(model, proc, S.make_tools(str(d)), qs, group_size=2, temperature=1.0, seed=0,
                      max_turns=2, max_new_tokens=6, dtype=torch.bfloat16)
    assert len(trajs) == 4 and all(t.finish for t in trajs)
    for t in trajs:
        assert len(t.token_ids) == len(t.loss_mask) == len(t.logprobs) and t.gen_tokens > 0
        assert all(math.isfinite(x) for x in t.logprobs)
        assert max(t.token_ids) < model.config.text_config.vocab_size


@pytest.fixture(scope="module")
def hub_sft(hub_dir, tmp_path_factory):
    """Two SFT steps with LoRA in bf16 from the hub-layout folder: a checkpoint and its world."""
    d = write_world(tmp_path_factory.mktemp("hubworld"))
    data = write_sft(d, 4)
    out = d / "sft"
    sft.main(["--model", str(hub_dir), "--data", str(data), "--out", str(out), "--lora_rank", "4",
              "--precision", "bf16", "--max_steps", "2", "--batch_size", "2", "--micro_batch", "1",
              "--eval_n", "0", "--agent_eval_n", "0", "--freeze_vision"])
    return d, out


def test_sft_lora_checkpoint_reloads_in_transformers_with_its_adapter(hub_dir, hub_sft):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, out = hub_sft
    log = (out / "log.txt").read_text()
    assert "compute torch.bfloat16" in log and "step 2/2" in log
    m, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert m.dtype == torch.float32  # merged weights are written in fp32
    cfg = json.loads((out / training.ADAPTER_DIR / training.ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(hub_dir)
    base, proc = M.load(hub_dir, dtype=torch.bfloat16, log=None)
    training.add_lora(base, rank=4, alpha=16)
    training.load_adapter(base, out)
    assert any(p.abs().sum() > 0 for n, p in base.named_parameters() if "lora_B" in n)  # it trained


def test_one_rl_step_from_the_sft_checkpoint(hub_sft, monkeypatch):
    d, sft_out = hub_sft
    monkeypatch.setattr(rl, "reward", token_reward)  # an untrained model never answers right
    rl.main(["--ckpt", str(sft_out), "--data", str(d), "--out", str(d / "rl"), "--steps", "1", "--batch", "2",
             "--group", "2", "--mini_batch", "4", "--micro_batch", "2", "--max_turns", "2", "--max_new_tokens", "6",
             "--lora_rank", "4", "--precision", "bf16", "--grad_ckpt"])
    log = (d / "rl" / "log.txt").read_text()
    assert "reference adapters off" in log and "step    1 |" in log and "gnorm 0.00" not in log
    assert (d / "rl" / training.ADAPTER_DIR / training.ADAPTER_FILE).is_file() and (d / "rl" / training.TRAIN_STATE).is_file()


def test_eval_of_two_questions(hub_sft, tmp_path):
    d, sft_out = hub_sft
    E.main(["--questions", str(d / "rl.jsonl"), "--data", str(d), "--ckpt", str(sft_out), "--limit", "2",
            "--modes", "agent", "--max_turns", "2", "--max_new_tokens", "6", "--out", str(tmp_path), "--no_progress"])
    assert len(T.read_jsonl(tmp_path / "trajectories.jsonl")) == 2
