"""Sources (globs, directories, CSV/Parquet, saved datasets), mixing, de-duplication, splits and the cache."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO

DATA = FIXTURES / "data"
SAMPLES = REPO.parent / "shared" / "data" / "samples"


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.config.schema import ModelConfig
    from trainer.model import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(REPO / "trainer" / "assets" / "tiny-llama")))


def _cfg(**overrides):
    from trainer.config.schema import DataConfig

    return DataConfig(**{"val_ratio": 0.0, "format": "alpaca", "template": "chatml", "max_seq_len": 256, **overrides})


def _alpaca_records(count: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."}
            for i in range(start, start + count)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------------- sources
def test_globs_and_directories_read_every_data_file_in_order(tmp_path):
    from trainer.data import parse_sources

    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "b.jsonl", _alpaca_records(2, 10))
    _write_jsonl(tmp_path / "a.jsonl", _alpaca_records(3))
    _write_jsonl(tmp_path / "sub" / "c.jsonl", _alpaca_records(1, 20))
    (tmp_path / "README").write_text("not data")
    by_glob = parse_sources(_cfg(path=str(tmp_path / "*.jsonl")))
    assert [e.path for e in by_glob.examples[0]] == [str(tmp_path / "a.jsonl")] * 3 + [str(tmp_path / "b.jsonl")] * 2
    by_dir = parse_sources(_cfg(path=str(tmp_path)))
    assert by_dir.reports[0].records == 6
    assert parse_sources(_cfg(path=str(tmp_path), max_samples=4)).reports[0].records == 4


def test_parquet_csv_and_a_saved_dataset_load_like_json(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.config.schema import DataSourceConfig
    from trainer.data import parse_sources

    records = _alpaca_records(5)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "train.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:3]),
                          "validation": datasets.Dataset.from_list(records[3:])}).save_to_disk(str(tmp_path / "saved"))
    parsed = parse_sources(_cfg(sources=[DataSourceConfig(path=str(tmp_path / "train.parquet")),
                                         DataSourceConfig(path=str(tmp_path / "saved")),
                                         DataSourceConfig(path=str(tmp_path / "saved"), split="validation"),
                                         DataSourceConfig(path=str(DATA / "alpaca.csv"))]))
    assert [r.records for r in parsed.reports] == [5, 3, 2, 3]
    assert [e.line for e in parsed.examples[0]] == [1, 2, 3, 4, 5]  # Parquet rows, numbered from 1
    assert parsed.examples[3][1].messages[0].context == "sun,moon"  # a quoted CSV cell keeps its comma


def test_plain_text_units(tmp_path):
    from trainer.data import parse_sources

    path = str(DATA / "text.txt")
    counts = {unit: parse_sources(_cfg(path=path, format="text", text_unit=unit)).reports[0].records
              for unit in ("block", "line", "file")}
    assert counts == {"block": 3, "line": 4, "file": 1}


def test_missing_paths_unknown_types_and_hub_ids_are_named(tmp_path):
    from trainer.data import parse_sources
    from trainer.data.sources import looks_like_hub_id
    from trainer.errors import DataError

    with pytest.raises(DataError, match="no such file or directory"):
        parse_sources(_cfg(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unknown file type '.xml'"):
        parse_sources(_cfg(path=str(tmp_path / "data.xml")))
    with pytest.raises(DataError, match="matches no data files"):
        parse_sources(_cfg(path=str(tmp_path / "*.jsonl")))
    with pytest.raises(DataError, match="plain-text file cannot hold alpaca"):
        parse_sources(_cfg(path=str(DATA / "text.txt")))
    assert looks_like_hub_id("tatsu-lab/alpaca") and not looks_like_hub_id("data/train.jsonl")


# ------------------------------------------------------------------------------------ mixing and hygiene
def test_mixing_weights_repeat_or_subsample_each_source(tokenizer, tmp_path):
    from trainer.config.schema import DataSourceConfig
    from trainer.data import prepare_datasets

    a = _write_jsonl(tmp_path / "a.jsonl", _alpaca_records(10))
    b = _write_jsonl(tmp_path / "b.jsonl", _alpaca_records(10, 100))
    cfg = _cfg(sources=[DataSourceConfig(path=str(a), weight=2.0), DataSourceConfig(path=str(b), weight=0.5)])
    data = prepare_datasets(cfg, tokenizer, seed=0)
    assert [s.uses for s in data.report.sources] == [20, 5] and len(data.train) == 25
    origin = data.train_origin.sources[data.train.slots]
    assert (origin == 0).sum() == 20 and (origin == 1).sum() == 5
    again = prepare_datasets(cfg, tokenizer, seed=0)
    assert again.train.slots.tolist() == data.train.slots.tolist()
    other_seed = prepare_datasets(cfg, tokenizer, seed=1)
    assert other_seed.train.slots.tolist() != data.train.slots.tolist()


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_replay_is_the_asked_share_of_every_epoch_and_never_held_out(tokenizer, tmp_path, ratio):
    """data.replay: general text mixed into training at a ratio of the epoch's samples (its few records repeat),
    neither split into validation/test nor counted against the training data's own split."""
    from trainer.config.schema import ReplayConfig
    from trainer.data import prepare_datasets

    train = _write_jsonl(tmp_path / "train.jsonl", _alpaca_records(40))
    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(f"General paragraph number {i} about rivers and hills." for i in range(6)))
    cfg = _cfg(path=str(train), val_ratio=0.1, replay=ReplayConfig(path=str(general), ratio=ratio))
    data = prepare_datasets(cfg, tokenizer, seed=3)
    train_report, replay_report = data.report.sources
    assert (train_report.role, replay_report.role, replay_report.samples) == ("train", "replay", 6)
    origin = data.train_origin.sources[data.train.slots]
    replayed = int((origin == 1).sum())
    assert replayed == replay_report.uses
    assert len(origin) == train_report.uses + replayed == data.report.num_train_samples
    assert replayed / len(origin) == pytest.approx(ratio, abs=1 / len(origin))  # to one sample's rounding
    assert train_report.uses == 36 and len(data.val) == 4  # the split is the training file's alone
    assert all("General paragraph" not in s.prompt + s.reference for s in data.val_samples)
    assert f"{replayed:,} of the samples" in data.report.summary_line()
    texts = {tokenizer.decode(data.train.table.sample(int(i)).input_ids) for i in data.train.slots[origin == 1]}
    # every record (repeated) when there are more uses than records, else a seeded subset without repeats
    assert len(texts) == min(6, replayed) and all("General paragraph" in text for text in texts)


@pytest.mark.parametrize("mode,removed", [("none", 0), ("exact", 1), ("normalized", 2)])
def test_duplicates_are_counted_and_removed_as_asked(tokenizer, mode, removed):
    from trainer.data import prepare_datasets

    data = prepare_datasets(_cfg(path=str(DATA / "alpaca.json"), dedup=mode), tokenizer, seed=0)
    report = data.report.sources[0]
    assert (report.duplicates_exact, report.duplicates_normalized, report.duplicates_removed) == (1, 1, removed)
    assert len(data.train) == 11 - removed  # 12 records, one blank answer skipped


def test_splits_are_seeded_and_explicit_files_replace_ratios(tokenizer, tmp_path):
    from trainer.data import prepare_datasets

    train = _write_jsonl(tmp_path / "train.jsonl", _alpaca_records(40))
    first = prepare_datasets(_cfg(path=str(train), val_ratio=0.1, test_ratio=0.05), tokenizer, seed=5)
    again = prepare_datasets(_cfg(path=str(train), val_ratio=0.1, test_ratio=0.05), tokenizer, seed=5)
    other = prepare_datasets(_cfg(path=str(train), val_ratio=0.1, test_ratio=0.05), tokenizer, seed=6)
    assert (len(first.train), len(first.val), len(first.test)) == (34, 4, 2)
    assert [s.reference for s in first.val_samples] == [s.reference for s in again.val_samples]
    assert [s.reference for s in first.val_samples] != [s.reference for s in other.val_samples]
    held_out = {s.reference for s in first.val_samples + first.test_samples}
    trained = {first.train_origin.lines[first.train.slots[i]] for i in range(len(first.train))}
    assert len(held_out) == 6 and len(trained) == 34
    val = _write_jsonl(tmp_path / "val.jsonl", _alpaca_records(3, 38))  # two of them also in training
    explicit = prepare_datasets(_cfg(path=str(train), val_path=str(val), val_ratio=0.1), tokenizer, seed=5)
    assert (len(explicit.train), len(explicit.val), explicit.report.val_overlap) == (40, 3, 2)
    deduped = prepare_datasets(_cfg(path=str(train), val_path=str(val), dedup="exact"), tokenizer, seed=5)
    assert len(deduped.val) == 1 and deduped.report.overlap_removed == 2


def test_the_demo_validation_file_goes_with_the_demo_data_and_a_named_one_stays(tmp_path):
    from tests.conftest import compose_config

    mine, theirs = str(DATA / "alpaca.json"), str(DATA / "alpaca.csv")
    demo = compose_config(f"run.dir={tmp_path}")
    assert demo.data.val_path.endswith("demo-facts/val.jsonl") and demo.eval.forgetting_path.endswith("general.txt")
    own = compose_config(f"run.dir={tmp_path}", f"data.path={mine}")
    assert own.data.val_path is None and own.eval.forgetting_path is None  # val_ratio holds out from mine instead
    named = compose_config(f"run.dir={tmp_path}", f"data.path={mine}", f"data.val_path={theirs}",
                           f"eval.forgetting_path={theirs}")
    assert named.data.val_path == theirs and named.eval.forgetting_path == theirs


def test_strict_turns_skips_into_errors_naming_the_record():
    from trainer.data import parse_sources
    from trainer.errors import DataError

    assert parse_sources(_cfg(path=str(DATA / "chat.jsonl"), format="chat")).reports[0].skipped == {"ends_on_user": 1}
    with pytest.raises(DataError, match=r"chat.jsonl:4: the conversation does not end with an assistant turn"):
        parse_sources(_cfg(path=str(DATA / "chat.jsonl"), format="chat", strict=True))


# ------------------------------------------------------------------------------------------------ cache
def test_the_cache_is_built_once_then_hit_and_keyed_by_what_changes_the_tokens(tokenizer, tmp_path):
    from trainer.data import prepare_datasets

    data_file = _write_jsonl(tmp_path / "train.jsonl", _alpaca_records(8))
    cache = str(tmp_path / "cache")
    built = prepare_datasets(_cfg(path=str(data_file)), tokenizer, seed=0, cache_dir=cache)
    hit = prepare_datasets(_cfg(path=str(data_file), packing=True), tokenizer, seed=0, cache_dir=cache)
    assert built.report.cache.startswith("built") and hit.report.cache.startswith("hit")
    assert hit.train.table.input_ids.tolist() == built.train.table.input_ids.tolist()
    assert hit.fingerprint != built.fingerprint  # same tokens, other rows: a checkpoint must not resume across
    for changed in ({"max_seq_len": 128}, {"template": "llama-3"}, {"train_on_inputs": True}):
        assert prepare_datasets(_cfg(path=str(data_file), **changed), tokenizer, seed=0,
                                cache_dir=cache).report.cache.startswith("built"), changed
    time.sleep(0.01)
    _write_jsonl(data_file, _alpaca_records(9))
    assert prepare_datasets(_cfg(path=str(data_file)), tokenizer, seed=0, cache_dir=cache).report.cache.startswith(
        "built")
    entries = [p for p in os.listdir(os.path.join(cache, "data")) if not p.endswith(".lock")]
    assert len(entries) == 5 and not any(".tmp-" in p for p in entries)


def test_an_error_while_building_leaves_nothing_in_the_cache(tmp_path):
    import numpy as np

    from trainer.data.cache import TokenCache
    from trainer.errors import DataError

    cache = TokenCache(str(tmp_path), "key")
    os.makedirs(cache.root)
    os.makedirs(f"{cache.path}.tmp-99999")  # what a builder killed mid-write leaves behind

    def failing_build():
        raise DataError("data.jsonl", 3, "bad record")

    with pytest.raises(DataError):
        cache.get_or_build(failing_build)
    assert not os.path.exists(cache.path)
    arrays, meta, built = cache.get_or_build(lambda: ({"x": np.arange(3)}, {"n": 3}))
    assert built and meta == {"n": 3} and arrays["x"].tolist() == [0, 1, 2]
    assert sorted(os.listdir(cache.root)) == ["key", "key.lock"]  # the stale temporary dir is gone


def _build_in_process(cache_dir: str, marker_dir: str) -> None:
    import numpy as np

    from trainer.data.cache import TokenCache

    def build():
        Path(marker_dir, f"built-by-{os.getpid()}").touch()
        time.sleep(0.5)  # long enough for the other processes to find the lock taken
        return {"x": np.arange(4)}, {"ok": True}

    arrays, meta, _ = TokenCache(cache_dir, "shared").get_or_build(build)
    assert arrays["x"].tolist() == [0, 1, 2, 3] and meta == {"ok": True}


def test_concurrent_processes_build_once_while_the_others_wait_on_the_lock(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    processes = [context.Process(target=_build_in_process, args=(str(tmp_path / "cache"), str(markers)))
                 for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert len(list(markers.iterdir())) == 1


# ------------------------------------------------------------------------------- the shared reference data
SHARED = [("alpaca_100.json", "alpaca", {}, 100),
          ("dolly_34.jsonl", "alpaca", {"input": "context", "output": "response"}, 34),
          ("sharegpt_50.json", "sharegpt", {}, 50), ("openai_chat_10.jsonl", "chat", {}, 10),
          ("preference_hh_tiny.json", "preference", {}, 1)]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="the shared reference samples are not on this machine")
@pytest.mark.parametrize("name,fmt,columns,records", SHARED)
def test_the_shared_reference_samples_load_in_their_natural_format(tokenizer, name, fmt, columns, records):
    from trainer.config.schema import ColumnsConfig
    from trainer.data import prepare_datasets

    data = prepare_datasets(_cfg(path=str(SAMPLES / name), format=fmt, columns=ColumnsConfig(**columns),
                                 max_seq_len=16384),
                            tokenizer, seed=0)
    report = data.report.sources[0]
    assert report.records == records and report.num_skipped == 0
    assert len(data.train) == records
    assert all(data.train[i].num_label_tokens > 0 for i in range(len(data.train)))


def test_the_forgetting_check_never_includes_the_replayed_data(tokenizer):
    """Replay trains on general data; the forgetting check must still measure only its own file."""
    from tests.conftest import compose_config
    from trainer.forgetting import build_forgetting_rows

    plain = build_forgetting_rows(compose_config(), tokenizer)
    replay = str(REPO / "trainer/assets/demo-facts/replay.txt")
    with_replay = build_forgetting_rows(compose_config(f"data.replay.path={replay}", "data.replay.ratio=0.5"),
                                        tokenizer)
    assert [list(r.input_ids) for r in with_replay] == [list(r.input_ids) for r in plain] and plain
