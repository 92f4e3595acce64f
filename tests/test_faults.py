"""Bad input and faults (issue 12): every case ends in one line naming the file or field, a non-zero exit, and
nothing lost or left half-written; a planted pickle is never executed; a manifest cannot name a path outside
its artifact; the train workers' rendezvous listens on loopback only; input errors are not retried.

Everything runs in this process on the session's Ray (``ray_session``) through ``seater_dist.cli.main``, on
a 60-user dataset. One training run (module fixture ``training``) serves three cases: it is watched for
listening sockets, a second writer is sent at its --out, and it is stopped with Ctrl-C after its first epoch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seater_dist.cli import main

SEATER = {"d_model": 16, "n_heads": 2, "ffn_dim": 32, "history_len": 5, "beam_size": 12}
SASREC = {"d_model": 16, "n_heads": 2, "num_blocks": 1, "max_len": 6, "num_negatives": 8}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def cli(capsys, *argv) -> tuple[int, list[str]]:
    """Run ``seater ARGV`` in this process -> (exit code, non-blank stderr lines)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def one_line_error(capsys, *argv, names=(), code=2) -> str:
    """Run ``seater ARGV``; assert the exit code and one ``seater CMD: error: ...`` line naming ``names``."""
    got, err = cli(capsys, *argv)
    assert got == code, err
    assert len(err) == 1, err
    assert err[0].startswith(f"seater {argv[0]}: error: "), err
    for name in names:
        assert str(name) in err[0], err[0]
    return err[0]


UNSAFE_ADVICE = ("weights_only", "allow_pickle", "unsafe", "a bug")


def no_unsafe_advice(message: str) -> None:
    """Assert that ``message`` neither suggests loading a file unsafely nor calls bad input a bug."""
    assert not [words for words in UNSAFE_ADVICE if words in message], message


def listing(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def hidden_beside(path: Path) -> list[str]:
    """Temp directories and lock files a writer of ``path`` leaves beside it."""
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*"))


def rewrite_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))


@contextlib.contextmanager
def read_only_dir(path: Path):
    """``path`` as a directory nobody may write into (root ignores permissions: the immutable attribute)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only directory here (root without chattr +i)")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# ------------------------------------------------------------------------------------------ artifacts


@pytest.fixture(scope="module")
def art(ray_session, tmp_path_factory):
    """A prepared 60-user dataset, `seater embed`'s layout (an untrained SASRec checkpoint in sasrec/best and
    its item_embeddings.npy), the tree `seater build-tree` makes of them, and an untrained SEATER checkpoint."""
    import torch

    from seater_dist.config import SasrecSettings, SeaterSettings
    from seater_dist.data.dataset import load_dataset
    from seater_dist.model.checkpoint import save_checkpoint
    from seater_dist.model.sasrec import SASRec
    from seater_dist.model.seater import SeaterModel
    from seater_dist.tree.item_tree import ItemTree

    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    lines = [" ".join([f"u{u}"] + [f"i{x}" for x in rng.integers(0, 30, rng.integers(6, 12))]) for u in range(60)]
    (root / "seqs.txt").write_text("\n".join(lines) + "\n")
    assert main(["prepare", "--input", str(root / "seqs.txt"), "--format", "sequences", "--out", str(root / "dataset"),
                 "--min-user-count", "2", "--min-item-count", "2"]) == 0
    ds = load_dataset(root / "dataset")
    torch.manual_seed(0)
    sasrec_settings = SasrecSettings(**SASREC)
    sasrec = save_checkpoint(root / "sasrec" / "best", SASRec(ds.num_items, sasrec_settings), sasrec_settings,
                             ds.item_ids)
    embeddings = root / "sasrec" / "item_embeddings.npy"
    shutil.copyfile(sasrec / "item_embeddings.npy", embeddings)
    assert main(["build-tree", "--embeddings", str(embeddings), "--k", "4", "--out", str(root / "tree")]) == 0
    tree = ItemTree.load(root / "tree")
    seater_settings = SeaterSettings(**SEATER)
    seater = save_checkpoint(root / "seater" / "best", SeaterModel(tree, seater_settings), seater_settings,
                             ds.item_ids, tree=tree)
    cfg = root / "small.yaml"
    cfg.write_text(f"seater: {json.dumps(SEATER)}\ntrain: {{workers: 2, batch_size: 16, epochs: 1}}\n")
    return SimpleNamespace(root=root, dataset=root / "dataset", tree=root / "tree", sasrec=sasrec, seater=seater,
                           embeddings=embeddings, num_items=ds.num_items, item_ids=ds.item_ids, config=cfg)


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def sasrec_checkpoint(path: Path, item_ids) -> Path:
    from seater_dist.config import SasrecSettings
    from seater_dist.model.checkpoint import save_checkpoint
    from seater_dist.model.sasrec import SASRec

    settings = SasrecSettings(**SASREC)
    return save_checkpoint(path, SASRec(len(item_ids), settings), settings, np.asarray(item_ids, dtype=object))


# ------------------------------------------------------------------------------------------ security


def _machine_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (None on a machine without one)."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def _tree_listeners(root) -> set[tuple[str, int, str]]:
    """(address, port, process) of every listening socket of ``root`` and its descendants."""
    import psutil

    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            found |= {(c.laddr.ip, c.laddr.port, name) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return True
    return False


def _join_without_token(gcs_port: int, home: Path) -> SimpleNamespace:
    """A driver on this machine, without the cluster's token, tries to join 127.0.0.1:gcs_port for up to 30 s
    (Ray retries a refused handshake; the driver is stopped at the first refusal) -> joined, and the
    authentication refusal seen in its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # no ~/.ray/auth_token; dial loopback
    driver = subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{gcs_port}'); "
                               "print('JOINED', flush=True)"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 30
    while driver.poll() is None and time.time() < deadline and not any("InvalidAuthToken" in line for line in lines):
        time.sleep(0.2)
    if driver.poll() is None:
        driver.kill()
    driver.wait()
    reader.join(10)
    output = "".join(lines)
    return SimpleNamespace(joined="JOINED" in output, refused="InvalidAuthToken" in output, output=output)


def _watch_private_ray(argv: list[str], home: Path, ready, linger: float, try_join: bool,
                       timeout: float = 240) -> SimpleNamespace:
    """``seater ARGV`` in a child process whose environment invites Ray onto the network (clusters enabled,
    authentication off, no token); every listening socket of its process tree is recorded until ``ready(output)``
    holds and ``linger`` more seconds have passed (or it exits), then each port is dialled on the machine's
    address, a driver without the token tries to join through 127.0.0.1 (``try_join``), and the child gets SIGINT."""
    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    child = subprocess.Popen([str(Path(sys.executable).with_name("seater")), *map(str, argv)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(child.stdout), daemon=True).start()
    root, seen, ready_at = psutil.Process(child.pid), set(), None
    deadline = time.time() + timeout
    try:
        while child.poll() is None and time.time() < deadline:
            seen |= _tree_listeners(root)
            if ready_at is None and any(name == "gcs_server" for _, _, name in seen) and ready("".join(output)):
                ready_at = time.time()
            if ready_at is not None and time.time() > ready_at + linger:
                break
            time.sleep(0.3)
        assert ready_at is not None or child.poll() is not None, "".join(output)[-3000:]
        machine = _machine_address()
        reachable = sorted((machine, port) for _, port, _ in seen if machine and child.poll() is None
                           and not _refuses(machine, port))
        gcs = next((port for _, port, name in seen if name == "gcs_server"), None)
        joined = _join_without_token(gcs, home) if gcs is not None and try_join and child.poll() is None else None
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        child.wait(timeout=120)
    return SimpleNamespace(listening=seen, reachable=reachable, joined=joined, output="".join(output))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "train", "evaluate"])
def test_every_commands_private_ray_listens_on_loopback_and_refuses_other_drivers(art, tmp_path, command):
    """Whatever the environment says (here: clusters enabled, authentication off) and whatever the command
    imports first (serve imports ray.serve before starting Ray), a command's private Ray listens on loopback
    only, and a driver without its token cannot join it through 127.0.0.1 either. Every command but serve
    starts its Ray on the one path in cli.main (NEEDS_RAY); train adds Ray Train's workers and rendezvous,
    evaluate Ray Data's actors: `seater run` starts nothing the two do not."""
    port = _free_port()
    argv, ready, linger = {
        "serve": (["serve", "--checkpoint", art.seater, "--port", port, "--max-replicas", "1"],
                  lambda out: "serving " in out, 2),
        "train": (["train", "--data", art.dataset, "--tree", art.tree, "--out", tmp_path / "seater",
                   "--config", art.config], lambda out: True, 8),
        "evaluate": (["evaluate", "--checkpoint", art.seater, "--data", art.dataset, "--out", tmp_path / "eval"],
                     lambda out: True, 5),
    }[command]
    home = tmp_path / "home"
    home.mkdir()
    seen = _watch_private_ray(argv, home, ready, linger, try_join=command in ("serve", "train"))
    assert any(name == "gcs_server" for _, _, name in seen.listening), seen.output[-3000:]
    exposed = sorted(entry for entry in seen.listening if entry[0] not in LOOPBACK)
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert seen.reachable == [], f"answered on the machine's address: {seen.reachable}"
    if command in ("serve", "train"):  # the short commands may end before a driver could try
        assert seen.joined is not None and not seen.joined.joined and seen.joined.refused, \
            seen.joined and seen.joined.output[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_gpu_setting_on_a_cluster_without_gpus_fails_at_once_naming_it(capsys, art, tmp_path):
    """Ray would wait forever for a GPU no node has; the command refuses before any work, naming the setting and
    the cluster's resources; the job refuses the GPU preset before its synth stage."""
    from jobs import train_microvideo

    config = tmp_path / "gpu.yaml"
    config.write_text("train: {workers: 1, use_gpu: true}\n")
    started = time.time()
    one_line_error(capsys, "train", "--data", art.dataset, "--tree", art.tree, "--out", tmp_path / "seater",
                   "--config", config, names=["train: workers 1", "use_gpu true", "0 GPU", "no autoscaler"])
    assert time.time() - started < 30 and not (tmp_path / "seater").exists()
    capsys.readouterr()
    assert train_microvideo.run(["--preset", "microvideo", "--out", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sasrec_train: workers 8, cpus_per_worker 8, use_gpu true" in err[0], err
    assert not (tmp_path / "job" / "synth").exists()


def test_serve_beyond_loopback_says_in_one_line_what_is_exposed():
    from seater_dist.serve.runner import exposure_warning

    local = exposure_warning("0.0.0.0", 8000, None)
    cluster = exposure_warning("0.0.0.0", 8000, "ray://head:10001")
    assert "\n" not in local and "0.0.0.0:8000" in local and "without authentication" in local
    assert "127.0.0.1 with token authentication" in local
    assert "docs/architecture.md" in cluster and "127.0.0.1" not in cluster



class _Planted:
    """A pickle that runs a shell command when unpickled (what an attacker would plant)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_in_a_checkpoint_is_never_executed(capsys, art, tmp_path):
    from seater_dist.artifacts import sha256_file

    ckpt = copy(art.seater, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    (ckpt / "model.pt").write_bytes(pickle.dumps(_Planted(marker)))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["checksums"]["model.pt"] = sha256_file(ckpt / "model.pt")  # the attacker controls the manifest too
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(capsys, "recommend", "--checkpoint", ckpt, "--history", "i1",
                          names=[ckpt / "model.pt", "a Python pickle", "not a model's weights"])
    no_unsafe_advice(line)
    assert not marker.exists(), "the planted pickle ran"


def test_a_planted_pickle_in_the_resumable_state_is_never_executed(art, tmp_path, monkeypatch):
    """--resume loads train_state.pt as tensors only (train/loop.py::_restore, weights_only=True); the refusal
    is bad input (exit 2) naming the file, not an internal error repeating torch's advice to load it unsafely."""
    import ray.train
    import torch

    from seater_dist.config import SeaterSettings
    from seater_dist.model.checkpoint import CheckpointError
    from seater_dist.model.seater import SeaterModel
    from seater_dist.runtime.errors import describe
    from seater_dist.train import loop
    from seater_dist.tree.item_tree import ItemTree

    planted = copy(art.seater, tmp_path / "epoch_0003")
    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), planted / loop.TRAIN_STATE)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(planted)))
    model = SeaterModel(ItemTree.load(art.tree), SeaterSettings(**SEATER))
    with pytest.raises(CheckpointError) as refused:
        loop._restore(model, None, loop.EarlyStopping(1))
    assert not marker.exists(), "the planted pickle ran"
    message, code = describe(refused.value)
    assert code == 2 and str(planted / loop.TRAIN_STATE) in message and "Python objects besides tensors" in message
    no_unsafe_advice(message)


def test_the_serving_load_lock_is_private_to_the_user(tmp_path, monkeypatch):
    """Serve replicas load checkpoints one at a time under a lock no other local user can hold: it lives in
    the user's own directory (mode 0700, owned by the user), never under a fixed name in the shared temp dir."""
    import fcntl
    import stat
    import tempfile

    from seater_dist.artifacts import ArtifactError
    from seater_dist.serve import replicas

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the shared temp directory, for this test
    with replicas._one_at_a_time(True):
        locks = list(tmp_path.rglob("*.lock"))
        assert len(locks) == 1 and locks[0].parent != tmp_path, locks
        private = locks[0].parent.stat()
        assert private.st_uid == os.getuid() and stat.S_IMODE(private.st_mode) == 0o700
        with open(locks[0]) as other, pytest.raises(BlockingIOError):  # it is the lock being held
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    directory = locks[0].parent
    shutil.rmtree(directory)
    directory.mkdir()
    directory.chmod(0o777)  # planted by someone else: open to every user
    with pytest.raises(ArtifactError, match=f"{directory}: not a private directory of this user"):
        with replicas._one_at_a_time(True):
            pass
    directory.rmdir()
    directory.symlink_to(tmp_path)  # or a symlink to somewhere else
    with pytest.raises(ArtifactError, match="not a private directory"):
        with replicas._one_at_a_time(True):
            pass


def test_the_uri_cache_is_private_to_the_user(tmp_path, monkeypatch):
    """Copies of s3:// artifacts are reused from the cache: it must not be a fixed name in the shared temp
    directory, where another local user could plant a "complete" copy before us."""
    import stat
    import tempfile

    from seater_dist import artifacts

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SEATER_CACHE", raising=False)
    parent = artifacts.cache_root().parent
    assert parent != tmp_path
    assert parent.stat().st_uid == os.getuid() and stat.S_IMODE(parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd"])
def test_a_manifest_naming_a_path_outside_its_directory_is_refused(capsys, art, tmp_path, name):
    ckpt = copy(art.sasrec, tmp_path / "ckpt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["checksums"][name] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(capsys, "evaluate", "--checkpoint", ckpt, "--data", art.dataset, "--out", tmp_path / "m",
                          names=[name, "not a path inside the artifact"])
    assert "root:" not in line and not (tmp_path / "m" / "metrics.json").exists()


def test_a_manifest_naming_a_fifo_does_not_hang_recommend(capsys, art, tmp_path):
    ckpt = copy(art.seater, tmp_path / "ckpt")
    os.mkfifo(ckpt / "fifo")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["checksums"]["fifo"] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    done: dict[str, object] = {}
    runner = threading.Thread(target=lambda: done.update(result=cli(capsys, "recommend", "--checkpoint", ckpt,
                                                                    "--history", "i1")), daemon=True)
    runner.start()
    runner.join(60)
    if runner.is_alive():  # unblock the reader before failing
        with open(ckpt / "fifo", "wb"):
            pass
        pytest.fail("recommend hung on a FIFO named by the manifest")
    code, err = done["result"]
    assert code == 2 and len(err) == 1 and "fifo: not a regular file" in err[0], err


# ------------------------------------------------------------------------------------------ one training run


@pytest.fixture(scope="module")
def training(art, tmp_path_factory):
    """`seater train` (2 workers) in this process, watched from a thread: every listening socket of this
    process's descendants (the session's Ray, the Train workers) is recorded; once the workers are up, a
    second `seater train` into the same --out is run; after the first epoch's checkpoint, Ctrl-C."""
    import psutil

    out = tmp_path_factory.mktemp("training") / "seater"
    cfg = out.parent / "long.yaml"
    cfg.write_text(f"seater: {json.dumps(SEATER)}\ntrain: {{workers: 2, batch_size: 64, epochs: 50, patience: 50}}\n")
    argv = ["train", "--data", str(art.dataset), "--tree", str(art.tree), "--out", str(out), "--config", str(cfg)]
    seen = SimpleNamespace(listening=set(), train_worker_listened=False, second=None, interrupted=False)
    running, stop = threading.Event(), threading.Event()

    def watch() -> None:
        me = psutil.Process()
        deadline = time.time() + 900
        while not stop.is_set() and time.time() < deadline:
            for proc in me.children(recursive=True):
                try:
                    name = " ".join(proc.cmdline())[:80]
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            seen.listening.add((conn.laddr.ip, conn.laddr.port, name))
                            seen.train_worker_listened |= "RayTrainWorker" in name
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            if seen.second is None and seen.train_worker_listened:
                started = time.time()
                code = main(argv)  # prints to the redirected stderr below
                seen.second = (code, time.time() - started)
            epoch_done = bool(list((out / "ray_results" / "seater").glob("epoch_*/manifest.json")))
            if ((seen.second is not None and epoch_done) or time.time() > deadline - 60) and running.is_set() \
                    and not seen.interrupted:  # Ctrl-C after the first epoch (or, if it never comes, to end the run)
                seen.interrupted = True
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.2)

    def guard(signum, frame):  # a Ctrl-C that arrives outside the run must not stop pytest
        if running.is_set():
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, guard)
    stderr = io.StringIO()
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        with contextlib.redirect_stderr(stderr):
            watcher.start()
            running.set()
            code = main(argv)
            running.clear()
    finally:
        running.clear()
        stop.set()
        watcher.join(30)
        signal.signal(signal.SIGINT, previous)
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith("seater train")]
    return SimpleNamespace(out=out, code=code, lines=lines, seen=seen)


def test_training_rendezvous_listens_on_loopback_only(training):
    seen = training.seen
    assert seen.train_worker_listened, "never saw a Train worker listening: the check saw nothing"
    exposed = sorted(entry for entry in seen.listening if entry[0] not in LOOPBACK)
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_a_second_train_into_the_same_out_is_refused_at_start(training):
    assert training.seen.second is not None, "the second writer never ran"
    code, seconds = training.seen.second
    refused = [line for line in training.lines if line.startswith("seater train: error:")]
    assert code == 2 and len(refused) == 1, training.lines
    assert str(training.out) in refused[0] and "another thread of this process" in refused[0]
    assert seconds < 30  # at start, not after training


def test_ctrl_c_during_training_exits_130_and_keeps_the_finished_epochs(training):
    from seater_dist.config import TrainSettings
    from seater_dist.train.trainer import resumable

    assert training.seen.interrupted and training.code == 130, training.lines
    assert training.seen.second is not None, "interrupted before the first epoch finished"
    interrupted = [line for line in training.lines if line.startswith("seater train: interrupted")]
    assert len(interrupted) == 1 and "--resume" in interrupted[0], training.lines
    assert resumable(training.out, TrainSettings(), "seater")
    assert list((training.out / "ray_results" / "seater").glob("epoch_0000/manifest.json"))
    assert not (training.out / "best").exists()  # nothing half-written
    assert hidden_beside(training.out) == [] and hidden_beside(training.out / "best") == []


def test_training_beside_another_local_ray_prints_no_placement_group_cleaner_traceback(capsys, art, tmp_path,
                                                                                      ray_head):
    """Ray Train's PlacementGroupCleaner (a detached actor) asks the state API about the controller with no
    address: with a second Ray on the machine, auto-detection failed ("Found multiple active Ray instances")
    and its thread died with a 25-line traceback on the console. Every worker now knows its own cluster."""
    import psutil
    import ray

    # counted from the processes themselves: Ray's own finder caches an earlier answer of this process
    gcs_servers = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "gcs_server"]
    assert len(gcs_servers) >= 2, "no second Ray to stand beside: the check would see nothing"
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    started = time.time()
    code, err = cli(capsys, "train", "--data", art.dataset, "--tree", art.tree, "--out", tmp_path / "out",
                    "--config", art.config)
    assert code == 0, err
    time.sleep(2)  # the cleaner checks once a second; its worker's output reaches the log file at once
    assert not [line for line in err if "PlacementGroupCleaner" in line or "Traceback" in line], err
    died = [p.name for p in logs.glob("worker-*") if p.stat().st_mtime >= started
            and "Exception in thread PlacementGroupCleanerMonitor" in p.read_text(errors="replace")]
    assert died == []


# ------------------------------------------------------------------------------------------ failure policy


def test_the_failure_policy_raises_input_errors_and_retries_worker_deaths():
    from ray.exceptions import ActorDiedError
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api import data_parallel_trainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    from seater_dist.data.errors import DataError
    from seater_dist.runtime.train_fit import InputErrorsFailFast, input_errors_fail_fast

    policy = InputErrorsFailFast(FailureConfig(max_failures=2))
    bad_input = WorkerGroupError("rank 0", {0: DataError("x.parquet: checksum mismatch"), 1: RuntimeError("gloo")})
    assert policy.make_decision(bad_input) == FailureDecision.RAISE
    died = WorkerGroupError("rank 1", {1: ActorDiedError()})
    assert policy.make_decision(died) == FailureDecision.RETRY
    assert policy.make_decision(WorkerGroupError("rank 0", {0: RuntimeError("boom")})) == FailureDecision.RETRY
    original = data_parallel_trainer.create_failure_policy
    with input_errors_fail_fast():
        assert data_parallel_trainer.create_failure_policy is InputErrorsFailFast
    assert data_parallel_trainer.create_failure_policy is original


@pytest.mark.slow
def test_an_input_error_inside_a_train_worker_is_not_retried(art, tmp_path, monkeypatch):
    """A dataset file altered after the driver's check fails in the workers: one attempt, not 1 + max_failures."""
    import functools

    import ray
    from ray.util.state import list_actors

    import seater_dist.train.trainer as trainer
    from seater_dist.config import SeaterSettings, TrainSettings
    from seater_dist.data.dataset import load_dataset
    from seater_dist.runtime.errors import describe

    data = copy(art.dataset, tmp_path / "dataset")
    (data / ".verified.json").unlink(missing_ok=True)
    with open(data / "users.parquet", "ab") as f:
        f.write(b"altered")
    monkeypatch.setattr(trainer, "load_dataset", functools.partial(load_dataset, verify=False))  # the driver misses it

    def workers_started() -> int:
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000,
                               address=ray.get_runtime_context().gcs_address))

    before = workers_started()
    with pytest.raises(Exception) as failure:
        trainer.train_seater(data, art.tree, tmp_path / "out", TrainSettings(workers=2, batch_size=16, epochs=1,
                                                                            max_failures=3), SeaterSettings(**SEATER))
    message, code = describe(failure.value)
    assert code == 2 and f"{data / 'users.parquet'}: checksum mismatch" in message and "\n" not in message
    assert workers_started() - before == 2, "the failure policy retried an input error"


# ------------------------------------------------------------------------------------------ data lost or wrong


@pytest.mark.parametrize("kind", ["a user's directory", "a dataset"])
def test_build_tree_never_replaces_a_directory_that_is_not_a_tree(capsys, art, tmp_path, kind):
    if kind == "a dataset":
        target = copy(art.dataset, tmp_path / "dataset")
    else:
        target = tmp_path / "mine"
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    before = listing(target)
    one_line_error(capsys, "build-tree", "--embeddings", art.embeddings, "--k", "4", "--out", target,
                   names=[target, "not a tree directory; refusing to replace it"])
    assert listing(target) == before and hidden_beside(target) == []


@pytest.mark.parametrize("damage", ["deleted", "truncated", "one bit flipped"])
def test_evaluate_refuses_a_dataset_whose_shard_changed(capsys, art, tmp_path, damage):
    data = copy(art.dataset, tmp_path / "dataset")
    shard = sorted((data / "test").glob("*.parquet"))[0]
    if damage == "deleted":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:50])
    else:
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 1
        shard.write_bytes(bytes(raw))
    one_line_error(capsys, "evaluate", "--checkpoint", art.sasrec, "--data", data, "--out", tmp_path / "m",
                   names=[shard, "missing" if damage == "deleted" else "checksum mismatch"])
    assert not (tmp_path / "m" / "metrics.json").exists()


def test_a_byte_changed_in_place_with_its_mtime_set_back_is_refused(capsys, art, tmp_path):
    """The verification stamp holds ctime, which no user can set: same size, mtime and inode do not hide it."""
    from seater_dist.data.dataset import load_dataset

    data = copy(art.dataset, tmp_path / "dataset")
    load_dataset(data)  # hashed in full, stamped in .verified.json
    shard = sorted((data / "test").glob("*.parquet"))[0]
    before = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    one_line_error(capsys, "evaluate", "--checkpoint", art.sasrec, "--data", data, "--out", tmp_path / "m",
                   names=[shard, "checksum mismatch"])
    assert not (tmp_path / "m").exists()


def test_a_dataset_is_hashed_once_then_trusted_by_its_stamp(art, tmp_path, monkeypatch):
    import seater_dist.data.dataset as dataset_module
    from seater_dist.data.errors import DataError

    data = copy(art.dataset, tmp_path / "dataset")
    (data / ".verified.json").unlink(missing_ok=True)
    hashed: list[str] = []
    real = dataset_module.sha256_file
    monkeypatch.setattr(dataset_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    monkeypatch.setattr(dataset_module, "_stamps", {})  # no in-process stamp: the file must do
    dataset_module.load_dataset(data)
    first = len(hashed)
    assert first == len(json.loads((data / "manifest.json").read_text())["checksums"])
    assert (data / ".verified.json").is_file()
    monkeypatch.setattr(dataset_module, "_stamps", {})
    dataset_module.load_dataset(data)
    assert len(hashed) == first  # trusted by the stamp: nothing re-hashed
    with open(data / "items.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="items.parquet: checksum mismatch"):
        dataset_module.load_dataset(data)
    assert hashed[first:] == ["items.parquet"]  # only the file whose stamp changed


@pytest.mark.parametrize("catalogue", ["more items", "fewer items", "same count, other ids"])
def test_evaluate_refuses_a_checkpoint_of_another_catalogue(capsys, art, tmp_path, catalogue):
    from seater_dist.model.checkpoint import catalogue_id

    n = {"more items": art.num_items * 3, "fewer items": art.num_items - 5}.get(catalogue, art.num_items)
    ids = [f"other-{i}" for i in range(n)]
    ckpt = sasrec_checkpoint(tmp_path / "ckpt", ids)
    line = one_line_error(capsys, "evaluate", "--checkpoint", ckpt, "--data", art.dataset, "--out", tmp_path / "m",
                          names=[ckpt, art.dataset, catalogue_id(ids)[:12], catalogue_id(art.item_ids)[:12]])
    assert f"{n:,} items" in line and f"{art.num_items:,} items" in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("model", ["sasrec", "seater"])
def test_a_checkpoint_with_one_weight_bit_flipped_is_refused(capsys, art, tmp_path, model):
    ckpt = copy(getattr(art, model), tmp_path / "ckpt")
    raw = bytearray((ckpt / "model.pt").read_bytes())
    raw[-200] ^= 1
    (ckpt / "model.pt").write_bytes(bytes(raw))
    one_line_error(capsys, "evaluate", "--checkpoint", ckpt, "--data", art.dataset, "--out", tmp_path / "m",
                   names=[ckpt / "model.pt", "checksum mismatch"])
    assert not (tmp_path / "m").exists()


@pytest.fixture
def holder():
    """A live process that 'holds' an output: its pid goes into a planted lock file."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", ["prepare", "build-tree", "train", "embed", "evaluate", "run"])
def test_a_second_writer_is_refused_at_start_naming_the_holder(capsys, art, tmp_path, holder, command):
    out = tmp_path / "out"
    argv = {
        "prepare": ["prepare", "--input", art.root / "seqs.txt", "--format", "sequences", "--out", out],
        "build-tree": ["build-tree", "--embeddings", art.embeddings, "--k", "4", "--out", out],
        "train": ["train", "--data", art.dataset, "--tree", art.tree, "--out", out],
        "embed": ["embed", "--data", art.dataset, "--out", out],
        "evaluate": ["evaluate", "--checkpoint", art.sasrec, "--data", art.dataset, "--out", out],
        "run": ["run", "--input", art.root / "seqs.txt", "--format", "sequences", "--out", out],
    }[command]
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "earlier",
                                "command": "seater something"}))
    t0 = time.time()
    one_line_error(capsys, *argv, names=[out, f"pid {holder.pid} on host {socket.gethostname()}", lock])
    assert time.time() - t0 < 20  # refused at start
    assert not out.exists() and lock.exists()  # nothing written, the holder's lock untouched


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over(capsys, art, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "tree"
    (tmp_path / ".tree.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    code, err = cli(capsys, "build-tree", "--embeddings", art.embeddings, "--k", "4", "--out", out)
    assert code == 0, err
    assert (out / "manifest.json").is_file() and hidden_beside(out) == []


def test_resume_with_nothing_to_resume_is_an_error(capsys, art, tmp_path):
    one_line_error(capsys, "train", "--data", art.dataset, "--tree", art.tree, "--out", tmp_path / "out" / "seater",
                   "--resume", names=["nothing to resume", "drop --resume"])
    assert not (tmp_path / "out").exists() and hidden_beside(tmp_path / "out" / "seater") == []  # nothing left


@pytest.mark.parametrize("command", ["prepare", "run"])
@pytest.mark.parametrize("where", ["out inside input", "out is input", "input inside out", "out inside, by a symlink"])
def test_an_out_inside_the_input_is_refused_up_front(capsys, art, tmp_path, command, where):
    """An output inside the input would be read as input by the next run; an input inside the output would be
    replaced. Refused before anything starts, naming both paths; symlinks resolved."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copyfile(art.root / "seqs.txt", raw / "seqs.txt")
    if where == "out inside input":
        given, out = raw, raw / "dataset"
    elif where == "out is input":
        given, out = raw, raw
    elif where == "input inside out":
        given, out = raw / "seqs.txt", raw
    else:
        (tmp_path / "link").symlink_to(raw)
        given, out = raw, tmp_path / "link" / "dataset"
    before = listing(raw)
    one_line_error(capsys, command, "--input", given, "--format", "sequences", "--out", out,
                   names=[f"--out {out}", f"--input {given}", "choose an output outside the input"])
    assert listing(raw) == before and hidden_beside(raw) == []


def test_a_config_cannot_set_the_input_of_prepare(capsys, art, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("prepare: {input: elsewhere.txt, min_user_count: 2}\n")
    one_line_error(capsys, "run", "--input", art.root / "seqs.txt", "--format", "sequences", "--out", tmp_path / "out",
                   "--config", cfg, names=[cfg, "prepare.input"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("timestamp", ["99999999999", "-5", "1e300", "1e19", "-1e300"],
                         ids=["year 5138", "negative", "1e300", "1e19 (beyond int64)", "-1e300"])
def test_timestamps_outside_1970_to_2100_are_rejected_rows(tmp_path, timestamp):
    from bench.local_prepare import prepare_local
    from seater_dist.config import PrepareSettings

    csv = tmp_path / "log.csv"
    csv.write_text(f"user_id,item_id,timestamp\nu1,i1,100\nu1,i2,{timestamp}\nu1,i3,300\nu2,i1,100\nu2,i3,200\n"
                   "u2,i2,1700000000000\n")  # the last in milliseconds: accepted
    result = prepare_local(PrepareSettings(input=str(csv), format="interactions", out=str(tmp_path / "ds"),
                                           min_user_count=2, min_item_count=1))
    assert result.dropped == {"timestamp_out_of_range": 1} and result.rows_kept == 5
    rejected = pq.read_table(tmp_path / "ds" / "rejected").to_pylist()
    assert [(r["row"], r["reason"]) for r in rejected] == [(3, "timestamp_out_of_range")]
    assert timestamp in rejected[0]["detail"] and "1970 to 2100" in rejected[0]["detail"]


@pytest.mark.parametrize("column", [pa.float64(), pa.uint64()], ids=["float64", "uint64"])
def test_timestamps_beyond_int64_in_a_parquet_column_are_rejected_rows(capsys, tmp_path, column):
    """`seater prepare` (on Ray) of a numeric time column holding 1e19: a rejected row, not an internal error."""
    path = tmp_path / "log.parquet"
    times = pa.array([100, 10**19, 300, 100, 200], pa.uint64()).cast(column, safe=False)
    pq.write_table(pa.table({"user_id": ["u1", "u1", "u1", "u2", "u2"], "item_id": ["i1", "i2", "i3", "i1", "i3"],
                             "timestamp": times}), path)
    code, err = cli(capsys, "prepare", "--input", path, "--format", "interactions", "--out", tmp_path / "ds",
                    "--min-user-count", "2", "--min-item-count", "1")
    assert code == 0, err
    rejected = pq.read_table(tmp_path / "ds" / "rejected").to_pylist()
    assert [(r["row"], r["reason"]) for r in rejected] == [(2, "timestamp_out_of_range")]
    assert "10000000000000000000" in rejected[0]["detail"] or "1e+19" in rejected[0]["detail"]


@pytest.mark.parametrize("fmt", ["interactions", "sequences", "amazon"])
def test_a_utf8_byte_order_mark_is_read_past(tmp_path, fmt):
    """Excel's "CSV UTF-8" starts with a byte-order mark: the first column is still `user_id` (not
    `\\ufeffuser_id`), the first user still `u1`; the dataset is the one the file without it makes."""
    from bench.local_prepare import prepare_local
    from seater_dist.config import PrepareSettings

    rows = [("u1", "i1", 100), ("u1", "i2", 200), ("u1", "i3", 300), ("u2", "i1", 100), ("u2", "i3", 200)]
    if fmt == "interactions":
        name, text = "log.csv", "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    elif fmt == "sequences":
        name, text = "log.txt", "u1 i1 i2 i3\nu2 i1 i3\n"
    else:
        name, text = "log.json", "".join(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t}) + "\n"
                                         for u, i, t in rows)
    outputs = []
    for bom in (b"", b"\xef\xbb\xbf"):
        folder = tmp_path / ("bom" if bom else "plain")
        folder.mkdir()
        (folder / name).write_bytes(bom + text.encode())
        result = prepare_local(PrepareSettings(input=str(folder / name), format=fmt, out=str(folder / "ds"),
                                               min_user_count=2, min_item_count=1))
        assert result.dropped == {} and result.rows_kept == 5, result
        outputs.append({p.relative_to(folder / "ds").as_posix(): pq.read_table(p).to_pylist()
                        for p in sorted((folder / "ds").rglob("*.parquet"))})
    assert outputs[0] == outputs[1]
    assert "u1" in {r["user_id"] for r in outputs[1]["users.parquet"]}


def test_ctrl_c_while_prepare_rewrites_a_dataset_keeps_it_and_no_temp_dir_survives(capsys, art, tmp_path,
                                                                                     monkeypatch):
    import seater_dist.data.prepare as prepare_module

    out = copy(art.dataset, tmp_path / "dataset")
    before = listing(out)
    argv = ["prepare", "--input", art.root / "seqs.txt", "--format", "sequences", "--out", out,
            "--min-user-count", "2", "--min-item-count", "2"]

    def interrupted(self):
        (self.tmp / "half-written.parquet").write_bytes(b"PAR1")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module._RayRun, "run", interrupted)
        code, err = cli(capsys, *argv)
    assert code == 130 and err == [f"seater prepare: interrupted; {out} is as it was (an output is replaced only "
                                   "once complete)"]
    assert listing(out) == before and hidden_beside(out) == []
    # A writer killed outright (no cleanup) leaves its temp dir: the next writer of the output removes it.
    leftover = tmp_path / ".dataset.tmp-killed"
    leftover.mkdir()
    (leftover / "part.parquet").write_bytes(b"half")
    code, err = cli(capsys, *argv)
    assert code == 0, err
    assert hidden_beside(out) == []


# ------------------------------------------------------------------------------------------ tracebacks


@pytest.mark.parametrize("fmt", ["interactions", "sequences"])
def test_text_that_is_not_utf8_is_one_line_naming_file_and_row(capsys, tmp_path, fmt):
    if fmt == "interactions":
        path = tmp_path / "log.csv"
        path.write_bytes(b"user_id,item_id,timestamp\nu1,i1,1\nu1,i\xff2,2\nu1,i3,3\n")
    else:
        path = tmp_path / "log.txt"
        path.write_bytes(b"u1 i1 i2 i3\nu2 i1 i2\nu3 caf\xe9 i2\n")
    one_line_error(capsys, "prepare", "--input", path, "--format", fmt, "--out", tmp_path / "ds",
                   names=[f"{path}: row 3: not UTF-8 text", "iconv"])
    assert not (tmp_path / "ds").exists() and hidden_beside(tmp_path / "ds") == []


@pytest.mark.parametrize("kind", ["gzip", "zip", "parquet named .csv", "binary", "UTF-16 text", "a .npy array"])
def test_a_file_that_is_not_text_says_what_it_is(capsys, tmp_path, kind):
    import gzip
    import zipfile

    if kind == "gzip":
        path = tmp_path / "log.txt.gz"
        path.write_bytes(gzip.compress(b"u1 i1 i2 i3\n"))
        fmt, says = "sequences", "gzip-compressed file; decompress it first"
    elif kind == "zip":
        path = tmp_path / "log.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("log.txt", "u1 i1 i2\n")
        fmt, says = "sequences", "zip archive"
    elif kind == "binary":
        path = tmp_path / "log.txt"
        path.write_bytes(b"u1 i1\x00\x00\x01 i2\n")
        fmt, says = "sequences", "a binary file"
    elif kind == "UTF-16 text":  # Excel's "Unicode text"
        path = tmp_path / "log.txt"
        path.write_bytes("u1 i1 i2\nu2 i1 i3\n".encode("utf-16"))
        fmt, says = "sequences", "UTF-16 text; convert it to UTF-8"
    elif kind == "a .npy array":
        path = tmp_path / "log.csv"
        np.save(tmp_path / "log.npy", np.ones((3, 3)))
        (tmp_path / "log.npy").rename(path)
        fmt, says = "interactions", "a .npy array, not text"
    else:
        path = tmp_path / "log.csv"
        pq.write_table(pa.table({"user_id": ["a"], "item_id": ["b"], "timestamp": [1]}), path)
        fmt, says = "interactions", "a parquet file; name it .parquet"
    one_line_error(capsys, "prepare", "--input", path, "--format", fmt, "--out", tmp_path / "ds", names=[path, says])
    assert not (tmp_path / "ds").exists()


def test_a_line_of_more_than_16m_items_names_its_row(tmp_path, monkeypatch):
    """The same check at a smaller limit (a 17M-item line is 100+ MB): the error names the file and the row."""
    import seater_dist.data.readers as readers
    from bench.local_prepare import prepare_local
    from seater_dist.config import PrepareSettings
    from seater_dist.data.errors import DataError
    from seater_dist.runtime.errors import describe

    monkeypatch.setattr(readers, "SEQ_POS_BITS", 3)  # at most 7 items a line
    path = tmp_path / "log.txt"
    path.write_text("u1 i1 i2 i3\nu2 " + " ".join(f"i{i}" for i in range(9)) + "\n")
    with pytest.raises(DataError) as err:
        prepare_local(PrepareSettings(input=str(path), format="sequences", out=str(tmp_path / "ds")))
    assert describe(err.value) == (f"{path}: row 2: a line holds more than 7 items (9); split that user's sequence", 2)
    assert not (tmp_path / "ds").exists()


def test_errors_raised_inside_ray_are_unwrapped_to_one_line():
    from ray.exceptions import ActorDiedError, RayTaskError, UserCodeException
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from seater_dist.data.errors import DataError
    from seater_dist.runtime.errors import describe

    original = DataError("/data/x.csv: row 3: not UTF-8 text")
    task_error = RayTaskError("read", "Traceback ...\nseater_dist.data.errors.DataError: /data/x.csv: row 3: not UTF-8 "
                              "text\n\nThe above exception was the direct cause of the following exception:\n\n"
                              "ray.exceptions.UserCodeException: UDF failed to process a data block.",
                              UserCodeException("UDF failed to process a data block."))
    actor_error = ActorDiedError(RayTaskError("MapWorker.__init__", "Traceback ...\n  File \"offline.py\"\n"
                                              "seater_dist.model.checkpoint.CheckpointError: /c/model.pt: checksum "
                                              "mismatch\n", RuntimeError("unpicklable")))
    cases = [
        (RayTaskError("f", "tb", original), "/data/x.csv: row 3: not UTF-8 text", 2),
        (task_error, "/data/x.csv: row 3: not UTF-8 text", 2),
        (actor_error, "/c/model.pt: checksum mismatch", 2),
        (WorkerGroupError("...", {0: RuntimeError("gloo: connection closed"), 1: original}),
         "/data/x.csv: row 3: not UTF-8 text", 2),
        (ControllerError(FileNotFoundError(2, "No such file or directory", "/data/y")),
         "/data/y: No such file or directory", 2),
        (KeyError("oops"), "internal error: KeyError", 1),
        (KeyboardInterrupt(), "interrupted", 130),
    ]
    for err, message, code in cases:
        got_message, got_code = describe(err)
        assert got_code == code and message in got_message and "\n" not in got_message, (err, got_message)


def test_a_corrupt_checkpoint_given_to_evaluate_is_one_line(capsys, art, tmp_path):
    ckpt = copy(art.seater, tmp_path / "ckpt")
    (ckpt / "tree" / "codes.npy").write_bytes(b"not an array")
    one_line_error(capsys, "evaluate", "--checkpoint", ckpt, "--data", art.dataset, "--out", tmp_path / "m",
                   names=[ckpt / "tree" / "codes.npy"])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("tree", ["fewer items", "same count, other catalogue"])
def test_train_refuses_a_tree_of_another_catalogue_before_any_work(capsys, art, tmp_path, tree):
    from seater_dist.config import TreeSettings
    from seater_dist.model.checkpoint import catalogue_id
    from seater_dist.tree.builder import build_tree

    n = art.num_items - 4 if tree == "fewer items" else art.num_items
    other = [f"x{i}" for i in range(n)]
    built = build_tree(np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32), TreeSettings(k=4),
                       use_ray=False)
    built.save(tmp_path / "tree", extra_manifest={"catalogue": catalogue_id(other)})
    out = tmp_path / "out"
    t0 = time.time()
    one_line_error(capsys, "train", "--data", art.dataset, "--tree", tmp_path / "tree", "--out", out,
                   names=[tmp_path / "tree", art.dataset, catalogue_id(other)[:12], catalogue_id(art.item_ids)[:12],
                          f"{n:,} items"])
    assert time.time() - t0 < 30  # before any worker started
    assert not out.exists() and hidden_beside(out) == []  # and nothing left behind


def test_the_tree_records_the_catalogue_of_the_embeddings_it_was_built_from(art):
    from seater_dist.model.checkpoint import catalogue_id

    manifest = json.loads((art.tree / "manifest.json").read_text())
    assert manifest["catalogue"] == catalogue_id(art.item_ids)
    assert manifest["embeddings_checkpoint"] == str(art.sasrec.resolve())


def test_evaluate_refuses_a_read_only_out_before_computing(capsys, art, tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        one_line_error(capsys, "evaluate", "--checkpoint", art.sasrec, "--data", art.dataset, "--out", ro / "m",
                       names=[ro, "cannot write here"])
    assert not (tmp_path / "ro" / "m").exists()


@pytest.mark.parametrize("command", ["prepare", "build-tree", "train"])
def test_a_read_only_out_is_refused_up_front(capsys, art, tmp_path, command):
    with read_only_dir(tmp_path / "ro") as ro:
        out = ro / "out"
        argv = {
            "prepare": ["prepare", "--input", art.root / "seqs.txt", "--format", "sequences", "--out", out],
            "build-tree": ["build-tree", "--embeddings", art.embeddings, "--k", "4", "--out", out],
            "train": ["train", "--data", art.dataset, "--tree", art.tree, "--out", out],
        }[command]
        one_line_error(capsys, *argv, names=[ro, "cannot"])
        assert list(ro.iterdir()) == []


def test_a_full_disk_is_refused_up_front(capsys, art, tmp_path, monkeypatch):
    from seater_dist.artifacts import lock

    monkeypatch.setattr(lock, "_free_bytes", lambda directory: 4096)
    out = tmp_path / "tree"
    one_line_error(capsys, "build-tree", "--embeddings", art.embeddings, "--k", "4", "--out", out,
                   names=[tmp_path, "the disk is full"])
    assert not out.exists() and hidden_beside(out) == []


@pytest.mark.parametrize("embeddings", ["identical rows", "0-byte file", "a directory", "random bytes",
                                        "a CSV named .npy", "an array of Python objects", "an .npz"])
def test_build_tree_input_that_cannot_make_a_tree_is_one_line(capsys, tmp_path, embeddings):
    """Files are named with what they are (by their magic bytes); no message suggests loading one unsafely."""
    path = tmp_path / "emb.npy"
    expected = "not a .npy array of item embeddings"
    if embeddings == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        says = f"{path}: a binary file (it holds NUL bytes), {expected}"
    elif embeddings == "a CSV named .npy":
        path.write_text("item,x,y\ni1,0.5,0.25\ni2,0.1,0.3\n")
        says = f"{path}: text beginning 'item,x,y', {expected}"
    elif embeddings == "an array of Python objects":
        np.save(path, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
        says = f"{path}: a .npy array of Python objects (pickled), {expected}"
    elif embeddings == "an .npz":
        path = tmp_path / "emb.npz"
        np.savez(path, embeddings=np.ones((30, 8), np.float32))
        says = f"{path}: an .npz archive of arrays, {expected}"
    elif embeddings == "identical rows":
        np.save(path, np.ones((30, 8), np.float32))
        says = "all 30 rows are identical"
    elif embeddings == "0-byte file":
        path.write_bytes(b"")
        says = f"{path}: empty file"
    else:
        path = tmp_path
        says = f"{path}: a directory"
    line = one_line_error(capsys, "build-tree", "--embeddings", path, "--k", "4", "--out", tmp_path / "tree",
                          names=[says])
    no_unsafe_advice(line)
    assert "pickled data" not in line and not (tmp_path / "tree").exists()


def test_a_misspelt_select_metric_fails_at_load(capsys, art, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: {select_metric: recal@50}\n")
    one_line_error(capsys, "train", "--data", art.dataset, "--tree", art.tree, "--out", tmp_path / "out", "--config",
                   cfg, names=[cfg, "train.select_metric", "'recal@50' is not a metric"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ messages


@pytest.mark.parametrize("name,header,says", [
    ("log.tsv", "user_id,item_id,timestamp", "read as tab-separated (by its name) but its header is comma-separated"),
    ("log.csv", "user_id\titem_id\ttimestamp", "read as comma-separated (by its name) but its header is tab-separated"),
])
def test_a_delimiter_that_does_not_match_the_extension_is_named(capsys, tmp_path, name, header, says):
    path = tmp_path / name
    sep = "," if "," in header else "\t"
    path.write_text(header + "\n" + sep.join(["u1", "i1", "1"]) + "\n")
    one_line_error(capsys, "prepare", "--input", path, "--format", "interactions", "--out", tmp_path / "ds",
                   names=[path, says])


@pytest.mark.parametrize("artifact", ["dataset", "tree", "checkpoint", "tree inside a checkpoint"])
@pytest.mark.parametrize("content", ["{not json", "[1, 2]"], ids=["invalid JSON", "not an object"])
def test_a_malformed_manifest_names_its_file(capsys, art, tmp_path, artifact, content):
    data, tree, ckpt = art.dataset, art.tree, art.sasrec
    if artifact == "dataset":
        data = manifest_dir = copy(art.dataset, tmp_path / "dataset")
    elif artifact == "tree":
        tree = manifest_dir = copy(art.tree, tmp_path / "tree")
    elif artifact == "checkpoint":
        ckpt = manifest_dir = copy(art.sasrec, tmp_path / "ckpt")
    else:
        ckpt = copy(art.seater, tmp_path / "ckpt")
        manifest_dir = ckpt / "tree"
    (manifest_dir / "manifest.json").write_text(content)
    argv = (["train", "--data", data, "--tree", tree, "--out", tmp_path / "out"] if artifact == "tree" else
            ["evaluate", "--checkpoint", ckpt, "--data", data, "--out", tmp_path / "m"])
    one_line_error(capsys, *argv, names=[manifest_dir / "manifest.json"])


@pytest.mark.parametrize("argv", [["train", "--workers", "-1"], ["train", "--workers", "0"],
                                  ["recommend", "--top-n", "0"]], ids=["workers -1", "workers 0", "top-n 0"])
def test_a_count_below_one_is_one_line(capsys, art, tmp_path, argv):
    command, flag, value = argv
    rest = (["--data", art.dataset, "--tree", art.tree, "--out", tmp_path / "out"] if command == "train" else
            ["--checkpoint", art.seater, "--history", "i1"])
    line = one_line_error(capsys, command, *rest, flag, value, names=[flag, f"got {value}"])
    assert "pydantic" not in line and "http" not in line


def test_a_blank_history_id_is_refused(capsys, art):
    one_line_error(capsys, "recommend", "--checkpoint", art.seater, "--history", "", names=["--history", "empty"])


# ------------------------------------------------------------------------------------------ beyond the list


def test_prepare_of_fewer_users_than_partitions(capsys, tmp_path):
    """Two users over more Ray Data partitions left empty blocks that failed the item counts."""
    csv = tmp_path / "two.csv"
    csv.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,5\nu1,i3,3\nu2,i1,1\nu2,i2,2\n")
    code, err = cli(capsys, "prepare", "--input", csv, "--format", "interactions", "--out", tmp_path / "ds",
                    "--min-user-count", "2", "--min-item-count", "1")
    assert code == 0, err


def test_a_checkpoints_nested_tree_manifest_is_checksummed(capsys, art, tmp_path):
    ckpt = copy(art.seater, tmp_path / "ckpt")
    manifest = json.loads((ckpt / "tree" / "manifest.json").read_text())
    manifest["k"] = 5
    (ckpt / "tree" / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(capsys, "evaluate", "--checkpoint", ckpt, "--data", art.dataset, "--out", tmp_path / "m",
                   names=[ckpt / "tree" / "manifest.json", "checksum mismatch"])


def test_train_refuses_an_artifact_directory_as_out(capsys, art, tmp_path):
    data = copy(art.dataset, tmp_path / "dataset")
    before = listing(data)
    one_line_error(capsys, "train", "--data", art.dataset, "--tree", art.tree, "--out", data,
                   names=[data, "is an artifact directory"])
    assert listing(data) == before


def test_a_fresh_training_run_never_deletes_a_storage_directory_it_did_not_write(capsys, art, tmp_path):
    foreign = tmp_path / "storage" / "seater"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"train: {{storage_path: {tmp_path / 'storage'}}}\n")
    one_line_error(capsys, "train", "--data", art.dataset, "--tree", art.tree, "--out", tmp_path / "out", "--config",
                   cfg, names=[foreign, "not a Ray Train run directory"])
    assert (foreign / "notes.txt").read_text() == "keep me" and hidden_beside(foreign) == []


def test_evaluate_of_an_empty_split_names_it(capsys, art, tmp_path):
    data = copy(art.dataset, tmp_path / "dataset")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["counts"]["test_users"] = 0
    (data / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(capsys, "evaluate", "--checkpoint", art.sasrec, "--data", data, "--out", tmp_path / "m",
                   names=[data, "the test split holds no users"])


def test_nothing_is_loaded_with_pickle_from_a_path():
    """Every torch.load passes weights_only=True; no pickle.load(s), no allow_pickle=True, anywhere in the package."""
    package = Path(__file__).resolve().parents[1] / "seater_dist"
    bad = []
    for path in package.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\))?[^()]*)\)", text):
            if "weights_only=True" not in match.group(1):
                bad.append(f"{path.name}: {match.group(0)}")
        bad += [f"{path.name}: {m}" for m in re.findall(r"pickle\.loads?\(|allow_pickle=True", text)]
    assert bad == []
