"""Synthetic data: filters drop what they should, lineage is recorded, the mix and yield report add up."""
from __future__ import annotations

import json

import pytest

from distill.filters import ExactDedup, MinHashDedup, length_reason, parse_judge_score, verify_reason
from distill.synth import clean_instruction, load_seeds, real_rows, synthesize, write_jsonl
from trainer.config import ConfigError, load_config
from trainer.tasks import extract_answer


def test_exact_dedup_ignores_case_punctuation_and_spacing():
    d = ExactDedup()
    assert d.reason("Explain photosynthesis.") is None
    assert d.reason("  explain   PHOTOSYNTHESIS!") == "duplicate"
    assert d.reason("Explain respiration.") is None


def test_minhash_flags_near_duplicates_and_keeps_distinct_texts():
    d = MinHashDedup(threshold=0.7, ngram=2, num_perm=128, seed=0)
    base = "write a short story about a dragon who learns to bake bread in a small village"
    assert d.reason(base) is None
    assert d.reason(base + " today") == "near_duplicate"  # one word appended: Jaccard 15/16
    assert d.reason("list three reasons why regular sleep improves memory and mood") is None
    assert d.reason("translate good morning into french and spanish please") is None
    # the estimate tracks the true Jaccard of the shingle sets
    a, b = "one two three four five six seven eight", "one two three four five six nine ten"
    sa, sb = d.shingles(a), d.shingles(b)
    assert abs(d.similarity(a, b) - len(sa & sb) / len(sa | sb)) < 0.15


def test_length_verifier_and_judge_parsing():
    assert length_reason("hi", 3, 10) == "too_short"
    assert length_reason("x" * 11, 3, 10) == "too_long"
    assert length_reason("hello", 3, 10) is None
    assert verify_reason("The answer is 12.", "12") is None
    assert verify_reason("13", "12") == "wrong_answer"
    assert verify_reason("anything", None) is None  # open-ended rows have nothing to verify
    assert parse_judge_score("Score: 4/5") == 4
    assert parse_judge_score("great") is None


def test_clean_instruction_strips_numbering_and_labels():
    assert clean_instruction("\n4. Task: Describe a rainbow.\nMore text") == "Describe a rainbow."
    assert clean_instruction('- "Name two rivers."') == "Name two rivers."


class ScriptedTeacher:
    """A stand-in for the engine: instructions from a fixed list, arithmetic answered right except every third."""

    def __init__(self, instructions: list[str], judge_reply: str = "5"):
        self.instructions, self.judge_reply, self.calls = list(instructions), judge_reply, []

    def __call__(self, chats, sampling):
        self.calls.append(sampling)
        out = []
        for chat in chats:
            prompt = chat[-1]["content"]
            if prompt.startswith("Here are some example tasks"):
                out.append(self.instructions.pop(0))
            elif prompt.startswith("Rate how well"):
                out.append(self.judge_reply)
            elif prompt.startswith("What is"):
                value = int(eval(prompt[len("What is "):-1]))  # noqa: S307 - test-built arithmetic
                self.n_math = getattr(self, "n_math", 0) + 1
                out.append(str(value + (1 if self.n_math % 3 == 0 else 0)))
            else:
                out.append("x" * 2000 if "essay" in prompt else f"A fine answer to: {prompt}")
        return out


INSTRUCTIONS = [
    "Explain how rainbows form after a storm.",
    "explain how RAINBOWS form after a storm!",  # exact duplicate
    "Explain how rainbows form after a storm today.",  # near duplicate
    "Hi",  # too short
    "Write a long essay about every war in history.",  # response too long
    "Give two tips for keeping houseplants alive.",
]


def _cfg(tmp_path, *extra):
    return load_config([f"synth.output={tmp_path}/synth.jsonl", "synth.num_instructions=6", "synth.num_arithmetic=6",
                        "synth.batch_size=4", "synth.near_dup_threshold=0.6", "synth.max_response_chars=500", *extra])


def test_pipeline_drops_by_reason_and_records_lineage(tmp_path):
    cfg = _cfg(tmp_path)
    teacher = ScriptedTeacher(INSTRUCTIONS)
    progress = []
    rows, report = synthesize(cfg, teacher, "teacher-x", progress=lambda done, more: progress.append((done, more)))
    assert report.generated == {"instruction": 6, "arithmetic": 6}
    assert report.dropped == {"duplicate": 1, "near_duplicate": 1, "too_short": 1, "too_long": 1, "wrong_answer": 2}
    assert report.kept == {"instruction": 2, "arithmetic": 4}
    assert len(rows) == 6
    assert sum(d for d, _ in progress) == sum(m for _, m in progress)  # the bar ends full
    for row in rows:
        lin = row["lineage"]
        assert {"source", "teacher", "template", "sampling", "seed", "kind"} <= set(lin)
        assert lin["source"] == "synthetic" and lin["teacher"] == "teacher-x"
        assert set(lin["sampling"]) >= {"temperature", "top_p", "max_tokens", "seed"}
        assert row["messages"][-1]["role"] == "assistant"
        if lin["kind"] == "instruction":
            assert len(lin["seed_examples"]) == cfg.synth.examples_per_prompt
        else:  # every kept arithmetic row is correct
            question = row["messages"][-2]["content"]
            assert extract_answer(row["messages"][-1]["content"]) == str(eval(question[len("What is "):-1]))  # noqa: S307
    # requests are seeded individually, so a re-run reproduces the dataset
    seeds = [p["seed"] for call in teacher.calls for p in call]
    assert len(seeds) == len(set(seeds))


def test_judge_drops_low_scores(tmp_path):
    cfg = _cfg(tmp_path, "synth.judge=true", "synth.judge_min_score=4")
    rows, report = synthesize(cfg, ScriptedTeacher(INSTRUCTIONS, judge_reply="Score: 2"), "t")
    assert rows == [] and report.dropped["judge"] == 6


def test_real_data_mix_and_jsonl_roundtrip(tmp_path):
    cfg = _cfg(tmp_path, "synth.real_source=arithmetic", "synth.real_fraction=0.5")
    rows, report = synthesize(cfg, ScriptedTeacher(INSTRUCTIONS), "t")
    assert report.real_rows == 6 and len(rows) == 12
    assert sum(r["lineage"]["source"] == "real:arithmetic" for r in rows) == 6
    path = write_jsonl(rows, cfg.synth.output)
    loaded = [json.loads(line) for line in path.read_text().splitlines()]
    assert loaded == rows
    from_file = real_rows(str(path), 3, seed=1)
    assert len(from_file) == 3 and all(r["lineage"]["source"] == "real:synth.jsonl" for r in from_file)


def test_config_and_seed_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="synth.real_source"):
        load_config(["synth.real_fraction=0.3"])
    (tmp_path / "seeds.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="line 1 has no 'instruction'"):
        load_seeds(str(tmp_path / "seeds.jsonl"))


def test_generate_cli_runs_the_engine_and_writes_rows_and_summary(tmp_path, tiny_llama_dir, capsys):
    from launch.generate import main

    out = tmp_path / "synth.jsonl"
    rc = main([f"synth.teacher={tiny_llama_dir}", f"synth.output={out}", "synth.num_instructions=2", "synth.num_arithmetic=2",
               "synth.max_instruction_tokens=8", "synth.max_response_tokens=4", "synth.min_instruction_chars=1", "engine.num_blocks=64"])
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == (0 if rows else 1)
    generated, kept, dropped = (sum(summary[k].values()) for k in ("generated", "kept", "dropped"))
    assert generated == 4 and kept + dropped == generated and kept + summary["real_rows"] == len(rows)
    assert all(r["lineage"]["teacher"] == tiny_llama_dir for r in rows if r["lineage"]["source"] == "synthetic")
    assert "synthetic data yield" in capsys.readouterr().out
    assert main(["synth.real_fraction=1.5"]) == 2  # a config error: one line, exit code 2, nothing generated
