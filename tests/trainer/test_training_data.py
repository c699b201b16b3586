"""Training data: the checks that name the bad file and line, loading every format, tokenising and packing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config
from trainer_helpers import char_tokenizer

from hf_layerskip.trainer.data import (
    check_data_files,
    check_sequence_length,
    expand_data_files,
    load_text_dataset,
    pack_token_ids,
    tokenize_and_pack,
)


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        check_data_files([tmp_path / "nowhere.jsonl"])


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.jsonl", "")])
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=f"empty.*{name}"):
        check_data_files([tmp_path / name])


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl", ['{"text": "fine"}', "", '{"text": "broken",', '{"text": "never read"}']
    )
    with pytest.raises(ValueError, match=r"data\.jsonl:3: malformed JSON line"):
        check_data_files([path])


def test_missing_text_column_names_file_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ['{"text": "fine"}', '{"content": "wrong key"}'])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: no 'text' column \(found \['content'\]\)"):
        check_data_files([path])
    write_jsonl(tmp_path / "content.jsonl", ['{"content": "a"}'])
    check_data_files([tmp_path / "content.jsonl"], text_column="content")


def test_missing_parquet_column(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(ValueError, match=r"data\.parquet: no 'text' column"):
        check_data_files([path])


def test_json_array_file_checks_each_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"txt": "b"}]))
    with pytest.raises(ValueError, match=r"data\.json \(record 1\): no 'text' column"):
        check_data_files([path])


def test_sequence_length_longer_than_the_model_names_its_config(tmp_path):
    config = tiny_config(max_position_embeddings=64)
    check_sequence_length(64, config, tmp_path)
    with pytest.raises(ValueError, match=rf"seq_length`=65.*max_position_embeddings=64 in {tmp_path}/config\.json"):
        check_sequence_length(65, config, tmp_path)


def test_glob_patterns_expand_sorted_and_a_pattern_without_match_fails(tmp_path):
    for name in ("b.txt", "a.txt"):
        (tmp_path / name).write_text("x")
    assert [path.name for path in expand_data_files([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt"]
    with pytest.raises(FileNotFoundError, match=r"\*\.md"):
        expand_data_files([str(tmp_path / "*.md")])


def test_loads_text_json_and_parquet_into_one_text_column(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    write_jsonl(tmp_path / "b.jsonl", ['{"body": "json one", "id": 1}', '{"body": "json two", "id": 2}'])
    pq.write_table(pa.table({"body": ["parquet one"], "n": [3]}), tmp_path / "c.parquet")
    paths = [tmp_path / "a.py", tmp_path / "b.jsonl", tmp_path / "c.parquet"]
    dataset = load_text_dataset(paths, text_column="body")
    assert dataset.column_names == ["text"]
    assert dataset["text"] == ["def f():\n    return 1\n", "json one", "json two", "parquet one"]


def test_pack_token_ids_joins_documents_with_the_separator_and_drops_the_tail():
    assert pack_token_ids([[5, 6, 7], [8], [9]], 3, separator=1) == [[5, 6, 7], [1, 8, 1]]  # [9, 1] dropped
    assert pack_token_ids([[5, 6, 7], [8], [9, 10]], 3, separator=None) == [[5, 6, 7], [8, 9, 10]]


def test_tokenize_and_pack_gives_fixed_length_blocks_of_the_token_stream(tmp_path):
    tokenizer = char_tokenizer()
    texts = ["first document " * 3, "second " * 5, "third"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    packed = tokenize_and_pack(load_text_dataset([tmp_path / "d.jsonl"]), tokenizer, seq_length=16)
    stream = [token for text in texts for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [1]]
    assert packed["input_ids"] == [stream[start : start + 16] for start in range(0, len(stream) - 15, 16)]
    assert packed["labels"] == packed["input_ids"]


def test_too_little_text_for_one_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="4 tokens, fewer than one sequence of seq_length=64"):
        tokenize_and_pack(load_text_dataset([tmp_path / "short.txt"]), char_tokenizer(), seq_length=64)
