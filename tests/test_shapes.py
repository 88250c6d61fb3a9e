"""The shapes dataset (deterministic, labelled, cached shards read by data.source=shapes) and the
judge of samples (a classifier trained on its real images: accuracy, diversity, save / load)."""
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from movq.config import DataConfig
from movq.data.shapes import SHAPE_CLASSES, render_shape, render_shapes, shapes_dataset, shapes_split
from movq.data.shards import iter_tar, read_manifest
from movq.data.stream import build_dataloader, build_dataset
from movq.evaluation.judge import (
    JudgeConfig,
    ShapeJudge,
    class_accuracy,
    diversity,
    judge_samples,
    predict,
    real_reference,
    train_judge,
)


def _cfg(cache, **kw):
    base = dict(source="shapes", image_size=32, batch_size=4, num_workers=0, cache_dir=str(cache),
                builtin_train_size=16, builtin_val_size=8)
    base.update(kw)
    return DataConfig(**base)


def test_render_is_deterministic_and_labelled():
    a, la, info = render_shape(3, 32, seed=0)
    b, lb, _ = render_shape(3, 32, seed=0)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and la == lb == 3 and info["kind"] == SHAPE_CLASSES[3]
    assert not np.array_equal(a, render_shape(3, 32, seed=1)[0])  # another seed, another image
    assert not np.array_equal(a, render_shape(3, 32, split="val")[0])  # val is not train
    x, y = render_shapes(10, 32)
    assert list(y) == [i % len(SHAPE_CLASSES) for i in range(10)]  # balanced: class = i mod 8
    assert np.array_equal(render_shapes(4, 32, start=6)[0], x[6:])  # image i does not depend on n
    assert len({im.tobytes() for im in x}) == 10
    # the shape is drawn: its colour covers a good part of the image
    img, _, info = render_shape(0, 64)
    near = np.linalg.norm(img.astype(float) - np.array(info["colour"]), axis=2) < 30
    assert near.mean() > 0.1
    with pytest.raises(ValueError, match="split"):
        render_shape(0, split="test")


def test_shards_are_cached_reproducible_and_match_the_renderer(tmp_path):
    cfg = _cfg(tmp_path / "a")
    paths = shapes_dataset(cfg)
    train = read_manifest(paths["train"])
    assert train["classes"] == list(SHAPE_CLASSES) and train["count"] == 16 and train["image_format"] == "png"
    assert read_manifest(paths["val"])["count"] == 8
    for s in train["shards"]:
        assert hashlib.sha256((paths["train"] / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert shapes_split(cfg, "train") == paths["train"]  # built once, then found
    again = read_manifest(shapes_split(_cfg(tmp_path / "b"), "train"))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in train["shards"]]
    other = read_manifest(shapes_split(_cfg(tmp_path / "c", seed=1), "train"))
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in train["shards"]]
    # a larger val split beside it leaves the train split alone (sizes are not in the key)
    assert shapes_split(_cfg(tmp_path / "a", builtin_val_size=12), "train") == paths["train"]
    first = sorted(paths["train"].glob("*.tar"))[0]
    key, members = next(iter_tar(str(first)))
    img, label, info = render_shape(int(key), 32)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["png"]))), img)
    assert int(members["cls"]) == label and json.loads(members["json"])["kind"] == SHAPE_CLASSES[label]


def test_data_source_shapes_gives_labelled_batches(tmp_path):
    cfg = _cfg(tmp_path)
    assert build_dataset(cfg, "train").num_classes == len(SHAPE_CLASSES)
    batch = next(iter(build_dataloader(cfg, "train", labels=True)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert ((batch["label"] >= 0) & (batch["label"] < len(SHAPE_CLASSES))).all()
    val = list(build_dataloader(cfg, "val", labels=True))
    labels = torch.cat([b["label"] for b in val])
    assert sorted(labels.tolist()) == list(range(8))  # val images 0…7: one of each class


# --------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------
# A small, quick recipe (the default one is bigger: see movq/evaluation/judge.py).
QUICK = JudgeConfig(image_size=32, downsample=1, widths=(8, 16, 32), train_images=1024, steps=200,
                    batch_size=64, lr=5e-3, augment=False)


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    model, logs = train_judge(QUICK)
    assert logs["train_accuracy"] > 0.8
    return model


@pytest.fixture(scope="module")
def real():
    return real_reference(QUICK, 256)


def test_judge_is_accurate_on_real_images(judge, real):
    x, y = real
    acc = class_accuracy(judge, x, y)
    assert acc > 0.85, acc  # chance: 1/8
    assert class_accuracy(judge, x, (y + 1) % 8) < 0.2  # the wrong intended class is judged wrong
    # floats in [-1, 1] and uint8 give the same verdict
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(predict(judge, xf), predict(judge, x))


def test_diversity(judge, real):
    x, y = real
    half = len(x) // 2
    same = diversity(judge, x[:half], y[:half], x[half:], y[half:])
    assert 0.8 < same < 1.25, same  # real images against other real images
    # one image per class, repeated: no diversity at all
    firsts = np.stack([x[y == c][0] for c in range(8)])
    collapsed, labels = np.repeat(firsts, 4, axis=0), np.repeat(np.arange(8), 4)
    assert diversity(judge, collapsed, labels, x, y) < 1e-3
    report = judge_samples(judge, x[:half], y[:half], real=(x[half:], y[half:]))
    assert set(report) == {"accuracy", "real_accuracy", "relative_accuracy", "diversity", "per_class"}
    assert set(report["per_class"]) == set(SHAPE_CLASSES)


def test_judge_save_load_and_errors(judge, real, tmp_path):
    path = tmp_path / "judge.safetensors"
    judge.save(path)
    back = ShapeJudge.load(path)
    assert back.config == judge.config
    x = torch.from_numpy(real[0][:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        torch.testing.assert_close(back(x), judge(x))
    with pytest.raises(ValueError, match="training size"):
        judge(torch.zeros(2, 3, 64, 64))
    with pytest.raises(FileNotFoundError, match="judge weights"):
        ShapeJudge.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a judge checkpoint"):
        ShapeJudge.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(judge, real[0][:4], real[1][:3])


def test_pretrained_judge_is_cached_by_recipe(tmp_path, monkeypatch):
    from movq.evaluation import judge as judge_mod

    calls = []
    original = judge_mod.train_judge

    def counting(cfg):
        calls.append(cfg)
        return original(cfg)

    monkeypatch.setattr(judge_mod, "train_judge", counting)
    tiny = JudgeConfig(image_size=16, downsample=1, widths=(4, 8), train_images=64, steps=3, batch_size=8)
    a = judge_mod.pretrained_judge(tmp_path, tiny)
    b = judge_mod.pretrained_judge(tmp_path, tiny)  # loaded, not trained again
    assert len(calls) == 1 and b.config == a.config
    assert [p.name for p in tmp_path.iterdir()] == [f"judge-16px-{tiny.key()}.safetensors"]
    other = JudgeConfig(**{**vars(tiny), "steps": 4})  # another recipe, another file
    assert other.key() != tiny.key()
    judge_mod.pretrained_judge(tmp_path, other)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2


def _sample_folder(folder, images, rule="cycle", classes=SHAPE_CLASSES, n=None):
    """What tools/sample.py leaves: NNNNNN.png, .sample_spec.json and sampling.json."""
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    (folder / ".sample_spec.json").write_text("{}")
    info = {"num_samples": len(images) if n is None else n, "labels": rule, "num_classes": len(classes),
            "classes": list(classes), "kind": "maskgit", "cfg_scale": 2.0}
    (folder / "sampling.json").write_text(json.dumps(info))
    Image.fromarray(images[0]).save(folder / "grid.png")  # not a sample
    return folder


def test_judge_tool_reports_real_and_sample_figures(judge, tmp_path, monkeypatch, capsys):
    from movq.cli import judge as judge_tool

    monkeypatch.setattr(judge_tool, "judge_for", lambda size, cache: judge)  # the quick judge of this module
    x, _ = render_shapes(48, 32, split="val", start=96)  # class = index mod 8: what "cycle" intends
    good = _sample_folder(tmp_path / "good", x)
    wrong = _sample_folder(tmp_path / "wrong", x, rule="class 3")  # all meant to be crosses
    out = tmp_path / "judge.json"
    assert judge_tool.main([f"real-ish={good}", str(wrong), "--json", str(out), "--real", "64"]) == 0
    report = json.loads(out.read_text())
    assert report["real"]["accuracy"] > 0.85 and set(report["samples"]) == {"real-ish", "wrong"}
    r, w = report["samples"]["real-ish"], report["samples"]["wrong"]
    assert r["accuracy"] > 0.85 and r["num_samples"] == 48 and r["meets_target"]
    assert w["accuracy"] < 0.3 and not w["meets_target"] and r["settings"] == {"cfg_scale": 2.0}
    assert 0.5 < r["diversity"] < 2.0
    printed = capsys.readouterr().out
    assert "real images:      accuracy" in printed and "real-ish:" in printed and "misses 90%" in printed
    bad = [
        ([str(_sample_folder(tmp_path / "null", x[:8], rule="null"))], "no intended class"),
        ([str(_sample_folder(tmp_path / "cls", x[:8], classes=("a", "b")))], "not the shapes dataset's"),
        ([str(_sample_folder(tmp_path / "n", x[:8], n=9))], "8 NNNNNN.png samples but sampling.json says 9"),
        ([str(tmp_path)], "no sampling.json"),
    ]
    for args, message in bad:
        assert judge_tool.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
