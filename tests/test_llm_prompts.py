"""Prompts written by a language model: parsing, checks, fallback, steering, saved prompt files.

The real path uses a tiny GPT-2 chat model trained for a few seconds (conftest.tiny_llm_dir).
"""

import contextlib
import gc
import json
import logging
import shutil
import weakref

import numpy as np
import pytest
import torch
from conftest import LLM_CLASSES, SMOKE, smoke_config
from PIL import Image

from syntagen_st import generate as gen_mod
from syntagen_st.core.checks import validate
from syntagen_st.core.classes import class_index
from syntagen_st.core.config import Config
from syntagen_st.core.errors import ConfigError, UserError
from syntagen_st.core.layout import RunLayout
from syntagen_st.core.store import Pool, load_mask
from syntagen_st.generation import sampler
from syntagen_st.generation.tiny import build_tokenizer
from syntagen_st.prompts import llm as llm_writer
from syntagen_st.prompts.__main__ import main as prompts_main
from syntagen_st.prompts.captions import NearDuplicates, check_caption, parse_captions
from syntagen_st.prompts.llm import CaptionWriter, open_writer
from syntagen_st.prompts.records import append_classes, classes_in_text, make_records
from syntagen_st.prompts.rounds import llm_records, load_round_prompts, round_records


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one torch thread is many times faster than two that wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALL = {"aeroplane", "person", "dog", "sofa", "cat", "tvmonitor", "diningtable", "pottedplant", "horse"}


def _words(text: str) -> int:
    return len(text.split())


def _check(caption, requested, allowed=ALL, max_classes=3, count=_words, limit=77):
    return check_caption(caption, requested, set(allowed), max_classes, count, limit)


# ------------------------------------------------------------------ parsing and checks


def test_parser_reads_numbered_lists_bullets_quotes_and_skips_stray_text():
    answer = (
        "Sure! Here are five captions for you:\n\n"
        "1. **A dog asleep on a sofa.**\n"
        '2) "A puppy curled up on a couch" - cozy and warm\n'
        "   3. A dog and a sofa in a sunlit loft;\n"
        "- A dog peeks from behind a sofa\n"
        "Caption 5: a dog on a sofa at dusk\n"
        "I hope these help!"
    )
    assert parse_captions(answer) == [
        "A dog asleep on a sofa", "A puppy curled up on a couch", "A dog and a sofa in a sunlit loft",
        "A dog peeks from behind a sofa", "a dog on a sofa at dusk",
    ]
    # No list markers at all: every line is a caption, quotes go.
    assert parse_captions('"a dog on a sofa"\n\n“a cat on a chair.”\n') == ["a dog on a sofa", "a cat on a chair"]
    assert parse_captions("") == [] and parse_captions("Captions:\n") == []


def test_checks_accept_synonyms_and_name_the_reason_of_a_rejection():
    assert _check("A man walking past a couch", ("person", "sofa")).classes == ("person", "sofa")
    assert _check("An airplane flying low over a field", ("aeroplane",)).accepted
    assert _check("A tv on a low cabinet in a dark room", ("tvmonitor",)).accepted
    assert _check("Two women at a dining table", ("person", "diningtable")).accepted
    assert _check("Two kittens asleep in the sun", ("cat",)).accepted
    missing = _check("A cat asleep on a couch", ("dog", "sofa"))
    assert not missing.accepted and missing.reason == "does not name dog"
    assert _check("A dog", ("dog",)).reason == "too short"


def test_a_foreign_class_is_added_when_allowed_and_room_is_left_else_dropped():
    added = _check("A dog on a sofa next to a sleeping cat", ("dog", "sofa"))
    assert added.accepted and added.classes == ("dog", "sofa", "cat")
    assert _check("A dog on a sofa next to a sleeping cat", ("dog", "sofa"), max_classes=2).reason == (
        "names 3 classes, more than 2")
    barred = _check("A dog on a sofa next to a sleeping cat", ("dog", "sofa"), allowed={"dog", "sofa"})
    assert barred.reason == "names another class: cat"


def test_a_caption_too_long_for_clip_with_the_class_names_is_dropped():
    clip = build_tokenizer()
    count = lambda text: len(clip(text, verbose=False).input_ids)  # noqa: E731
    fits = "a photo of a dog and a sofa in a living room " * 4  # 74 tokens with the names
    long = "a photo of a dog and a sofa in a living room " * 5  # 91 tokens with the names
    assert _check(fits.strip(), ("dog", "sofa"), count=count).accepted
    verdict = _check(long.strip(), ("dog", "sofa"), count=count)
    assert not verdict.accepted and verdict.reason.startswith("too long") and "limit 77" in verdict.reason


def test_near_duplicates_within_the_same_classes_are_removed():
    seen = NearDuplicates()
    assert seen.add("A dog on a sofa in the living room", ("dog", "sofa"))
    assert not seen.add("a dog on the sofa, in a living room.", ("sofa", "dog"))
    assert not seen.add("Dogs on sofas in the living room", ("dog", "sofa"))
    assert seen.add("A dog jumps off a sofa in a sunny garden", ("dog", "sofa"))
    assert seen.add("A dog on a sofa in the living room", ("dog", "sofa", "cat"))  # other classes: another picture


# ------------------------------------------------------------------ the writer with canned answers


class CannedWriter(CaptionWriter):
    """The real writer around canned model answers, one function of the requested classes."""

    def __init__(self, cfg: Config, answer) -> None:
        super().__init__(None, None, cfg.generate, _words, 77)
        self.answer, self.asked = answer, []

    def complete(self, requests, seed):
        self.asked += requests
        return [self.answer(classes, n) for classes, n in requests]


def _cfg(classes=("dog", "sofa", "cat"), max_classes=2) -> Config:
    cfg = smoke_config()
    cfg.generate.classes = list(classes)
    cfg.generate.max_classes_per_prompt = max_classes
    cfg.generate.prompt_source = "llm"
    return cfg


def test_unusable_answers_fall_back_to_the_templates_with_a_counted_warning(caplog):
    cfg = _cfg()
    garbage = CannedWriter(cfg, lambda classes, n: "Sure! Here you go:\n1. A sunset over the sea\n2. !!!\n3. a horse")
    with caplog.at_level(logging.WARNING):
        records, stats = llm_records(cfg, 0, range(10), None, writer=garbage)
    assert stats["topped_up"] == 10 and stats["accepted"] == 0 and stats["rejected"]
    assert "10 of 10 prompts come from the templates" in caplog.text
    # Each top-up is the very template prompt the sample would have had.
    templates = make_records(cfg.seed, 0, range(10), cfg.generate.classes, None, 2)
    assert [(r.prompt, r.classes) for r in records] == [(t.prompt, t.classes) for t in templates]
    assert {r.prompt_source for r in records} == {"template"}

    # Half usable: one valid caption per request; the rest topped up and counted.
    one = CannedWriter(cfg, lambda classes, n: "1. a photo of " + " and ".join(f"a {c}" for c in classes) + " at dawn\n2. off topic")
    records, stats = llm_records(cfg, 0, range(10), None, writer=one)
    from_llm = [r for r in records if r.prompt_source == "llm"]
    assert from_llm and stats["topped_up"] == 10 - len(from_llm) == stats["topped_up"]
    for r in records:
        assert set(classes_in_text(r.prompt)) == set(r.classes) and r.class_prompt == append_classes(r.prompt, r.classes)


def test_steering_asks_for_weak_classes_in_proportion_to_their_weights_with_companions():
    cfg = _cfg(max_classes=3)
    for weights, dog_share in ((None, 1 / 3), ({"dog": 5.0, "sofa": 1.0, "cat": 1.0}, 5 / 7)):
        writer = CannedWriter(cfg, lambda classes, n: "")
        llm_records(cfg, 1, range(600), weights, writer=writer)
        first = [classes for classes, n in writer.asked for _ in range(n)]
        share = sum(c[0] == "dog" for c in first) / len(first)
        assert abs(share - dog_share) < 0.06, (weights, share)
        # Companions come from the co-occurrence table (dog's: person, cat, sofa).
        assert any(len(c) > 1 and c[0] == "dog" for c in first)
        assert all(set(c[1:]) <= {"cat", "sofa"} for c in first if c[0] == "dog")


# ------------------------------------------------------------------ saved prompt files


def test_round_prompts_are_saved_and_read_back_and_a_larger_budget_keeps_them(tmp_path):
    cfg = smoke_config()
    run = RunLayout(tmp_path)
    first = round_records(cfg, 2, 5, {"dog": 3.0}, run)
    path = run.prompts(2)
    assert [r.id for r in load_round_prompts(path, 2)] == [f"r02_{i:06d}" for i in range(5)]
    # Other weights cannot change a saved round; more samples extend it.
    assert round_records(cfg, 2, 5, {"cat": 9.0}, run) == first
    more = round_records(cfg, 2, 8, {"dog": 3.0}, run)
    assert more[:5] == first and len(load_round_prompts(path, 2)) == 8
    assert round_records(cfg, 2, 3, None, run) == first[:3]
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[1], *rows[2:]]) + "\n")
    with pytest.raises(UserError, match=r"round2.jsonl:1: expected sample r02_000000"):
        round_records(cfg, 2, 8, None, run)


def test_llm_source_settings_are_checked(tmp_path):
    cfg = Config()
    cfg.generate.prompt_source = "llm"
    cfg.generate.llm = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="generate.llm: folder .* does not exist"):
        validate(cfg)
    cfg.generate.llm = "not a model id"
    with pytest.raises(ConfigError, match="neither a folder nor a hub id"):
        validate(cfg)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog on a sofa\n")
    cfg = Config()
    cfg.generate.prompts_file = str(prompts)
    with pytest.raises(ConfigError, match="prompts_file is read only with generate.prompt_source: file"):
        validate(cfg)
    cfg.generate.prompt_source = "file"
    validate(cfg)


# ------------------------------------------------------------------ the real path: a tiny trained chat model


def _llm_args(llm_dir, out, n):
    return [
        "--config", SMOKE, "--generate.height", "64", "--generate.width", "64", "--generate.steps", "2",
        "--generate.batch_size", "2", "--num-images", str(n), "--out", str(out), "--no-progress",
        "--generate.prompt_source", "llm", "--generate.llm", str(llm_dir),
        "--generate.classes", json.dumps(list(LLM_CLASSES)), "--generate.max_classes_per_prompt", "2",
        "--generate.llm_captions_per_request", "4",
    ]


def _pool_state(out):
    pool = Pool(out / "pool")
    rows = pool.rows()
    arrays = {r["id"]: (np.array(Image.open(pool.image_path(r["id"]))), load_mask(pool.mask_path(r["id"]))) for r in rows}
    return rows, arrays


def _forbid_llm(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the language model was asked again")

    monkeypatch.setattr(llm_writer, "load_llm", refuse)


def test_generate_with_llm_prompts_saves_them_first_and_resumes_and_reproduces_without_the_llm(
    tiny_llm_dir, tmp_path, monkeypatch
):
    n = 6
    clean = tmp_path / "clean"
    # The language model and Stable Diffusion are never loaded at the same time.
    held = {"llm": False, "sd": False, "llm_used": False}
    real_open, real_load = llm_writer.open_writer, sampler.load_pipeline

    @contextlib.contextmanager
    def tracked_open(cfg):
        assert not held["sd"], "the language model loaded while Stable Diffusion was held"
        with real_open(cfg) as writer:
            held["llm"] = held["llm_used"] = True
            yield writer
        held["llm"] = False

    def checked_load(*args):
        assert not held["llm"], "Stable Diffusion loaded while the language model was held"
        held["sd"] = True
        return real_load(*args)

    monkeypatch.setattr(llm_writer, "open_writer", tracked_open)
    monkeypatch.setattr(sampler, "load_pipeline", checked_load)
    assert gen_mod.main(_llm_args(tiny_llm_dir, clean, n)) == 0
    assert held["llm_used"] and held["sd"]
    monkeypatch.undo()
    saved = load_round_prompts(RunLayout(clean).prompts(0), 0)
    rows, arrays = _pool_state(clean)
    assert len(saved) == len(rows) == n
    assert any(r.prompt_source == "llm" for r in saved), "the tiny model wrote no usable caption"
    stats = json.loads(RunLayout(clean).prompt_stats(0).read_text())
    assert stats[0]["kept"] == sum(r.prompt_source == "llm" for r in saved)
    for record, row in zip(saved, rows):
        # The manifest keeps the exact prompt; its classes are the ones the caption names,
        # and the attention scores and mask are of exactly those classes.
        assert {k: row[k] for k in ("id", "prompt", "class_prompt", "seed", "prompt_source")} == {
            "id": record.id, "prompt": record.prompt, "class_prompt": record.class_prompt, "seed": record.seed,
            "prompt_source": record.prompt_source}
        assert tuple(row["classes"]) == record.classes
        assert set(classes_in_text(record.prompt)) == set(record.classes) <= set(LLM_CLASSES)
        assert record.class_prompt == append_classes(record.prompt, record.classes)
        ids = np.load(Pool(clean / "pool").scores_path(record.id))["class_ids"]
        assert ids.tolist() == [class_index(c) for c in record.classes]
        assert set(np.unique(arrays[record.id][1])) <= {0, 255, *ids.tolist()}

    # A crash after the prompts were saved: the rerun reads them and never loads the model.
    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    original = Pool.write_sample

    def dying_write(self, sid, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, sid, *args, **kwargs)

    monkeypatch.setattr(Pool, "write_sample", dying_write)
    with pytest.raises(KeyboardInterrupt):
        gen_mod.main(_llm_args(tiny_llm_dir, crashed, n))
    monkeypatch.setattr(Pool, "write_sample", original)
    assert RunLayout(crashed).prompts(0).exists() and len(Pool(crashed / "pool").rows()) == 2
    _forbid_llm(monkeypatch)
    gen_mod.main(_llm_args(tiny_llm_dir, crashed, n))

    # A reproduction elsewhere from the saved prompt file alone.
    again = tmp_path / "again"
    shutil.copytree(clean / "prompts", again / "prompts")
    gen_mod.main(_llm_args(tiny_llm_dir, again, n))
    for other in (crashed, again):
        other_rows, other_arrays = _pool_state(other)
        assert other_rows == rows
        for sid, (image, mask) in arrays.items():
            assert np.array_equal(other_arrays[sid][0], image) and np.array_equal(other_arrays[sid][1], mask)


def test_the_model_is_freed_when_the_writer_closes(tiny_llm_dir):
    cfg = _cfg(LLM_CLASSES)
    cfg.generate.llm = str(tiny_llm_dir)
    with open_writer(cfg) as writer:
        model = weakref.ref(writer.model)
        assert model() is not None
    gc.collect()
    assert model() is None


def test_a_template_without_a_system_role_gets_one_user_message_and_leaves_the_global_rng_alone(tiny_llm_dir):
    from jinja2 import Template

    from syntagen_st.testing.llm import CHAT_TEMPLATE

    cfg = _cfg(LLM_CLASSES)
    cfg.generate.llm = str(tiny_llm_dir)
    with open_writer(cfg) as writer:
        # Gemma-style: the template itself refuses a system message.
        writer.tokenizer.chat_template = (
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
            + CHAT_TEMPLATE)
        text = writer._chat_text(("dog",), 3)
        assert text.count("<|user|>") == 1 and "<|system|>" not in text and "You write short captions" in text
        assert Template(writer.tokenizer.chat_template)  # the template itself parses
        # Sampling is seeded inside a fork of torch's generator: the caller's random stream goes on as it was.
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        writer.complete([(("dog",), 2)], seed=7)
        assert torch.equal(torch.rand(3), expected)


def test_prompts_cli_prints_captions_and_rejections_and_writes_a_prompt_file(tiny_llm_dir, tmp_path, capsys):
    out = tmp_path / "dog_sofa.jsonl"
    prompts_main([
        "--source", "llm", "--classes", "dog,sofa", "--n", "6", "--model.pretrained", "tiny", "--model.device", "cpu",
        "--generate.llm", str(tiny_llm_dir), "--generate.classes", json.dumps(list(LLM_CLASSES)),
        "--generate.max_classes_per_prompt", "2", "--generate.llm_captions_per_request", "6", "--out", str(out),
    ])
    printed = capsys.readouterr().out
    assert "rejected" in printed and '"asked"' in printed
    cfg = smoke_config()
    cfg.generate.prompt_source, cfg.generate.prompts_file = "file", str(out)
    validate(cfg)  # generate.prompts_file reads it
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert entries and all(set(e["classes"]) == {"dog", "sofa"} for e in entries)
    assert all(e["prompt"] in printed for e in entries)
