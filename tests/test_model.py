"""model.py: rendering and loss masks, positions, log-probs, save/load, LoRA, KV-cache chunks."""
import json
import shutil

import pytest
import torch
from PIL import Image

import make_data as D
import model as M
import training
from tests.conftest import TINY_TEXTS, template_messages

RED, BLUE = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 112), "blue")
ASSISTANT = [
    "<reason>I need to identify the object.</reason><img_search><img></img_search>",
    "<reason>The object is Kessin Valor.</reason><text_search>Kessin Valor founded</text_search>",
    "<reason>It was founded in 1843.</reason><answer>1843</answer>",
]
CONV = [
    {"role": "user", "content": "<image>\nWhen was this founded?"},
    {"role": "assistant", "content": ASSISTANT[0]},
    {"role": "user", "content": "<information>Kessin Valor: a star.</information>\n<image>\nSearch more."},
    {"role": "assistant", "content": ASSISTANT[1]},
    {"role": "user", "content": "<information>Kessin Valor was founded in 1843.</information>\nAnswer."},
    {"role": "assistant", "content": ASSISTANT[2]},
]


def test_text_equals_chat_template(tiny):
    _, proc = tiny
    text, _ = M.conversation_text(CONV)
    assert text == proc.tokenizer.apply_chat_template(template_messages(CONV), tokenize=False)
    text, _ = M.conversation_text(CONV[:1], add_generation_prompt=True)
    ref = proc.tokenizer.apply_chat_template(template_messages(CONV[:1]), tokenize=False,
                                             add_generation_prompt=True)
    assert text == ref


def test_tokens_equal_template_and_processor(tiny):
    _, proc = tiny
    r = M.render(proc, CONV, [RED, BLUE])
    # The processor's rule, written independently: each image's single pad becomes t*h*w/4 pads.
    text = proc.tokenizer.apply_chat_template(template_messages(CONV), tokenize=False)
    grids = proc.image_processor(images=[RED, BLUE], return_tensors="pt")["image_grid_thw"]
    head, mid, tail = text.split("<|image_pad|>")
    n = [int(g.prod()) // 4 for g in grids]
    ref = proc.tokenizer(head + "<|image_pad|>" * n[0] + mid + "<|image_pad|>" * n[1] + tail,
                         add_special_tokens=False)["input_ids"]
    assert r["input_ids"].tolist() == ref
    assert (r["input_ids"] == proc.image_token_id).sum().item() == sum(n) == 4 + 12
    assert torch.equal(r["image_grid_thw"], grids)
    sized = M.render(proc, CONV, [RED, BLUE], pixels=False)  # grids from the images' sizes alone (sft's scan)
    assert torch.equal(sized["input_ids"], r["input_ids"]) and torch.equal(sized["image_grid_thw"], grids)


def test_loss_mask_exact(tiny):
    _, proc = tiny
    r = M.render(proc, CONV, [RED, BLUE])
    ids, mask = r["input_ids"], r["loss_mask"]
    # Masked tokens are exactly the three assistant contents, each followed by its <|im_end|>.
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    assert len(runs) == 3
    for run, content in zip(runs, ASSISTANT):
        assert run == proc.encode(content) + [proc.im_end_id]
    # Each run starts right after "<|im_start|>assistant\n" and nothing else is trained.
    header = proc.encode("<|im_start|>assistant\n")
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    for s in starts:
        assert ids[s - len(header):s].tolist() == header
    assert mask.sum().item() == sum(len(proc.encode(c)) + 1 for c in ASSISTANT)
    assert mask[ids == proc.image_token_id].sum() == 0
    info = proc.encode("<information>")
    for i in range(len(ids) - len(info)):
        if ids[i:i + len(info)].tolist() == info:
            assert mask[i] == 0


def test_mrope_positions_match_transformers(tiny):
    model, proc = tiny
    r = M.render(proc, CONV, [RED, BLUE])
    ids = r["input_ids"][None]
    ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == proc.image_token_id).int(),
                                        image_grid_thw=r["image_grid_thw"])
    ours, _ = M.mrope_positions(r["input_ids"], r["image_grid_thw"], proc)
    assert torch.equal(ours, ref[:, 0])


def test_kv_cache_two_chunks_with_new_image_equals_full_forward(tiny):
    model, proc = tiny
    r = M.render(proc, CONV, [RED, BLUE])
    ids, grids, pv = r["input_ids"], r["image_grid_thw"], r["pixel_values"]
    pos, _ = M.mrope_positions(ids, grids, proc)
    with torch.no_grad():
        full = model(input_ids=ids[None], position_ids=pos[:, None], pixel_values=pv,
                     image_grid_thw=grids).logits[0]
        # Split right after the first assistant turn: the second chunk holds the second image.
        cut = (ids == proc.im_end_id).nonzero().flatten()[2].item() + 1
        n1 = int(grids[0].prod())  # patches of image 1
        pos1, nxt = M.mrope_positions(ids[:cut], grids[:1], proc)
        out1 = model(input_ids=ids[None, :cut], position_ids=pos1[:, None], pixel_values=pv[:n1],
                     image_grid_thw=grids[:1], use_cache=True)
        pos2, _ = M.mrope_positions(ids[cut:], grids[1:], proc, start=nxt)
        out2 = model(input_ids=ids[None, cut:], position_ids=pos2[:, None], pixel_values=pv[n1:],
                     image_grid_thw=grids[1:], past_key_values=out1.past_key_values, use_cache=True)
    chunked = torch.cat([out1.logits[0], out2.logits[0]])
    assert torch.allclose(chunked, full, atol=1e-5), (chunked - full).abs().max()


def test_token_logprobs_match_full_softmax(tiny):
    model, proc = tiny
    items = [M.render(proc, CONV, [RED, BLUE]), M.render(proc, CONV[:2], [RED])]
    b = M.collate(items, proc)
    with torch.no_grad():
        lp = M.token_logprobs(model, b, temperature=0.7, chunk=7)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"], pixel_values=b["pixel_values"],
                       image_grid_thw=b["image_grid_thw"]).logits
    logits[..., [proc.image_token_id, model.config.video_token_id]] = float("-inf")  # never sampled
    ref = torch.log_softmax(logits.float() / 0.7, -1)[:, :-1].gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    m = b["loss_mask"][:, 1:].bool()
    assert torch.allclose(lp[:, 1:][m], ref[m], atol=1e-5)
    assert (lp[:, 1:][~m] == 0).all() and (lp[:, 0] == 0).all()


def test_save_load_identical_logits(tiny, tmp_path):
    model, proc = tiny
    training.save(model, proc, tmp_path / "ck", {"step": 3})
    m2, p2 = M.load(tmp_path / "ck", log=None)
    b = M.collate([M.render(proc, CONV, [RED, BLUE])], proc)
    with torch.no_grad():
        a = M.token_logprobs(model, b)
        c = M.token_logprobs(m2, b)
    assert torch.equal(a, c)
    assert json.loads((tmp_path / "ck" / "meta.json").read_text())["step"] == 3
    assert p2.tokenizer.chat_template == proc.tokenizer.chat_template
    assert not list(tmp_path.glob(".ck*"))  # no temporary folder left behind


def test_missing_or_corrupt_files_are_named(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    data = (tiny_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError, match="model.safetensors"):
        M.load(bad, log=None)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        M.load(bad, log=None)
    shutil.copy(tiny_dir / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        M.load(bad, log=None)
    shutil.copy(tiny_dir / "config.json", bad / "config.json")
    (bad / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        M.load(bad, log=None)


def test_lora_init_unchanged_and_only_lora_trains(tiny_dir):
    model, proc = M.load(tiny_dir, log=None)
    b = M.collate([M.render(proc, CONV, [RED, BLUE])], proc)
    with torch.no_grad():
        before = M.token_logprobs(model, b)
    training.add_lora(model, rank=4, alpha=8)
    after = M.token_logprobs(model, b)
    assert torch.allclose(before, after, atol=1e-6)
    (-(after * b["loss_mask"]).sum()).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    # Merged on save: the saved checkpoint is a plain model with the same outputs.
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    sd = training.merged_state_dict(model)
    assert not any("lora_" in k or ".base." in k for k in sd)
    plain, _ = M.load(tiny_dir, log=None)
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert torch.allclose(M.token_logprobs(model, b), M.token_logprobs(plain, b), atol=1e-5)


def test_tiny_generates_with_model_generate(tiny):
    model, proc = tiny
    r = M.render(proc, CONV[:1], [RED], add_generation_prompt=True)
    b = M.collate([r], proc)
    out = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                         mm_token_type_ids=(b["input_ids"] == proc.image_token_id).int(),
                         max_new_tokens=5, do_sample=False)
    assert out.shape == (1, b["input_ids"].shape[1] + 5)


def test_build_tiny_deterministic(tmp_path):
    a = D.build_tiny(tmp_path / "a", TINY_TEXTS, seed=1, vocab_size=400)
    b = D.build_tiny(tmp_path / "b", TINY_TEXTS, seed=1, vocab_size=400)
    for f in ("model.safetensors", "tokenizer.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_shipped_template_is_the_reference():
    ref = M.HERE.parent / "shared" / "reference" / M.CHAT_TEMPLATE_FILE
    if not ref.is_file():
        pytest.skip("../shared/reference is not beside this checkout")
    assert M.chat_template_text() == ref.read_text()


def test_copy_warmup_trains_copying(tiny_dir):
    model, proc = M.load(tiny_dir, log=None)
    special = {proc.tokenizer.convert_tokens_to_ids(t) for t in M.SPECIAL_TOKENS}
    ids = torch.tensor([i for i in range(len(proc.tokenizer)) if i not in special])
    seq = ids[torch.randint(len(ids), (8, 6), generator=torch.Generator().manual_seed(1))]
    x = torch.cat([seq, torch.full((8, 1), int(ids[0])), seq], 1)
    mask = torch.zeros_like(x)
    mask[:, 7:] = 1
    b = {"input_ids": x, "position_ids": torch.arange(13).view(1, 1, 13).expand(3, 8, 13),
         "attention_mask": torch.ones_like(x), "loss_mask": mask}

    def copy_loss():
        with torch.no_grad():
            return -(M.token_logprobs(model, b) * mask).sum().item() / mask.sum().item()
    before = copy_loss()
    D.copy_warmup(model, ids.tolist(), steps=60, seed=0)
    assert copy_loss() < before - 0.3 and not model.training


def test_tiny_tokens_of_a_name_are_the_same_on_a_page_and_in_an_action():
    texts = TINY_TEXTS + ["Bunork Bubus is made by Vukuk Brillan.", "<answer>Vukuk Brillan</answer>",
                          "It was founded in 1894.", "<answer>1894</answer>"] * 20
    tok = D.train_tokenizer(texts, 400)

    def pieces(text):
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    name, year = pieces("Vukuk Brillan"), pieces("1894")
    assert len(year) == 1
    for text, part in [("made by Vukuk Brillan.", name), ("<answer>Vukuk Brillan</answer>", name),
                       ("<text_search>Vukuk Brillan maker</text_search>", name),
                       ("founded in 1894.", year), ("<answer>1894</answer>", year)]:
        got = pieces(text)
        assert any(got[i:i + len(part)] == part for i in range(len(got))), (text, got, part)


def test_caption_warmup_trains_seeing(tiny_dir):
    model, proc = M.load(tiny_dir, log=None)
    pairs = [(Image.new("RGB", (56, 56), c), f"A {c} square.") for c in ("red", "blue", "green", "black")]
    b = M.collate([M.render(proc, [{"role": "user", "content": M.IMAGE + D.CAPTION_PROMPT},
                                   {"role": "assistant", "content": t}], [im]) for im, t in pairs], proc)

    def loss():
        with torch.no_grad():
            return -(M.token_logprobs(model, b) * b["loss_mask"]).sum().item() / b["loss_mask"].sum().item()
    before = loss()
    D.caption_warmup(model, proc, pairs, steps=30, seed=0, batch=4)
    assert loss() < before - 1.0 and not model.training


def test_default_checkpoint_is_the_latest_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="make_data"):
        M.default_checkpoint()
    for stage in ("data/tiny", "out/sft", "out/rl"):
        (tmp_path / stage).mkdir(parents=True)
        (tmp_path / stage / "config.json").write_text("{}")
        assert M.default_checkpoint() == stage
