"""The Wikipedia-topic classification task: splits, cached head, mean-pooled classifier, evaluation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from autocompress.calib import DataConfig
from autocompress.errors import DataError
from autocompress.evaluate import Evaluator, tasks
from autocompress.evaluate.metrics import Classification, class_logits
from autocompress.model import load_model
from autocompress.model.tokenizer import ByteTokenizer

SMALL = tasks.SplitSizes(eval=40, proxy=12, calib=12, head_train=300)


def _tiny_base(folder):
    """Write a tiny random-init BertModel folder with the byte tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    BertModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    ByteTokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture
def tiny_base(tmp_path, monkeypatch):
    """A tiny base model folder; the cache is private to the test."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    return _tiny_base(tmp_path / "tiny-bert-base")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A classifier folder (tiny base + a head trained on the SMALL splits), built once for the module."""
    root = tmp_path_factory.mktemp("topics")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOCOMPRESS_CACHE", str(root / "cache"))
        return tasks.classifier_dir(_tiny_base(root / "tiny-bert-base"), SMALL)


def test_splits_are_document_disjoint_fixed_and_eleven_classes():
    articles, classes, _ = tasks.topic_articles()
    assert len(classes) == 11 and tasks.DROPPED_TOPIC not in classes
    assert len(articles) == len({a.title for a in articles})
    for sizes in (SMALL, tasks.SIZES):
        splits = tasks.topic_splits(sizes)
        titles = {name: {a.title for a in arts} for name, arts in splits.items()}
        names = list(titles)
        for i, a in enumerate(names):
            assert len(titles[a]) == len(splits[a])
            for b in names[i + 1 :]:
                assert not titles[a] & titles[b], (a, b)
        assert [len(splits[n]) for n in ("eval", "proxy", "calib")] == [sizes.eval, sizes.proxy, sizes.calib]
        assert splits == tasks.topic_splits(sizes)  # fixed seed: the same cut every time
    assert tasks.topic_splits(SMALL)["eval"] != tasks.topic_splits(SMALL, seed=1)["eval"]


def test_topic_data_rows_are_single_labelled_articles():
    tok = ByteTokenizer()
    data = tasks.load_topic_data(tok, DataConfig(seq_len=48), SMALL)
    assert data.eval.shape == (SMALL.eval, 48) and data.proxy.shape[0] == SMALL.proxy
    assert data.calib.shape[0] == SMALL.calib
    assert (data.eval[:, 0] == tok.bos_token_id).all()  # each row starts its own article
    assert data.eval_labels.shape == (SMALL.eval,) and int(data.eval_labels.min()) >= 0
    assert int(data.eval_labels.max()) < len(data.classes) == 11
    lengths = (data.eval != tok.pad_token_id).sum(1)
    assert (lengths[:-1] >= lengths[1:]).all()  # longest first, so batches trim their padding
    # the label of a row is its article's topic
    eval_articles = tasks.topic_splits(SMALL)["eval"]
    first = next(a for a in eval_articles if tasks.encode_article(tok, a.text, 48) == data.eval[0].tolist())
    assert data.classes[int(data.eval_labels[0])] == data.classes[first.label]
    # proxy rows keep the split's (random) order, so a prefix is a fair subset; every row is its whole article
    wide = tasks.load_topic_data(tok, DataConfig(seq_len=4096), SMALL)
    proxy_articles = tasks.topic_splits(SMALL)["proxy"]
    for row, article in zip(wide.proxy, proxy_articles, strict=True):
        ids = tasks.encode_article(tok, article.text, 4096)
        assert row[: len(ids)].tolist() == ids and (row[len(ids) :] == tok.pad_token_id).all()
    assert tasks.load_topic_data(tok, DataConfig(seq_len=48), SMALL).data_hash == data.data_hash
    assert tasks.load_topic_data(tok, DataConfig(seq_len=40), SMALL).data_hash != data.data_hash
    with pytest.raises(DataError, match="drop --data"):
        tasks.load_topic_data(tok, DataConfig(source="x.txt"), SMALL)


def test_head_is_trained_once_then_read_from_the_cache(tiny_base, monkeypatch):
    calls = []
    real = tasks.train_head

    def counting(features, labels, c=tasks.HEAD_C):
        calls.append(features.shape)
        return real(features, labels, c)

    monkeypatch.setattr(tasks, "train_head", counting)
    first = tasks.classifier_dir(tiny_base, SMALL)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = tasks.classifier_dir(tiny_base, SMALL)
    assert again == first and len(calls) == 1 and calls[0] == (SMALL.head_train, 32)
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no half-written folder left
    info = json.loads((first / "autocompress-head.json").read_text())
    assert info["head_train_articles"] == SMALL.head_train and 0.0 <= info["eval_accuracy"] <= 1.0
    other = tasks.classifier_dir(tiny_base, SMALL, seed=7)  # another split is another head
    assert other != first and len(calls) == 2

    lm = load_model(first)
    assert isinstance(lm.model, tasks.MeanPoolBertForSequenceClassification)
    assert lm.anatomy.task == "encoder" and len(lm.anatomy.linears) == 12
    assert lm.task_data is tasks.load_topic_data
    assert lm.model.config.id2label[0] == tasks.topic_articles()[1][0]
    assert lm.anatomy.model_hash == load_model(first).anatomy.model_hash


def test_mean_pooling_ignores_padding_and_matches_the_head_features(tiny_classifier):
    lm = load_model(tiny_classifier)
    model = lm.model
    ids = torch.tensor([[1, 40, 50, 60, 2]])
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], 1)
    out = model(input_ids=ids).logits
    assert torch.allclose(model(input_ids=padded).logits, out, atol=1e-5)
    # same result with the mask given explicitly and no trimming (what ONNX export traces)
    mask = (padded != 0).long()
    hidden = model.bert(input_ids=padded, attention_mask=mask)[0]
    manual = model.classifier(tasks.pool(hidden, mask, True))
    assert torch.allclose(manual, out, atol=1e-5)
    feats = tasks.sentence_embeddings(model.bert, padded, 0)
    assert torch.allclose(model.classifier(feats), out, atol=1e-5)
    assert feats.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_evaluator_scores_the_classifier(tiny_classifier):
    lm = load_model(tiny_classifier)
    data = tasks.load_topic_data(lm.tokenizer, DataConfig(seq_len=48), SMALL)
    ev = Evaluator(lm.model, data, lm.anatomy.task)
    assert ev.full_metric == "accuracy"
    assert ev.base_logprobs.shape == (SMALL.proxy, 11)
    same = ev.proxy(lm.model)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    base = ev.base_full()
    assert isinstance(base, Classification) and base.n == SMALL.eval and base.top1_agreement == 1.0
    pred = class_logits(lm.model, data.eval).argmax(-1)
    assert base.accuracy == pytest.approx(float((pred == data.eval_labels).float().mean()))
    noisy = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in noisy.bert.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    worse = ev.full(noisy)
    assert worse.top1_agreement < 1.0 and ev.proxy(noisy).kl > 1e-4
    assert set(worse.metrics()) == {"accuracy", "macro_f1", "ece", "eval_top1_agreement"}


def test_classifier_exports_to_onnx_and_hf(tiny_classifier, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from autocompress.export.hf import export_hf
    from autocompress.export.onnx import export_onnx
    from autocompress.plan import ModelRef, Plan

    lm = load_model(tiny_classifier)
    plan = Plan(model=ModelRef.of(lm.anatomy))
    exp = export_onnx(lm.model, lm.anatomy, plan, tmp_path / "m.onnx", quantize=False)
    ids = torch.tensor([[1, 40, 50, 60, 2, 0, 0], [1, 70, 80, 90, 100, 110, 2]])
    sess = ort.InferenceSession(str(exp.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": (ids != 0).long().numpy()})[0]
    assert np.allclose(got, lm.model(input_ids=ids).logits.numpy(), atol=1e-4)
    export_hf(lm.model, plan, tmp_path / "hf", lm.tokenizer)
    info = json.loads((tmp_path / "hf" / "autocompress.json").read_text())
    assert not info["loadable_with_plain_transformers"] and "pooling" in info["not_loadable_because"][-1]
    back = load_model(tmp_path / "hf")
    assert isinstance(back.model, tasks.MeanPoolBertForSequenceClassification)
    assert back.anatomy.model_hash == lm.anatomy.model_hash


def test_compressed_classifier_keeps_its_pooling_and_is_scored(tiny_classifier, tmp_path, monkeypatch):
    from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan
    from autocompress.workbench import Workbench

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "SIZES", SMALL)
    wb = Workbench.open(str(tiny_classifier), DataConfig(seq_len=48))
    assert isinstance(wb.data, tasks.TopicTokenData) and wb.data.eval.shape[0] == tasks.SIZES.eval
    plan = Plan(
        model=ModelRef.of(wb.lm.anatomy),
        default=LayerChoice(bits=4, group_size=16, sparsity=0.5),
        blocks={0: BlockChoice(keep_heads=2, keep_mlp_channels=32)},
        drop_blocks=(1,),
        provenance=wb.provenance(),
    )
    small = wb.apply(plan)
    assert isinstance(small, tasks.MeanPoolBertForSequenceClassification) and len(small.bert.encoder.layer) == 1
    ev = Evaluator(wb.lm.model, wb.data, wb.lm.anatomy.task)
    fid, res = ev.proxy(small), ev.full(small)
    assert fid.kl > 0.0 and 0.0 <= fid.top1_agreement <= 1.0
    assert res.n == tasks.SIZES.eval and 0.0 <= res.accuracy <= 1.0 and 0.0 <= res.ece <= 1.0
    assert ev.base_full().top1_agreement == 1.0


def _search_topics(model, tmp_path, trials):
    import autocompress as ac

    return ac.search(
        model=model,
        hw="jetson",
        space="quant-only",
        trials=trials,
        study="topics",
        out=tmp_path / "studies",
        data=DataConfig(seq_len=64),
        full_eval=2,
    )


def _check_front_has_accuracy(result):
    base = result.base_metrics
    assert 0.0 <= base["ece"] <= 1.0 and 0.0 <= base["macro_f1"] <= 1.0
    scored = [c for c in [*result.pareto, *result.baselines.values()] if "accuracy" in c.metrics]
    assert scored and all(0.0 <= c.metrics["eval_top1_agreement"] <= 1.0 for c in scored)
    unc = result.baselines["uncompressed"].metrics
    assert unc["accuracy"] == pytest.approx(base["accuracy"]) and unc["eval_top1_agreement"] == 1.0
    summary = (result.study_dir / "summary.md").read_text()
    assert "| accuracy |" in summary and "macro-F1" in summary
    saved = json.loads((result.study_dir / "pareto.json").read_text())
    assert any("accuracy" in c["metrics"] for c in saved["pareto"])


def test_search_on_a_tiny_topic_classifier_scores_its_front(tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "SIZES", SMALL)
    _check_front_has_accuracy(_search_topics(str(tiny_classifier), tmp_path, trials=3))


@pytest.mark.slow
def test_search_on_minilm_wiki_topics_reports_accuracy_on_the_front(tmp_path, monkeypatch):
    """End to end on the real MiniLM: head trained (small split, private cache), searched, front scored."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "SIZES", tasks.SplitSizes(eval=48, proxy=8, calib=8, head_train=200))
    result = _search_topics("minilm-wiki-topics", tmp_path, trials=4)
    assert result.base_metrics["accuracy"] > 0.4  # 11 classes: the head learned (majority class is ~20 %)
    _check_front_has_accuracy(result)


def test_cli_evaluate_prints_the_classification_metrics(tiny_classifier, tmp_path, monkeypatch, capsys):
    from autocompress.cli import main

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "SIZES", SMALL)
    code = main(["evaluate", "--model", str(tiny_classifier)])
    out = capsys.readouterr().out
    assert code in (0, None)
    assert f"accuracy ({SMALL.eval} articles)" in out and "macro-F1" in out and "expected calibration error" in out
    assert "perplexity" not in out
