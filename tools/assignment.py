"""Course assignments: a student edition of this project with the paper's key functions blanked.

    python tools/assignment.py --list                        # the exercises, easy to hard, with the paper's references
    python tools/assignment.py --out hw                      # the student edition in hw/, every exercise blanked
    python tools/assignment.py --out hw --exercises 1,2,4    # only some (numbers, or names such as byol.D)
    cd hw && python -m pytest -q test_assignment.py          # the grading tests: each blank fails, each answer passes
    python tools/assignment.py --grade hw                    # a mark per exercise, from the grading tests
    python tools/assignment.py --check                       # the grading tests catch every wrong answer in MUTATIONS

How it works. EXERCISES below names each function by file and qualified name. The tool copies the
project into the output folder and, in each exercise's function, replaces the body (everything
after the docstring) by `raise NotImplementedError("Exercise N: ...")`, found on the syntax tree
(`ast`): the project's files carry no markers and are never changed. Signatures, decorators,
docstrings and every other line stay as they are. The tool writes the grading tests,
test_assignment.py, and a short ASSIGNMENT.md beside them. Standard library and torch only;
--grade and --check also need pytest, as the grading tests do.

This file is the instructor's: it is left out of the student edition, because MUTATIONS -- the
plausible wrong answers that test_all.py checks the grading tests against -- are nearly right
answers, written out. docs/teaching.md is the instructor's guide.
"""

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = "tools/assignment.py"


@dataclass(frozen=True)
class Exercise:
    file: str  # the project file the function lives in
    qualname: str  # "function" or "Class.method"
    minutes: int  # rough time for a student who has read the paper
    paper: str  # what in the paper it teaches
    task: str  # the NotImplementedError message: the equation and the shapes in and out

    @property
    def name(self):
        return f"{self.file[:-3]}.{self.qualname}"


# Easy to hard. An exercise's number is its place in this list, whichever subset an edition has.
EXERCISES = [
    Exercise(
        "common.py",
        "solarize",
        5,
        "Appendix A: the recipes' augmentations (BYOL's second view is solarised)",
        "solarisation: invert every pixel at or above `threshold` (p -> 1 - p) and keep the others. "
        "x: N x 3 x H x W floats in [0, 1]; returns a tensor of the same shape.",
    ),
    Exercise(
        "byol.py",
        "D",
        10,
        "Eq. (5) and Algorithm 1: the distance D with stop-gradient on the target",
        "Eq. (5)'s distance, 2 - 2 cos(p_i, sg(z_i)) for each row i, averaged over the batch; z is a target: "
        "stop its gradient, and l2-normalise both. p, z: N x d; returns a scalar (0-dim tensor).",
    ),
    Exercise(
        "byol.py",
        "byol_loss",
        5,
        "Eq. (5): BYOL's symmetric loss",
        "Eq. (5), symmetric: each view's prediction regresses the OTHER view's momentum projection through D; "
        "average the two directions. p_1, p_2, z_1m, z_2m: N x d each; returns a scalar.",
    ),
    Exercise(
        "common.py",
        "NamedStageEMA.update",
        15,
        "Eq. (6): the EMA update, on the listed stages only (Fig. 1b)",
        "Eq. (6), xi <- beta * xi + (1 - beta) * theta, in place, for every parameter of every stage in "
        "self.ema_stages (xi in self.ema[stage], theta in the online stage, pair by pair of the same shape; "
        "parameter_pairs() gives both lists). BatchNorm buffers are not averaged; no stage listed: nothing "
        "to do. beta: a float in [0, 1]; "
        "returns None.",
    ),
    Exercise(
        "dino.py",
        "Centre.update",
        10,
        "Table 1 (DINO): the centring that DINO relies on besides the EMA",
        "DINO's centre, c <- m c + (1 - m) mean(teacher logits), the mean over the rows of all the global "
        "views, m = self.momentum. teacher_logits: a list of N x K tensors; updates self.value (1 x K) in "
        "place; returns None.",
    ),
    Exercise(
        "mocov2.py",
        "KeyQueues.push",
        15,
        "Table 1 (MoCo v2): the queue of past keys, the negatives",
        "a FIFO queue per view: write the batch's l2-normalised keys over the oldest N slots of each queue, "
        "starting at self.pointer and wrapping around the queue length K, then advance self.pointer by N "
        "(mod K). keys: one N x d tensor per view; self.keys: V x K x d; returns None.",
    ),
    Exercise(
        "mocov2.py",
        "info_nce",
        15,
        "Table 1 (MoCo v2, loss CL): InfoNCE against the queue",
        "InfoNCE: mean over i of -log(exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.Q_j / T))) on "
        "l2-normalised q and k, the key k under stop-gradient. q, k: N x d; queue Q: K x d unit rows; "
        "temperature T: a float; returns a scalar.",
    ),
    Exercise(
        "ressl.py",
        "ressl_loss",
        15,
        "Table 1 (ReSSL): relational distillation against the queue",
        "ReSSL's loss, the cross-entropy H(p_t, p_s) averaged over the batch: p_t = softmax(k Q^T / T_t) "
        "from the teacher's key (stop-gradient), p_s = softmax(q Q^T / T_s), q and k l2-normalised. q, k: "
        "N x d; queue Q: K x d unit rows; returns a scalar.",
    ),
    Exercise(
        "simclr.py",
        "nt_xent",
        20,
        "Table 1 (SimCLR, loss CL): NT-Xent over 2N views",
        "NT-Xent: anchor i (of 2N) has the positive candidate (i + N) mod 2N and the other 2N - 2 candidates "
        "as negatives (candidate i is left out); cosine similarities divided by the temperature; mean of the "
        "2N cross-entropies. anchors, candidates: 2N x d (view 1 of the N images, then view 2); returns a "
        "scalar.",
    ),
    Exercise(
        "common.py",
        "knn_predict",
        20,
        "Table 2 and Sec. 3: the kNN evaluation of the representation",
        "weighted kNN: cosine similarity of each test feature to every training feature, the k most similar "
        "(k at most the number of training features) vote for their labels with weight exp(sim / T), "
        "predict the class with the largest vote. train_features: M x D, train_labels: M (int64), "
        "test_features: B x D; returns B int64 class indices.",
    ),
    Exercise(
        "dino.py",
        "dino_loss",
        25,
        "Table 1 (DINO, loss CE): distillation from the momentum teacher",
        "DINO's loss, H(P_t^a, P_s^b) = -sum_k P_t^a(k) log P_s^b(k), averaged over the batch and over "
        "the pairs of views a != b (a: teacher views, b: student views): P_t = softmax((t - c) / T_t) "
        "under stop-gradient with the centre c as it is, P_s = softmax(s / T_s). student_logits: list of "
        "N x K; teacher_logits: list of N x K; centre: 1 x K; returns a scalar.",
    ),
    Exercise(
        "common.py",
        "NamedStageEMA.forward",
        40,
        "Eq. (7) and Algorithm 1: activation reuse, the target starts where the first EMA stage starts (Fig. 1b)",
        "activation reuse, Eq. (7) and Algorithm 1: the target's output for one view. Start from the "
        "online activation entering the first EMA stage, inputs[self.ema_stages[0]] (detached), and run the "
        "stages from there: self._run_from(start, h) runs them (EMA copies where listed, shared stages "
        "with their BatchNorm statistics frozen). No EMA stage: inputs['output'] under stop-gradient. "
        "inputs: {stage: the N x ... activation entering it, 'output': N x d}; returns N x d.",
    ),
]


@dataclass(frozen=True)
class Mutation:
    exercise: int  # the number of the exercise whose grading tests must catch it
    wrong: str  # the wrong answer, in words
    body: str  # the wrong answer, in code: a whole body for the function (the docstring stays)


# Plausible wrong answers, each a whole body with one mistake, written out so that it does not depend
# on how the reference body happens to be written. test_all.py puts each into a copy of the project
# (python tools/assignment.py --check) and checks that the grading tests of its exercise fail.
MUTATIONS = [
    Mutation(
        1,
        "solarises strictly above the threshold (a pixel exactly at 128/255 is kept)",
        """
        return torch.where(x > threshold, 1.0 - x, x)
    """,
    ),
    Mutation(
        2,
        "no stop-gradient on the target z",
        """
        p = F.normalize(p.float(), dim=1)
        z = F.normalize(z.float(), dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()
    """,
    ),
    Mutation(
        3,
        "pairs each prediction with its own view's target",
        """
        return D(p_1, z_1m) / 2 + D(p_2, z_2m) / 2
    """,
    ),
    Mutation(
        4,
        "the EMA with beta and 1 - beta swapped",
        """
        xi, theta = self.parameter_pairs()
        for xi_p, theta_p in zip(xi, theta):
            xi_p.mul_(1.0 - beta).add_(theta_p, alpha=beta)
    """,
    ),
    Mutation(
        5,
        "the centre's momentum and 1 - momentum swapped",
        """
        batch_mean = torch.cat(teacher_logits).float().mean(dim=0, keepdim=True)
        self.value.mul_(1 - self.momentum).add_(batch_mean, alpha=self.momentum)
    """,
    ),
    Mutation(
        6,
        "the queue's pointer never advances (every batch overwrites the same slots)",
        """
        n = keys[0].shape[0]
        slots = (self.pointer + torch.arange(n, device=self.keys.device)) % self.keys.shape[1]
        self.keys.index_copy_(1, slots, F.normalize(torch.stack(keys).float(), dim=2))
    """,
    ),
    Mutation(
        7,
        "no stop-gradient on the key k",
        """
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    """,
    ),
    Mutation(
        7,
        "no temperature",
        """
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    """,
    ),
    Mutation(
        8,
        "the student's and the teacher's temperatures swapped",
        """
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
        p_t = F.softmax(k @ queue.T / student_temp, dim=1)
        log_p_s = F.log_softmax(q @ queue.T / teacher_temp, dim=1)
        return -(p_t * log_p_s).sum(dim=1).mean()
    """,
    ),
    Mutation(
        9,
        "no temperature",
        """
        a, c = F.normalize(anchors.float(), dim=1), F.normalize(candidates.float(), dim=1)
        n2 = a.shape[0]
        logits = (a @ c.T).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
        return F.cross_entropy(logits, (torch.arange(n2) + n2 // 2) % n2)
    """,
    ),
    Mutation(
        9,
        "the positive on the wrong diagonal (the anchor's own index i, not (i + N) mod 2N)",
        """
        a, c = F.normalize(anchors.float(), dim=1), F.normalize(candidates.float(), dim=1)
        n2 = a.shape[0]
        logits = (a @ c.T / temperature).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
        return F.cross_entropy(logits, torch.arange(n2))
    """,
    ),
    Mutation(
        10,
        "every neighbour votes 1 (no exp(sim / T) weight)",
        """
        train_features = F.normalize(train_features, dim=1)
        sim, idx = (F.normalize(test_features, dim=1) @ train_features.T).topk(min(k, len(train_features)), dim=1)
        votes = torch.zeros(len(test_features), num_classes).scatter_add_(1, train_labels[idx], torch.ones_like(sim))
        return votes.argmax(dim=1)
    """,
    ),
    Mutation(
        10,
        "dot products, not cosine similarities (no l2-normalisation)",
        """
        sim, idx = (test_features @ train_features.T).topk(min(k, len(train_features)), dim=1)
        votes = torch.zeros(len(test_features), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        return votes.argmax(dim=1)
    """,
    ),
    Mutation(
        11,
        "the centre updated with this batch's teacher logits before the loss is taken",
        """
        centre = 0.9 * centre + 0.1 * torch.cat(teacher_logits).detach().float().mean(dim=0, keepdim=True)
        teacher = [F.softmax((t.detach().float() - centre) / teacher_temp, dim=1) for t in teacher_logits]
        student = [F.log_softmax(s.float() / student_temp, dim=1) for s in student_logits]
        losses = [-(t * s).sum(dim=1).mean() for a, t in enumerate(teacher) for b, s in enumerate(student) if a != b]
        return sum(losses) / len(losses)
    """,
    ),
    Mutation(
        11,
        "no stop-gradient on the teacher",
        """
        teacher = [F.softmax((t.float() - centre) / teacher_temp, dim=1) for t in teacher_logits]
        student = [F.log_softmax(s.float() / student_temp, dim=1) for s in student_logits]
        losses = [-(t * s).sum(dim=1).mean() for a, t in enumerate(teacher) for b, s in enumerate(student) if a != b]
        return sum(losses) / len(losses)
    """,
    ),
    Mutation(
        12,
        "no activation reuse: the target always runs from the image",
        """
        if not self.ema_stages:
            return inputs["output"].detach()
        return self._run_from("conv1", inputs["conv1"].detach())
    """,
    ),
    Mutation(
        12,
        "starts at the last EMA stage instead of the first",
        """
        if not self.ema_stages:
            return inputs["output"].detach()
        start = self.ema_stages[-1]
        return self._run_from(start, inputs[start].detach())
    """,
    ),
]


class AssignmentError(Exception):
    """Bad input: one line naming the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Blanking, on the syntax tree
# ---------------------------------------------------------------------------------------------


def find_function(tree, qualname):
    """The FunctionDef for "function" or "Class.method" at the top level of a module."""
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise AssignmentError(f"{qualname} is not defined; update EXERCISES in {THIS_FILE}")
        body = node.body
    if not isinstance(node, ast.FunctionDef):
        raise AssignmentError(f"{qualname} is a class, not a function; name one of its methods in EXERCISES")
    return node


def body_span(source, qualname):
    """(first, last, indent): the 1-based lines of the function's body after its docstring, and its indent."""
    node = find_function(ast.parse(source), qualname)
    first = node.body[0]
    has_docstring = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    start = first.end_lineno + 1 if has_docstring else first.lineno
    return start, node.end_lineno, " " * first.col_offset


def blank_body(source, exercise, number):
    """The source with the exercise's body replaced by a NotImplementedError naming what to implement."""
    start, end, indent = body_span(source, exercise.qualname)
    message = f"Exercise {number}: {exercise.task}"
    pieces = textwrap.wrap(message, width=100 - len(indent), drop_whitespace=False, break_on_hyphens=False)
    lines = [f"{indent}raise NotImplementedError("] + [f"{indent}    {json.dumps(piece)}" for piece in pieces]
    lines[-1] += ")"
    text = source.splitlines(keepends=True)
    result = "".join(text[: start - 1]) + "\n".join(lines) + "\n" + "".join(text[end:])
    ast.parse(result)  # still valid Python
    return result


def mutate(source, mutation):
    """The source with the body of the mutation's function replaced by the mutation's (wrong) body."""
    start, end, indent = body_span(source, EXERCISES[mutation.exercise - 1].qualname)
    lines = [indent + line if line else line for line in textwrap.dedent(mutation.body).strip("\n").splitlines()]
    text = source.splitlines(keepends=True)
    result = "".join(text[: start - 1]) + "\n".join(lines) + "\n" + "".join(text[end:])
    ast.parse(result)
    return result


def select(spec):
    """Exercise numbers from --exercises: "all", or a comma list of numbers and names (byol.D, simclr.nt_xent)."""
    if spec in (None, "all"):
        return list(range(1, len(EXERCISES) + 1))
    by_name = {e.name: i for i, e in enumerate(EXERCISES, 1)}
    by_name.update({e.qualname: i for i, e in enumerate(EXERCISES, 1)})
    chosen = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.isdigit() and 1 <= int(item) <= len(EXERCISES):
            chosen.add(int(item))
        elif item in by_name:
            chosen.add(by_name[item])
        else:
            raise AssignmentError(
                f"--exercises: no exercise '{item}'; give numbers 1-{len(EXERCISES)} or names "
                f"such as byol.D (see --list)"
            )
    if not chosen:
        raise AssignmentError("--exercises is empty; give numbers or names, or leave it out for all")
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# The edition: a copy of the project, blanked (or mutated), with its grading tests
# ---------------------------------------------------------------------------------------------


def project_files(root=ROOT):
    """The project's files, relative to root: what git tracks plus new files it does not ignore; without git,
    every file except caches, run outputs and data."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        files = [line for line in out.stdout.splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", "runs", "data", "__pycache__", ".pytest_cache"}
        files = [
            str(p.relative_to(root))
            for p in sorted(root.rglob("*"))
            if p.is_file() and not skip.intersection(p.relative_to(root).parts)
        ]
    # A student edition written inside the project (python tools/assignment.py --out hw) is not part of it.
    editions = [
        str(Path(f).parent)
        for f in files
        if Path(f).name == "ASSIGNMENT.md" and (root / Path(f).parent / "test_assignment.py").is_file()
    ]
    inside = lambda f: any(e == "." or f.startswith(e + "/") for e in editions)
    return [f for f in files if (root / f).is_file() and f != THIS_FILE and not inside(f)]


def write_edition(out, numbers, root=ROOT, blank=True, mutation=None):
    """Copy the project into `out`, blank the chosen exercises (or, with blank=False, leave the reference
    bodies), apply `mutation` if one is given, and write test_assignment.py and ASSIGNMENT.md."""
    out = Path(out)
    changed = {}  # file -> its new text
    for number in numbers if blank else ():
        exercise = EXERCISES[number - 1]
        changed[exercise.file] = blank_body(
            changed.get(exercise.file) or (root / exercise.file).read_text(), exercise, number
        )
    if mutation is not None:
        file = EXERCISES[mutation.exercise - 1].file
        changed[file] = mutate(changed.get(file) or (root / file).read_text(), mutation)
    for name in project_files(root):
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in changed:
            target.write_text(changed[name])
        else:
            shutil.copy2(root / name, target)
    selected = "{" + ", ".join(map(str, sorted(numbers))) + "}"
    (out / "test_assignment.py").write_text(GRADING_TESTS.replace("@SELECTED@", selected))
    (out / "ASSIGNMENT.md").write_text(handout(numbers))


def handout(numbers):
    lines = [
        "# Assignment: the momentum encoder, in code",
        "",
        "Each function below has its body replaced by `raise NotImplementedError(...)`; the message says",
        "what to compute and the shapes in and out, and the docstring above it says more. Read the",
        "paper section named, write the body, and check it:",
        "",
        "```",
        "python -m pytest -q test_assignment.py -k exercise_03    # one exercise",
        "python -m pytest -q test_assignment.py                   # all of them",
        "```",
        "",
        "A failing test says what it expected, on which input, and which property failed. Change only",
        "the bodies of the functions named here.",
        "",
        "| # | function | about | paper |",
        "|---|---|---|---|",
    ]
    for number in numbers:
        e = EXERCISES[number - 1]
        lines.append(f"| {number} | `{e.file}`: `{e.qualname}` | {e.minutes} min | {e.paper} |")
    if 2 in numbers and 3 in numbers:
        lines += ["", "`byol_loss` (3) calls `D` (2): its tests pass once both are written."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Grading: run the tests, a mark per exercise
# ---------------------------------------------------------------------------------------------


def run_grading_tests(directory, test_file="test_assignment.py", select_tests=None, timeout=600):
    """Run the grading tests with `directory` as the project. Returns {test name: failure message or None}."""
    directory = Path(directory).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        test_path = Path(test_file) if Path(test_file).is_absolute() else directory / test_file
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_path), f"--junitxml={report}"]
        if select_tests:
            cmd += ["-k", select_tests]
        env = {**os.environ, "PYTHONPATH": str(directory), "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run(cmd, cwd=directory, capture_output=True, text=True, timeout=timeout, env=env)
        if not report.exists():
            raise AssignmentError(f"the grading tests did not run:\n{done.stdout}\n{done.stderr}")
        results = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            problem = next((c for c in case if c.tag in ("failure", "error")), None)
            if any(c.tag == "skipped" for c in case):
                continue
            results[case.get("name")] = None if problem is None else (problem.get("message") or problem.text or "")
        return results


PROJECT_MODULES = ("byol", "common", "dino", "linear_eval", "mocov2", "ressl", "simclr", "simsiam")


def run_tests_in_process(directory, test_file, select_tests=None):
    """Like run_grading_tests, in this process: torch is imported once, so checking many editions is quick.
    The project modules are imported afresh from `directory` (and forgotten again afterwards)."""
    import pytest

    class Collect:
        def __init__(self):
            self.results = {}

        def pytest_runtest_logreport(self, report):
            if report.skipped or (report.when != "call" and report.passed):
                return
            name = report.nodeid.split("::")[-1]
            self.results[name] = None if report.passed else report.longreprtext

    def forget():  # the project's modules and the test module, so that the next edition imports its own
        for name in [n for n in sys.modules if n in PROJECT_MODULES or n.split(".")[-1] == "test_assignment"]:
            del sys.modules[name]

    collect = Collect()
    forget()
    sys.path.insert(0, str(directory))
    try:
        args = ["-q", "--tb=line", "-p", "no:cacheprovider", "--import-mode=importlib", str(test_file)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # quiet
            code = pytest.main(args + (["-k", select_tests] if select_tests else []), plugins=[collect])
    finally:
        sys.path.remove(str(directory))
        forget()
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not collect.results:
        raise AssignmentError(f"the grading tests in {test_file} did not run (pytest exit code {int(code)})")
    return collect.results


def fill_in(directory, numbers, root=ROOT):
    """Put the reference bodies back into a student edition's blanks: what a student who answers every
    exercise exactly as the project does would hand in."""
    for number in numbers:
        exercise = EXERCISES[number - 1]
        path = Path(directory) / exercise.file
        student = path.read_text()
        reference = (root / exercise.file).read_text()
        start, end, _ = body_span(student, exercise.qualname)
        ref_start, ref_end, _ = body_span(reference, exercise.qualname)
        lines, ref_lines = student.splitlines(keepends=True), reference.splitlines(keepends=True)
        path.write_text("".join(lines[: start - 1] + ref_lines[ref_start - 1 : ref_end] + lines[end:]))


def check(quiet=False):
    """The checks test_all.py makes: the grading tests fail on every blank, naming its exercise; pass when the
    reference bodies are filled in and against the project itself; and catch every wrong answer in MUTATIONS.
    Returns a JSON-ready dict."""
    import torch

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and leaves the other cores alone
    say = (lambda *a: None) if quiet else print
    numbers = list(range(1, len(EXERCISES) + 1))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        student = Path(tmp) / "student"
        write_edition(student, numbers)
        results = run_tests_in_process(student, student / "test_assignment.py")
        report["blank"] = {name: failure for name, failure in results.items()}
        say(f"blank edition: {sum(f is not None for f in results.values())} of {len(results)} tests fail")
        fill_in(student, numbers)
        results = run_tests_in_process(student, student / "test_assignment.py")
        report["filled_in"] = results
        say(f"reference bodies filled in: {sum(f is None for f in results.values())} of {len(results)} tests pass")
        results = run_tests_in_process(ROOT, student / "test_assignment.py")
        report["project"] = results
        say(f"against the project itself: {sum(f is None for f in results.values())} of {len(results)} tests pass")
        report["mutations"] = []
        for i, mutation in enumerate(MUTATIONS):
            edition = Path(tmp) / f"mutation{i}"
            write_edition(edition, numbers, blank=False, mutation=mutation)
            results = run_tests_in_process(edition, edition / "test_assignment.py", f"exercise_{mutation.exercise:02d}")
            failed = sorted(name for name, failure in results.items() if failure is not None)
            report["mutations"].append(
                {
                    "exercise": mutation.exercise,
                    "wrong": mutation.wrong,
                    "tests": len(results),
                    "failed": failed,
                    "messages": [results[name] for name in failed],
                }
            )
            verdict = f"caught by {len(failed)}" if failed else "NOT caught by any"
            say(f"exercise {mutation.exercise:2d}, {mutation.wrong}: {verdict} of {len(results)} tests")
    return report


def exercise_of(test_name):
    match = re.match(r"test_exercise_(\d+)_", test_name)
    return int(match.group(1)) if match else None


def grade(directory):
    """Print a mark per exercise (tests passed / tests) and return {exercise: (passed, total)}."""
    results = run_grading_tests(directory)
    marks = {}
    for name, failure in results.items():
        passed, total = marks.get(exercise_of(name), (0, 0))
        marks[exercise_of(name)] = (passed + (failure is None), total + 1)
    for number in sorted(marks):
        passed, total = marks[number]
        e = EXERCISES[number - 1]
        print(f"{number:2d}. {e.name:28s} {passed}/{total} tests  {'done' if passed == total else 'not yet'}")
    done = sum(p == t for p, t in marks.values())
    print(f"exercises done: {done} of {len(marks)}")
    return marks


def list_exercises():
    wrong = {}
    for m in MUTATIONS:
        wrong.setdefault(m.exercise, []).append(m.wrong)
    for number, e in enumerate(EXERCISES, 1):
        print(
            f"{number:2d}. {e.name}  (about {e.minutes} min)\n    paper: {e.paper}\n"
            f"    wrong answers its tests catch: {'; '.join(wrong.get(number, []))}"
        )
    print(
        f"\n{len(EXERCISES)} exercises, about {sum(e.minutes for e in EXERCISES)} minutes in all. Wrong answers "
        f"the grading tests are checked to catch (test_all.py): {len(MUTATIONS)}."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write a student edition of this project with the paper's key "
        "functions blanked, and its grading tests."
    )
    parser.add_argument("--out", help="folder for the student edition (new or empty)")
    parser.add_argument("--exercises", default="all", help="comma list of numbers or names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the exercises with their paper references")
    parser.add_argument("--grade", metavar="DIR", help="run DIR's grading tests and print a mark per exercise")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the grading tests: they fail on every blank, "
        "pass on the reference and catch every listed wrong answer (test_all.py runs this)",
    )
    parser.add_argument("--json", metavar="FILE", help="with --check: also write the results to FILE as JSON")
    args = parser.parse_args(argv)
    try:
        if args.list:
            list_exercises()
        elif args.check:
            report = check()
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))
        elif args.grade:
            if not (Path(args.grade) / "test_assignment.py").is_file():
                raise AssignmentError(f"{args.grade} has no test_assignment.py; pass a folder written by --out")
            grade(args.grade)
        elif args.out:
            numbers = select(args.exercises)
            out = Path(args.out).resolve()
            if out == ROOT or out in ROOT.parents:
                raise AssignmentError(f"--out {args.out} would write over the project; choose a new folder")
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise AssignmentError(f"--out {args.out} exists and is not an empty folder; choose a new one")
            write_edition(out, numbers)
            print(
                f"wrote the student edition to {out}: exercises {', '.join(map(str, numbers))} "
                f"(about {sum(EXERCISES[n - 1].minutes for n in numbers)} minutes); "
                f"check with: cd {args.out} && python -m pytest -q test_assignment.py"
            )
        else:
            parser.error("give --out DIR, --list, --grade DIR or --check")
    except AssignmentError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# The grading tests, written into the edition as test_assignment.py
# ---------------------------------------------------------------------------------------------

GRADING_TESTS = r'''"""Grading tests for the assignment.  Run:  python -m pytest -q test_assignment.py

Written by tools/assignment.py. Each test is named after its exercise (test_exercise_07_...) and
says, when it fails, what it expected, on which input, and which property failed. They run on a
CPU in seconds and use small made-up inputs whose answers are known in closed form or are
written out below as plain loops.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import byol
import common
import dino
import mocov2
import ressl
import simclr

SELECTED = @SELECTED@  # the exercises of this edition; tests of the others are skipped

TITLES = {1: "common.solarize", 2: "byol.D", 3: "byol.byol_loss", 4: "common.NamedStageEMA.update",
          5: "dino.Centre.update", 6: "mocov2.KeyQueues.push", 7: "mocov2.info_nce", 8: "ressl.ressl_loss",
          9: "simclr.nt_xent", 10: "common.knn_predict", 11: "dino.dino_loss", 12: "common.NamedStageEMA.forward"}


def exercise(number):
    return pytest.mark.skipif(number not in SELECTED, reason=f"exercise {number} is not in this edition")


def fail(number, prop, on, expected, got, hint=None):
    """Stop the test with a message that teaches: the property, the input, what was expected, what came."""
    message = (f"Exercise {number} ({TITLES[number]}): {prop}\n  on:       {on}\n  expected: {expected}\n"
               f"  got:      {got}")
    if hint:
        message += f"\n  hint:     {hint}"
    pytest.fail(message, pytrace=False)


def scalar(number, value, on):
    """The loss as a float, after checking it is a 0-dim tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        fail(number, "the loss is one number (a 0-dim tensor): the mean over the batch", on, "shape ()", shape)
    return float(value)


def check_value(number, prop, on, got, expected, tol=1e-4, hint=None):
    if not math.isfinite(got) or abs(got - expected) > tol * max(1.0, abs(expected)):
        fail(number, prop, on, f"{expected:.6f}", f"{got:.6f}", hint)


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def rows(t):
    return [[float(v) for v in row] for row in t]


# ---- Exercise 1: solarisation ---------------------------------------------------------------

@exercise(1)
def test_exercise_01_solarize_inverts_pixels_at_or_above_the_threshold():
    values = [0.0, 0.25, 127 / 255, 128 / 255, 0.75, 1.0]
    x = torch.tensor(values * 4).view(2, 3, 2, 2)
    out = common.solarize(x.clone())
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        fail(1, "the output has the input's shape", "x of shape (2, 3, 2, 2)", "shape (2, 3, 2, 2)",
             getattr(out, "shape", out))
    for p, o in zip(x.flatten().tolist(), out.flatten().tolist()):
        expected = 1 - p if p >= 128 / 255 else p
        if abs(o - expected) > 1e-6:
            where = "exactly at the threshold 128/255" if abs(p - 128 / 255) < 1e-6 else \
                ("above" if p > 128 / 255 else "below") + " the threshold 128/255"
            fail(1, "p -> 1 - p for pixels at or above the threshold, unchanged below", f"a pixel {p:.5f} ({where})",
                 f"{expected:.5f}", f"{o:.5f}", "PIL's solarize inverts p >= threshold, the threshold included")


@exercise(1)
def test_exercise_01_solarize_uses_the_threshold_given():
    x = torch.tensor([0.1, 0.3, 0.5, 0.9]).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    out = common.solarize(x, threshold=0.3)
    expected = torch.where(x >= 0.3, 1 - x, x)  # written out: [0.1, 0.7, 0.5, 0.1]
    if not torch.allclose(out, expected, atol=1e-6):
        fail(1, "the threshold is the argument, not a constant", "pixels 0.1, 0.3, 0.5, 0.9 with threshold=0.3",
             [round(v, 4) for v in expected[0, 0].flatten().tolist()],
             [round(v, 4) for v in out[0, 0].flatten().tolist()])


# ---- Exercise 2: BYOL's distance D ----------------------------------------------------------

@exercise(2)
def test_exercise_02_D_closed_forms():
    torch.manual_seed(0)
    p = torch.randn(6, 8)
    cases = [(3 * p, 0.0, "z = 3 p (same direction, any length)", "2 - 2 cos = 0 when p and z point the same way"),
             (-0.5 * p, 4.0, "z = -0.5 p (opposite directions)", "2 - 2 cos = 4 when they point opposite ways")]
    p2, q = torch.zeros(6, 8), torch.zeros(6, 8)
    p2[:, 1], q[:, 0] = 2.0, 1.0
    for z, expected, on, prop in cases:
        got = scalar(2, byol.D(p, z), on)
        check_value(2, prop, f"p: 6 x 8 random, {on}", got, expected, 1e-5,
                    "l2-normalise p and z along dim 1, then 2 - 2 * (p * z).sum(dim=1), averaged over the rows")
    got = scalar(2, byol.D(p2, q), "orthogonal rows")
    check_value(2, "2 - 2 cos = 2 for orthogonal vectors", "p rows (0, 2, 0, ...), z rows (1, 0, 0, ...)", got, 2.0)


@exercise(2)
def test_exercise_02_D_is_the_batch_mean_of_2_minus_2_cos():
    torch.manual_seed(1)
    p, z = torch.randn(5, 7), torch.randn(5, 7)
    expected = sum(2 - 2 * cos(a, b) for a, b in zip(rows(p), rows(z))) / 5  # written out, row by row
    got = scalar(2, byol.D(p, z), "p, z: 5 x 7 random")
    check_value(2, "D = mean over rows i of 2 - 2 cos(p_i, z_i)", "p, z: 5 x 7 random (seed 1)", got, expected, 1e-5,
                "a mean over the batch, not a sum; cosine of each row with the same row of z")


@exercise(2)
def test_exercise_02_D_stops_the_gradient_at_the_target():
    torch.manual_seed(2)
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol.D(p, z).backward()
    if p.grad is None or p.grad.abs().sum() == 0:
        fail(2, "the gradient reaches the prediction p", "p, z: 4 x 8, D(p, z).backward()", "p.grad non-zero",
             p.grad)
    if z.grad is not None:
        fail(2, "stop-gradient: no gradient reaches the target z (Algorithm 1: z = z.detach())",
             "p, z: 4 x 8, D(p, z).backward()", "z.grad is None", f"a gradient of norm {float(z.grad.norm()):.4f}",
             "detach z before using it: the target is not trained through the loss")


# ---- Exercise 3: BYOL's symmetric loss ------------------------------------------------------

@exercise(3)
def test_exercise_03_byol_loss_pairs_each_prediction_with_the_other_view():
    torch.manual_seed(3)
    p_1, p_2 = torch.randn(8, 16), torch.randn(8, 16)
    got = scalar(3, byol.byol_loss(p_1, p_2, p_2, p_1), "z_1m = p_2, z_2m = p_1")
    check_value(3, "p_1 regresses z_2m and p_2 regresses z_1m: with z_2m = p_1 and z_1m = p_2 the loss is 0",
                "p_1, p_2: 8 x 16 random, z_1m = p_2, z_2m = p_1", got, 0.0, 1e-5,
                "pair view 1's prediction with view 2's target, and the other way round")


@exercise(3)
def test_exercise_03_byol_loss_is_equation_5():
    torch.manual_seed(4)
    p_1, p_2, z_1m, z_2m = (torch.randn(6, 10) for _ in range(4))
    n = 6
    eq5 = -0.5 * (sum(cos(a, b) for a, b in zip(rows(p_1), rows(z_2m))) / n
                  + sum(cos(a, b) for a, b in zip(rows(p_2), rows(z_1m))) / n)  # Eq. (5), written out
    got = scalar(3, byol.byol_loss(p_1, p_2, z_1m, z_2m), "6 x 10 random")
    check_value(3, "the loss is D(p_1, z_2m) / 2 + D(p_2, z_1m) / 2 = 2 + 2 L, L of Eq. (5)",
                "p_1, p_2, z_1m, z_2m: 6 x 10 random (seed 4)", got, 2 + 2 * eq5, 1e-5,
                "average the two directions (each halved), using D of exercise 2")


@exercise(3)
def test_exercise_03_byol_loss_trains_the_predictions_only():
    torch.manual_seed(5)
    p_1, p_2, z_1m, z_2m = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    byol.byol_loss(p_1, p_2, z_1m, z_2m).backward()
    if p_1.grad is None or p_2.grad is None:
        fail(3, "both predictions receive a gradient", "4 x 8 random, loss.backward()", "p_1.grad, p_2.grad set",
             f"p_1.grad {'set' if p_1.grad is not None else 'None'}, "
             f"p_2.grad {'set' if p_2.grad is not None else 'None'}")
    if z_1m.grad is not None or z_2m.grad is not None:
        fail(3, "stop-gradient on both targets", "4 x 8 random, loss.backward()", "z_1m.grad and z_2m.grad None",
             "a gradient reached a target", "use D, which detaches its target")


# ---- Exercise 4: Eq. (6), the EMA update ------------------------------------------------------

def small_encoder(stages, seed=0):
    """A quarter-quarter-width ResNet-18 (width 4) and a small projector: fast on a CPU."""
    torch.manual_seed(seed)
    online = common.Encoder(common.ResNetCIFAR("resnet18", width=4), common.mlp(32, 16, 8))
    target = common.NamedStageEMA(online, common.parse_ema_stages(stages))
    return online, target


def move_online(online, seed=1):
    """Move the online weights away from the EMA copies, as an optimiser step would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))


def ema_named(target):
    return {f"{s}.{n}": p for s in target.ema_stages for n, p in target.ema[s].named_parameters()}


def online_named(online, stages):
    modules = online.stages()
    return {f"{s}.{n}": p for s in stages for n, p in modules[s].named_parameters()}


@exercise(4)
@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_exercise_04_update_is_equation_6(beta):
    online, target = small_encoder("block4,projector")
    move_online(online)
    before = {k: v.detach().clone() for k, v in ema_named(target).items()}
    theta = online_named(online, ["block4", "projector"])
    target.update(beta)
    for name, new in ema_named(target).items():
        expected = beta * before[name] + (1 - beta) * theta[name]
        if not torch.allclose(new, expected, atol=1e-6):
            swapped = (1 - beta) * before[name] + beta * theta[name]
            hint = ("this is (1 - beta) * xi + beta * theta: beta and 1 - beta are swapped; beta weighs the OLD "
                    "target weights" if torch.allclose(new, swapped, atol=1e-6) else
                    "xi <- beta * xi + (1 - beta) * theta, xi the EMA copy, theta the online weights")
            fail(4, "Eq. (6) on every parameter of the EMA stages", f"beta = {beta}, EMA on block4,projector, "
                 f"parameter {name}", "beta * xi + (1 - beta) * theta",
                 f"max difference {float((new - expected).abs().max()):.3g}", hint)


@exercise(4)
def test_exercise_04_update_at_beta_0_and_1():
    online, target = small_encoder("projector")
    move_online(online)
    before = {k: v.detach().clone() for k, v in ema_named(target).items()}
    target.update(1.0)
    for name, p in ema_named(target).items():
        if not torch.allclose(p, before[name], atol=1e-7):
            fail(4, "beta = 1 freezes the target (xi <- xi)", f"beta = 1, EMA on projector, parameter {name}",
                 "the EMA copy unchanged", f"it moved by {float((p - before[name]).abs().max()):.3g}")
    target.update(0.0)
    theta = online_named(online, ["projector"])
    for name, p in ema_named(target).items():
        if not torch.allclose(p, theta[name], atol=1e-7):
            fail(4, "beta = 0 copies the online weights (xi <- theta): no momentum", f"beta = 0, parameter {name}",
                 "the EMA copy equal to the online parameter",
                 f"max difference {float((p - theta[name]).abs().max()):.3g}",
                 "at beta = 0 the new target is (1 - 0) * theta")


@exercise(4)
def test_exercise_04_only_the_ema_copies_move():
    online, target = small_encoder("block4,projector")
    move_online(online)
    online_before = {n: p.detach().clone() for n, p in online.named_parameters()}
    buffers_before = {n: b.clone() for n, b in target.ema.named_buffers()}
    target.update(0.7)
    for name, p in online.named_parameters():
        if not torch.equal(p, online_before[name]):
            fail(4, "the update changes the EMA copies only, never the online network", f"beta = 0.7, online {name}",
                 "unchanged", "changed", "write into xi (the target's parameters), read theta")
    for name, b in target.ema.named_buffers():
        if not torch.equal(b, buffers_before[name]):
            fail(4, "BatchNorm running statistics are buffers, not parameters: Eq. (6) leaves them alone",
                 f"beta = 0.7, EMA buffer {name}", "unchanged", "changed", "average target.parameter_pairs() only")
    for name, p in ema_named(target).items():
        if p.requires_grad:
            fail(4, "the EMA copies never need gradients", f"after update, {name}", "requires_grad False", "True")
    _, empty = small_encoder("none")
    empty.update(0.5)  # no EMA stage: nothing to update, and no error


# ---- Exercise 5: DINO's centre ----------------------------------------------------------------

@exercise(5)
def test_exercise_05_centre_is_a_moving_mean_of_both_views():
    centre = dino.Centre(6, 0.9)
    centre.value.fill_(1.0)
    t_1, t_2 = torch.arange(12.0).view(2, 6), torch.full((3, 6), -2.0)
    centre.update([t_1, t_2])
    mean = [(sum(float(t_1[i, j]) for i in range(2)) + sum(float(t_2[i, j]) for i in range(3))) / 5 for j in range(6)]
    expected = [0.9 * 1.0 + 0.1 * m for m in mean]  # written out: c <- m c + (1 - m) mean
    got = centre.value
    if tuple(got.shape) != (1, 6):
        fail(5, "the centre stays 1 x K", "K = 6", "shape (1, 6)", tuple(got.shape))
    if not torch.allclose(got, torch.tensor([expected]), atol=1e-5):
        only_first = [0.9 + 0.1 * float(t_1[:, j].mean()) for j in range(6)]
        swapped = [0.1 * 1.0 + 0.9 * m for m in mean]
        hint = ("momentum and 1 - momentum are swapped: the old centre keeps weight m = 0.9"
                if torch.allclose(got, torch.tensor([swapped]), atol=1e-5) else
                "the mean runs over the rows of every global view together (here 2 + 3 rows)"
                if torch.allclose(got, torch.tensor([only_first]), atol=1e-5) else
                "c <- m * c + (1 - m) * (mean of all teacher rows), m = self.momentum")
        fail(5, "c <- m c + (1 - m) mean(teacher logits over both views)",
             "c = 1, m = 0.9, view 1 rows 0..11 as 2 x 6, "
             "view 2 three rows of -2", [round(v, 4) for v in expected], [round(v, 4) for v in got.flatten().tolist()],
             hint)


@exercise(5)
def test_exercise_05_centre_is_updated_in_place_and_without_gradient():
    centre = dino.Centre(4, 0.8)
    t = torch.randn(3, 4, requires_grad=True)
    centre.update([t * 2, t])
    if centre.value.requires_grad:
        fail(5, "the centre is a statistic, not trained: no autograd history", "teacher logits that require grad",
             "centre.value.requires_grad False", "True")
    saved = centre.state_dict().get("value")
    if saved is None or tuple(saved.shape) != (1, 4) or not torch.equal(saved, centre.value):
        fail(5, "the centre stays the 1 x K buffer self.value (it is saved in checkpoints)", "one update",
             "state_dict()['value'] of shape (1, 4), the updated centre", None if saved is None else tuple(saved.shape),
             "update self.value in place: self.value.mul_(...).add_(...)")


# ---- Exercise 6: the key queue -----------------------------------------------------------------

@exercise(6)
def test_exercise_06_push_is_fifo_normalised_and_wraps_around():
    torch.manual_seed(6)
    queues = mocov2.KeyQueues(2, 8, 4)  # 2 views, K = 8 keys of d = 4
    before = queues.keys.clone()
    k_1, k_2 = torch.randn(4, 4), torch.randn(4, 4)
    queues.push(k_1, k_2)
    on = "queues of K = 8 keys, d = 4; push(k_1, k_2) with N = 4 keys per view"
    if not torch.allclose(queues.keys[0, :4], F.normalize(k_1, dim=1), atol=1e-6):
        unnormalised = torch.allclose(queues.keys[0, :4], k_1, atol=1e-6)
        fail(6, "the first push fills slots 0..3 of view 1's queue with its l2-normalised keys", on,
             "keys[0, :4] = k_1 / |k_1|", "raw keys" if unnormalised else "something else",
             "normalise each key to unit length before storing it" if unnormalised else "start at self.pointer (0)")
    if not torch.allclose(queues.keys[1, :4], F.normalize(k_2, dim=1), atol=1e-6):
        fail(6, "view 2's keys go to queue 2", on, "keys[1, :4] = k_2 / |k_2|", "something else")
    if not torch.equal(queues.keys[:, 4:], before[:, 4:]):
        fail(6, "only the N oldest slots are replaced", on, "keys[:, 4:] unchanged", "changed")
    if int(queues.pointer) != 4:
        fail(6, "the pointer moves past the slots just written", on, "pointer 4", int(queues.pointer))
    queues.push(k_2, k_1)
    queues.push(k_1, k_2)  # the third push wraps around: slots 0..3 again
    if int(queues.pointer) != 4 or not torch.allclose(queues.keys[0, 4:], F.normalize(k_2, dim=1), atol=1e-6) or \
            not torch.allclose(queues.keys[0, :4], F.normalize(k_1, dim=1), atol=1e-6):
        fail(6, "FIFO with wrap-around: after 3 pushes of 4 into 8 slots, slots 0..3 hold the 3rd batch and 4..7 "
             "the 2nd", "pushes (k_1, k_2), (k_2, k_1), (k_1, k_2)", "pointer 4, keys[0] = [k_1; k_2] normalised",
             f"pointer {int(queues.pointer)}", "slot = (pointer + i) mod K; pointer <- (pointer + N) mod K")


@exercise(6)
def test_exercise_06_no_gradient_into_the_queue():
    queues = mocov2.KeyQueues(2, 8, 4)
    k = torch.randn(4, 4, requires_grad=True)
    queues.push(k * 1.5, k)
    if queues.keys.requires_grad or queues.keys.grad_fn is not None:
        fail(6, "the queue stores values, not graph: no gradient may flow into past keys", "keys that require grad",
             "queues.keys.requires_grad False", "True", "keep the @torch.no_grad() decorator, or detach the keys")
    if "keys" not in queues.state_dict() or "pointer" not in queues.state_dict():
        fail(6, "keys and pointer stay buffers (saved in checkpoints)", "one push", "both in state_dict()",
             sorted(queues.state_dict()))


# ---- Exercise 7: InfoNCE -------------------------------------------------------------------------

def info_nce_written_out(q, k, queue, t):
    total = 0.0
    for qi, ki in zip(rows(q), rows(k)):
        positive = math.exp(cos(qi, ki) / t)
        negatives = sum(math.exp(cos(qi, kj) / t) for kj in rows(queue))
        total += -math.log(positive / (positive + negatives))
    return total / len(q)


@exercise(7)
def test_exercise_07_info_nce_closed_forms():
    v = torch.ones(4, 8)
    uniform = F.normalize(torch.ones(20, 8), dim=1)
    got = scalar(7, mocov2.info_nce(v, v, uniform, 0.2), "q = k = ones")
    check_value(7, "every logit equal: the positive is one of K + 1 equally likely candidates, loss log(K + 1)",
                "q = k = ones(4, 8), a uniform queue of K = 20 identical unit keys, T = 0.2", got, math.log(21))
    q = torch.zeros(3, 8)
    q[torch.arange(3), torch.arange(3)] = 1.0
    queue = torch.zeros(20, 8)
    queue[:, 7] = 1.0  # every key orthogonal to every query
    expected = math.log(1 + 20 * math.exp(-1 / 0.2))  # positive cos 1, negatives cos 0
    got = scalar(7, mocov2.info_nce(q, q, queue, 0.2), "orthogonal queue")
    check_value(7, "positive similarity 1, negatives 0: loss log(1 + K exp(-1 / T))",
                "q = k = 3 unit vectors, K = 20 queued keys orthogonal to them, T = 0.2", got, expected,
                hint="divide every logit (positive and negatives) by the temperature")


@exercise(7)
def test_exercise_07_info_nce_against_the_written_out_loss():
    torch.manual_seed(7)
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(12, 8), dim=1)
    for t in (0.2, 0.5):
        got = scalar(7, mocov2.info_nce(q, k, queue, t), "random")
        check_value(7, "InfoNCE = -log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.Q_j/T))), mean over the batch",
                    f"q, k: 4 x 8 random (unnormalised), queue: 12 unit keys, T = {t}", got,
                    info_nce_written_out(q, k, queue, t), hint="l2-normalise q and k; the positive is class 0")


@exercise(7)
def test_exercise_07_info_nce_stops_the_gradient_at_the_key():
    torch.manual_seed(8)
    queues = mocov2.KeyQueues(2, 12, 8)
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    mocov2.info_nce(q, k, queues.keys[1], 0.2).backward()
    if q.grad is None or q.grad.abs().sum() == 0:
        fail(7, "the query q is trained", "loss.backward()", "q.grad non-zero", q.grad)
    if k.grad is not None:
        fail(7, "stop-gradient on the key: keys come from the momentum encoder and are not trained through",
             "q, k: 4 x 8 requiring grad, loss.backward()", "k.grad None", "a gradient reached k", "detach k")


# ---- Exercise 8: ReSSL ----------------------------------------------------------------------------

def ressl_written_out(q, k, queue, ts, tt):
    total = 0.0
    for qi, ki in zip(rows(q), rows(k)):
        t = [math.exp(cos(ki, kj) / tt) for kj in rows(queue)]
        s = [math.exp(cos(qi, kj) / ts) for kj in rows(queue)]
        total += -sum(t[j] / sum(t) * math.log(s[j] / sum(s)) for j in range(len(t)))
    return total / len(q)


@exercise(8)
def test_exercise_08_ressl_loss_closed_form_and_written_out():
    v = torch.ones(4, 8)
    got = scalar(8, ressl.ressl_loss(v, v, F.normalize(torch.ones(16, 8), dim=1), 0.1, 0.04), "uniform")
    check_value(8, "a uniform queue makes both distributions uniform: loss log K", "q = k = ones(4, 8), 16 identical "
                "unit keys, T_s = 0.1, T_t = 0.04", got, math.log(16))
    torch.manual_seed(9)
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(16, 8), dim=1)
    got = scalar(8, ressl.ressl_loss(q, k, queue, 0.1, 0.04), "random")
    check_value(8, "H(p_t, p_s) with p_t = softmax(k Q^T / T_t), p_s = softmax(q Q^T / T_s)",
                "q, k: 4 x 8 random, 16 unit keys, T_s = 0.1 (student), T_t = 0.04 (teacher)", got,
                ressl_written_out(q, k, queue, 0.1, 0.04),
                hint="the teacher (key k) is sharper: it uses teacher_temp; the student (query q) student_temp")


@exercise(8)
def test_exercise_08_ressl_loss_stops_the_gradient_at_the_teacher():
    torch.manual_seed(10)
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    ressl.ressl_loss(q, k, F.normalize(torch.randn(16, 8), dim=1), 0.1, 0.04).backward()
    if q.grad is None or k.grad is not None:
        fail(8, "gradient into the student's q only, none into the teacher's k", "loss.backward()",
             "q.grad set, k.grad None", f"q.grad {'set' if q.grad is not None else 'None'}, "
             f"k.grad {'set' if k.grad is not None else 'None'}", "detach k")


# ---- Exercise 9: NT-Xent ------------------------------------------------------------------------

def nt_xent_written_out(anchors, candidates, t):
    a, c = rows(anchors), rows(candidates)
    n2, total = len(a), 0.0
    for i in range(n2):
        sims = [cos(a[i], c[k]) / t for k in range(n2)]
        positive = (i + n2 // 2) % n2
        total += -(sims[positive] - math.log(sum(math.exp(s) for k, s in enumerate(sims) if k != i)))
    return total / n2


@exercise(9)
def test_exercise_09_nt_xent_closed_forms():
    n = 6
    same = torch.ones(2 * n, 8)
    got = scalar(9, simclr.nt_xent(same, same, 0.2), "identical views")
    check_value(9, "identical views: every candidate equally similar, so the positive is 1 of 2N - 1: log(2N - 1)",
                f"all 2N = {2 * n} anchors and candidates equal, T = 0.2", got, math.log(2 * n - 1),
                hint=("log(2N) means candidate i (the anchor itself) is not left out"
                      if abs(got - math.log(2 * n)) < 1e-4 else "leave candidate i out of the denominator"))
    eye = torch.eye(3, 8)
    views = torch.cat([eye, eye])  # N = 3 images, orthonormal, two identical views each
    got = scalar(9, simclr.nt_xent(views, views, 0.5), "orthonormal images")
    check_value(9, "positive similarity 1, the 2N - 2 negatives 0: loss log(1 + (2N - 2) exp(-1 / T))",
                "N = 3 orthonormal images, two identical views each, T = 0.5", got, math.log(1 + 4 * math.exp(-2)),
                hint="divide the cosine similarities by the temperature")


@exercise(9)
def test_exercise_09_nt_xent_against_the_written_out_loss():
    torch.manual_seed(11)
    anchors, candidates = torch.randn(8, 6), torch.randn(8, 6)
    for a, c, t, on in ((anchors, anchors, 0.2, "plain SimCLR: anchors = candidates, 2N = 8 x 6 random, T = 0.2"),
                        (anchors, candidates, 0.5, "with a target: different candidates, 8 x 6 random, T = 0.5")):
        got = scalar(9, simclr.nt_xent(a, c, t), on)
        expected = nt_xent_written_out(a, c, t)
        check_value(9, "l_i = -log(exp(s(i, j(i)) / T) / sum_{k != i} exp(s(i, k) / T)), j(i) = (i + N) mod 2N",
                    on, got, expected, hint="anchor i's positive is the other view of the same image, "
                    "(i + N) mod 2N: not i itself")


@exercise(9)
def test_exercise_09_nt_xent_trains_anchors_and_candidates():
    torch.manual_seed(12)
    z = torch.randn(8, 6, requires_grad=True)
    simclr.nt_xent(z, z, 0.2).backward()
    a = z.detach().clone().requires_grad_(True)  # the same loss in torch ops, for its gradient
    n = F.normalize(a, dim=1)
    logits = (n @ n.T / 0.2).masked_fill(torch.eye(8, dtype=torch.bool), float("-inf"))
    F.cross_entropy(logits, (torch.arange(8) + 4) % 8).backward()
    if z.grad is None or not torch.allclose(z.grad, a.grad, atol=1e-5):
        fail(9, "in plain SimCLR gradients flow through both sides of every similarity",
             "anchors = candidates = z (8 x 6 random), T = 0.2, loss.backward()", "z.grad of the full loss",
             "a different gradient" if z.grad is not None else "None", "do not detach inside nt_xent: the caller "
             "passes targets already under stop-gradient when there is an EMA")


# ---- Exercise 10: weighted kNN -----------------------------------------------------------------

def knn_written_out(train, labels, test, num_classes, k, t):
    predictions = []
    for x in rows(test):
        sims = sorted(((cos(x, y), int(c)) for y, c in zip(rows(train), labels)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for sim, c in sims:
            votes[c] += math.exp(sim / t)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
    return predictions


@exercise(10)
def test_exercise_10_knn_weights_each_vote_by_similarity():
    def at(degrees):
        return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]
    train = torch.tensor([at(8), at(60), at(-60), at(180)])
    labels = torch.tensor([1, 0, 0, 2])
    pred = common.knn_predict(train, labels, torch.tensor([at(0)]), 3, k=3, temperature=0.1)
    if int(pred[0]) != 1:
        fail(10, "votes are weighted by exp(sim / T): one close neighbour outweighs two distant ones",
             "test point at 0 degrees; neighbours: class 1 at 8 degrees (cos 0.99), class 0 at +-60 (cos 0.5); "
             "k = 3, T = 0.1", "class 1 (exp(9.9) = 19930 against 2 exp(5) = 297)", f"class {int(pred[0])}",
             "add exp(similarity / T) to the neighbour's class, not 1")


@exercise(10)
def test_exercise_10_knn_against_a_written_out_count():
    torch.manual_seed(13)
    train, labels = torch.randn(40, 6), torch.randint(0, 3, (40,))
    train = train * torch.rand(40, 1).mul(20).add(0.05)  # lengths from 0.05 to 20: only directions count
    test = torch.randn(9, 6) * torch.rand(9, 1).mul(20).add(0.05)
    for k, chunk in ((5, 1024), (5, 2), (200, 4)):
        pred = common.knn_predict(train, labels, test, 3, k=k, temperature=0.1, chunk=chunk)
        expected = knn_written_out(train, labels, test, 3, min(k, 40), 0.1)
        on = f"40 training features of random lengths, 9 test features, 3 classes, k = {k}, T = 0.1, chunk = {chunk}"
        if not isinstance(pred, torch.Tensor) or tuple(pred.shape) != (9,) or pred.dtype != torch.long:
            fail(10, "one int64 class index per test feature", on, "int64 tensor of shape (9,)",
                 f"{getattr(pred, 'dtype', type(pred).__name__)} of shape {tuple(getattr(pred, 'shape', ()))}")
        if pred.tolist() != expected:
            fail(10, "cosine similarity (l2-normalise both sides), the k most similar vote with weight exp(sim / T)",
                 on, expected, pred.tolist(), "k larger than the training set means all of it"
                 if k > 40 else "the features are not unit length: normalise them, since kNN here is cosine")


# ---- Exercise 11: DINO's loss -------------------------------------------------------------------

def dino_written_out(student, teacher, centre, ts, tt):
    total, pairs = 0.0, 0
    c = [float(v) for v in centre[0]]
    for a, t_view in enumerate(teacher):
        for b, s_view in enumerate(student):
            if a == b:
                continue
            for t_row, s_row in zip(rows(t_view), rows(s_view)):
                t = [math.exp((v - cj) / tt) for v, cj in zip(t_row, c)]
                s = [math.exp(v / ts) for v in s_row]
                total += -sum(t[j] / sum(t) * math.log(s[j] / sum(s)) for j in range(len(t))) / len(t_view)
            pairs += 1
    return total / pairs


@exercise(11)
def test_exercise_11_dino_loss_with_a_uniform_teacher():
    k_size = 32
    zeros = [torch.zeros(4, k_size) for _ in range(3)]
    got = scalar(11, dino.dino_loss(zeros, zeros[:2], torch.zeros(1, k_size), 0.1, 0.04), "zeros")
    check_value(11, "uniform teacher and student: the cross-entropy of two uniform distributions is log K",
                f"all logits 0, K = {k_size}, 3 student views, 2 teacher views, centre 0", got, math.log(k_size))
    torch.manual_seed(14)
    student = [torch.randn(4, k_size) for _ in range(3)]
    teacher = [torch.full((4, k_size), 2.5) for _ in range(2)]  # constant rows: a uniform teacher
    expected = dino_written_out(student, teacher, torch.zeros(1, k_size), 0.1, 0.04)
    got = scalar(11, dino.dino_loss(student, teacher, torch.zeros(1, k_size), 0.1, 0.04), "uniform teacher")
    check_value(11, "a uniform teacher: the loss is the mean of -(1/K) sum_k log P_s(k) over pairs a != b",
                "teacher rows constant (uniform after softmax), 3 random student views of 4 x 32, T_s = 0.1", got,
                expected, hint="student: log_softmax(s / T_s) along the K outputs")


@exercise(11)
def test_exercise_11_dino_loss_against_the_written_out_loss():
    torch.manual_seed(15)
    k_size = 16
    student, teacher = [torch.randn(4, k_size) for _ in range(3)], [torch.randn(4, k_size) for _ in range(2)]
    centre = torch.randn(1, k_size)
    centre_before = centre.clone()
    got = scalar(11, dino.dino_loss(student, teacher, centre, 0.1, 0.04), "random")
    expected = dino_written_out(student, teacher, centre, 0.1, 0.04)
    check_value(11, "H(P_t^a, P_s^b) averaged over pairs a != b, P_t = softmax((t - c) / T_t) with the centre c as "
                "given", "3 student and 2 teacher views of 4 x 16 random logits, a random centre, T_s = 0.1, "
                "T_t = 0.04", got, expected, hint="use the centre as it is: it is updated after the loss, from "
                "this batch's teacher outputs (dino.py's main); skip the pairs where a == b")
    if not torch.equal(centre, centre_before):
        fail(11, "the loss reads the centre and leaves it alone", "the call above", "centre unchanged", "changed",
             "the centre moves in Centre.update, after the loss")


@exercise(11)
def test_exercise_11_dino_loss_stops_the_gradient_at_the_teacher():
    torch.manual_seed(16)
    student = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    dino.dino_loss(student, teacher, torch.zeros(1, 8), 0.1, 0.04).backward()
    if any(s.grad is None for s in student):
        fail(11, "every student view is trained", "2 + 2 views, loss.backward()", "each student .grad set", "None")
    if any(t.grad is not None for t in teacher):
        fail(11, "stop-gradient on the teacher: it is the momentum encoder's output, a target",
             "2 student, 2 teacher views requiring grad, loss.backward()", "teacher .grad None",
             "a gradient reached the teacher", "detach the teacher logits")


# ---- Exercise 12: activation reuse, NamedStageEMA.forward -----------------------------------------

def pooled(h):
    return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


def moved_apart(target, seed=2):
    """Make the EMA copies differ from the online stages, so that which one ran shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in target.ema.parameters():
            p.add_(0.5 * torch.randn_like(p))


@exercise(12)
def test_exercise_12_target_runs_the_ema_stages_from_the_first_ones_input():
    online, target = small_encoder("block4,projector")
    moved_apart(target)
    online.eval()
    target.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        f, z, inputs = online(x)
        expected = target.ema["projector"](pooled(target.ema["block4"](inputs["block4"])))
        got = target(inputs)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        fail(12, "the target returns one N x d output", "EMA on block4,projector, 4 images", tuple(expected.shape),
             getattr(got, "shape", got))
    if not torch.allclose(got, expected, atol=1e-5):
        hint = ("this is the EMA projector on the online f: the target started at the LAST EMA stage, not the "
                "first" if torch.allclose(got, target.ema["projector"](f), atol=1e-5) else
                "this is the online output: the EMA copies did not run" if torch.allclose(got, z, atol=1e-5) else
                "start from inputs[first EMA stage] and run that stage and every later one, EMA copies where listed")
        fail(12, "Eq. (6)-(7) for EMA on block4,projector: z_m = g_m(pool(block4_m(inputs['block4'])))",
             "EMA copies moved away from the online stages, 4 images 8 x 8, eval mode", "that output",
             f"max difference {float((got - expected).abs().max()):.3g}", hint)


@exercise(12)
@pytest.mark.parametrize("stages,low,high", [("projector", 1.0, 1.0), ("block4,projector", 1.01, 1.99),
                                              ("all", 2.0, 2.0), ("conv1", 2.0, 2.0)])
def test_exercise_12_activation_reuse_runs_the_backbone_once_per_view(stages, low, high):
    online, target = small_encoder(stages)
    counter = common.ForwardCounter(online, target, 8)
    online.train()
    target.train()
    _, _, inputs = online(torch.randn(4, 3, 8, 8))
    target(inputs)
    got = counter.forwards_per_image()
    if not low - 1e-6 <= got <= high + 1e-6:
        expected = f"{low:.2f}" if low == high else f"between {low:.2f} and {high:.2f}"
        hint = ("start from inputs[first EMA stage]; with EMA on the projector only, the target reuses the online f "
                "and runs no backbone stage (Eq. 7)" if got > high else "the target ran fewer stages than it "
                "should: run every stage from the first EMA stage on")
        fail(12, "activation reuse (Algorithm 1): stages before the first EMA stage are not run again",
             f"--ema-stages {stages}, one view, counted by common.ForwardCounter",
             f"{expected} backbone forwards per image", f"{got:.2f}", hint)


@exercise(12)
def test_exercise_12_without_ema_the_target_is_the_online_output_under_stop_gradient():
    online, target = small_encoder("none")
    _, z, inputs = online(torch.randn(4, 3, 8, 8))
    got = target(inputs)
    if not isinstance(got, torch.Tensor) or not torch.allclose(got, z.detach()):
        fail(12, "no EMA stage (beta = 0, Table 1's 'Remove'): the target is the online output", "--ema-stages none",
             "inputs['output']", "something else")
    if got.requires_grad:
        fail(12, "stop-gradient: the target output carries no gradient", "--ema-stages none, online output with grad",
             "requires_grad False", "True", "return inputs['output'].detach()")


@exercise(12)
def test_exercise_12_shared_stages_leave_the_online_running_statistics_alone():
    online, target = small_encoder("conv1")
    online.train()
    target.train()
    _, _, inputs = online(torch.randn(4, 3, 8, 8))
    stats = {k: v.clone() for k, v in online.backbone.block1.state_dict().items()}
    out = target(inputs)
    if out.requires_grad:
        fail(12, "the target output carries no gradient", "--ema-stages conv1", "requires_grad False", "True")
    for key, value in online.backbone.block1.state_dict().items():
        if not torch.equal(value, stats[key]):
            fail(12, "a shared stage run by the target must not change the online BatchNorm running statistics",
                 "--ema-stages conv1 (block1..projector shared), train mode", f"online block1 {key} unchanged",
                 "changed", "run the stages with self._run_from(start, h), which freezes the shared stages' statistics")
'''


if __name__ == "__main__":
    main()
