"""Hostile files, interrupted and concurrent runs, full disks: one test per defect of issue 9.

Subprocess tests run ``python -m blda_posthoc`` for real (kill -9, Ctrl-C, file size limits,
two processes at once); the others use click's CliRunner or the library directly.
"""

from __future__ import annotations

import errno
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_case
from PIL import Image
from tiny_models import TinyNet, save_scripted

from blda_posthoc import outputs
from blda_posthoc.cli import main
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import read_label, write_png
from blda_posthoc.io.store import LogitStore, StoreWriter
from blda_posthoc.outputs import Claim, OutputFolder, check_name, path_inside

TESTS = Path(__file__).parent
ROOT = TESTS.parent


# ----------------------------------------------------------------------------------- helpers


def invoke(*args: object, exit_code: int = 0) -> tuple[str, str]:
    """Run ``blda ARGS`` in-process; check the exit code; return stdout and stderr."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == exit_code, result.stderr
    return result.stdout, result.stderr


def one_line_error(stderr: str, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def last_error(stderr: str, *fragments: str) -> str:
    """The last stderr line is the one ``error:`` line (notes before it are allowed)."""
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: ")
        and sum(line.startswith("error:") for line in stderr.splitlines()) == 1
    ), stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


def sub_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def blda_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "blda_posthoc", *(str(a) for a in args)]


def slowed_cmd(module: str, function: str, *args: object, delay: float = 0.1) -> list[str]:
    """``blda ARGS`` in which every call of ``module.function`` first sleeps ``delay`` seconds.

    A victim to kill must still be running when the test kills it, even on a fast idle machine
    and when a loaded machine starves the test's own polling for seconds: keep the time left
    after the kill condition holds at 5 s or more.
    """
    script = (
        f"import sys, time, importlib; m = importlib.import_module({module!r}); "
        f"f = m.{function}; m.{function} = lambda *a, **k: (time.sleep({delay}), f(*a, **k))[1]; "
        "from blda_posthoc.cli import main; sys.exit(main())"
    )
    return [sys.executable, "-c", script, *(str(a) for a in args)]


def file_size_limit(limit: int):
    """A ``preexec_fn`` that caps file sizes (a full disk for the child), SIGXFSZ ignored."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_sub(*args: object, limit: int | None = None, timeout: float = 180, **env: str):
    return subprocess.run(
        blda_cmd(*args),
        env=sub_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=None if limit is None else file_size_limit(limit),
    )


def wait_for(predicate, timeout: float = 60.0) -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def complete_count(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return sum(bool(g.attrs.get("complete", False)) for g in f["images"].values())


def write_images(root: Path, count: int, size: tuple[int, int] = (12, 16)) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        path = root / f"city_{'ab'[index % 2]}" / f"img_{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    return write_case(tmp_path / "case", num_images=6)


@pytest.fixture
def store(tmp_path: Path, case: tuple[Path, Path]) -> Path:
    out = tmp_path / "s.h5"
    invoke("import-logits", case[0], "--labels", case[1], "--out", out, "--dtype", "float32")
    return out


# ------------------------------------------------------------------------- 1. model loading


class Payload:
    """Unpickling this creates ``self.marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-save", "factory-checkpoint"])
def test_pickled_code_never_runs_without_trust(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    images = write_images(tmp_path / "images", 2)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    if kind == "raw-pickle":
        evil.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), evil)
    model = ["--model", "tiny_models:build", "--checkpoint", evil]
    if kind != "factory-checkpoint":
        model = ["--model", evil]
    _, err = invoke(
        "dump-logits", *model, "--images", images, "--out", tmp_path / "x.h5", exit_code=1
    )
    one_line_error(err, str(evil), "--trust-checkpoint")
    assert not marker.exists()
    assert not (tmp_path / "x.h5").exists()


def test_whole_module_loads_with_trust_checkpoint(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", 2)
    saved = tmp_path / "module.pt"
    torch.save(TinyNet(4).eval(), saved)
    args = ["dump-logits", "--model", saved, "--images", images, "--workers", "0"]
    args += ["--num-classes", "4"]
    _, err = invoke(*args, "--out", tmp_path / "a.h5", exit_code=1)
    one_line_error(err, "--trust-checkpoint")
    invoke(*args, "--out", tmp_path / "b.h5", "--trust-checkpoint")
    with LogitStore([tmp_path / "b.h5"]) as s:
        assert len(s) == 2


# ------------------------------------------------------------------------------ 2. names


UNSAFE = ["../x", "/abs/x", "a//b", "a/./b", "a/..", "a\nb", "a\x00b", "", "a\\b", "a/"]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_names_are_refused_by_writer_and_reader(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="unsafe"):
        check_name(name, "x")
    with pytest.raises(InputError, match="unsafe"), StoreWriter(tmp_path / "w.h5", ["a", "b"]) as w:
        w.write(name, np.zeros((2, 2, 2), np.float32))
    assert not (tmp_path / "w.h5").exists()
    if "\x00" in name:
        return  # HDF5 strings cannot hold it
    # a hand-made store holding the name: every reader refuses it, naming the store
    path = tmp_path / "evil.h5"
    with StoreWriter(path, ["a", "b"]) as w:
        w.write("ok", np.zeros((2, 2, 2), np.float32))
    with h5py.File(path, "a") as f:
        f["images"].move("ok", "evil")
        f["images/evil"].attrs["name"] = name
    with pytest.raises(InputError, match=f"^{path}: "):
        LogitStore([path])


@pytest.mark.parametrize("name", ["city/img_000", "a b/c-d.e", "köln/x", "..a/b..", "a"])
def test_ordinary_names_are_safe(name: str) -> None:
    assert check_name(name, "x") == name


def test_outputs_stay_inside_their_folder(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "city").symlink_to(elsewhere)
    with pytest.raises(InputError, match="outside"):
        path_inside(out, "city/x.png")
    (out / "y.png").symlink_to(elsewhere / "victim.png")
    with pytest.raises(InputError, match="outside"):
        path_inside(out, "y.png")
    assert path_inside(out, "a/b.png") == out.resolve() / "a" / "b.png"


def test_temporary_files_never_follow_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    target = tmp_path / "out" / "x.png"
    target.parent.mkdir()
    (target.parent / "x.png.tmp").symlink_to(victim)  # the old, predictable temporary name
    write_png(target, np.zeros((2, 3), np.uint8))
    assert victim.read_bytes() == b"keep me" and read_label(target).shape == (2, 3)
    trap = target.parent / "trap"
    trap.symlink_to(victim)
    monkeypatch.setattr(outputs, "temporary_name", lambda path: trap)  # a name an attacker won
    with pytest.raises(OSError):
        write_png(target.parent / "z.png", np.zeros((2, 3), np.uint8))
    assert victim.read_bytes() == b"keep me" and not (target.parent / "z.png").exists()


# ------------------------------------------------------------- 3. data outside the store file


def add_image(path: Path, key: str, make) -> None:
    """Add a complete image group whose ``logits`` dataset ``make(group)`` creates."""
    with h5py.File(path, "a") as f:
        group = f["images"].create_group(key)
        make(group)
        group.attrs.update(
            {"name": key, "height": 2, "width": 2, "logit_min": 0.0, "logit_max": 0.0}
        )
        group.attrs["has_label"] = False
        group.attrs["complete"] = True


def test_external_storage_virtual_datasets_and_links_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(8, np.float32).tobytes())
    base = tmp_path / "base.h5"
    with StoreWriter(base, ["a", "b"], dtype="float32") as w:
        w.write("ok", np.zeros((2, 2, 2), np.float32))

    def external(group: h5py.Group) -> None:
        group.create_dataset("logits", (2, 2, 2), "f4", external=[(str(secret), 0, 32)])

    def virtual(group: h5py.Group) -> None:
        layout = h5py.VirtualLayout((2, 2, 2), "f4")
        layout[:] = h5py.VirtualSource(str(base), "images/ok/logits", (2, 2, 2))
        group.create_virtual_dataset("logits", layout)

    def soft(group: h5py.Group) -> None:
        group["logits"] = h5py.SoftLink("/images/ok/logits")

    for index, make in enumerate([external, virtual, soft]):
        path = tmp_path / f"s{index}.h5"
        path.write_bytes(base.read_bytes())
        add_image(path, "bad", make)
        with LogitStore([path]) as s, pytest.raises(InputError, match=f"^{path}: .*bad.*"):
            s.read("bad")
    path = tmp_path / "link.h5"
    path.write_bytes(base.read_bytes())
    with h5py.File(path, "a") as f:
        f["images"]["bad"] = h5py.ExternalLink(str(base), "/images/ok")
    with pytest.raises(InputError, match="ExternalLink"):
        LogitStore([path])


# -------------------------------------------------------------------- 4. concurrent writers

HOLDER = """
import sys, time
from pathlib import Path
import numpy as np
from blda_posthoc.io.store import StoreWriter
out, go = Path(sys.argv[1]), Path(sys.argv[2])
with StoreWriter(out, ["a", "b"]) as w:
    w.write("first", np.ones((2, 3, 3), np.float32))
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.02)
    w.write("second", np.zeros((2, 3, 3), np.float32))
"""


def test_second_writer_stops_before_touching_the_first_ones_store(
    tmp_path: Path, case: tuple[Path, Path]
) -> None:
    out, go = tmp_path / "same.h5", tmp_path / "go"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(go)],
        env=sub_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        before = (tmp_path / "same.h5.partial").read_bytes()
        second = run_sub("import-logits", case[0], "--out", out, "--overwrite")
        assert second.returncode == 1
        one_line_error(second.stderr, str(out), "another run is writing it")
        assert (tmp_path / "same.h5.partial").read_bytes() == before  # not truncated
    finally:
        go.touch()
        assert holder.wait(timeout=60) == 0
    with LogitStore([out]) as s:
        assert s.names == ["first", "second"]
        np.testing.assert_array_equal(s.read("first").logits, 1.0)


def test_a_killed_holder_releases_its_claim(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    code = "import sys,time; from blda_posthoc.outputs import Claim; c = Claim(sys.argv[1]);"
    code += " print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], env=sub_env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match="another run is writing it"):
        Claim(out)
    holder.kill()
    holder.wait()
    with Claim(out):
        pass
    assert not (tmp_path / "o.h5.lock").exists()


# ------------------------------------------------------------- 5. overwrite swaps whole outputs


def test_failed_overwrite_leaves_the_old_folder_untouched(tmp_path: Path) -> None:
    out = tmp_path / "pred"
    with OutputFolder(out, command="t", settings={"v": 1}) as folder:
        write_png(folder.file("a.png"), np.ones((2, 2), np.uint8))
        write_png(folder.file("b.png"), np.ones((2, 2), np.uint8))
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    with (
        pytest.raises(RuntimeError),
        OutputFolder(out, command="t", settings={"v": 2}, overwrite=True) as folder,
    ):
        write_png(folder.file("a.png"), np.zeros((2, 2), np.uint8))
        raise RuntimeError("fails half-way")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    with pytest.raises(InputError, match="other settings"):
        OutputFolder(out, command="t", settings={"v": 1}, resume=True)  # the partial is v2
    (tmp_path / "pred.partial" / ".b.png.0123abcd.tmp").write_bytes(b"left by kill -9")
    with OutputFolder(out, command="t", settings={"v": 2}, resume=True) as folder:
        assert folder.exists("a.png") and not folder.exists("b.png")
        write_png(folder.file("b.png"), np.zeros((2, 2), np.uint8))
    assert read_label(out / "b.png").max() == 0 and not (tmp_path / "pred.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == [".blda-run.json", "a.png", "b.png"]
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="no blda run wrote"):
        OutputFolder(foreign, command="t", settings={}, overwrite=True)
    assert (foreign / "thesis.tex").exists()


# ------------------------------------------------------------------ 6. resume checks settings


def test_dump_resume_refuses_another_model_or_preprocessing(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", 3)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(tmp_path / f"m{seed}.pt")
        save_scripted(TinyNet(4).eval(), models[-1])
    out = tmp_path / "d.h5"
    base = ["dump-logits", "--images", images, "--out", out, "--workers", "0", "--num-classes", "4"]
    invoke(*base, "--model", models[0])
    before = out.read_bytes()
    _, err = invoke(*base, "--model", models[1], "--resume", exit_code=1)
    one_line_error(err, "other settings (model", "cannot resume")
    _, err = invoke(*base, "--model", models[0], "--resume", "--mean", "1,2,3", exit_code=1)
    one_line_error(err, "other settings (preprocess")
    # Another autocast precision gives other logits: refused too (fp32 before, bf16 now).
    _, err = invoke(*base, "--model", models[0], "--resume", "--precision", "bf16", exit_code=1)
    one_line_error(err, "other settings (precision", "cannot resume")
    assert out.read_bytes() == before and not (tmp_path / "d.h5.partial").exists()
    _, err = invoke(*base, "--model", models[0], "--resume")
    assert "3 of 3 images already done" in err


def test_import_resume_refuses_other_sources(tmp_path: Path, case: tuple[Path, Path]) -> None:
    out = tmp_path / "i.h5"
    invoke("import-logits", case[0], "--labels", case[1], "--out", out)
    _, err = invoke("import-logits", case[0], "--out", out, "--resume", exit_code=1)
    one_line_error(err, "other settings (labels_dir")


def _swap_logits_external(group: h5py.Group, other: Path) -> None:
    data = group["logits"][()]
    raw = other.with_suffix(".bin")
    raw.write_bytes(data.tobytes())
    del group["logits"]
    group.create_dataset("logits", data.shape, data.dtype, external=[(str(raw), 0, data.nbytes)])


def _swap_logits_virtual(group: h5py.Group, other: Path) -> None:
    data = group["logits"][()]
    with h5py.File(other, "w") as f:
        f["x"] = data
    del group["logits"]
    layout = h5py.VirtualLayout(data.shape, data.dtype)
    layout[:] = h5py.VirtualSource(str(other), "x", data.shape)
    group.create_virtual_dataset("logits", layout)


def _swap_label_soft(group: h5py.Group, other: Path) -> None:
    del group["label"]
    group["label"] = h5py.SoftLink(group["logits"].name)


def _swap_label_external_link(group: h5py.Group, other: Path) -> None:
    data = group["label"][()]
    with h5py.File(other, "w") as f:
        f["y"] = data
    del group["label"]
    group["label"] = h5py.ExternalLink(str(other), "/y")


def _swap_label_transposed(group: h5py.Group, other: Path) -> None:
    data = group["label"][()]
    del group["label"]
    group["label"] = np.ascontiguousarray(data.T)


def _extra_link(group: h5py.Group, other: Path) -> None:
    with h5py.File(other, "w") as f:
        f["z"] = np.zeros(3)
    group["extra"] = h5py.ExternalLink(str(other), "/z")


def _swap_label_dtype(group: h5py.Group, other: Path) -> None:
    data = group["label"][()]
    del group["label"]
    group["label"] = data.astype(np.float32)


def _swap_logits_dtype(group: h5py.Group, other: Path) -> None:
    data = group["logits"][()]
    del group["logits"]
    group["logits"] = data.astype(np.float64)


@pytest.mark.parametrize(
    ("swap", "fragment"),
    [
        (_swap_label_dtype, "label is float32"),
        (_swap_logits_dtype, "float64"),
        (_swap_logits_external, "uses external storage"),
        (_swap_logits_virtual, "uses virtual storage"),
        (_swap_label_soft, "is a SoftLink"),
        (_swap_label_external_link, "is a ExternalLink"),
        (_swap_label_transposed, "label is uint8"),
        (_extra_link, "holds 'extra'"),
    ],
)
def test_import_resume_refuses_links_and_foreign_data_in_the_partial_store(
    tmp_path: Path, case: tuple[Path, Path], swap, fragment: str
) -> None:
    """Nothing reached through a link or stored elsewhere is copied into the final store."""
    out = tmp_path / "i.h5"
    args = ["import-logits", case[0], "--labels", case[1], "--out", out]
    invoke(*args)
    partial = tmp_path / "i.h5.partial"
    out.rename(partial)
    with h5py.File(partial, "a") as f:
        group = f["images"][sorted(f["images"])[0]]
        swap(group, tmp_path / "elsewhere.h5")
    _, err = invoke(*args, "--resume", exit_code=1)
    one_line_error(err, "i.h5.partial", fragment)
    assert not out.exists() and partial.exists()


# ----------------------------------------------------------- 7. float16 overflow, huge values


def test_logits_beyond_float16_are_refused_with_a_hint(tmp_path: Path) -> None:
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "a.npy", np.full((2, 3, 3), 7e4, np.float32))
    _, err = invoke("import-logits", folder, "--out", tmp_path / "h.h5", exit_code=1)
    one_line_error(err, str(folder / "a.npy"), "float16", "--dtype float32")
    assert not (tmp_path / "h.h5").exists() and not (tmp_path / "h.h5.partial").exists()
    invoke("import-logits", folder, "--out", tmp_path / "f.h5", "--dtype", "float32")
    np.save(folder / "a.npy", np.full((2, 3, 3), 1e30, np.float32))
    _, err = invoke(
        "import-logits", folder, "--out", tmp_path / "g.h5", "--dtype", "float32", exit_code=1
    )
    one_line_error(err, "1e+30")


def test_dump_refuses_model_logits_beyond_float16(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", 2)
    big = TinyNet(4).eval()
    with torch.no_grad():
        big.conv2.weight.mul_(1e6)
    model = tmp_path / "big.pt"
    save_scripted(big, model)
    args = ["dump-logits", "--model", model, "--images", images, "--workers", "0"]
    args += ["--num-classes", "4"]
    _, err = invoke(*args, "--out", tmp_path / "a.h5", exit_code=1)
    one_line_error(err, "float16 store", "--dtype float32")
    invoke(*args, "--out", tmp_path / "b.h5", "--dtype", "float32")


def test_reader_refuses_non_finite_or_misrecorded_logits(store: Path) -> None:
    with h5py.File(store, "a") as f:
        f["images/city_a%2Fimg_000/logits"][0, 0, 0] = np.inf
        f["images/city_b%2Fimg_001"].attrs["logit_max"] = 1e30
        f["images/city_a%2Fimg_002"].attrs["logit_max"] = 0.0
    with LogitStore([store]) as s:
        with pytest.raises(InputError, match=f"^{store}: image 'city_a/img_000'.*infinite"):
            s.read("city_a/img_000")
        with pytest.raises(InputError, match="out of range"):
            s.read("city_b/img_001")
        with pytest.raises(InputError, match="outside the recorded"):
            s.read("city_a/img_002")
        s.read("city_b/img_003")


# ------------------------------------------------------------------ 8. options must be finite


@pytest.mark.parametrize(
    "option", [["--std", "0,0,0"], ["--mean", "nan,0,0"], ["--std", "1,inf,1"], ["--scale", "nan"]]
)
def test_dump_options_must_be_finite(tmp_path: Path, option: list[str]) -> None:
    images = write_images(tmp_path / "images", 1)
    model = tmp_path / "m.pt"
    save_scripted(TinyNet(4).eval(), model)
    out = tmp_path / "x.h5"
    result = CliRunner().invoke(
        main,
        ["dump-logits", "--model", str(model), "--images", str(images), "--out", str(out)] + option,
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()


# --------------------------------------------------------------------- 10. class count limits


def test_more_than_255_classes_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((256, 2, 2), np.float32))
    _, err = invoke("import-logits", folder, "--out", tmp_path / "x.h5", exit_code=1)
    one_line_error(err, "256", "255")
    path = tmp_path / "many.h5"
    with StoreWriter(path, ["a", "b"]) as w:
        w.write("x", np.zeros((2, 2, 2), np.float32))
    with h5py.File(path, "a") as f:
        f.attrs["class_names"] = str([f"c{i}" for i in range(300)]).replace("'", '"')
    with pytest.raises(InputError, match="at most 255 classes .*300 names"):
        LogitStore([path])


# ------------------------------------------------------ 11, 12. damaged inputs: one clean error


def _delete(path: str):
    def edit(f: h5py.File) -> None:
        del f[path]

    return edit


def _attr(path: str, key: str, value: object | None):
    def edit(f: h5py.File) -> None:
        if value is None:
            del f[path].attrs[key]
        else:
            f[path].attrs[key] = value

    return edit


def _replace(path: str, data: np.ndarray):
    def edit(f: h5py.File) -> None:
        del f[path]
        f[path] = data

    return edit


IMG = "images/city_a%2Fimg_000"
DAMAGE = {
    "no images group": _delete("images"),
    "no logits": _delete(f"{IMG}/logits"),
    "no label": _delete(f"{IMG}/label"),
    "no height": _attr(IMG, "height", None),
    "text height": _attr(IMG, "height", "tall"),
    "huge size": _attr(IMG, "width", 10**9),
    "no name": _attr(IMG, "name", None),
    "flag not bool": _attr(IMG, "complete", "yes"),
    "format as bytes": _attr("/", "format", np.bytes_(b"blda-logitz")),
    "class names not json": _attr("/", "class_names", "[oops"),
    "version text": _attr("/", "version", "1"),
    "logits 2-d": _replace(f"{IMG}/logits", np.zeros((24, 32), np.float32)),
    "logits int": _replace(f"{IMG}/logits", np.zeros((4, 24, 32), np.int32)),
    "label wrong size": _replace(f"{IMG}/label", np.zeros((3, 3), np.uint8)),
    "images is a dataset": _replace("images", np.zeros(3)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_stores_end_in_one_error_naming_them(
    tmp_path: Path, store: Path, damage: str
) -> None:
    with h5py.File(store, "a") as f:
        DAMAGE[damage](f)
    _, err = invoke("fit-stats", store, "--out", tmp_path / "st.h5", "--labels", "gt", exit_code=1)
    one_line_error(err, str(store))
    assert not (tmp_path / "st.h5").exists()


def test_corrupt_chunk_and_flipped_bytes_name_the_store(tmp_path: Path, store: Path) -> None:
    with h5py.File(store, "r") as f:
        info = f[f"{IMG}/logits"].id.get_chunk_info(0)
    raw = bytearray(store.read_bytes())
    raw[info.byte_offset : info.byte_offset + 64] = bytes(64)
    store.write_bytes(bytes(raw))
    with LogitStore([store]) as s, pytest.raises(InputError, match=f"^{store}: image"):
        s.read("city_a/img_000")
    half = tmp_path / "half.h5"
    half.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    _, err = invoke("fit-stats", half, "--out", tmp_path / "x.h5", exit_code=1)
    one_line_error(err, str(half))


def test_empty_store_and_empty_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    with StoreWriter(path, ["a", "b"]) as w:
        w.write("x", np.zeros((2, 2, 2), np.float32))
    with h5py.File(path, "a") as f:
        f["images/x"].attrs["complete"] = False
    with pytest.raises(InputError, match="no complete image"):
        LogitStore([path])
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((4, 0, 5), np.float32))
    _, err = invoke("import-logits", folder, "--out", tmp_path / "x.h5", exit_code=1)
    one_line_error(err, str(folder / "a.npy"), "(4, 0, 5)")


def png_bytes(width: int, height: int) -> bytes:
    """A grey PNG whose header claims ``width x height`` (its pixel data is not all there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_label_is_refused_before_decoding(
    tmp_path: Path, case: tuple[Path, Path]
) -> None:
    label = case[1] / "city_a" / "img_000.png"
    label.write_bytes(png_bytes(60000, 60000))
    start = time.monotonic()
    _, err = invoke(
        "import-logits", case[0], "--labels", case[1], "--out", tmp_path / "x.h5", exit_code=1
    )
    one_line_error(err, str(label))
    assert time.monotonic() - start < 10
    noise = np.random.default_rng(0).integers(0, 4, (24, 32), dtype=np.uint8)
    Image.fromarray(noise).save(label)
    label.write_bytes(label.read_bytes()[:-40])  # cut inside the pixel data
    _, err = invoke(
        "import-logits", case[0], "--labels", case[1], "--out", tmp_path / "y.h5", exit_code=1
    )
    one_line_error(err, str(label))


def test_disk_full_is_one_error_and_the_finished_images_resume(
    tmp_path: Path, case: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    out = tmp_path / "full.h5"
    _, err = invoke("import-logits", case[0], "--out", out, exit_code=1)
    line = one_line_error(err, f"{out}.partial: disk full", "rerun with --resume")
    assert "3 finished images are kept" in line and not out.exists()
    monkeypatch.setattr(os, "posix_fallocate", real)
    _, err = invoke("fit-stats", out, "--out", tmp_path / "st.h5", exit_code=1)
    one_line_error(err, "--resume")
    invoke("import-logits", case[0], "--out", out, "--resume")
    invoke("import-logits", case[0], "--out", tmp_path / "ref.h5")
    assert out.read_bytes() == (tmp_path / "ref.h5").read_bytes()


@pytest.mark.parametrize("command", ["import-logits", "dump-logits"])
def test_a_real_file_size_limit_ends_in_error_not_a_crash(tmp_path: Path, command: str) -> None:
    out = tmp_path / "o.h5"
    if command == "import-logits":
        logits, _ = write_case(tmp_path / "case", num_images=24, size=(96, 128))
        args = ["import-logits", logits, "--out", out]
    else:
        images = write_images(tmp_path / "images", 12, size=(160, 200))
        args = ["dump-logits", "--model", "slow_models:build", "--images", images, "--out", out]
        args += ["--workers", "0", "--dtype", "float32", "--logits-scale", "1"]
    limited = run_sub(*args, limit=1_800_000)
    assert limited.returncode == 1, limited.stderr
    last_error(limited.stderr, f"{out}.partial: file too large")
    assert not out.exists()
    again = run_sub(*args, "--resume")
    assert again.returncode == 0, again.stderr
    reference = run_sub(*[a if a != out else tmp_path / "ref.h5" for a in args])
    assert reference.returncode == 0, reference.stderr
    assert out.read_bytes() == (tmp_path / "ref.h5").read_bytes()


def test_a_failing_hdf5_write_never_crashes_the_process(
    tmp_path: Path, case: tuple[Path, Path]
) -> None:
    code = (
        "import sys; import blda_posthoc.outputs as o; o.reserve = lambda *a: None\n"
        "from blda_posthoc.cli import main; main(sys.argv[1:])"
    )
    out = tmp_path / "o.h5"
    result = subprocess.run(
        [sys.executable, "-c", code, "import-logits", str(case[0]), "--out", str(out)],
        env=sub_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=file_size_limit(60_000),
    )
    assert result.returncode == 1, result.stderr  # not 139 (segmentation fault)
    one_line_error(result.stderr, f"{out}.partial: file too large")
    assert not out.exists()


def test_an_image_whose_data_write_failed_is_not_complete_and_resume_rewrites_it(
    tmp_path: Path, case: tuple[Path, Path]
) -> None:
    """The third image's label write fails after its group and logits exist.

    The file is flushed just before the failure (HDF5 may write its metadata at any time), so
    an image marked complete before all its data were written would be kept by ``--resume``.
    """
    code = (
        "import sys, h5py\n"
        "real = h5py.Group.create_dataset\n"
        "calls = []\n"
        "def create(self, name, *args, **kwargs):\n"
        "    if name == 'label':\n"
        "        calls.append(name)\n"
        "        if len(calls) == 3:\n"
        "            self.file.flush()\n"
        "            raise OSError('simulated failure')\n"
        "    return real(self, name, *args, **kwargs)\n"
        "h5py.Group.create_dataset = create\n"
        "from blda_posthoc.cli import main; main(sys.argv[1:])"
    )
    out, ref = tmp_path / "o.h5", tmp_path / "ref.h5"
    args = ["import-logits", str(case[0]), "--labels", str(case[1])]
    result = subprocess.run(
        [sys.executable, "-c", code, *args, "--out", str(out)],
        env=sub_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    one_line_error(result.stderr, f"{out}.partial", "simulated failure")
    partial = Path(f"{out}.partial")
    with h5py.File(partial, "r") as f:
        flags = {key: bool(g.attrs.get("complete", False)) for key, g in f["images"].items()}
    assert sorted(flags.values()) == [False, True, True], flags  # the third is not complete
    invoke(*args, "--out", out, "--resume")
    invoke(*args, "--out", ref)
    assert out.read_bytes() == ref.read_bytes()


# ------------------------------------------------------------- 13, 14. kill -9 and Ctrl-C


def test_kill9_of_dump_logits_then_immediate_resume_is_byte_identical(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", 14)
    out, ref = tmp_path / "k.h5", tmp_path / "ref.h5"
    args = ["dump-logits", "--model", "slow_models:build", "--images", images, "--workers", "2"]
    rng = np.random.default_rng(9)
    for attempt in range(2):
        out.unlink(missing_ok=True)
        victim = subprocess.Popen(
            blda_cmd(*args, "--out", out),
            env=sub_env(BLDA_TEST_DELAY="0.4"),
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: os.path.exists(f"{out}.partial"))
        time.sleep(float(rng.uniform(0.1, 1.2)))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert not out.exists()
        kept = complete_count_safe(out)  # the killed writer may have left a group half-made
        resumed = run_sub(*args, "--out", out, "--resume")  # at once: workers may still live
        assert resumed.returncode == 0, (attempt, resumed.stderr)
        assert f"{kept} of 14 images already done" in resumed.stderr or kept == 0
    assert run_sub(*args, "--out", ref).returncode == 0
    assert out.read_bytes() == ref.read_bytes()


def test_kill9_of_import_logits_then_resume_is_byte_identical(tmp_path: Path) -> None:
    logits, _ = write_case(tmp_path / "big", num_images=60, num_classes=8, size=(96, 128))
    out, ref = tmp_path / "k.h5", tmp_path / "ref.h5"
    command = slowed_cmd("numpy", "load", "import-logits", logits, "--out", out, delay=0.3)
    victim = subprocess.Popen(command, env=sub_env(), stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(f"{out}.partial") and complete_count_safe(out) >= 3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    if out.exists():
        pytest.fail("the import finished before it could be killed; make the case larger")
    assert run_sub("import-logits", logits, "--out", out, "--resume").returncode == 0
    invoke("import-logits", logits, "--out", ref)
    assert out.read_bytes() == ref.read_bytes()


def complete_count_safe(out: Path) -> int:
    try:
        return complete_count(Path(f"{out}.partial"))
    except (OSError, KeyError):
        return 0


def test_ctrl_c_exits_130_saying_what_is_kept_and_how_to_resume(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", 30)
    out = tmp_path / "c.h5"
    args = ["dump-logits", "--model", "slow_models:build", "--images", images, "--out", out]
    ready = tmp_path / "ready"
    victim = subprocess.Popen(
        blda_cmd(*args, "--workers", "0"),
        env=sub_env(BLDA_TEST_READY=str(ready), BLDA_TEST_HOLD_AFTER="3"),
        stderr=subprocess.PIPE,
        text=True,
    )
    # The victim says when it is mid-run (its model holds its 4th image until interrupted),
    # so no guessed delay: wait for that, then for its first images to be written.
    wait_for(ready.exists)
    wait_for(lambda: complete_count_safe(out) >= 2)
    assert victim.poll() is None  # still held, however slow the machine
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; ") and "Traceback" not in err
    assert f"finished images are kept in {out}.partial; rerun with --resume" in last
    resumed = run_sub(*args, "--resume")
    assert resumed.returncode == 0 and "already done" in resumed.stderr


# ------------------------------------------------- correct, relabel, fit-stats and evaluate


@pytest.fixture
def corrected(tmp_path: Path, store: Path) -> dict[str, Path]:
    """A store, its stats and a complete ``correct`` output folder (tau 0.5)."""
    stats = tmp_path / "st.h5"
    invoke("fit-stats", store, "--out", stats)
    out = tmp_path / "pred"
    invoke(
        "correct",
        store,
        "--stats",
        stats,
        "--method",
        "blda",
        "--tau",
        "0.5",
        "--out-dir",
        out,
        "--color",
    )
    return {"store": store, "stats": stats, "out": out}


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


class FailAfter:
    """Replaces a writer: the ``k + 1``-th call raises ``error`` (a crash half-way)."""

    def __init__(self, real, k: int, error: BaseException) -> None:
        self.real, self.k, self.error, self.calls = real, k, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.k:
            raise self.error
        return self.real(*args, **kwargs)


def test_failed_correct_overwrite_keeps_the_old_folder_whole_then_resumes(
    tmp_path: Path, corrected: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from blda_posthoc.pipelines import correct as correct_module

    old = folder_bytes(corrected["out"])
    args = [
        "correct",
        corrected["store"],
        "--stats",
        corrected["stats"],
        "--method",
        "blda",
        "--color",
    ]
    args += ["--out-dir", corrected["out"], "--tau", "0.1"]
    real = correct_module.write_label_map
    monkeypatch.setattr(correct_module, "write_label_map", FailAfter(real, 2, OSError(5, "EIO")))
    _, err = invoke(*args, "--overwrite", exit_code=1)
    line = one_line_error(err, "kept in", "pred.partial", "rerun with --resume")
    assert "is untouched" in line
    assert folder_bytes(corrected["out"]) == old  # old predictions and old correct.json
    monkeypatch.setattr(correct_module, "write_label_map", real)
    _, err = invoke(*args[:-1], "0.5", "--resume", exit_code=1)  # other settings than the run
    one_line_error(err, "other settings (tau", "cannot resume")
    _, err = invoke(*args, "--resume")
    assert "kept 2 existing" in err
    invoke(*args[:-2], "--out-dir", tmp_path / "fresh", "--tau", "0.1")
    assert folder_bytes(corrected["out"]) == folder_bytes(tmp_path / "fresh")
    assert not (tmp_path / "pred.partial").exists()


@pytest.mark.parametrize("where", ["import", "parse"])
def test_ctrl_c_during_start_up_exits_130_not_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Ctrl-C while the command module (torch) imports or options parse: 130, no 'Aborted!'."""
    from blda_posthoc import cli
    from blda_posthoc.cli import common

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if where == "import":
        monkeypatch.setattr(cli.LazyGroup, "_module", stop)
    else:
        monkeypatch.setattr(common.ShardType, "convert", stop)
    result = CliRunner().invoke(main, ["evaluate", "x.h5", "--shard", "1/2"])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "interrupted" and "Aborted" not in result.output


def test_ctrl_c_in_correct_exits_130_and_resume_completes(
    tmp_path: Path, corrected: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from blda_posthoc.pipelines import correct as correct_module

    out = tmp_path / "ctrl"
    args = [
        "correct",
        corrected["store"],
        "--stats",
        corrected["stats"],
        "--method",
        "blda",
        "--tau",
        "0.5",
    ]
    args += ["--out-dir", out, "--color"]
    real = correct_module.write_label_map
    monkeypatch.setattr(correct_module, "write_label_map", FailAfter(real, 3, KeyboardInterrupt()))
    _, err = invoke(*args, exit_code=130)
    assert err.strip().startswith("interrupted; the finished outputs are kept in")
    assert "--resume" in err and not out.exists()
    monkeypatch.setattr(correct_module, "write_label_map", real)
    invoke(*args, "--resume")
    assert folder_bytes(out) == folder_bytes(corrected["out"])


def _rewrite_store(path: Path, scale: float) -> None:
    """Replace the store at ``path`` by one with the same names and classes, logits scaled."""
    fresh = path.with_name("fresh-" + path.name)
    with LogitStore([path]) as old, StoreWriter(fresh, old.class_names, dtype="float32") as new:
        for record in old:
            new.write(record.name, record.logits * scale, record.label, record.size)
    os.replace(fresh, path)


@pytest.mark.parametrize("command", ["correct", "relabel"])
def test_resume_refuses_a_store_replaced_at_the_same_path(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The run record holds the stores' content fingerprints, not only their paths."""
    from blda_posthoc.pipelines import correct as correct_module
    from blda_posthoc.pipelines import relabel as relabel_module

    stats = tmp_path / "st.h5"
    invoke("fit-stats", store, "--out", stats)
    with LogitStore([store]) as s:
        before = s.fingerprints[0]
    out = tmp_path / "out"
    args = [command, store, "--stats", stats, "--tau", "0.5", "--out-dir", out]
    module = correct_module if command == "correct" else relabel_module
    real = module.write_label_map
    monkeypatch.setattr(module, "write_label_map", FailAfter(real, 1, KeyboardInterrupt()))
    invoke(*args, exit_code=130)
    monkeypatch.setattr(module, "write_label_map", real)
    original = store.read_bytes()
    _rewrite_store(store, 1.5)
    with LogitStore([store]) as s:
        after = s.fingerprints[0]
    assert after != before
    _, err = invoke(*args, "--resume", exit_code=1)
    one_line_error(err, "store_fingerprints", before, after, "cannot resume")
    store.write_bytes(original)  # the same content again: the same fingerprint, resumable
    with LogitStore([store]) as s:
        assert s.fingerprints[0] == before
    invoke(*args, "--resume")


def test_store_fingerprints_follow_the_content(tmp_path: Path) -> None:
    """Per image and per store; equal content gives equal prints; old stores get meta- ones."""
    rng = np.random.default_rng(0)
    logits = {n: rng.normal(size=(2, 4, 5)).astype(np.float32) for n in ("a", "b/c")}

    def write(path: Path, data: dict[str, np.ndarray]) -> str:
        with StoreWriter(path, ["x", "y"], dtype="float32", settings={"model": "m"}) as w:
            for name in sorted(data):
                w.write(name, data[name])
        with LogitStore([path]) as s:
            return s.fingerprints[0]

    first, again = write(tmp_path / "1.h5", logits), write(tmp_path / "2.h5", logits)
    assert first == again and len(first) == 16
    with h5py.File(tmp_path / "1.h5", "r") as f:
        prints = [f["images"][k].attrs["fingerprint"] for k in f["images"]]
    assert len(set(prints)) == 2 and all(len(p) == 16 for p in prints)
    changed = dict(logits, a=logits["a"] + 1)
    assert write(tmp_path / "3.h5", changed) != first
    assert write(tmp_path / "4.h5", {"a": logits["a"]}) != first
    # A store written before fingerprints: a metadata fingerprint, stable, prefixed meta-.
    for name in ("1.h5", "3.h5"):
        with h5py.File(tmp_path / name, "a") as f:
            del f.attrs["fingerprint"]
    with LogitStore([tmp_path / "1.h5"]) as s, LogitStore([tmp_path / "3.h5"]) as t:
        assert s.fingerprints[0].startswith("meta-") and t.fingerprints[0].startswith("meta-")
        assert s.fingerprints[0] != t.fingerprints[0]  # other logit ranges
    with h5py.File(tmp_path / "2.h5", "a") as f:
        f.attrs["fingerprint"] = "not hex"
    with pytest.raises(InputError, match="fingerprint 'not hex' is not 16 hex digits"):
        LogitStore([tmp_path / "2.h5"])


def test_a_run_that_wrote_nothing_leaves_no_partial_folder_and_claims_nothing(
    tmp_path: Path, corrected: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from blda_posthoc.pipelines import correct as correct_module

    out = tmp_path / "nothing"
    args = [
        "correct",
        corrected["store"],
        "--stats",
        corrected["stats"],
        "--method",
        "blda",
        "--out-dir",
        out,
    ]
    scores = tmp_path / "sc.h5"
    (tmp_path / "sc.h5.partial").write_bytes(b"left by a killed run")
    _, err = invoke(*args, "--scores-out", scores, exit_code=1)
    line = one_line_error(err, "sc.h5.partial: an unfinished --scores-out store", "--overwrite")
    assert "kept" not in line and "rerun with --resume" not in line
    assert not out.exists() and not (tmp_path / "nothing.partial").exists()
    real = correct_module.write_label_map
    monkeypatch.setattr(correct_module, "write_label_map", FailAfter(real, 0, InputError("boom")))
    _, err = invoke(*args, exit_code=1)
    assert err.strip() == "error: boom"  # no "finished outputs are kept" when there are none
    assert not out.exists() and not (tmp_path / "nothing.partial").exists()
    monkeypatch.setattr(correct_module, "write_label_map", FailAfter(real, 1, InputError("boom")))
    _, err = invoke(*args, exit_code=1)
    one_line_error(err, "boom", "kept in", "nothing.partial")  # one finished image: kept
    assert (tmp_path / "nothing.partial").is_dir()


def test_resume_cannot_be_led_outside_the_folder(
    tmp_path: Path, corrected: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from blda_posthoc.pipelines import correct as correct_module

    out = tmp_path / "esc"
    args = [
        "correct",
        corrected["store"],
        "--stats",
        corrected["stats"],
        "--method",
        "blda",
        "--out-dir",
        out,
    ]
    real = correct_module.write_label_map
    monkeypatch.setattr(correct_module, "write_label_map", FailAfter(real, 1, KeyboardInterrupt()))
    invoke(*args, exit_code=130)
    monkeypatch.setattr(correct_module, "write_label_map", real)
    victim = tmp_path / "victim"
    victim.mkdir()
    partial = tmp_path / "esc.partial"
    for sub in ("city_a", "city_b"):
        if (partial / sub).exists():
            for png in (partial / sub).iterdir():
                png.unlink()
            (partial / sub).rmdir()
        (partial / sub).symlink_to(victim)
    _, err = invoke(*args, "--resume", exit_code=1)
    one_line_error(err, "outside", "symbolic link")
    assert list(victim.iterdir()) == []


def test_outputs_may_not_be_inputs(tmp_path: Path, corrected: dict[str, Path]) -> None:
    store, stats = corrected["store"], corrected["stats"]
    before = store.read_bytes()
    cases = [
        ["fit-stats", store, "--out", store, "--overwrite"],
        ["fit-stats", store, "--out", stats, "--overwrite", "--calibration", stats],
        ["correct", store, "--stats", stats, "--out-dir", tmp_path / "x", "--scores-out", store],
        ["evaluate", store, "--json", store, "--overwrite"],
        ["relabel", store, "--stats", stats, "--out-dir", tmp_path, "--overwrite"],
        ["correct", store, "--stats", stats, "--out-dir", tmp_path, "--overwrite"],
    ]
    for args in cases:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code in (1, 2), (args, result.output)
        assert "is also an input" in result.stderr or "Usage" in result.stderr, result.stderr
    labels = tmp_path / "labels"
    labels.mkdir()
    _, err = invoke(
        "relabel",
        store,
        "--stats",
        stats,
        "--out-dir",
        labels,
        "--pseudo-dir",
        labels,
        exit_code=1,
    )
    one_line_error(err, "is also an input")
    assert store.read_bytes() == before


def test_a_second_fit_stats_on_the_same_output_stops(tmp_path: Path, store: Path) -> None:
    out = tmp_path / "busy.h5"
    code = "import sys,time; from blda_posthoc.outputs import Claim; c = Claim(sys.argv[1]);"
    code += " print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], env=sub_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        _, err = invoke("fit-stats", store, "--out", out, exit_code=1)
        one_line_error(err, f"{out}: another run is writing it")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("correct", ["--tau", "nan"]),
        ("correct", ["--clamp", "nan"]),
        ("relabel", ["--keep-portion", "nan"]),
        ("relabel", ["--min-confidence", "nan"]),
        ("relabel", ["--tau", "inf"]),
    ],
)
def test_correction_options_must_be_finite(tmp_path: Path, command: str, option: list[str]) -> None:
    out = tmp_path / "nan"
    args = [command, tmp_path / "s.h5", "--stats", tmp_path / "st.h5", "--out-dir", out]
    result = CliRunner().invoke(main, [str(a) for a in [*args, *option]])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not out.exists() and not (tmp_path / "nan.partial").exists()


def test_fit_stats_refuses_a_stretched_grid_and_unbounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "wide.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(path, ["a", "b", "c"], dtype="float32") as w:
        for i in range(5):
            w.write(f"img_{i}", rng.normal(0, 3, (3, 8, 8)).astype(np.float32))
        w.write("zz_outlier", np.full((3, 8, 8), 1e5, np.float32))
    _, err = invoke(
        "fit-stats", path, "--out", tmp_path / "s.h5", "--labels", "pseudo", exit_code=1
    )
    one_line_error(err, str(path), "'zz_outlier'", "far outside")
    many = tmp_path / "many.h5"
    with StoreWriter(many, [f"c{i}" for i in range(255)]) as w:
        w.write("x", rng.normal(0, 1, (255, 2, 2)).astype(np.float32))
    args = ["--labels", "pseudo", "--bins", "65536"]
    _, err = invoke("fit-stats", many, "--out", tmp_path / "m.h5", *args, exit_code=1)
    one_line_error(err, "--bins 65536 with 255 classes", "GiB")


@pytest.mark.parametrize("command", ["fit-stats", "correct"])
def test_disk_full_in_fit_stats_and_correct_leaves_nothing_under_the_final_name(
    tmp_path: Path, corrected: dict[str, Path], command: str
) -> None:
    if command == "fit-stats":
        out = tmp_path / "full.h5"
        args = ["fit-stats", corrected["store"], "--out", out]
    else:
        out = tmp_path / "full"
        args = [
            "correct",
            corrected["store"],
            "--stats",
            corrected["stats"],
            "--method",
            "blda",
            "--out-dir",
            out,
        ]
    limited = run_sub(*args, limit=600)
    assert limited.returncode == 1, limited.stderr
    last_error(limited.stderr, "file too large")
    assert not out.exists()


def test_evaluate_names_the_label_file_or_store(tmp_path: Path, store: Path) -> None:
    labels = tmp_path / "labels"
    for name in ("city_a/img_000", "city_b/img_001", "city_a/img_002", "city_b/img_003"):
        (labels / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32), 1, np.uint8)).save(labels / f"{name}.png")
    for name in ("city_a/img_004", "city_b/img_005"):
        Image.fromarray(np.full((24, 32), 9, np.uint8)).save(labels / f"{name}.png")
    _, err = invoke("evaluate", store, "--labels", labels, exit_code=1)
    one_line_error(err, str(labels / "city_a" / "img_004.png"))


def make_big_store(root: Path, count: int) -> Path:
    logits, labels = write_case(root / "case", num_images=count, num_classes=4, size=(24, 32))
    out = root / "big.h5"
    invoke("import-logits", logits, "--labels", labels, "--out", out)
    return out


@pytest.mark.parametrize("command", ["correct", "relabel"])
def test_kill9_of_correct_and_relabel_then_resume_is_byte_identical(
    tmp_path: Path, store: Path, command: str
) -> None:
    store_path = make_big_store(tmp_path, 120)
    stats = tmp_path / "st.h5"
    invoke("fit-stats", store, "--out", stats)  # a small store: fitting is not under test
    args = [command, store_path, "--stats", stats, "--tau", "0.4", "--color"]
    if command == "relabel":
        args += ["--min-confidence", "0.6"]
    out, ref = tmp_path / "k", tmp_path / "ref"
    victim = subprocess.Popen(
        slowed_cmd("blda_posthoc.io.images", "write_png", *args, "--out-dir", out, delay=0.1),
        env=sub_env(),
        stderr=subprocess.DEVNULL,
    )
    partial = tmp_path / "k.partial"
    wait_for(lambda: partial.is_dir() and len(list(partial.rglob("*.png"))) >= 8)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    if out.exists():
        pytest.fail("the run finished before it could be killed; make the case larger")
    resumed = run_sub(*args, "--out-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    invoke(*args, "--out-dir", ref)
    assert folder_bytes(out) == folder_bytes(ref)


def test_resume_settings_with_a_key_on_one_side_only_are_refused(tmp_path: Path) -> None:
    """A setting only the recorded run has (or only this run has) is a difference too."""
    out = tmp_path / "o.h5.partial"
    outputs.check_settings(out, {"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1})  # same: no error
    for recorded, current, key in (
        ({"a": 1, "b": 2}, {"a": 1}, "b"),
        ({"a": 1}, {"a": 1, "new": 0}, "new"),
    ):
        with pytest.raises(InputError, match=rf"other settings \({key}: .*cannot resume"):
            outputs.check_settings(out, recorded, current)
