"""Tests of tools/gpu_report.py (one command that reports what a GPU does with this code, each part a
subprocess with a time limit) and of tools/reproduce.py --jobs auto, which reads its report. All on the
CPU: where a GPU is needed, a fake one (torch.cuda's answers replaced in this process), and fake parts
(a `sleep` that hangs) for the time limits. Run: python -m pytest -q test_gpu_report_new.py (about 30 s).
"""

import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent


def tool(name):
    """A module of tools/ (gpu_report, reproduce), imported for its functions."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    return importlib.import_module(name)


def run(script, *args, check=True, env=None):
    """Run a script or tool (a path from the repository root) as a user would, from the root."""
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


gpu_report = tool("gpu_report")
reproduce = tool("reproduce")


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees one NVIDIA H200 with 141 GB, in this process only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *device: SimpleNamespace(total_memory=141 * 2**30))


def image_folder(root, per_class=3):
    """A tiny JPEG-folder dataset in CIFAR-10's layout: train/ and test/, two classes of 32x32 images."""
    from PIL import Image

    for split in ("train", "test"):
        for label, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), colour).save(folder / f"{i:04d}.jpg")
    return root


def contains(command, *words):
    """Whether `words` appear in `command` one after another (a flag and its value)."""
    n = len(words)
    return any(list(command[i : i + n]) == list(words) for i in range(len(command) - n + 1))


def fake_part(name, seconds, command, read=lambda ctx, log: {"output": log.splitlines()[1:]}):
    return gpu_report.Part(name, seconds, f"fake part {name}", lambda ctx, limit: command, read)


def alive(pid):
    """Whether a process runs (a zombie, killed and waiting for init to reap it, does not)."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return False
    return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------------------------------------
# The parts' commands, on a fake GPU
# ---------------------------------------------------------------------------------------------


def test_every_part_command_is_built_right(fake_gpu, tmp_path):
    data = image_folder(tmp_path / "cifar")
    args = gpu_report.parse_args(["--data-dir", str(data), "--work-dir", str(tmp_path / "work")])
    device, name, memory_mb = gpu_report.find_device(args.device)
    assert (device, gpu_report.device_slug(name), memory_mb) == ("cuda", "nvidia-h200", 141 * 1024)
    ctx = gpu_report.context(args, device, tmp_path / "work")
    assert ctx.train_images == 6
    parts = gpu_report.all_parts(args.sizes)
    assert [p.name for p in parts] == [
        "versions",
        "cuda-tests",
        "epoch-all",
        "epoch-projector",
        "jobs-1",
        "jobs-2",
        "jobs-4",
        "jobs-8",
        "learning",
        "random",
        "epoch-compiled-all",
        "epoch-compiled-projector",
    ]
    assert sum(p.seconds for p in parts) == gpu_report.BUDGET_SECONDS  # the shares fill the default eight minutes
    commands = {p.name: p.command(ctx, 60) for p in parts}
    python = sys.executable

    assert commands["versions"][:2] == [python, "-c"] and "torch.backends.cudnn.version()" in commands["versions"][2]
    assert commands["cuda-tests"] == [python, "-m", "pytest", "-q", "test_all.py", "-m", "", "-k", "cuda"]

    for stages in ("all", "projector"):
        eager = commands[f"epoch-{stages}"]
        assert eager[:3] == [python, "tools/bench.py", "--real-epoch"] and eager[-1] == "--profile"
        assert contains(eager, "--run-dir", str(tmp_path / "work" / f"epoch-{stages}" / "run"))
        flags = shlex.split(eager[3])
        for pair in (
            ("--dataset", "synthetic"),
            ("--synthetic-size", "50000"),
            ("--image-size", "32"),
            ("--batch-size", "256"),
            ("--width", "64"),
            ("--ema-stages", stages),
            ("--device", "cuda"),
        ):
            assert contains(flags, *pair), (stages, pair)
        assert "--compile" not in flags
        compiled = commands[f"epoch-compiled-{stages}"]
        cache = tmp_path / "work" / f"epoch-compiled-{stages}" / "compiler-cache"
        assert compiled[:2] == ["env", f"TORCHINDUCTOR_CACHE_DIR={cache}"]  # a cold cache of its own
        assert compiled[3:6] == [python, "tools/bench.py", "--real-epoch"] and "--profile" not in compiled
        assert shlex.split(compiled[6]) == flags + ["--compile"]

    for n in (1, 2, 4, 8):
        shell, option, line = commands[f"jobs-{n}"]
        assert (shell, option) == ("sh", "-c") and line.endswith(" & wait")
        runs = [shlex.split(r) for r in line.removesuffix(" wait").split(" &") if r.strip()]
        assert len(runs) == n
        for k, words in enumerate(runs):
            assert words[0] == f"OMP_NUM_THREADS={max(1, os.cpu_count() // n)}" and words[2] == "byol.py"
            for pair in (
                ("--synthetic-size", "20000"),
                ("--epochs", "2"),
                ("--eval-every", "1000"),
                ("--batch-size", "256"),
                ("--width", "64"),
                ("--device", "cuda"),
                ("--seed", str(k)),
                ("--out-dir", str(tmp_path / "work" / f"jobs-{n}" / f"run-{k}")),
            ):
                assert contains(words, *pair), (n, k, pair)

    learning = commands["learning"]
    assert learning[:2] == [python, "byol.py"]
    for pair in (
        ("--dataset", "imagefolder"),
        ("--data-dir", str(data)),
        ("--width", "64"),
        ("--batch-size", "256"),
        ("--epochs", "5"),  # no real epoch measured yet: the GPU's default
        ("--eval-every", "5"),  # kNN at the end
        ("--device", "cuda"),
    ):
        assert contains(learning, *pair), pair
    assert "--train-subset" not in learning  # all the training images
    random_backbone = commands["random"]
    assert random_backbone[:4] == [python, "linear_eval.py", "--random-init", "--no-augment"]
    for pair in (("--dataset", "imagefolder"), ("--data-dir", str(data)), ("--width", "64"), ("--device", "cuda")):
        assert contains(random_backbone, *pair), pair


def test_the_learning_run_gets_as_many_epochs_as_its_time_allows(fake_gpu, tmp_path):
    args = gpu_report.parse_args(["--data-dir", str(image_folder(tmp_path / "cifar"))])
    ctx = gpu_report.context(args, "cuda", tmp_path / "work")
    ctx.train_images = 50000
    # epoch-all measured 5.8 s for 195 steps of 256: an epoch of 50,000 images, 10 % more for the probe, is 6.39 s
    ctx.results["epoch-all"] = {"real_epoch_seconds": 5.8, "steps_per_epoch": 195, "batch_size": 256}
    assert gpu_report.learning_epochs(ctx, 100) == 10  # (100 - 30 s of start-up) / 6.39
    assert gpu_report.learning_epochs(ctx, 1000) == gpu_report.MAX_LEARNING_EPOCHS
    assert gpu_report.learning_epochs(ctx, 20) == 1  # at least one
    ctx.args.learning_epochs = 3
    assert gpu_report.learning_epochs(ctx, 1000) == 3  # --learning-epochs wins


def test_scale_down_flags_and_cpu_sizes(tmp_path):
    args = gpu_report.parse_args(["--synthetic-size", "1024", "--batch-size", "64", "--width", "16", "--jobs", "1,3"])
    assert (args.sizes.images, args.sizes.batch_size, args.sizes.width, args.sizes.jobs) == (1024, 64, 16, (1, 3))
    assert [p.name for p in gpu_report.all_parts(args.sizes) if p.name.startswith("jobs")] == ["jobs-1", "jobs-3"]
    tiny = gpu_report.parse_args(["--device", "cpu"]).sizes
    assert tiny.images <= 256 and tiny.width <= 8 and tiny.jobs == (1, 2) and "--train-subset" in tiny.learning_images


def test_parts_are_chosen_by_name_or_group(capsys):
    parts = gpu_report.all_parts(gpu_report.SIZES["cuda"])
    chosen = gpu_report.select_parts(parts, "epoch,versions")
    assert [p.name for p in chosen] == [
        "versions",
        "epoch-all",
        "epoch-projector",
        "epoch-compiled-all",
        "epoch-compiled-projector",
    ]
    assert [p.name for p in gpu_report.select_parts(parts, "jobs")] == ["jobs-1", "jobs-2", "jobs-4", "jobs-8"]
    assert [p.name for p in gpu_report.select_parts(parts, "epoch-compiled")] == [
        "epoch-compiled-all",
        "epoch-compiled-projector",
    ]
    with pytest.raises(SystemExit) as ended:
        gpu_report.select_parts(parts, "versions,benchmark")
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no part benchmark" in err and "cuda-tests" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget-seconds", "3"], "--budget-seconds 3 leaves no time"),
        (["--jobs", "1,x"], "--jobs '1,x': give a comma list"),
        (["--jobs", "0,2"], "at least 1"),
        (["--width", "0"], "--width 0: give a positive number"),
        (["--data-dir", "no-such-folder"], "--data-dir no-such-folder has no train/ folder"),
    ],
)
def test_bad_input_is_refused_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as ended:
        gpu_report.parse_args(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


# ---------------------------------------------------------------------------------------------
# Without a GPU
# ---------------------------------------------------------------------------------------------


def test_without_a_gpu_it_refuses_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as ended:
        gpu_report.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and len(err.splitlines()) == 1 and "pass --device cpu" in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_command_refuses_in_one_line(tmp_path):
    result = run("tools/gpu_report.py", "--out", tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and "no CUDA GPU is visible" in result.stderr


# ---------------------------------------------------------------------------------------------
# Time limits, and the report after every part (fake parts, on the CPU)
# ---------------------------------------------------------------------------------------------


def test_a_part_that_hangs_is_killed_on_time_and_the_others_still_run(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    # the part starts a sleep of its own (a process of its group) and waits: both must be gone when it runs out
    hangs = ["sh", "-c", f"echo started; sleep 60 & echo $! > {pid_file}; wait"]
    quick = [sys.executable, "-c", "print('quick')"]
    parts = [fake_part("before", 2, quick), fake_part("hangs", 2, hangs), fake_part("after", 2, quick)]
    argv = ["--device", "cpu", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    started = time.monotonic()
    code = gpu_report.main([*argv, "--budget-seconds", "11"], parts=parts)
    took = time.monotonic() - started
    assert code == 1  # a part ran out of time: said in the exit status too
    (out,) = (tmp_path / "out").iterdir()  # the CPU's folder
    report = json.loads((out / "report.json").read_text())
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {"before": "done", "hangs": "ran out of time", "after": "done"}
    hung = report["parts"]["hangs"]
    # its limit: its share of the 6 s left (11 - 5 in reserve) and what "before" left unused, so at most 4 s
    assert 1.5 < hung["limit_seconds"] <= 4.0 and hung["seconds"] == pytest.approx(hung["limit_seconds"], abs=0.5)
    assert hung["exit_code"] is None and hung["results"] == {"output": ["started"]}  # what it had printed: kept
    assert (out / "logs" / "hangs.log").read_text().splitlines() == [f"$ {gpu_report.shown(hangs)}", "started"]
    assert not alive(int(pid_file.read_text())), "the part's own child must be killed with it"
    assert report["parts"]["after"]["results"] == {"output": ["quick"]}
    assert took < 11 and report["seconds"] < 11
    assert "| hangs | fake part hangs | ran out of time |" in (out / "report.md").read_text()


def test_the_report_is_written_before_and_rewritten_after_every_part(tmp_path, monkeypatch):
    out_root = tmp_path / "out"
    slug = gpu_report.device_slug(gpu_report.cpu_model())
    # the second part reads the report as it is on disk while it runs
    look = (
        "import json, sys; r = json.load(open(sys.argv[1])); "
        "print(json.dumps({n: p['status'] for n, p in r['parts'].items()}))"
    )
    peek = [sys.executable, "-c", look, str(out_root / slug / "report.json")]
    parts = [
        fake_part("first", 1, [sys.executable, "-c", "print('one')"]),
        fake_part("second", 1, peek, read=lambda ctx, log: gpu_report.last_json_line(log)),
        fake_part("third", 1, [sys.executable, "-c", "print('three')"]),
    ]
    writes = []
    write_report = gpu_report.write_report
    monkeypatch.setattr(
        gpu_report, "write_report", lambda report, out_dir: writes.append(1) or write_report(report, out_dir)
    )
    argv = ["--device", "cpu", "--out", str(out_root), "--work-dir", str(tmp_path / "work"), "--budget-seconds", "60"]
    assert gpu_report.main(argv, parts=parts) == 0
    report = json.loads((out_root / slug / "report.json").read_text())
    # while the second part ran, the file said: the first done, the second running, the third not run yet
    assert report["parts"]["second"]["results"] == {"first": "done", "second": "running", "third": "not run yet"}
    assert len(writes) == 1 + 2 * len(parts) + 1  # at the start, before and after each part, and at the end
    assert [p["status"] for p in report["parts"].values()] == ["done"] * 3
    text = (out_root / slug / "report.md").read_text()
    assert all(f"| {name} | fake part {name} | done |" in text for name in ("first", "second", "third"))

    # the next report keeps this one in earlier/<its date>-<its revision>/
    assert gpu_report.main(argv, parts=parts[:1]) == 0
    (earlier,) = (out_root / slug / "earlier").iterdir()
    assert earlier.name.startswith(report["started"][:10]) and earlier.name.endswith(report["git_revision"])
    assert set(json.loads((earlier / "report.json").read_text())["parts"]) == {"first", "second", "third"}
    assert (earlier / "logs" / "second.log").exists() and (earlier / "report.md").exists()
    assert set(json.loads((out_root / slug / "report.json").read_text())["parts"]) == {"first"}


def test_parts_that_need_the_images_are_skipped_without_data_dir(tmp_path):
    argv = ["--device", "cpu", "--parts", "learning,random", "--out", str(tmp_path), "--work-dir", str(tmp_path)]
    assert gpu_report.main(argv) == 0  # nothing failed: skipped, and said so
    (report,) = tmp_path.glob("*/report.json")
    statuses = [part["status"] for part in json.loads(report.read_text())["parts"].values()]
    assert statuses == ["skipped: no --data-dir given"] * 2


def test_an_outer_sigterm_kills_the_running_part_and_leaves_the_report(tmp_path):
    """`timeout` sends SIGTERM: the report kills the running part's group, marks it interrupted, and ends."""
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/gpu_report.py", "--device", "cpu", "--parts", "jobs-1,random"]
    cmd += ["--out", str(out), "--work-dir", str(tmp_path / "work")]
    report = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in report.stdout:  # wait until the part has started
        if "] jobs-1 (at most" in line:
            break
    time.sleep(1)
    report.terminate()
    _, err = report.communicate(timeout=30)
    assert report.returncode == 130 and "interrupted; the report so far:" in err, err
    (written,) = out.glob("*/report.json")
    parts = json.loads(written.read_text())["parts"]
    assert parts["jobs-1"]["status"] == "interrupted" and parts["random"]["status"] == "skipped: no --data-dir given"
    runs = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True)
    assert runs.stdout.strip() == "", "the part's runs must be killed with the report"


# ---------------------------------------------------------------------------------------------
# --device cpu, end to end: the versions part and one real part
# ---------------------------------------------------------------------------------------------


def test_device_cpu_runs_the_versions_and_a_short_real_part_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = run(
        "tools/gpu_report.py",
        *("--device", "cpu", "--parts", "versions,jobs-1", "--out", out, "--work-dir", tmp_path / "work"),
        *("--budget-seconds", "200"),
    )
    (folder,) = out.iterdir()
    report = json.loads((folder / "report.json").read_text())
    assert report["device"] == "cpu" and report["command"].startswith("python tools/gpu_report.py --device cpu")
    assert report["git_revision"] and report["cpu_cores"] == os.cpu_count() and report["started"]
    versions, jobs = report["parts"]["versions"], report["parts"]["jobs-1"]
    assert versions["status"] == "done" and versions["results"]["torch"] == torch.__version__
    assert {"cuda", "cudnn", "gpu", "compute_capability", "python"} <= set(versions["results"])
    assert jobs["status"] == "done" and jobs["results"]["all_finished"]
    (run_1,) = jobs["results"]["runs"]
    assert run_1["epochs"] == 2 and run_1["images_per_second"] > 0 and run_1["peak_memory_mb"] > 0
    assert report["best_jobs"] == 1 and report["summary"]["table1_hours_at_best_jobs"] > 0
    shares, took = (sum(part[key] for part in report["parts"].values()) for key in ("share_seconds", "seconds"))
    assert shares <= 200 - gpu_report.RESERVE_SECONDS and took < shares
    text = (folder / "report.md").read_text()
    assert "## Runs at once on the one device" in text and f"| torch | {torch.__version__} |" in text
    assert text in result.stdout  # printed as well as written
    assert (folder / "logs" / "jobs-1.log").read_text().startswith("$ sh -c ")


# ---------------------------------------------------------------------------------------------
# Reading the parts' output, the summary and the page (every section, from fake results)
# ---------------------------------------------------------------------------------------------


def test_the_cuda_tests_are_read_when_finished_and_when_stopped():
    progress = "......ss..                               [100%]"
    finished = f"$ python -m pytest\n{progress}\n8 passed, 2 skipped, 2900 deselected in 41.37s\n"
    assert gpu_report.read_tests(None, finished) == {
        "finished": True,
        "passed": 8,
        "failed": 0,
        "skipped": 2,
        "seconds": 41.37,
    }
    assert gpu_report.read_tests(None, "1 failed, 9 passed, 1 error in 3.00s")["failed"] == 2
    stopped = "$ python -m pytest\n..F.s"
    assert gpu_report.read_tests(None, stopped) == {
        "finished": False,
        "passed": 3,
        "failed": 1,
        "skipped": 1,
        "seconds": None,
    }


def test_an_epoch_part_reads_the_summary_or_what_the_run_had_written(tmp_path):
    args = gpu_report.parse_args(["--device", "cpu"])
    ctx = gpu_report.context(args, "cpu", tmp_path)
    part = gpu_report.epoch_part("all", compiled=True, seconds=1)
    assert part.read(ctx, 'epoch    1 | ...\n{"real_epoch_seconds": 2.5}\n') == {"real_epoch_seconds": 2.5}
    run_dir = tmp_path / "epoch-compiled-all" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_seconds": 95.0}) + "\n")
    assert part.read(ctx, "epoch    1 | ...\n") == {"epochs_written": [{"epoch": 1, "epoch_seconds": 95.0}]}


def test_table1_time_runs_the_left_over_runs_as_a_last_round():
    images_per_run = 200 * 195 * 256
    rates = {1: 1000.0, 4: 3000.0, 8: 3200.0}
    expected = (8 * images_per_run / 3200 + 4 * images_per_run / 3000) / 3600  # 8 at once, then the last 4
    assert gpu_report.table1_hours(rates, 8) == pytest.approx(expected)
    assert gpu_report.table1_hours(rates, 1) == pytest.approx(12 * images_per_run / 1000 / 3600)
    assert gpu_report.table1_hours({5: 5000.0}, 5) == pytest.approx(
        (10 * images_per_run / 5000 + 2 * images_per_run / 2000) / 3600  # 2 left: at 5's rate per run
    )


def full_report():
    """A report as a GPU would leave it, every part with results (one compiled part ran out of time)."""
    profile = {
        "clock": "GPU",
        "total_ms": 30.0,
        "ops": [{"name": "sm90_xmma|conv", "calls": 40, "ms": 9.0, "share": 0.3}],
    }

    def epoch(seconds, lean):
        return {
            "real_epoch_seconds": seconds,
            "first_epoch_seconds": seconds + 4,
            "lean_epoch_seconds": lean,
            "overhead": seconds / lean,
            "images_per_second": 49920 / seconds,
            "peak_memory_mb": 3000.0,
            "steps_per_epoch": 195,
            "batch_size": 256,
            "profile": profile,
        }

    def jobs(n, rate_each, memory_mb, finished=True):
        run = {"epochs": 2, "images_per_second": rate_each, "peak_memory_mb": memory_mb, "images_trained": 39936}
        return {
            "runs": [run] * n,
            "all_finished": finished,
            "images_per_second_summed": n * rate_each,
            "images_trained": n * 39936,
            "peak_memory_mb_summed": n * memory_mb,
        }

    results = {
        "versions": {"torch": "2.11.0+cu130", "gpu": "NVIDIA H200"},
        "cuda-tests": {"finished": True, "passed": 10, "failed": 0, "skipped": 0, "seconds": 52.0},
        "epoch-all": epoch(5.8, 6.0),
        "epoch-projector": epoch(5.2, 4.8),
        "jobs-1": jobs(1, 8600.0, 3000.0),
        "jobs-2": jobs(2, 7000.0, 3000.0),
        "jobs-4": jobs(4, 4500.0, 3000.0),
        "jobs-8": jobs(8, 2300.0, 20000.0),  # the most together, but 8 x 20 GB does not fit in 141 GB
        "learning": {
            "epochs_asked": 8,
            "epochs": 8,
            "linear_top1": 55.0,
            "knn_top1": 60.5,
            "knn1_top1": 50.0,
            "knn_epoch": 8,
            "training_seconds": 50.0,
            "images_per_second": 8000.0,
        },
        "random": {"top1": 35.0, "top5": 80.0, "knn_top1": 30.0, "knn1_top1": 25.0},
        "epoch-compiled-all": epoch(2.4, 2.2),
        "epoch-compiled-projector": {"epochs_written": [{"epoch": 1, "epoch_seconds": 95.0}]},
    }
    parts = {
        name: {
            "what": name,
            "status": "ran out of time" if "epochs_written" in r else "done",
            "seconds": 30.0,
            "limit_seconds": 40.0,
            "results": r,
        }
        for name, r in results.items()
    }
    return {
        "command": "python tools/gpu_report.py --data-dir CIFAR-10-images",
        "started": "2026-12-05 10:00:00",
        "git_revision": "abc1234",
        "cpu": "AMD EPYC 9654",
        "cpu_cores": 16,
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "device_memory_mb": 141 * 1024,
        "budget_seconds": 480,
        "data_dir": "CIFAR-10-images",
        "seconds": 470.0,
        "parts": parts,
    }


def test_the_summary_and_the_page_of_a_full_report():
    report = full_report()
    summary = gpu_report.summarise(report)
    assert summary["projector_over_all_eager"] == pytest.approx(5.2 / 5.8)
    assert summary["projector_over_all_lean_eager"] == pytest.approx(4.8 / 6.0)
    assert "projector_over_all_compiled" not in summary  # its projector part ran out of time
    assert summary["jobs"]["8"]["fits_in_memory"] is False and summary["jobs"]["4"]["fits_in_memory"] is True
    assert summary["best_jobs"] == 4  # 18,000 images / s together; 8's 18,400 do not fit in memory
    assert summary["table1_hours_at_best_jobs"] == pytest.approx(
        gpu_report.table1_hours({1: 8600, 2: 14000, 4: 18000}, 4)
    )
    assert summary["jobs"]["1"]["images_per_second_wall"] == pytest.approx(39936 / 30)
    assert summary["learning_over_random_knn_points"] == pytest.approx(30.5)
    assert summary["learning_over_random_linear_points"] == pytest.approx(20.0)
    report["summary"] = summary
    text = gpu_report.markdown(report)
    for line in (
        "# What one NVIDIA H200 does with this code",
        "10 passed, 0 failed, 0 skipped in 52.0 s.",
        "| epoch-all | 5.80 | 9.80 | 6.00 | 0.97 | 8,607 | 3,000 |",
        "| epoch-compiled-projector | ran out of time; the run had written epoch 1: 95.0 s | | | | | |",
        "projector / all, real epoch: eager 0.90 (lean step 0.80) (FLOPs: 0.75).",
        "### epoch-all: where one lean step's time goes (torch.profiler, GPU time, 30.0 ms in all)",
        "| sm90_xmma/conv | 40 | 9.00 | 30.0 % |",
        "| 8 | 18,400 | 10,650 | 20,000, 20,000, 20,000, 20,000, 20,000, 20,000, 20,000, 20,000 | yes | no |",
        "Best: 4 at once",
        "8 of 8 epochs in 0.5 min (done); kNN top-1 60.50 (after epoch 8), linear top-1 (the online probe) 55.00.",
        "The run ended +30.5 points above the random backbone in kNN, +20.0 in linear top-1.",
    ):
        assert line in text, line


# ---------------------------------------------------------------------------------------------
# tools/reproduce.py --jobs auto
# ---------------------------------------------------------------------------------------------


def test_reproduce_jobs_auto_parses_and_refuses_bad_counts(capsys):
    assert reproduce.parse_args(["table1", "--jobs", "auto"]).jobs == "auto"
    assert reproduce.parse_args(["table1", "--jobs", "3"]).jobs == 3
    assert reproduce.parse_args(["table1"]).jobs == 1
    for bad, message in (("x", "--jobs 'x': give how many runs go at once (a number), or auto"), ("0", "at least 1")):
        with pytest.raises(SystemExit) as ended:
            reproduce.parse_args(["table1", "--jobs", bad])
        err = capsys.readouterr().err
        assert ended.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_reproduce_jobs_auto_on_a_cpu_is_one_run_per_core(capsys):
    args = reproduce.parse_args(["table1", "--jobs", "auto", "--extra", "--device cpu"])
    assert reproduce.auto_jobs(args) == os.cpu_count()
    assert f"{os.cpu_count()} at once on the CPU" in capsys.readouterr().out
    args = reproduce.parse_args(["table1", "--jobs", "auto", "--extra", "--device cpu", "--nproc", "2"])
    assert reproduce.auto_jobs(args) == max(1, os.cpu_count() // 2)


def test_reproduce_jobs_auto_on_a_gpu_reads_the_latest_report_that_measured_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "visible_gpu", lambda: "NVIDIA H200")
    args = reproduce.parse_args(["table1", "--jobs", "auto"])
    assert reproduce.auto_jobs(args, reports=tmp_path) == 1  # no report yet
    assert "no report of the NVIDIA H200 has measured runs at once" in capsys.readouterr().out
    folder = tmp_path / "nvidia-h200"
    for stamp, best in (("2026-12-01-100000-aaaaaaa", 2), ("2026-12-03-100000-bbbbbbb", 3)):
        (folder / "earlier" / stamp).mkdir(parents=True)
        (folder / "earlier" / stamp / "report.json").write_text(json.dumps({"best_jobs": best}))
    (folder / "report.json").write_text(json.dumps({"best_jobs": None}))  # the latest measured no runs at once
    assert reproduce.auto_jobs(args, reports=tmp_path) == 3  # the newest that did
    (folder / "report.json").write_text(json.dumps({"best_jobs": 4}))
    assert reproduce.auto_jobs(args, reports=tmp_path) == 4
    assert "4 at once on the NVIDIA H200" in capsys.readouterr().out
    args = reproduce.parse_args(["table1", "--jobs", "auto", "--nproc", "2"])
    assert reproduce.auto_jobs(args, reports=tmp_path) == 1  # each run spans the GPUs already


# ---------------------------------------------------------------------------------------------
# tools/bench.py --real-epoch with --profile and --run-dir, as the report runs it (slow: two runs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_real_epoch_profiles_the_lean_step_and_keeps_the_run(tmp_path):
    flags = "--dataset synthetic --synthetic-size 64 --image-size 16 --batch-size 16 --width 8 --device cpu"
    flags += " --proj-hidden-dim 64 --pred-hidden-dim 64"
    result = run("tools/bench.py", "--real-epoch", flags, "--profile", "--run-dir", tmp_path / "run")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps_per_epoch"] == 4 and summary["batch_size"] == 16 and summary["ema_stages"] == "all"
    assert summary["first_epoch_extra_seconds"] == pytest.approx(
        summary["first_epoch_seconds"] - summary["real_epoch_seconds"]
    )
    assert all(seconds > 0 for seconds in summary["lean_before_after"])
    profile = summary["profile"]
    assert profile["clock"] == "CPU" and profile["ops"] and profile["total_ms"] > 0
    assert sum(op["share"] for op in profile["ops"]) <= 1 + 1e-6
    assert any("convolution" in op["name"] for op in profile["ops"])
    assert "| op | calls | ms | share |" in result.stdout and "epoch    2 |" in result.stdout  # the run's lines too
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["epoch_seconds"] == summary["real_epoch_seconds"]


def test_bench_refuses_profile_without_real_epoch():
    result = run("tools/bench.py", "--profile", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--profile belongs to --real-epoch" in result.stderr
