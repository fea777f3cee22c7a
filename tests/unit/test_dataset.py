"""Unit tests for megatron_guided.data.dataset (row loading, validation, prompts, filtering)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_guided.config import DataConfig
from megatron_guided.data.dataset import (
    DataError,
    PromptDataset,
    PromptSample,
    build_prompt_dataset,
    load_rows,
    reconcile_image_placeholders,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Char-level WordLevel tokenizer over printable ASCII + newline, ChatML chat template."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    hf = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token="[UNK]",
                                 extra_special_tokens=["<|im_start|>"],
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHATML
    return hf


def chatml(user: str, system: str | None = None) -> str:
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return out + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def cfg(**kw) -> DataConfig:
    kw.setdefault("max_prompt_length", 512)
    return DataConfig(**kw)


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def png(path, color=(255, 0, 0), size=(4, 3)):
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(color=(0, 255, 0), size=(2, 2)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [
    {"problem": "Compute (1+2)-3.", "answer": "0", "solution": "Step 1: 1+2=3", "steps": 3},
    {"problem": "Compute 4+5.", "answer": "9"},
    {"problem": "Compute 7-1.", "answer": "6"},
]


# ------------------------------------------------------------------------------------ formats

def test_jsonl_basic_prompt_and_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ds = build_prompt_dataset(str(path), cfg(), tok)
    assert isinstance(ds, PromptDataset) and len(ds) == 3
    s = ds[0]
    assert isinstance(s, PromptSample)
    assert s.index == 0 and s.source == f"{path}:1"
    assert s.messages == [{"role": "user", "content": "Compute (1+2)-3."}]
    assert tok.decode(s.prompt_ids) == chatml("Compute (1+2)-3.")
    assert s.ground_truth == "0" and s.images == []
    assert s.extra == {"solution": "Step 1: 1+2=3", "steps": 3}
    assert [x.index for x in ds] == [0, 1, 2]
    assert ds.stats.rows_read == 3 and ds.stats.rows_kept == 3
    assert ds.stats.rows_skipped_bad == 0 and ds.stats.rows_filtered_too_long == 0


def test_batched_ids_match_apply_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    c = cfg(system_prompt="Be brief.")
    for s in build_prompt_dataset(str(path), c, tok):
        ref = tok.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert s.prompt_ids == list(ref)


def test_load_rows_row_numbers_skip_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    got = list(load_rows(str(path)))
    assert [(n, i) for n, i, _ in got] == [(str(path), 1), (str(path), 3)]
    assert got[1][2] == ROWS[1]


def test_json_list(tmp_path, tok):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS))
    ds = build_prompt_dataset(str(path), cfg(), tok)
    assert [s.ground_truth for s in ds] == ["0", "9", "6"]
    assert ds[1].source == f"{path}:1"  # 0-based index for non-jsonl


def test_json_lines_named_json(tmp_path, tok):
    path = write_jsonl(tmp_path / "exported.json", ROWS)  # datasets' to_json default
    assert len(build_prompt_dataset(str(path), cfg(), tok)) == 3


def test_json_not_a_list_errors(tmp_path, tok):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match=r"bad\.json.*list of row objects.*'rows'"):
        build_prompt_dataset(str(path), cfg(), tok)


def test_parquet(tmp_path, tok):
    path = write_parquet(tmp_path / "train.parquet", ROWS[1:])
    ds = build_prompt_dataset(str(path), cfg(), tok)
    assert [s.ground_truth for s in ds] == ["9", "6"]
    assert ds[0].source == f"{path}:0"
    assert tok.decode(ds[1].prompt_ids) == chatml("Compute 7-1.")


def test_folder_sorted_and_split(tmp_path, tok):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [ROWS[1]])
    (folder / "a.json").write_text(json.dumps([ROWS[0]]))
    write_parquet(folder / "c.parquet", [ROWS[2]])
    (folder / "notes.txt").write_text("not data")
    ds = build_prompt_dataset(str(folder), cfg(), tok)
    assert [s.ground_truth for s in ds] == ["0", "9", "6"]

    hf = tmp_path / "hf"
    (hf / "data").mkdir(parents=True)
    write_parquet(hf / "data" / "train-00000-of-00001.parquet", ROWS[:2])
    write_parquet(hf / "data" / "test-00000-of-00001.parquet", ROWS[2:])
    assert [s.ground_truth for s in build_prompt_dataset(f"{hf}/data@train", cfg(), tok)] == ["0", "9"]
    assert [s.ground_truth for s in build_prompt_dataset(f"{hf}/data@test", cfg(), tok)] == ["6"]
    with pytest.raises(DataError, match="split 'validation'"):
        build_prompt_dataset(f"{hf}/data@validation", cfg(), tok)


def test_empty_folder_errors(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl/.json/.parquet files"):
        build_prompt_dataset(str(tmp_path / "empty"), cfg(), tok)


def test_save_to_disk_dataset_and_dict(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list(ROWS[1:]).save_to_disk(str(tmp_path / "single"))
    ds = build_prompt_dataset(str(tmp_path / "single"), cfg(), tok)
    assert [s.ground_truth for s in ds] == ["9", "6"]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train = build_prompt_dataset(f"{tmp_path / 'dd'}@train", cfg(), tok)
    assert [s.ground_truth for s in train] == ["0", "9"]
    assert train[1].source == f"{tmp_path / 'dd'}@train:1"
    test = build_prompt_dataset(f"{tmp_path / 'dd'}@test", cfg(), tok)
    assert [s.ground_truth for s in test] == ["6"]
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]"):
        build_prompt_dataset(str(tmp_path / "dd"), cfg(), tok)
    with pytest.raises(DataError, match="no split 'dev'"):
        build_prompt_dataset(f"{tmp_path / 'dd'}@dev", cfg(), tok)


def test_comma_separated_specs(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = write_parquet(tmp_path / "b.parquet", ROWS[1:])
    ds = build_prompt_dataset(f"{a}, {b}", cfg(), tok)
    assert [s.ground_truth for s in ds] == ["0", "9", "6"]
    assert [s.index for s in ds] == [0, 1, 2]


def test_missing_path_errors(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl") as info:
        build_prompt_dataset(str(missing), cfg(), tok)
    assert "hub" not in str(info.value)
    with pytest.raises(DataError, match="nope.jsonl"):  # also a DataError (ValueError)
        list(load_rows(f"{a},{missing}"))
    with pytest.raises(FileNotFoundError, match="hub datasets are not downloaded"):
        build_prompt_dataset("hiyouga/geometry3k@train", cfg(), tok)


# ------------------------------------------------------------------------------ keys, answers

def test_custom_keys_and_numeric_answers(tmp_path, tok):
    rows = [{"question": "What is 2+2?", "label": 4},
            {"question": "Half of 5?", "label": 2.5},
            {"question": "Three?", "label": 3.0}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    ds = build_prompt_dataset(str(path), cfg(prompt_key="question", answer_key="label"), tok)
    assert [s.ground_truth for s in ds] == ["4", "2.5", "3"]
    assert all(isinstance(s.ground_truth, str) for s in ds)
    assert ds[0].messages[-1]["content"] == "What is 2+2?" and ds[0].extra == {}


def test_system_and_format_prompt_exact(tmp_path, tok):
    tmpl = tmp_path / "math.jinja"
    tmpl.write_text("{{ content | trim }} Put the final answer in \\boxed{}.\n")
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "  Compute 4+5. ", "answer": 9}])
    c = cfg(system_prompt="You are a careful solver.", format_prompt=str(tmpl))
    s = build_prompt_dataset(str(path), c, tok)[0]
    user = "Compute 4+5. Put the final answer in \\boxed{}."
    assert s.messages == [{"role": "system", "content": "You are a careful solver."},
                          {"role": "user", "content": user}]
    assert tok.decode(s.prompt_ids) == chatml(user, system="You are a careful solver.")


def test_missing_format_prompt_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match=r"data\.format_prompt=.*nope\.jinja"):
        build_prompt_dataset(str(path), cfg(format_prompt=str(tmp_path / "nope.jinja")), tok)


def test_overlong_filtered_and_logged_once(tmp_path, tok, caplog):
    rows = [{"problem": "x" * n, "answer": "1"} for n in (5, 40, 10, 80, 3)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    limit = len(tok(chatml("x" * 10), add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.INFO, logger="megatron_guided.data.dataset"):
        ds = build_prompt_dataset(str(path), cfg(max_prompt_length=limit), tok)
    assert len(ds) == 3 and ds.stats.rows_filtered_too_long == 2
    assert [s.source for s in ds] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert [s.index for s in ds] == [0, 1, 2]
    assert max(len(s.prompt_ids) for s in ds) == limit
    drops = [r.getMessage() for r in caplog.records if "prompts longer than" in r.getMessage()]
    assert len(drops) == 1
    assert f"dropped 2 of 5 prompts longer than data.max_prompt_length={limit}" in drops[0]
    assert sum("loaded 3 prompts" in r.getMessage() for r in caplog.records) == 1


def test_everything_filtered_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(DataError, match="no prompts left"):
        build_prompt_dataset(str(path), cfg(max_prompt_length=4), tok)


# ------------------------------------------------------------------------------- bad rows

@pytest.mark.parametrize("row, pattern", [
    ({"question": "q", "answer": "1"},
     r"t\.jsonl:2: missing key 'problem' \(data\.prompt_key\); row keys: \['question', 'answer'\]"),
    ({"problem": "q"}, r"t\.jsonl:2: missing key 'answer' \(data\.answer_key\)"),
    ({"problem": 5, "answer": "1"}, r"t\.jsonl:2: key 'problem' \(data\.prompt_key\) must be a string"),
    ({"problem": "q", "answer": ["1", "2"]}, r"t\.jsonl:2: key 'answer' \(data\.answer_key\) must be"),
    ({"problem": "q", "answer": None}, r"t\.jsonl:2: key 'answer'"),
    ({"problem": "q", "answer": "1", "images": ["missing.png"]},
     r"t\.jsonl:2: key 'images' \(data\.image_key\).*missing\.png"),
    ([1, 2], r"t\.jsonl:2: row must be an object"),
])
def test_malformed_row_errors(tmp_path, tok, row, pattern):
    path = write_jsonl(tmp_path / "t.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=pattern):
        build_prompt_dataset(str(path), cfg(), tok)


def test_bad_json_line_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS[:2], raw_lines=['{"problem": "oops"'])
    with pytest.raises(DataError, match=r"t\.jsonl:3: invalid JSON"):
        list(load_rows(str(path)))
    with pytest.raises(DataError, match=r"t\.jsonl:3: invalid JSON"):
        build_prompt_dataset(str(path), cfg(), tok)


def test_skip_bad_rows_counts(tmp_path, tok, caplog):
    rows = [ROWS[0], {"question": "q", "answer": "1"}, ROWS[1], {"problem": "q"},
            {"problem": "q", "answer": "1", "images": ["gone.png"]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows, raw_lines=["not json", json.dumps(ROWS[2])])
    with caplog.at_level(logging.INFO, logger="megatron_guided.data.dataset"):
        ds = build_prompt_dataset(str(path), cfg(skip_bad_rows=True), tok)
    assert [s.ground_truth for s in ds] == ["0", "9", "6"]
    assert ds[2].source == f"{path}:7"
    st = ds.stats
    assert st.rows_read == 7 and st.rows_skipped_bad == 4 and st.rows_kept == 3
    assert len(st.bad_row_reasons) == 4
    assert "t.jsonl:2: missing key 'problem'" in st.bad_row_reasons[0]
    assert "t.jsonl:6: invalid JSON" in st.bad_row_reasons[3]
    summary = [r.getMessage() for r in caplog.records if "loaded 3 prompts" in r.getMessage()]
    assert len(summary) == 1 and "skipped 4 malformed" in summary[0]


# -------------------------------------------------------------------------------- images

def test_reconcile_function():
    assert reconcile_image_placeholders("abc", 2) == ("<image><image>abc", True)
    assert reconcile_image_placeholders("<image>a<image>b<image>c", 1) == ("<image>abc", True)
    assert reconcile_image_placeholders("a<image>b", 2) == ("<image>a<image>b", True)
    assert reconcile_image_placeholders("<image>a", 1) == ("<image>a", False)
    assert reconcile_image_placeholders("see <image>", 0) == ("see <image>", False)


class FakeProcessor:
    """Minimal multimodal processor: renders list content, expands each image to w*h pad tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def encode_prompt(self, messages, images):
        self.calls += 1
        out = ""
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = "".join("<IMG>" if p["type"] == "image" else p["text"] for p in content)
            out += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
        pieces = (out + "<|im_start|>assistant\n").split("<IMG>")
        assert len(pieces) - 1 == len(images)
        expanded = pieces[0]
        for img, piece in zip(images, pieces[1:]):
            expanded += "#" * (img.size[0] * img.size[1]) + piece
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"], None


@pytest.fixture()
def image_rows(tmp_path):
    png(tmp_path / "a.png", size=(2, 2))
    png(tmp_path / "b.png", size=(3, 1))
    return [
        # none: one tag per image prepended
        {"problem": "What is shown?", "answer": "red", "images": ["a.png", "b.png"]},
        # too many: extras dropped
        {"problem": "<image>Left<image>right<image>extra", "answer": "x", "images": ["a.png"]},
        # too few: missing ones prepended
        {"problem": "Compare with <image> here.", "answer": "y", "images": ["a.png", "b.png"]},
        # exact: unchanged
        {"problem": "<image>Exact.", "answer": "z", "images": ["b.png"]},
        # text-only row in the same file
        {"problem": "Text only.", "answer": "t"},
    ]


def test_image_placeholder_reconciliation(tmp_path, tok, image_rows, caplog):
    path = write_jsonl(tmp_path / "mm.jsonl", image_rows)
    proc = FakeProcessor(tok)
    with caplog.at_level(logging.INFO, logger="megatron_guided.data.dataset"):
        ds = build_prompt_dataset(str(path), cfg(system_prompt="S."), tok, processor=proc)
    user = [s.messages[-1]["content"] for s in ds]
    assert user[0] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is shown?"}]
    assert user[1] == [{"type": "image"}, {"type": "text", "text": "Leftrightextra"}]
    assert user[2] == [{"type": "image"}, {"type": "text", "text": "Compare with "},
                       {"type": "image"}, {"type": "text", "text": " here."}]
    assert user[3] == [{"type": "image"}, {"type": "text", "text": "Exact."}]
    assert user[4] == "Text only."
    for s in ds[:4]:
        n_parts = sum(p["type"] == "image" for p in s.messages[-1]["content"])
        assert n_parts == len(s.images)
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in s.images)
    assert ds[0].messages[0] == {"role": "system", "content": "S."}
    assert ds[4].images == []
    assert ds.stats.rows_image_reconciled == 3
    logs = [r.getMessage() for r in caplog.records if "tags with the image count" in r.getMessage()]
    assert len(logs) == 1 and "in 3 of 4 rows with images" in logs[0]

    # image rows go through the processor (image tokens expanded); text rows through the tokenizer
    assert proc.calls == 4
    assert tok.decode(ds[0].prompt_ids) == chatml("#" * 4 + "#" * 3 + "What is shown?", system="S.")
    assert tok.decode(ds[2].prompt_ids) == chatml("####Compare with ### here.", system="S.")
    assert tok.decode(ds[4].prompt_ids) == chatml("Text only.", system="S.")


def test_image_sources_dir_bytes_and_image_dir(tmp_path, tok):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    png(imgs / "p.png", color=(0, 0, 255), size=(5, 5))
    png(tmp_path / "local.png", size=(1, 1))
    rows = [
        {"problem": "a", "answer": "1", "images": ["p.png"]},                      # via image_dir
        {"problem": "b", "answer": "1", "images": ["local.png"]},                  # via data-file dir
        {"problem": "c", "answer": "1", "images": [str(imgs / "p.png")]},         # absolute
    ]
    path = write_jsonl(tmp_path / "mm.jsonl", rows)
    ds = build_prompt_dataset(str(path), cfg(image_dir=str(imgs)), tok, processor=FakeProcessor(tok))
    assert [s.images[0].size for s in ds] == [(5, 5), (1, 1), (5, 5)]
    assert ds[0].images[0].getpixel((0, 0)) == (0, 0, 255)

    # parquet with HF-style {"bytes", "path"} structs
    pq_path = write_parquet(tmp_path / "mm.parquet", [
        {"problem": "d", "answer": "2", "images": [{"bytes": png_bytes(size=(2, 3)), "path": None}]}])
    s = build_prompt_dataset(str(pq_path), cfg(), tok, processor=FakeProcessor(tok))[0]
    assert s.images[0].size == (2, 3) and s.messages[-1]["content"][0] == {"type": "image"}


def test_save_to_disk_with_image_feature(tmp_path, tok):
    import datasets

    features = datasets.Features({"problem": datasets.Value("string"),
                                  "answer": datasets.Value("string"),
                                  "images": getattr(datasets, "List", datasets.Sequence)(datasets.Image())})
    rows = [{"problem": "e", "answer": "3", "images": [Image.new("RGB", (2, 2))]}]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "vl"))
    s = build_prompt_dataset(str(tmp_path / "vl"), cfg(), tok, processor=FakeProcessor(tok))[0]
    assert len(s.images) == 1 and s.images[0].size == (2, 2)


def test_images_without_processor_errors(tmp_path, tok):
    png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "mm.jsonl", [{"problem": "p", "answer": "1", "images": ["a.png"]}])
    with pytest.raises(DataError, match=r"mm\.jsonl:1: .*no multimodal processor.*vision-language"):
        build_prompt_dataset(str(path), cfg(), tok)


def test_unreadable_image_names_row(tmp_path, tok):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    rows = [ROWS[0], {"problem": "p", "answer": "1", "images": ["broken.png"]}]
    path = write_jsonl(tmp_path / "mm.jsonl", rows)
    with pytest.raises(DataError, match=r"mm\.jsonl:2: key 'images' \(data\.image_key\).*broken\.png"):
        build_prompt_dataset(str(path), cfg(), tok, processor=FakeProcessor(tok))
    ds = build_prompt_dataset(str(path), cfg(skip_bad_rows=True), tok, processor=FakeProcessor(tok))
    assert len(ds) == 1 and ds.stats.rows_skipped_bad == 1
