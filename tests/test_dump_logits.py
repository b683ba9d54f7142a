"""``blda dump-logits``: model kinds, inputs, sharding, resume, errors (tiny CPU models)."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import Asserting, Pointwise, Raising, TinyNet, Transposed, save_scripted

from blda_posthoc.cli import main
from blda_posthoc.core.infer import Preprocess, normalize, select_output
from blda_posthoc.errors import InputError
from blda_posthoc.io.models import load_model
from blda_posthoc.io.store import LogitStore, StoreWriter, encode_logits, expand_store_paths
from blda_posthoc.pipelines.dump_logits import (
    DumpOptions,
    collect_items,
    dump_logits,
    shard_path,
    torchrun_shard,
)

TESTS = Path(__file__).parent
RAW = ["--mean", "0,0,0", "--std", "1,1,1"]


# ----------------------------------------------------------------------------------- fixtures


def write_images(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Write RGB PNGs ``city_a/img_000.png, city_b/img_001.png, ...``; return the pixels."""
    rng = np.random.default_rng(seed)
    images = []
    for index, (h, w) in enumerate(sizes):
        path = root / f"city_{'ab'[index % 2]}" / f"img_{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(path)
        images.append(image)
    return images


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    """Six images in two folders, two sizes (so batches must split by size)."""
    root = tmp_path / "images"
    write_images(root, [(24, 32)] * 4 + [(20, 28)] * 2)
    return root


@pytest.fixture
def script_model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    save_scripted(TinyNet(4).eval(), path)
    return path


@pytest.fixture
def factory_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def onnx_pointwise(path: Path, model: Pointwise) -> Path:
    """Write ``model`` (a 1x1 conv) as an ONNX graph built with onnx.helper."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = model.conv.weight.detach().numpy()
    bias = model.conv.bias.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        "pointwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weight.shape[0], "H", "W"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["dump-logits", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


def read_store(*paths: Path) -> dict[str, np.ndarray]:
    with LogitStore(list(paths)) as store:
        return {record.name: record.logits for record in store}


def reference(model: torch.nn.Module, images: Path, pre: Preprocess) -> dict[str, np.ndarray]:
    """Direct forward pass of ``model`` on every image (no resizing needed: same-size output)."""
    out = {}
    for item in collect_items(images):
        pixels = torch.from_numpy(np.array(Image.open(item.image).convert("RGB")))[None]
        with torch.no_grad():
            logits = model(normalize(pixels, pre))
        out[item.name] = select_output(logits)[0].numpy()
    return out


# ------------------------------------------------------------------------------- model kinds


def test_torchscript_argmax_matches_direct_forward(
    tmp_path: Path, images_dir: Path, script_model: Path
) -> None:
    out = tmp_path / "s.h5"
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images_dir),
            "--out",
            str(out),
            *RAW,
            "--batch-size",
            "3",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, err
    assert "4 channels" in err  # no names given: inferred and said so
    stored = read_store(out)
    expected = reference(TinyNet(4).eval(), images_dir, Preprocess((0, 0, 0), (1, 1, 1)))
    assert sorted(stored) == sorted(expected)
    assert sorted(stored)[:3] == ["city_a/img_000", "city_a/img_002", "city_a/img_004"]
    agree = np.mean(
        np.concatenate([(stored[n].argmax(0) == expected[n].argmax(0)).ravel() for n in stored])
    )
    assert agree >= 0.999
    for name in stored:
        np.testing.assert_allclose(stored[name], expected[name], atol=0.02, rtol=1e-3)
    with h5py.File(out, "r") as f:
        assert f.attrs["dtype"] == "float16"
        assert f["images"]["city_a%2Fimg_000"]["logits"].dtype == np.float16


def test_onnx_model_and_sliding_window_equal_whole(tmp_path: Path, images_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = Pointwise(3).eval()
    onnx_file = onnx_pointwise(tmp_path / "pw.onnx", model)
    common = [
        "--model",
        str(onnx_file),
        "--images",
        str(images_dir),
        "--num-classes",
        "3",
        "--dtype",
        "float32",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]
    code, err = run([*common, "--out", str(tmp_path / "whole.h5")])
    assert code == 0, err
    code, err = run(
        [*common, "--out", str(tmp_path / "slide.h5"), "--window", "10x12", "--stride", "7x5"]
    )
    assert code == 0, err
    whole, slide = read_store(tmp_path / "whole.h5"), read_store(tmp_path / "slide.h5")
    expected = reference(model, images_dir, Preprocess())
    for name in expected:
        np.testing.assert_allclose(whole[name], expected[name], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(slide[name], whole[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("factory", "checkpoint_kind"),
    [
        ("build", "state_dict"),
        ("build_tuple", "nested"),
        ("build_tensor", "module"),
        ("build", "ddp"),
    ],
)
def test_factory_with_checkpoint(
    tmp_path: Path, images_dir: Path, factory_path: None, factory: str, checkpoint_kind: str
) -> None:
    trained = TinyNet(4, output={"build": "dict", "build_tuple": "tuple"}.get(factory, "tensor"))
    with torch.no_grad():  # weights differ from what the factory builds
        for param in trained.parameters():
            param.mul_(-2.0)
    state = trained.state_dict()
    payload = {
        "state_dict": state,
        "nested": {"state_dict": state, "meta": {"epoch": 3}},
        "module": trained,
        "ddp": {"model": {f"module.{k}": v for k, v in state.items()}},
    }[checkpoint_kind]
    ckpt = tmp_path / "ckpt.pth"
    torch.save(payload, ckpt)
    out = tmp_path / "f.h5"
    code, err = run(
        [
            "--model",
            f"tiny_models:{factory}",
            "--checkpoint",
            str(ckpt),
            "--images",
            str(images_dir),
            "--out",
            str(out),
            "--class-names",
            "a,b,c,d",
            "--dtype",
            "float32",
            "--workers",
            "0",
            *(["--trust-checkpoint"] if checkpoint_kind == "module" else []),
        ]
    )
    assert code == 0, err
    expected = reference(trained.eval(), images_dir, Preprocess())
    stored = read_store(out)
    for name in expected:
        np.testing.assert_allclose(stored[name], expected[name], atol=1e-4, rtol=1e-4)
    with LogitStore([out]) as store:
        assert store.class_names == ["a", "b", "c", "d"]


def test_factory_checkpoint_that_does_not_fit(
    tmp_path: Path, images_dir: Path, factory_path: None
) -> None:
    ckpt = tmp_path / "other.pth"
    torch.save(TinyNet(7).state_dict(), ckpt)
    code, err = run(
        [
            "--model",
            "tiny_models:build",
            "--checkpoint",
            str(ckpt),
            "--images",
            str(images_dir),
            "--out",
            str(tmp_path / "x.h5"),
        ]
    )
    assert code == 1
    assert err.startswith(f"error: {ckpt}: ") and "Traceback" not in err


def test_state_dict_given_as_model_file_points_to_factory(tmp_path: Path, images_dir: Path) -> None:
    weights = tmp_path / "weights.pth"
    torch.save(TinyNet(4).state_dict(), weights)
    code, err = run(
        ["--model", str(weights), "--images", str(images_dir), "--out", str(tmp_path / "x.h5")]
    )
    assert code == 1
    assert "package.module:factory" in err and err.count("\n") == 1


def test_onnxruntime_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(InputError, match=r"pip install 'blda-posthoc\[onnx\]'"):
        load_model(str(model_file), None, torch.device("cpu"))


def test_onnx_cpu_fallback_is_warned_only_when_cuda_was_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    model_file = onnx_pointwise(tmp_path / "pw.onnx", Pointwise(4))
    cuda = torch.device("cuda")  # the session is built on CPU: nothing touches CUDA
    notes: list[str] = []
    load_model(str(model_file), None, cuda, warn=notes.append, device_chosen=False)
    assert notes == []  # --device auto: CPU is what onnxruntime has, nothing to warn about
    load_model(str(model_file), None, cuda, warn=notes.append)
    assert len(notes) == 1 and "onnxruntime has no CUDA provider" in notes[0]


def test_channel_count_mismatch(tmp_path: Path, images_dir: Path, script_model: Path) -> None:
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images_dir),
            "--out",
            str(tmp_path / "x.h5"),
            "--num-classes",
            "5",
            "--workers",
            "0",
        ]
    )
    assert code == 1
    assert (
        err == f"error: {script_model}: outputs 4 channels but 5 classes were given "
        "(--class-names / --num-classes)\n"
    )
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images_dir),
            "--out",
            str(tmp_path / "x.h5"),
            "--class-names",
            "cityscapes",
            "--workers",
            "0",
        ]
    )
    assert code == 1 and "19 classes" in err


def onnx_transposed(path: Path) -> Path:
    """An ONNX 1x1 conv whose output is transposed to ``(N, C, W, H)``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    model = Pointwise(3)
    weight = model.conv.weight.detach().numpy()
    bias = model.conv.bias.detach().numpy()
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["y"]),
            helper.make_node("Transpose", ["y"], ["t"], perm=[0, 1, 3, 2]),
        ],
        "transposed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 3, "W", "H"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_transposed_output_is_refused(tmp_path: Path, images_dir: Path, kind: str) -> None:
    if kind == "onnx":
        pytest.importorskip("onnxruntime")
        model = onnx_transposed(tmp_path / "t.onnx")
    else:
        model = save_scripted(Transposed(3).eval(), tmp_path / "t.pt")
    out = tmp_path / "x.h5"
    code, err = run(
        ["--model", str(model), "--images", str(images_dir), "--out", str(out), "--workers", "0"]
    )
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: {model}: "), err
    assert "32x24 pixels for a 24x32 input" in err and "transposed" in err
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (Asserting, "AssertionError: input smaller than this model accepts"),
        (Raising, "RuntimeError: this model wants 4 input channels"),
    ],
)
def test_failing_torchscript_model_is_a_one_line_error(
    tmp_path: Path, images_dir: Path, module: type, reason: str
) -> None:
    model = save_scripted(module(3).eval(), tmp_path / "bad.pt")
    out = tmp_path / "x.h5"
    code, err = run(
        ["--model", str(model), "--images", str(images_dir), "--out", str(out), "--workers", "0"]
    )
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {model}: failed on ") and reason in err, err
    assert not out.exists() and not Path(f"{out}.partial").exists()


# ------------------------------------------------------------------------------------ inputs


def test_cityscapes_tree_with_suffixes(tmp_path: Path, script_model: Path) -> None:
    rng = np.random.default_rng(3)
    left, gt = tmp_path / "leftImg8bit" / "val", tmp_path / "gtFine" / "val"
    labels = {}
    for city, frame in [
        ("frankfurt", "frankfurt_000000_000294"),
        ("lindau", "lindau_000001_000019"),
    ]:
        (left / city).mkdir(parents=True)
        (gt / city).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(
            left / city / f"{frame}_leftImg8bit.png"
        )
        label = rng.integers(0, 4, (16, 24), dtype=np.uint8)
        label[0, :3] = 255
        labels[f"{city}/{frame}"] = label
        Image.fromarray(label).save(gt / city / f"{frame}_gtFine_labelTrainIds.png")
        Image.fromarray(label * 7).save(gt / city / f"{frame}_gtFine_labelIds.png")  # decoy
    out = tmp_path / "cs.h5"
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(left),
            "--image-suffix",
            "_leftImg8bit",
            "--labels",
            str(gt),
            "--label-suffix",
            "_gtFine_labelTrainIds",
            "--out",
            str(out),
            "--num-classes",
            "4",
            "--workers",
            "0",
        ]
    )
    assert code == 0, err
    with LogitStore([out]) as store:
        assert store.names == sorted(labels)
        assert store.has_labels()
        for record in store:
            np.testing.assert_array_equal(record.label, labels[record.name])
            assert record.size == (16, 24)


def test_image_without_label_names_the_image(
    tmp_path: Path, images_dir: Path, script_model: Path
) -> None:
    labels = tmp_path / "labels"
    (labels / "city_a").mkdir(parents=True)
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(labels / "city_a" / "img_000.png")
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images_dir),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "x.h5"),
        ]
    )
    assert code == 1
    assert err.startswith(f"error: {images_dir / 'city_a' / 'img_002.png'}: no label")
    assert err.count("\n") == 1


def test_label_of_other_size_is_an_error(tmp_path: Path, script_model: Path) -> None:
    images = tmp_path / "im"
    write_images(images, [(8, 8)])
    labels = tmp_path / "lb" / "city_a"
    labels.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(labels / "img_000.png")
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images),
            "--labels",
            str(tmp_path / "lb"),
            "--out",
            str(tmp_path / "x.h5"),
            "--num-classes",
            "4",
        ]
    )
    assert code == 1 and "label is 8x9 but the image is 8x8" in err


def test_workers_and_logits_scale(tmp_path: Path, images_dir: Path, script_model: Path) -> None:
    base = [
        "--model",
        str(script_model),
        "--images",
        str(images_dir),
        "--num-classes",
        "4",
        "--dtype",
        "float32",
        "--logits-scale",
        "0.5",
        "--batch-size",
        "4",
    ]
    assert run([*base, "--workers", "0", "--out", str(tmp_path / "a.h5")])[0] == 0
    assert run([*base, "--workers", "2", "--out", str(tmp_path / "b.h5")])[0] == 0
    a, b = read_store(tmp_path / "a.h5"), read_store(tmp_path / "b.h5")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5)
    with LogitStore([tmp_path / "a.h5"]) as store:
        assert store.read("city_a/img_000").logits.shape == (4, 12, 16)
        assert store.size("city_a/img_000") == (24, 32)
        assert store.read("city_b/img_005").logits.shape == (4, 10, 14)


# --------------------------------------------------------------------------------- scale-out


def test_two_shards_equal_one_run(tmp_path: Path, images_dir: Path, script_model: Path) -> None:
    base = [
        "--model",
        str(script_model),
        "--images",
        str(images_dir),
        "--num-classes",
        "4",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]
    assert run([*base, "--out", str(tmp_path / "all.h5")])[0] == 0
    for k in (1, 2):
        code, err = run([*base, "--out", str(tmp_path / "tgt.h5"), "--shard", f"{k}/2"])
        assert code == 0, err
    shards = [tmp_path / "tgt-1-of-2.h5", tmp_path / "tgt-2-of-2.h5"]
    assert not (tmp_path / "tgt.h5").exists()
    with h5py.File(shards[0], "r") as f:
        assert f.attrs["shard"] == "1/2"
        assert len(f["images"]) == 3
    together = read_store(*expand_store_paths([str(tmp_path / "tgt-*-of-2.h5")]))
    single = read_store(tmp_path / "all.h5")
    assert sorted(together) == sorted(single)
    for name in single:
        np.testing.assert_allclose(together[name], single[name], atol=1e-2, rtol=1e-3)
        assert (together[name].argmax(0) == single[name].argmax(0)).mean() > 0.999


def test_torchrun_environment_selects_the_shard(
    tmp_path: Path, images_dir: Path, script_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert torchrun_shard({"RANK": "2", "WORLD_SIZE": "4"}) == (3, 4)
    assert torchrun_shard({}) is None
    assert shard_path(Path("d/tgt.h5"), (3, 4)) == Path("d/tgt-3-of-4.h5")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images_dir),
            "--out",
            str(tmp_path / "t.h5"),
            "--num-classes",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, err
    with h5py.File(tmp_path / "t-2-of-2.h5", "r") as f:  # one shard alone: not a whole run
        names = sorted(str(group.attrs["name"]) for group in f["images"].values())
        assert names == ["city_a/img_002", "city_b/img_001", "city_b/img_005"]
    described = CliRunner().invoke(main, ["info", str(tmp_path / "t-2-of-2.h5")])
    assert described.exit_code == 0, described.output  # info describes one shard


# ------------------------------------------------------------------------------------ resume


class FailAfter:
    """Wrap a model so that its ``k + 1``-th call raises (a crash in the middle of a run)."""

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        self.model, self.k, self.calls = model, k, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.k:
            raise KeyboardInterrupt
        return self.model(x)


def test_resume_after_interrupted_run(tmp_path: Path, images_dir: Path) -> None:
    model = TinyNet(4).eval()
    items = collect_items(images_dir)
    options = DumpOptions(out=tmp_path / "r.h5", num_classes=4, batch_size=1, dtype="float32")
    full = dump_logits(model, items, DumpOptions(**{**options.__dict__, "out": tmp_path / "u.h5"}))
    assert full.written == 6

    crashing = FailAfter(model, 2)
    with pytest.raises(KeyboardInterrupt):
        dump_logits(crashing, items, options)
    partial = tmp_path / "r.h5.partial"
    assert partial.exists() and not (tmp_path / "r.h5").exists()
    with h5py.File(partial, "r") as f:  # complete images hold their full, correct data
        done = [g for g in f["images"].values() if g.attrs.get("complete", False)]
        assert len(done) == 2
        for group in done:
            np.testing.assert_array_equal(
                group["logits"][()], read_store(tmp_path / "u.h5")[group.attrs["name"]]
            )

    with pytest.raises(InputError, match="use --resume"):
        dump_logits(model, items, options)
    counting = FailAfter(model, 100)
    options.resume = True
    result = dump_logits(counting, items, options)
    assert (result.written, result.skipped, counting.calls) == (4, 2, 4)
    resumed, uninterrupted = read_store(tmp_path / "r.h5"), read_store(tmp_path / "u.h5")
    assert sorted(resumed) == sorted(uninterrupted)
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])


def test_resume_via_cli_and_refusals(tmp_path: Path, images_dir: Path, script_model: Path) -> None:
    base = [
        "--model",
        str(script_model),
        "--images",
        str(images_dir),
        "--num-classes",
        "4",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "s.h5"),
    ]
    assert run(base)[0] == 0
    code, err = run(base)
    assert code == 1 and "already exists (use --overwrite" in err
    code, err = run([*base, "--resume"])
    assert code == 0 and "6 already done" in err
    code, err = run([*base, "--resume", "--dtype", "float32"])
    assert code == 1 and "cannot resume" in err
    assert (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.partial").exists()
    assert run([*base, "--overwrite"])[0] == 0


# ---------------------------------------------------------------------------- devices, errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_is_a_clean_error(
    tmp_path: Path, images_dir: Path, script_model: Path
) -> None:
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images_dir),
            "--out",
            str(tmp_path / "x.h5"),
            "--device",
            "cuda",
        ]
    )
    assert code == 1
    assert err == "error: --device cuda: CUDA is not available on this machine\n"


def test_fp16_on_cpu_is_refused(tmp_path: Path, images_dir: Path, script_model: Path) -> None:
    code, err = run(
        [
            "--model",
            str(script_model),
            "--images",
            str(images_dir),
            "--out",
            str(tmp_path / "x.h5"),
            "--device",
            "cpu",
            "--precision",
            "fp16",
        ]
    )
    assert code == 1 and "fp16" in err and "bf16" in err


def test_usage_errors_exit_2(tmp_path: Path, images_dir: Path, script_model: Path) -> None:
    base = [
        "--model",
        str(script_model),
        "--images",
        str(images_dir),
        "--out",
        str(tmp_path / "x.h5"),
    ]
    for extra in (
        ["--shard", "3/2"],
        ["--window", "8"],
        ["--mean", "1,2"],
        ["--scale", "0.5", "--size", "8x8"],
        ["--stride", "4x4"],
    ):
        assert run([*base, *extra])[0] == 2, extra


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
def test_cuda_matches_cpu(
    tmp_path: Path, images_dir: Path, script_model: Path, precision: str
) -> None:
    base = [
        "--model",
        str(script_model),
        "--images",
        str(images_dir),
        "--num-classes",
        "4",
        *RAW,
        "--workers",
        "2",
        "--batch-size",
        "4",
    ]
    assert run([*base, "--device", "cpu", "--out", str(tmp_path / "cpu.h5")])[0] == 0
    code, err = run(
        [*base, "--device", "cuda", "--precision", precision, "--out", str(tmp_path / "gpu.h5")]
    )
    assert code == 0, err
    cpu, gpu = read_store(tmp_path / "cpu.h5"), read_store(tmp_path / "gpu.h5")
    agree = np.mean(np.concatenate([(cpu[n].argmax(0) == gpu[n].argmax(0)).ravel() for n in cpu]))
    assert agree >= (0.999 if precision == "fp32" else 0.98)


# ------------------------------------------------------------------------- parallel encoding


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_encoded_chunks_read_back_like_plain_writes(tmp_path: Path, dtype: str) -> None:
    logits = np.random.default_rng(0).normal(0, 8, size=(2, 600, 530)).astype(np.float32)
    path = tmp_path / "enc.h5"
    with StoreWriter(path, ["a", "b"], dtype=dtype) as writer:
        writer.write("plain", logits)
        writer.write("encoded", logits, encoded=encode_logits(logits, dtype))
    with LogitStore([path]) as store:
        plain, encoded = store.read("plain").logits, store.read("encoded").logits
    np.testing.assert_array_equal(encoded, plain)
    np.testing.assert_array_equal(encoded, logits.astype(dtype).astype(np.float32))


def test_serial_mode_writes_the_same_store(tmp_path: Path, images_dir: Path) -> None:
    model = TinyNet(4).eval()
    items = collect_items(images_dir)
    piped = DumpOptions(out=tmp_path / "p.h5", num_classes=4, batch_size=4, encoders=3)
    serial = DumpOptions(out=tmp_path / "s.h5", num_classes=4, batch_size=4, queue_size=0)
    dump_logits(model, items, piped)
    dump_logits(model, items, serial)
    a, b = read_store(tmp_path / "p.h5"), read_store(tmp_path / "s.h5")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_native_resolution_store_corrects_like_full_resolution(tmp_path: Path) -> None:
    """A half-resolution model: the native store is smaller, and `correct` gives the same PNGs."""
    import torch
    from click.testing import CliRunner
    from PIL import Image
    from tiny_models import HalfRes

    from blda_posthoc.cli import main

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
            images / f"im{i}.png"
        )
    torch.manual_seed(0)
    save_scripted(HalfRes(3).eval(), tmp_path / "half.pt")
    runner = CliRunner()
    common = [
        "dump-logits",
        "--model",
        str(tmp_path / "half.pt"),
        "--images",
        str(images),
        "--num-classes",
        "3",
        "--dtype",
        "float32",
        "--workers",
        "0",
    ]
    for name, extra in (("native", []), ("full", ["--logits-scale", "1"])):
        result = runner.invoke(main, [*common, "--out", str(tmp_path / f"{name}.h5"), *extra])
        assert result.exit_code == 0, result.output
    with LogitStore([tmp_path / "native.h5"]) as store:
        assert store.read("im0").logits.shape[1:] != (24, 32) and store.size("im0") == (24, 32)
    for name in ("native", "full"):
        for args in (
            [
                "fit-stats",
                str(tmp_path / f"{name}.h5"),
                "--labels",
                "pseudo",
                "--min-pixels",
                "1",
                "--out",
                str(tmp_path / f"{name}_s.h5"),
            ],
            [
                "correct",
                str(tmp_path / f"{name}.h5"),
                "--stats",
                str(tmp_path / f"{name}_s.h5"),
                "--tau",
                "0",
                "--out-dir",
                str(tmp_path / f"{name}_pred"),
            ],
        ):
            result = runner.invoke(main, args)
            assert result.exit_code == 0, result.output
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "native_pred" / f"im{i}.png"))
        b = np.asarray(Image.open(tmp_path / "full_pred" / f"im{i}.png"))
        assert a.shape == (24, 32) and (a == b).mean() == 1.0
