"""Real tiny training runs on the CPU: finetune, linear probe with its feature cache, regression,
resume after a real interruption, bit-for-bit determinism, offline pretrained weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from emopipe.catalog import ExperimentSpec, load_catalog
from emopipe.core import trained_model
from emopipe.core.images import build_arrays, decode_resize, default_arrays_root
from emopipe.core.device_data import InputPipeline, random_resized_crop_flip
from emopipe.core.models import ModelError, Normalization, create_model
from emopipe.core.synthetic import render, synthetic_listing
from emopipe.core.trained_model import (TrainingData, TrainingError, load_checkpoint, load_training_data, predict,
                                        record_model, train_model)
from emopipe.fingerprint import sha256_bytes, sha256_file
from emopipe.paths import object_path, objects_dir
from emopipe_tests.conftest import encode

# Other test files run on the same 2 cores; more threads only contend.
torch.set_num_threads(2)

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def colour_images(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class is the colour of a square at a random place: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(COLOURS)
    x = rng.integers(60, 160, (n, size, size, 3))
    for i, c in enumerate(y):
        s = int(rng.integers(size // 3, size // 2))
        r, q = rng.integers(0, size - s, 2)
        x[i, r:r + s, q:q + s] = COLOURS[c] + rng.integers(-30, 30, 3)
    return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)


def colour_data(n_train: int = 48, n_val: int = 24, size: int = 32) -> TrainingData:
    x_train, y_train = colour_images(n_train, 1, size)
    x_val, y_val = colour_images(n_val, 2, size)
    return TrainingData(["red", "green", "blue"], None, [f"train{i}" for i in range(n_train)],
                        [f"val{i}" for i in range(n_val)], x_train, x_val, y_train, y_val)


PHOTOS = ("chelsea", "coffee", "rocket")


def photo_data(photos, n_train: int = 48, n_val: int = 24, size: int = 32) -> TrainingData:
    """Random crops of three real photos, at random exposure: what ImageNet features tell apart."""
    def crops(n, seed):
        rng = np.random.default_rng(seed)
        y = np.arange(n) % len(PHOTOS)
        out = []
        for c in y:
            img = photos[PHOTOS[c]]
            h, w = (int(d * rng.uniform(0.5, 0.9)) for d in img.shape[:2])
            r, q = rng.integers(0, img.shape[0] - h + 1), rng.integers(0, img.shape[1] - w + 1)
            crop = np.asarray(Image.fromarray(img[r:r + h, q:q + w]).resize((size, size), Image.BILINEAR))
            out.append(np.clip(crop * rng.uniform(0.6, 1.2), 0, 255).astype(np.uint8))
        return np.stack(out), y

    (x_train, y_train), (x_val, y_val) = crops(n_train, 1), crops(n_val, 2)
    return TrainingData(list(PHOTOS), None, [f"photo-train{i}" for i in range(n_train)],
                        [f"photo-val{i}" for i in range(n_val)], x_train, x_val, y_train, y_val)


def experiment(**kw) -> ExperimentSpec:
    base = dict(name="tiny", dataset="tiny", image_size=32, model="test_vit", pretrained="none",
                mode="finetune", epochs=3, batch_size=8, lr=1e-3, weight_decay=1e-4, patience=0)
    return ExperimentSpec(**{**base, **kw})


# --- models ---------------------------------------------------------------------------------------


def test_unknown_model_name_is_a_clear_error_with_close_matches():
    with pytest.raises(ModelError) as e:
        create_model("resnet5O", num_outputs=3, image_size=32, pretrained="none")
    message = str(e.value)
    assert "'resnet5O'" in message and "resnet50" in message and "timm.list_models(" in message


def test_small_images_get_a_cifar_stem_and_vits_their_size():
    resnet, norm = create_model("resnet18", num_outputs=4, image_size=32, pretrained="none")
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    assert norm.mean == pytest.approx((0.485, 0.456, 0.406))
    lite, _ = create_model("tf_efficientnet_lite0", num_outputs=0, image_size=32, pretrained="none")
    assert lite.conv_stem.stride == (1, 1)
    vit, _ = create_model("test_vit", num_outputs=5, image_size=32, pretrained="none")
    big, _ = create_model("resnet18", num_outputs=4, image_size=224, pretrained="none")
    with torch.no_grad():
        assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
        assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert big.conv1.stride == (2, 2) and not isinstance(big.maxpool, torch.nn.Identity)


def test_timm_weights_offline_fail_fast_with_the_model_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="'resnet18'.*pretrained"):
        create_model("resnet18", num_outputs=3, image_size=32, pretrained="timm")
    with pytest.raises(ModelError, match="no pretrained weights for 'efficientnetv2_s'.*tf_efficientnetv2_s"):
        create_model("efficientnetv2_s", num_outputs=3, image_size=32, pretrained="timm")


def test_efficientnet_lite0_package_weights_recognise_imagenet_photos(photos):
    model, norm = create_model("tf_efficientnet_lite0", num_outputs=1000, image_size=224, pretrained="efficientnet_lite0")
    assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5)
    info = {"normalization": norm.as_dict(), "task": "classification", "num_outputs": 1000}
    x = np.stack([np.asarray(Image.fromarray(photos[n]).resize((224, 224), Image.BICUBIC)) for n in ("chelsea", "coffee")])
    top = predict(model, info, x, device="cpu").argmax(1)
    assert 281 <= top[0] <= 285  # ImageNet's cat classes (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert top[1] == 967  # espresso


def test_local_weights_files_load_and_misfits_are_clear_errors(tmp_path):
    import timm

    vit = timm.create_model("test_vit")  # built for 160 px: timm's loader resamples its position embedding
    resnet = timm.create_model("resnet18")
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    torch.save({"state_dict": resnet.state_dict(), "epoch": 90}, tmp_path / "resnet.pth.tar")
    small_vit, norm = create_model("test_vit", num_outputs=3, image_size=32, pretrained=str(tmp_path / "vit.pth"))
    assert torch.equal(small_vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert small_vit.pos_embed.shape[1] < vit.pos_embed.shape[1] and norm.mean == (0.5, 0.5, 0.5)
    small_resnet, _ = create_model("resnet18", num_outputs=0, image_size=32, pretrained=str(tmp_path / "resnet.pth.tar"))
    assert torch.equal(small_resnet.layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    assert small_resnet.conv1.kernel_size == (3, 3)  # the CIFAR stem, started from the centre of the 7x7 one
    with pytest.raises(ModelError, match="does not load into model 'resnet18'"):
        create_model("resnet18", num_outputs=3, image_size=32, pretrained=str(tmp_path / "vit.pth"))
    with pytest.raises(ModelError, match="does not exist"):
        create_model("resnet18", num_outputs=3, image_size=32, pretrained=str(tmp_path / "missing.pth"))


# --- the data path ------------------------------------------------------------------------------------


def test_augmentation_draws_a_crop_and_flip_per_sample(photos):
    image = torch.from_numpy(np.array(Image.fromarray(photos["astronaut"]).resize((32, 32))))
    batch = image.expand(64, 32, 32, 3).permute(0, 3, 1, 2).float()
    out = random_resized_crop_flip(batch, torch.Generator().manual_seed(0))
    assert len({o.numpy().tobytes() for o in out}) == 64  # torchvision's v2 on a batch: one crop for all
    # Full-size boxes: each output is exactly the image or its mirror, about half of them mirrored.
    whole = random_resized_crop_flip(batch, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    same = [torch.allclose(o, batch[0], atol=1e-3) for o in whole]
    mirrored = [torch.allclose(o, batch[0].flip(-1), atol=1e-3) for o in whole]
    assert all(a != b for a, b in zip(same, mirrored)) and 16 < sum(mirrored) < 48


def test_pipeline_normalizes_like_the_weights_expect():
    pipeline = InputPipeline(Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), torch.device("cpu"))
    x = pipeline(torch.tensor([0, 255, 51], dtype=torch.uint8).expand(2, 4, 4, 3))
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[:, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))


# --- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One uninterrupted finetune run, shared by the tests that compare against it."""
    work = tmp_path_factory.mktemp("finetune")
    logs = []
    result = train_model(experiment(), colour_data(), split_id="s1", work_dir=work / "models",
                         log=logs.append, device="cpu", feature_cache=work / "features")
    return result, logs


def test_finetune_learns_and_its_checkpoint_predicts(finetuned, db):
    result, logs = finetuned
    data = colour_data()
    assert result.epochs_run == 3 and [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val >= 0.8, result.history  # chance: 1/3
    assert result.checkpoint_path.name == f"{result.model_id}.pt" == f"{sha256_file(result.checkpoint_path)}.pt"
    assert result.curve_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("epoch 3/3" in line for line in logs)

    model, info = load_checkpoint(result.checkpoint_path)
    assert info["classes"] == ["red", "green", "blue"] and info["image_size"] == 32 and info["best_epoch"] == result.best_epoch
    probabilities = predict(model, info, data.x_val, device="cpu", batch_size=7)
    assert probabilities.shape == (24, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert (probabilities.argmax(1) == data.y_val).mean() == pytest.approx(result.best_val)

    model_id = record_model(db, result, experiment(), "s1", "fp-of-s1")
    with db.connect() as conn:
        row = conn.execute("SELECT model_id, experiment, split_id, split_fingerprint, architecture, hyperparameters, "
                           "classes, epochs_run, best_epoch, history, device, versions, code_version, "
                           "images_per_second, checkpoint_path FROM models").fetchall()
    assert len(row) == 1 and row[0][:5] == (model_id, "tiny", "s1", "fp-of-s1", "test_vit")
    assert json.loads(row[0][5])["lr"] == 1e-3 and json.loads(row[0][6]) == ["red", "green", "blue"]
    assert row[0][7:9] == (3, result.best_epoch) and len(json.loads(row[0][9])) == 3
    assert row[0][10].startswith("cpu") and "torch" in json.loads(row[0][11]) and row[0][12].startswith("0.")
    assert row[0][13] > 0 and row[0][14] == str(result.checkpoint_path)


def test_same_seed_and_inputs_give_the_same_checkpoint_bytes(finetuned, tmp_path):
    again = train_model(experiment(), colour_data(), split_id="s1", work_dir=tmp_path / "models",
                        log=lambda _: None, device="cpu")
    assert again.model_id == finetuned[0].model_id


def test_a_trained_checkpoint_is_a_weights_file_for_another_experiment(finetuned):
    result = finetuned[0]
    backbone, norm = create_model("test_vit", num_outputs=0, image_size=32, pretrained=str(result.checkpoint_path))
    model, info = load_checkpoint(result.checkpoint_path)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.state_dict().items())
    assert norm.as_dict() == info["normalization"]
    with pytest.raises(ModelError, match="does not fit 'resnet18'"):
        create_model("resnet18", num_outputs=0, image_size=32, pretrained=str(result.checkpoint_path))


class Killed(Exception):
    pass


def test_an_interrupted_run_resumes_after_its_last_epoch(finetuned, tmp_path):
    seen = []

    def die_after_epoch_1(epoch, history):
        seen.append(epoch)
        if epoch == 1:
            raise Killed

    kwargs = dict(split_id="s1", work_dir=tmp_path / "models", log=lambda _: None, device="cpu",
                  on_epoch_end=die_after_epoch_1)
    with pytest.raises(Killed):
        train_model(experiment(), colour_data(), **kwargs)
    assert not list((tmp_path / "models").glob("*.pt"))  # no final checkpoint yet
    result = train_model(experiment(), colour_data(), **kwargs)
    assert seen == [1, 2, 3]  # epoch 1 was not trained again
    assert result.resumed_from_epoch == 1 and [h["epoch"] for h in result.history] == [1, 2, 3]
    # RNG, optimizer and scheduler states came back too: the same weights as the uninterrupted run.
    assert result.model_id == finetuned[0].model_id
    done = train_model(experiment(), colour_data(), **kwargs)  # finished: returned, not retrained
    assert seen == [1, 2, 3] and done.model_id == result.model_id
    # Another hyperparameter is another run, not a resume.
    other = train_model(experiment(lr=2e-3, epochs=1), colour_data(), **{**kwargs, "on_epoch_end": lambda e, _: seen.append(e)})
    assert seen == [1, 2, 3, 1] and other.resumed_from_epoch == 0


def test_linear_probe_trains_a_head_on_cached_features(tmp_path, monkeypatch, photos):
    data = photo_data(photos)
    probe = dict(model="tf_efficientnet_lite0", pretrained="efficientnet_lite0", mode="linear_probe",
                 epochs=4, lr=3e-3, head_hidden=32)
    logs = []
    first = train_model(experiment(**probe), data, split_id="s1", work_dir=tmp_path / "models",
                        log=logs.append, device="cpu", feature_cache=tmp_path / "features")
    assert first.best_val >= 0.9, first.history
    assert any("computing 72" in line for line in logs)
    shards = sorted((tmp_path / "features").rglob("*.npy"))
    assert len(shards) == 1 and np.load(shards[0]).shape == (72, 1280)

    model, info = load_checkpoint(first.checkpoint_path)  # backbone + head: predicts from images
    assert (predict(model, info, data.x_val, device="cpu").argmax(1) == data.y_val).mean() == pytest.approx(first.best_val)

    # Same backbone, another head and soft labels: not one feature computed again.
    def no_features(*args, **kwargs):
        raise AssertionError("features were computed again")

    monkeypatch.setattr(trained_model.features, "extract_features", no_features)
    soft = TrainingData(data.classes, None, data.train_ids, data.val_ids, data.x_train, data.x_val,
                        np.eye(3, dtype=np.float32)[data.y_train] * 0.8 + 0.2 / 3, data.y_val)
    logs.clear()
    second = train_model(experiment(**{**probe, "head_hidden": 16, "soft_labels": ("r", "g", "b")}), soft,
                         split_id="s1", work_dir=tmp_path / "models", log=logs.append, device="cpu",
                         feature_cache=tmp_path / "features")
    assert any("72 of 72 cached" in line and "computing 0" in line for line in logs)
    assert second.best_val >= 0.9 and second.model_id != first.model_id


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


@pytest.mark.parametrize("optimizer, lr, schedule", [("sgd", 0.05, "plateau"), ("adagrad", 0.01, "none")])
def test_sgd_and_adagrad_with_plateau_and_constant_schedules(optimizer, lr, schedule, photos, feature_cache, tmp_path):
    exp = experiment(model="tf_efficientnet_lite0", pretrained="efficientnet_lite0", mode="linear_probe", epochs=4,
                     head_hidden=32, optimizer=optimizer, lr=lr, schedule=schedule, weight_decay=0.01, label_smoothing=0.1)
    result = train_model(exp, photo_data(photos), split_id="s1", work_dir=tmp_path, log=lambda _: None,
                         device="cpu", feature_cache=feature_cache)
    assert result.best_val >= 0.9, result.history
    state = torch.load(result.run_dir / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.01]  # none on biases (timm's grouping)
    if optimizer == "sgd":
        assert all(g["momentum"] == 0.9 and g["nesterov"] for g in groups)
        assert state["scheduler"]["mode"] == "max"  # ReduceLROnPlateau on val accuracy
    else:
        assert "lr_decay" in groups[0] and state["scheduler"] is None
        assert {h["lr"] for h in result.history} == {lr}


def test_early_stopping_after_patience_epochs_without_improvement(photos, feature_cache, tmp_path):
    logs = []
    exp = experiment(model="tf_efficientnet_lite0", pretrained="efficientnet_lite0", mode="linear_probe", epochs=10,
                     lr=0.0, patience=2, head_hidden=32)  # lr 0: nothing improves after epoch 1
    result = train_model(exp, photo_data(photos), split_id="s1", work_dir=tmp_path, log=logs.append,
                         device="cpu", feature_cache=feature_cache)
    assert result.epochs_run == 3 and result.best_epoch == 1
    assert any("early stop" in line for line in logs)


def test_regression_learns_a_continuous_target(tmp_path):
    x_train, _ = colour_images(60, 3)
    x_val, _ = colour_images(30, 4)

    def targets(x):  # brightness and redness, in [0, 1]
        x = x.astype(np.float32) / 255
        return np.stack([x.mean((1, 2, 3)), x[..., 0].mean((1, 2)) - x[..., 1:].mean((1, 2, 3)) + 0.5], 1)

    data = TrainingData(None, ["brightness", "redness"], [f"t{i}" for i in range(60)], [f"v{i}" for i in range(30)],
                        x_train, x_val, targets(x_train), targets(x_val))
    exp = experiment(task="regression", targets=("brightness", "redness"))
    result = train_model(exp, data, split_id="s1", work_dir=tmp_path / "models", log=lambda _: None, device="cpu")
    assert result.metric == "mse"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    baseline = ((data.y_val - data.y_train.mean(0)) ** 2).mean()  # predicting the training mean
    assert result.best_val < 0.5 * baseline, (result.best_val, baseline)
    model, info = load_checkpoint(result.checkpoint_path)
    outputs = predict(model, info, data.x_val, device="cpu")
    assert outputs.shape == (30, 2) and info["targets"] == ["brightness", "redness"]
    assert ((outputs - data.y_val) ** 2).mean() == pytest.approx(result.best_val, rel=1e-4)


def test_demo_like_probe_beats_twice_chance(tmp_path):
    """The built-in demo's recipe (EfficientNet-Lite0 ImageNet features, 224 px, 8 synthetic classes),
    on 6 images per class instead of 100."""
    demo = load_catalog().experiment("demo")
    listing = synthetic_listing(6, seed=0)
    x = np.stack([decode_resize(render(uri), 224, "crop") for uri, _, _ in listing])
    classes = sorted({label for _, label, _ in listing})
    y = np.array([classes.index(label) for _, label, _ in listing])
    val = np.arange(len(y)) % 6 >= 4  # 4 train + 2 val per class
    data = TrainingData(classes, None, [u for (u, _, _), v in zip(listing, val) if not v],
                        [u for (u, _, _), v in zip(listing, val) if v], x[~val], x[val], y[~val], y[val])
    result = train_model(demo, data, split_id="demo", work_dir=tmp_path / "models", log=lambda _: None,
                         device="cpu", feature_cache=tmp_path / "features")
    assert result.best_val >= 2 / len(classes), result.history


# --- from the database ------------------------------------------------------------------------------


def test_load_training_data_joins_splits_images_and_arrays(db, photos):
    ids = {}
    with db.transaction() as conn:
        for n, name in enumerate(["chelsea", "coffee", "astronaut", "rocket", "camera", "coins"]):
            data = encode(photos[name])
            image_id = sha256_bytes(data)
            path = object_path(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            ids[name] = image_id
            attributes = {"valence": 0.1 * n, "share_cat": 0.75 if n % 2 else 0.5, "share_thing": 0.25 if n % 2 else 0.5}
            conn.execute("INSERT INTO images (image_id, dataset, source_uri, label, attributes) VALUES (?, 'd', ?, ?, ?)",
                         [image_id, f"{name}.jpg", "cat" if n % 2 else "thing", json.dumps(attributes)])
            conn.execute("INSERT INTO splits VALUES ('s', ?, ?)", [image_id, ["train", "train", "val", "val", "test", "train"][n]])
    build_arrays(db, list(ids.values()), 32, objects_root=objects_dir(), arrays_root=default_arrays_root(), workers=1)

    data = load_training_data(db, "s", experiment(dataset="d"))
    assert data.classes == ["cat", "thing"]
    assert data.train_ids == sorted([ids["chelsea"], ids["coffee"], ids["coins"]])
    assert data.val_ids == sorted([ids["astronaut"], ids["rocket"]])
    assert data.x_train.shape == (3, 32, 32, 3) and data.x_train.dtype == np.uint8
    by_id = {i: n for n, i in ids.items()}
    assert list(data.y_train) == [0 if by_id[i] in ("coffee", "coins") else 1 for i in data.train_ids]
    expected = decode_resize(encode(photos[by_id[data.val_ids[0]]]), 32, "squash")
    assert np.array_equal(data.x_val[0], expected)

    soft = load_training_data(db, "s", experiment(dataset="d", soft_labels=("share_cat", "share_thing")))
    assert soft.y_train.shape == (3, 2) and np.allclose(soft.y_train.sum(1), 1)
    regression = load_training_data(db, "s", experiment(dataset="d", task="regression", targets=("valence",)))
    assert regression.classes is None and regression.y_val.shape == (2, 1)
    with pytest.raises(TrainingError, match="arousal"):
        load_training_data(db, "s", experiment(dataset="d", task="regression", targets=("arousal",)))
