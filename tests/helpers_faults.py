"""Run stablesr commands as real processes that can be killed (SIGKILL) at chosen points or limited in file size.

Importing torch and diffusers takes most of a CLI run on a small CPU, so a test starts one helper process
([`Forker`]) that imports them once and forks a fresh child per command. Each child is an ordinary process running
the CLI's ``main`` (or a script, or a code snippet) with its output in a log file. It can be

- killed from inside at an exact point: ``kills=[Kill("stablesr.file_utils:_publish", call=2, when="after")]``
  wraps that function so that the child SIGKILLs itself right after its 2nd call (``when="before"``: just before
  it); the kill is as real as one from outside, the point is just reproducible;
- killed from outside: [`Forker.start`] returns the pid and [`Forker.finish`] waits, so the test can poll the output
  folder (or sleep) in between and ``os.kill(pid, SIGKILL)``;
- given a file size limit (``fsize``, RLIMIT_FSIZE with SIGXFSZ ignored), so a write past it fails with EFBIG as
  on a full disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

_ZYGOTE = r"""
import importlib, json, os, runpy, signal, sys, traceback

import accelerate, diffusers, torch, transformers  # noqa: F401  the slow imports, done once for every child
import stablesr.cascade, stablesr.cfw_data, stablesr.conversion, stablesr.evaluate, stablesr.reports  # noqa
import stablesr.pipelines.pipeline_stablesr  # noqa: F401
from stablesr.cli import main as cli_main


def arm(kill):
    module_name, attr = kill["target"].split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == kill["call"] and kill["when"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == kill["call"] and kill["when"] == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, attr, wrapper)


def child(job):
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if job["fsize"] is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], resource.RLIM_INFINITY))
    for kill in job["kills"]:
        arm(kill)
    rc = 0
    try:
        if job["kind"] == "cli":
            rc = cli_main(job["argv"])
        elif job["kind"] == "script":
            sys.argv = [job["target"], *job["argv"]]
            runpy.run_path(job["target"], run_name="__main__")
        else:
            exec(compile(job["target"], "<job>", "exec"), {"__name__": "__main__", "argv": job["argv"]})
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(job)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
"""


@dataclass
class Kill:
    """SIGKILL the child just ``"before"`` or ``"after"`` the ``call``-th call of ``target`` ("module:function")."""

    target: str
    call: int = 1
    when: str = "before"


@dataclass
class Outcome:
    killed: bool  # ended by SIGKILL
    returncode: int  # exit code, or -9 when killed
    log: str  # stdout and stderr


class Forker:
    """One process that imported the heavy modules, forking a child per command (see the module docstring)."""

    def __init__(self, cwd: str | os.PathLike):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd,
            env=env,
        )
        self._logs = 0
        self._log_dir = Path(cwd)

    def start(self, kind: str, target: str | None = None, argv: list[str] | None = None, *,
              kills: list[Kill] | None = None, fsize: int | None = None) -> tuple[int, Path]:
        """Fork a child; ``kind`` is "cli" (``argv`` for ``stablesr``), "script" (``target`` a path, run as
        ``__main__`` with ``argv``) or "code" (``target`` source with ``argv`` bound). Returns (pid, log path)."""
        self._logs += 1
        log = self._log_dir / f"child-{self._logs}.log"
        job = {"kind": kind, "target": target, "argv": [str(a) for a in argv or []], "log": str(log),
               "kills": [asdict(k) for k in kills or []], "fsize": fsize}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the forking helper died (exit code {self.proc.wait()})")
        return json.loads(reply)["pid"], log

    def finish(self, log: Path) -> Outcome:
        """Wait for the child started last."""
        status = json.loads(self.proc.stdout.readline())["status"]
        code = os.waitstatus_to_exitcode(status)
        return Outcome(killed=code == -signal.SIGKILL, returncode=code, log=log.read_text(errors="replace"))

    def run(self, kind: str, target: str | None = None, argv: list[str] | None = None, *,
            kills: list[Kill] | None = None, fsize: int | None = None,
            kill_when: Callable[[], bool] | None = None, timeout: float = 300) -> Outcome:
        """Start a child and wait for it; with ``kill_when``, SIGKILL it from outside as soon as that is true
        (polled every 5 ms). A child still running after ``timeout`` seconds is killed and reported as a failure."""
        pid, log = self.start(kind, target, argv, kills=kills, fsize=fsize)
        deadline = time.monotonic() + timeout
        while kill_when is not None:
            if kill_when():
                _kill(pid)
                break
            if _exited(pid) or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if kill_when is None:
            while not _exited(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if time.monotonic() > deadline:
            _kill(pid)
            outcome = self.finish(log)
            raise AssertionError(f"child ran past {timeout} s; its log:\n{outcome.log}")
        return self.finish(log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def noise_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` smooth random RGB images ``im{i}.png`` of ``size`` (W, H) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        smooth = rng.random((size[1] // 4, size[0] // 4, 3))
        Image.fromarray((smooth * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC).save(folder / f"im{i}.png")
    return folder


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def temporaries(root: Path) -> list[Path]:
    """Hidden temporaries (``.NAME.<hex>.tmp`` files and folders) under ``root`` and next to it."""
    found = [p for p in root.rglob(".*") if _is_temporary(p)] if root.is_dir() else []
    return found + [p for p in root.parent.glob(f".{root.name}.*") if _is_temporary(p)]


def published(root: Path) -> dict[str, bytes]:
    """Every file under its final name (no hidden part in its path), relative path -> bytes."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exited(pid: int) -> bool:
    """Whether the child (not ours to reap: the helper waits for it) has exited; a zombie counts as exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
