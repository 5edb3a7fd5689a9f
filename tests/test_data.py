"""The data pipeline: sources through `datasets`, tokenizers, packing, the fixed validation split,
the resumable deterministic order, and the embedded corpus."""

import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from lin_llm import data as D
from lin_llm import load_config
from lin_llm.tokenizer import ByteTokenizer, HFTokenizer

ROOT = Path(__file__).resolve().parent.parent


def _train_cfg(*overrides):
    return load_config(None, ["model.bos_id=256", "model.eos_id=257", "train.seq_len=16", *overrides])


def test_the_embedded_corpus_is_real_public_domain_text_of_4mb():
    text = lzma.decompress((ROOT / "data" / "kjv.txt.xz").read_bytes()).decode("utf-8")
    assert len(text.encode()) >= 4 * 1024 * 1024
    assert text.startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.\n")
    assert text.rstrip().endswith("21 The grace of our Lord Jesus Christ be with you all. Amen.")
    readme = (ROOT / "data" / "README.md").read_text()
    assert "Public domain" in readme and "bible-kjv-text" in readme
    cfg = _train_cfg()
    docs = D.load_documents(cfg.train)
    assert len(docs) == 1189 and docs[0].startswith("Genesis 1\n") and docs[-1].startswith("Revelation 22\n")


def test_packing_joins_documents_with_bos_eos_and_cuts_overlapping_windows():
    cfg = _train_cfg()
    docs = [f"document number {i} " * 3 for i in range(40)]
    corpus = D.build_corpus(docs, ByteTokenizer(prepend_bos=True), cfg.model, seq_len=16, val_fraction=0.1)
    assert corpus.train[0] == 256 and (corpus.train == 257).sum() == 36 and (corpus.val == 257).sum() == 4
    seqs = D.sequences(corpus.train, np.arange(corpus.n_train), 16)
    assert seqs.shape == (corpus.n_train, 17)
    # inputs and targets come from one stream: each window starts where the last one's inputs end
    np.testing.assert_array_equal(seqs[1:, 0], seqs[:-1, 16])
    assert bytes(seqs[0, 1:17].tolist()).decode() == docs[0][:16]
    # the held-out documents are whole documents, none of them in the training stream
    train_text = ByteTokenizer().decode(corpus.train)
    held_out = [d for d in docs if d not in train_text]
    assert len(held_out) == 4 and all(d in ByteTokenizer().decode(corpus.val) for d in held_out)


def test_the_validation_split_does_not_depend_on_the_seed():
    cfg = _train_cfg()
    docs = [f"doc {i}" for i in range(100)]
    a = D.build_corpus(docs, ByteTokenizer(), cfg.model, 4, 0.1)
    b = D.build_corpus(docs, ByteTokenizer(), _train_cfg("train.seed=7").model, 4, 0.1)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.fingerprint == b.fingerprint


def test_order_is_a_function_of_the_step_and_each_epoch_is_a_permutation():
    n, batch = 10, 4
    steps = [D.train_indices(s, batch, n, seed=3) for s in range(5)]  # 20 sequences = 2 epochs
    flat = np.concatenate(steps)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # a new permutation per epoch
    np.testing.assert_array_equal(D.train_indices(3, batch, n, seed=3), steps[3])  # resumable by step
    assert not np.array_equal(D.train_indices(0, batch, n, seed=4), steps[0])


def test_jsonl_and_parquet_files_with_a_text_field(tmp_path):
    rows = [{"body": f"row {i} " * 20, "id": i} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:15]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[15:]))
    cfg = _train_cfg(f"train.data={tmp_path}/*.jsonl", "train.text_field=body")
    docs = D.load_documents(cfg.train, tmp_path / "cache")
    assert docs == [r["body"] for r in rows]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["body"] for r in rows]}), tmp_path / "c.parquet")
    assert D.load_documents(_train_cfg(f"train.data={tmp_path / 'c.parquet'}").train, tmp_path / "cache") == docs
    with pytest.raises(D.DataError, match=r"has no column 'text' \(columns: body, id\); set train.text_field"):
        D.load_documents(_train_cfg(f"train.data={tmp_path / 'a.jsonl'}").train, tmp_path / "cache")
    with pytest.raises(D.DataError, match="cannot tell the format"):
        D.file_format(tmp_path / "x.csv")


def test_a_checkpoints_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "in": 1, "the": 2, "beginning": 3, "god": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = _train_cfg(f"train.tokenizer={tmp_path}", "model.vocab_size=260")
    loaded = D.training_tokenizer(cfg.train, cfg.model)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("in the beginning god") == [1, 2, 3, 4]
    # "auto" takes the tokenizer of train.init_from
    auto = D.training_tokenizer(_train_cfg(f"train.init_from={tmp_path}").train, cfg.model)
    assert isinstance(auto, HFTokenizer)
    with pytest.raises(D.DataError, match=r"the tokenizer has 260 tokens but model.vocab_size=100"):
        D.training_tokenizer(_train_cfg("train.tokenizer=byte", "model.vocab_size=100", "model.bos_id=1",
                                    "model.eos_id=2").train, _train_cfg("model.vocab_size=100", "model.bos_id=1",
                                                                        "model.eos_id=2").model)
    with pytest.raises(D.DataError, match="no tokenizer.json there"):
        D.training_tokenizer(_train_cfg(f"train.tokenizer={tmp_path / 'nope'}").train, cfg.model)
    # a SentencePiece-only directory is refused, not silently read as bytes
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(b"\x0a\x00")
    for option in ("train.tokenizer=auto", f"train.tokenizer={spm}"):
        with pytest.raises(D.DataError, match=r"SentencePiece tokenizer.model but no tokenizer.json.*save_pretrained"):
            D.training_tokenizer(_train_cfg(f"train.init_from={spm}", option).train, cfg.model)


def test_a_hub_dataset_that_cannot_be_loaded_says_what_to_change(tmp_path):
    cfg = _train_cfg("train.dataset=no-such-owner/no-such-dataset")
    with pytest.raises(D.DataError, match=r"train.dataset='no-such-owner/no-such-dataset' could not be loaded.*check the name"):
        D.load_documents(cfg.train, tmp_path / "cache")
