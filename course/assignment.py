"""Course assignments: a student edition of this project with the paper's key functions blanked.

    python course/assignment.py --list                        # the exercises, easy to hard, with the paper's references
    python course/assignment.py --out hw                      # the student edition in hw/, every exercise blanked
    python course/assignment.py --out hw --exercises 1,2,4    # only some (numbers, or names such as byol.D)
    cd hw && python -m pytest -q test_assignment.py          # the grading tests: each blank fails, each answer passes
    python course/assignment.py --grade hw                    # a mark per exercise, from the grading tests
    python course/assignment.py --check                       # the grading tests catch every wrong answer in MUTATIONS

How it works. EXERCISES below names each function by file and qualified name. The tool copies the
project into the output folder and, in each exercise's function (and in the functions elsewhere that
hold the same answer, its `also`), replaces the body (everything after the docstring) by
`raise NotImplementedError("Exercise N: ...")`, found on the syntax tree
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
THIS_FILE = "course/assignment.py"
GRADING_FILE = "course/grading_tests.py"  # the grading tests: test_assignment.py in an edition


@dataclass(frozen=True)
class Exercise:
    file: str  # the project file the function lives in
    qualname: str  # "function" or "Class.method"
    minutes: int  # rough time for a student who has read the paper
    paper: str  # what in the paper it teaches
    task: str  # the NotImplementedError message: the equation and the shapes in and out
    also: tuple = ()  # (file, qualname, task) of functions elsewhere that hold the same answer: blanked with it

    @property
    def name(self):
        return f"{self.file[:-3]}.{self.qualname}"

    def functions(self):
        """(file, qualname, task) of every function the exercise blanks: its own, then those in `also`."""
        return [(self.file, self.qualname, self.task), *self.also]


# Easy to hard. An exercise's number is its place in this list, whichever subset an edition has.
EXERCISES = [
    Exercise(
        "common.py",
        "solarize",
        5,
        "Appendix A: solo-learn's default augmentations (in which BYOL's second view is solarised)",
        "solarisation: invert every pixel at or above `threshold` (p -> 1 - p) and keep the others. "
        "x: N x 3 x H x W floats in [0, 1]; returns a tensor of the same shape.",
    ),
    Exercise(
        "byol.py",
        "D",
        10,
        "Eq. (5) and Algorithm 1: the distance D with stop-gradient on the target",
        "the distance D of Eq. (5) in this code's form, 2 - 2 cos(p_i, sg(z_i)) for each row i (Algorithm 1 "
        "writes -cos: the same minimiser, docs/deviations.md), averaged over the batch; z is a target: stop its "
        "gradient, and l2-normalise both. p, z: N x d; returns a scalar (0-dim tensor).",
        also=(
            (
                "simsiam.py",
                "D",
                "SimSiam's D, byol.D in Algorithm 1's own form: -cos(p_i, sg(z_i)) for each row i, averaged over "
                "the batch; stop z's gradient, and l2-normalise both. p, z: N x d; returns a scalar (0-dim tensor).",
            ),
        ),
    ),
    Exercise(
        "byol.py",
        "byol_loss",
        5,
        "Eq. (5): BYOL's symmetric loss",
        "Eq. (5), symmetric: each view's prediction regresses the OTHER view's momentum projection through D; "
        "average the two directions. p_1, p_2, z_1m, z_2m: N x d each; returns a scalar.",
        also=(
            (
                "simsiam.py",
                "simsiam_loss",
                "SimSiam's symmetric loss, as byol_loss: each view's prediction against the OTHER view's target "
                "through this file's D, the two directions averaged. p_1, p_2, z_1m, z_2m: N x d each; returns a "
                "scalar.",
            ),
        ),
    ),
    Exercise(
        "common.py",
        "NamedStageEMA.update",
        15,
        "Eq. (6): the EMA update, on the listed stages only (Fig. 1b)",
        "Eq. (6), xi <- beta * xi + (1 - beta) * theta, in place, for every parameter of every stage in "
        "self.ema_stages (xi in self.ema[stage], theta in the online stage, pair by pair of the same shape; "
        "parameter_pairs() gives both lists). BatchNorm buffers are not averaged; no stage listed: nothing "
        "to do. First record beta in self.beta (the run's log line reads it). beta: a float in [0, 1]; "
        "returns None.",
    ),
    Exercise(
        "dino.py",
        "Centre.update",
        10,
        "Table 1 (DINO): the centring that DINO relies on besides the EMA",
        "DINO's centre, c <- m c + (1 - m) mean(teacher logits), the mean over the rows of all the global "
        "views, m = self.momentum. teacher_logits: a list of N x K tensors; updates self.value (1 x K) in "
        "place; returns None. Under torchrun the mean is the global batch's: pass this process's mean through "
        "common.mean_over_processes (on one process it returns its input; the tests run one).",
    ),
    Exercise(
        "common.py",
        "KeyQueue.push",
        15,
        "Table 1 (MoCo v2, ReSSL): the queue of past keys, the negatives",
        "a FIFO queue (one per view): write the batch's l2-normalised keys over the oldest N slots of each "
        "queue, starting at self.pointer and wrapping around the queue length K, then advance self.pointer by "
        "N (mod K). keys: one N x d tensor per queue; self.keys: V x K x d, or K x d for a single queue "
        "(self.keys.view(-1, K, d) is V x K x d either way, and writes through); returns None.",
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
        "scalar. Under torchrun the candidates are every process's 2N and this process's own start at "
        "column first: offset both indices by it.",
    ),
    Exercise(
        "common.py",
        "knn_predict",
        20,
        "Table 2's KNN-1 (k = 1) and our weighted kNN (k = 200): the evaluation of the representation",
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
        "online activation entering the first EMA stage, activations[self.ema_stages[0]] (detached), and run "
        "the stages from there: self._run_from(start, h) runs them (EMA copies where listed, shared stages "
        "with their BatchNorm statistics frozen). No EMA stage: activations['output'] under stop-gradient. "
        "activations: {stage: the N x ... activation entering it, 'output': N x d}; returns N x d.",
    ),
]


@dataclass(frozen=True)
class Mutation:
    exercise: int  # the number of the exercise whose grading tests must catch it
    wrong: str  # the wrong answer, in words
    body: str  # the wrong answer, in code: a whole body for the function (the docstring stays)


# Plausible wrong answers, each a whole body with one mistake, written out so that it does not depend
# on how the reference body happens to be written. test_all.py puts each into a copy of the project
# (python course/assignment.py --check) and checks that the grading tests of its exercise fail.
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
        self.beta = beta
        xi, theta = self.parameter_pairs()
        for xi_p, theta_p in zip(xi, theta):
            xi_p.mul_(1.0 - beta).add_(theta_p, alpha=beta)
    """,
    ),
    Mutation(
        4,
        "the BatchNorm running statistics averaged with the weights",
        """
        self.beta = beta
        for stage in self.ema_stages:
            ema, online = self.ema[stage].state_dict(), self.online_stages[stage].state_dict()
            for name, xi_t in ema.items():
                if xi_t.is_floating_point():
                    xi_t.mul_(beta).add_(online[name], alpha=1.0 - beta)
    """,
    ),
    Mutation(
        4,
        "beta is not recorded in self.beta (the run's log line reads it)",
        """
        xi, theta = self.parameter_pairs()
        for xi_p, theta_p in zip(xi, theta):
            xi_p.mul_(beta).add_(theta_p, alpha=1.0 - beta)
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
        5,
        "the mean of this process's rows only (no common.mean_over_processes: under torchrun each process keeps "
        "a centre of its own)",
        """
        batch_mean = torch.cat(teacher_logits).float().mean(dim=0, keepdim=True)
        self.value.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
    """,
    ),
    Mutation(
        6,
        "the queue's pointer never advances (every batch overwrites the same slots)",
        """
        queues = self.keys.view(-1, *self.keys.shape[-2:])
        n = keys[0].shape[0]
        slots = (self.pointer + torch.arange(n, device=queues.device)) % queues.shape[1]
        queues.index_copy_(1, slots, F.normalize(torch.stack(keys).float(), dim=2))
    """,
    ),
    Mutation(
        6,
        "a slice that stops at the end of the queue (the keys of a batch that crosses it are dropped)",
        """
        queues = self.keys.view(-1, *self.keys.shape[-2:])
        n, size, start = keys[0].shape[0], queues.shape[1], int(self.pointer)
        fits = min(n, size - start)
        queues[:, start : start + fits] = F.normalize(torch.stack(keys).float(), dim=2)[:, :fits]
        self.pointer.copy_((self.pointer + n) % size)
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
        10,
        "every training feature votes (k ignored)",
        """
        sim = F.normalize(test_features, dim=1) @ F.normalize(train_features, dim=1).T
        votes = torch.zeros(len(test_features), num_classes)
        votes.scatter_add_(1, train_labels.expand_as(sim), (sim / temperature).exp())
        return votes.argmax(dim=1)
    """,
    ),
    Mutation(
        10,
        "the temperature fixed at 0.1 (the argument ignored)",
        """
        train_features = F.normalize(train_features, dim=1)
        sim, idx = (F.normalize(test_features, dim=1) @ train_features.T).topk(min(k, len(train_features)), dim=1)
        votes = torch.zeros(len(test_features), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / 0.1).exp())
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
            return activations["output"].detach()
        return self._run_from("conv1", activations["conv1"].detach())
    """,
    ),
    Mutation(
        12,
        "starts at the last EMA stage instead of the first",
        """
        if not self.ema_stages:
            return activations["output"].detach()
        start = self.ema_stages[-1]
        return self._run_from(start, activations[start].detach())
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


def blank_body(source, qualname, task, number):
    """The source with the body of function `qualname` replaced by a NotImplementedError naming what to implement."""
    start, end, indent = body_span(source, qualname)
    message = f"Exercise {number}: {task}"
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
    # A student edition written inside the project (python course/assignment.py --out hw) is not part of it.
    editions = [
        str(Path(f).parent)
        for f in files
        if Path(f).name == "ASSIGNMENT.md" and (root / Path(f).parent / "test_assignment.py").is_file()
    ]
    inside = lambda f: any(e == "." or f.startswith(e + "/") for e in editions)
    return [f for f in files if (root / f).is_file() and f not in (THIS_FILE, GRADING_FILE) and not inside(f)]


def write_edition(out, numbers, root=ROOT, blank=True, mutation=None):
    """Copy the project into `out`, blank the chosen exercises (or, with blank=False, leave the reference
    bodies), apply `mutation` if one is given, and write test_assignment.py and ASSIGNMENT.md."""
    out = Path(out)
    changed = {}  # file -> its new text
    for number in numbers if blank else ():
        for file, qualname, task in EXERCISES[number - 1].functions():
            changed[file] = blank_body(changed.get(file) or (root / file).read_text(), qualname, task, number)
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
    selected = "SELECTED = {" + ", ".join(map(str, sorted(numbers))) + "}"
    grading, found = re.subn(r"^SELECTED = None\b", selected, (root / GRADING_FILE).read_text(), flags=re.M)
    if found != 1:
        raise SystemExit(f"error: {GRADING_FILE} must have one line 'SELECTED = None ...' (found {found})")
    (out / "test_assignment.py").write_text(grading)
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
        where = "; ".join(f"`{file}`: `{qualname}`" for file, qualname, _ in e.functions())
        lines.append(f"| {number} | {where} | {e.minutes} min | {e.paper} |")
    if 2 in numbers and 3 in numbers:
        lines += [
            "",
            "`byol_loss` and `simsiam_loss` (3) call their file's `D` (2): their tests pass once both are written.",
        ]
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
        # the folder's own conftest.py and pytest settings are not loaded: a conftest.py can turn failures into passes
        cmd += ["--noconftest", "-c", os.devnull, "--rootdir", str(directory)]
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
        for file, qualname, _ in EXERCISES[number - 1].functions():
            path = Path(directory) / file
            student = path.read_text()
            reference = (root / file).read_text()
            start, end, _ = body_span(student, qualname)
            ref_start, ref_end, _ = body_span(reference, qualname)
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


if __name__ == "__main__":
    main()
