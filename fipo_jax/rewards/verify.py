"""Answer equivalence: normalised exact match, exact decimal match, then math-verify under a hard time bound.

Order of checks in `check_equivalence` (cheapest first, each one final when it applies):
  1. the prediction or the gold is longer than ``max_answer_chars`` → not equal, no parsing and no
     normalisation at all (an over-long gold is also reported in ``Verdict.error``);
  2. ``normalize_answer(gold) == normalize_answer(pred)`` → equal (the official DAPO rule);
  3. both are plain decimals (``-12``, ``0.50``) → compared exactly as fractions;
  4. otherwise math-verify (``verify(parse(gold), parse(pred))``, gold first), in a worker process
     (not installed: `MathVerifyMissingError`, the one-line 'train' extra message, is raised).

Time bound (why a process, and which one). math-verify's own timeout uses ``signal.alarm``, which
only works in the main thread, has 1-second resolution, and cannot interrupt C-level work (a
sympy ``9**(9**(9**9))`` spends its time inside one integer power). So the check runs in a
persistent child interpreter (`MathVerifyWorker`, started lazily with ``subprocess`` on
``_verify_worker.py``; it imports only math-verify, never JAX, and does not depend on the
``multiprocessing`` start method or on the caller's ``__main__``). Inside the child a
``setitimer`` deadline interrupts slow Python-level work cheaply (the worker survives); if no reply
arrives within ``timeout_s + kill_grace_s`` the parent kills the child and starts a new one on the
next check. A timed-out check counts as not equal. The child's address space is capped
(``memory_limit_mb``) so a runaway expression fails with MemoryError instead of exhausting the host.
Calls are serialised by a lock, so the functions are safe to use from several threads.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import threading
from fractions import Fraction
from typing import Literal

from fipo_jax._requires import missing_message
from fipo_jax.core import _checks
from fipo_jax.rewards.normalize import normalize_answer

__all__ = [
    "DEFAULT_MAX_ANSWER_CHARS",
    "DEFAULT_VERIFY_TIMEOUT_S",
    "MathVerifyMissingError",
    "MathVerifyWorker",
    "Verdict",
    "check_equivalence",
    "default_worker",
    "is_equivalent",
    "numeric_equal",
]

DEFAULT_VERIFY_TIMEOUT_S = 5.0
DEFAULT_MAX_ANSWER_CHARS = 1024

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")
_DECIMAL_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_MAX_DECIMAL_CHARS = 64


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome of one equivalence check.

    Attributes:
      equal: the prediction is judged equivalent to the gold answer.
      method: which rule decided: "exact" (normalised strings), "numeric" (plain decimals),
        "math_verify", or "rejected" (empty or over-long prediction or gold, never parsed).
      timed_out: math-verify ran past its time bound (then ``equal`` is False).
      error: what went wrong (worker crash, parser exception, bad gold), else None.
    """

    equal: bool
    method: Literal["exact", "numeric", "math_verify", "rejected"]
    timed_out: bool = False
    error: str | None = None


class MathVerifyMissingError(ImportError):
    """math-verify must judge an answer (the string and decimal rules did not decide) but is not
    installed: an install problem, never one sample's wrong answer, so the reward lets it through."""


def require_math_verify() -> None:
    """`MathVerifyMissingError` (the one-line 'train' extra message) unless math-verify can be imported.

    Looks the package up without importing it: only the worker process imports math-verify (and sympy).
    """
    if "math_verify" in sys.modules:  # imported here already (or blocked: None)
        found = sys.modules["math_verify"] is not None
    else:
        try:
            found = importlib.util.find_spec("math_verify") is not None
        except (ImportError, ValueError):  # a broken install is as good as none
            found = False
    if not found:
        raise MathVerifyMissingError(missing_message("train", ["math_verify"]))


def numeric_equal(gold: str, predicted: str) -> bool | None:
    """Exact comparison of two plain decimals (``-3``, ``0.50``, ``.5``); None if either is not one.

    ``5`` equals ``5.00``; ``0.333333`` does not equal ``0.3333333`` (no rounding, unlike
    math-verify's 6-digit float rounding). Inputs longer than 64 characters give None.

    >>> numeric_equal("5", "5.00"), numeric_equal("-2", "2"), numeric_equal("1/2", "0.5")
    (True, False, None)
    """
    if len(gold) > _MAX_DECIMAL_CHARS or len(predicted) > _MAX_DECIMAL_CHARS:
        return None
    if not (_DECIMAL_RE.fullmatch(gold) and _DECIMAL_RE.fullmatch(predicted)):
        return None
    return Fraction(gold) == Fraction(predicted)


class MathVerifyWorker:
    """A persistent math-verify child process with a hard per-check deadline (see module docstring).

    Args:
      startup_timeout_s: how long to wait for the child to import math-verify (a cold start
        takes about 1 s; the first start on a busy machine can take longer).
      kill_grace_s: extra wait beyond a check's ``timeout_s`` before the child is killed.
      memory_limit_mb: address-space cap of the child (RLIMIT_AS); 0 disables it.
      cache_size: number of (gold, prediction) verdicts remembered (timeouts included, errors not),
        so repeated wrong answers in a group are verified once; 0 disables the cache.

    Attributes:
      starts: child processes started so far; kills: children killed (hard timeouts, crashes).

    The child is ``python -P -u _verify_worker.py <memory_limit_mb>`` (``-P``: the script's folder
    is not put on ``sys.path``); it exits by itself when this process closes its stdin or dies.
    """

    def __init__(
        self,
        *,
        startup_timeout_s: float = 120.0,
        kill_grace_s: float = 1.0,
        memory_limit_mb: int = 4096,
        cache_size: int = 4096,
    ):
        for name, value in (("startup_timeout_s", startup_timeout_s), ("kill_grace_s", kill_grace_s)):
            _checks.check_number(f"{name} (seconds)", value, minimum=0, exclusive_minimum=True)
        for name, value in (("memory_limit_mb", memory_limit_mb), ("cache_size", cache_size)):
            _checks.check_int(name, value, minimum=0)
        self.startup_timeout_s = float(startup_timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.memory_limit_mb = memory_limit_mb
        self.cache_size = cache_size
        self.starts = 0
        self.kills = 0
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, str, float], Verdict] = collections.OrderedDict()
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue | None = None
        self._owner_pid = os.getpid()
        self._next_id = 0

    # -- process management -------------------------------------------------------------------

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-u", _WORKER_SCRIPT, str(self.memory_limit_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        replies: queue.Queue = queue.Queue()

        def pump(stream=proc.stdout, sink=replies):  # one reader thread per child; ends at its EOF
            try:
                for line in stream:
                    sink.put(line)
            except (OSError, ValueError):
                pass
            finally:
                sink.put(None)
                stream.close()

        threading.Thread(target=pump, name="math-verify-reader", daemon=True).start()
        self._proc, self._replies = proc, replies
        self.starts += 1
        status, ready = self._receive(self.startup_timeout_s)
        if ready is None or not ready.get("ready"):
            reason = {"timeout": "no reply in time", "eof": "it exited"}.get(status) or (ready or {}).get("error", "?")
            self._kill()
            raise RuntimeError(f"math-verify worker failed to start: {reason}")

    def _kill(self, graceful: bool = False) -> None:
        """Stop the child: SIGKILL at once, or (graceful) close its stdin and kill only if it lingers."""
        proc, self._proc, self._replies = self._proc, None, None
        if proc is None:
            return
        assert proc.stdin is not None  # started with stdin=PIPE
        try:
            proc.stdin.close()  # the child exits at end of input; stdout is closed by its reader thread
        except OSError:
            pass
        if graceful:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
            self.kills += 1
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _receive(self, timeout_s: float) -> tuple[Literal["reply", "eof", "timeout"], dict | None]:
        """Next reply from the child: ("reply", message), ("eof", None) if it exited, or ("timeout", None)."""
        assert self._replies is not None, "no child started"
        try:
            line = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            return "timeout", None
        if line is None:
            return "eof", None
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            message = None
        return ("reply", message) if isinstance(message, dict) else ("eof", None)

    @property
    def pid(self) -> int | None:
        """Process id of the running child, or None when none is running (for monitoring)."""
        return self._proc.pid if self._proc is not None and self._alive() else None

    def close(self) -> None:
        """Stop the child process (a later check starts a new one)."""
        with self._lock:
            if os.getpid() == self._owner_pid:
                self._kill(graceful=True)
            self._proc, self._replies = None, None

    def __enter__(self) -> MathVerifyWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- checks --------------------------------------------------------------------------------

    def check(self, gold: str, predicted: str, timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S) -> Verdict:
        """math-verify equivalence of two (normalised) answers, bounded by ``timeout_s`` seconds.

        Never raises for str input: a timeout gives ``Verdict(False, timed_out=True)``, a crashed
        or unstartable child gives ``Verdict(False, error=...)``.
        """
        _checks.check_number("timeout_s (seconds)", timeout_s, minimum=0, exclusive_minimum=True)
        _checks.require(isinstance(gold, str) and isinstance(predicted, str),
                        f"gold and predicted must be str, got {type(gold).__name__}, {type(predicted).__name__}",
                        error=TypeError)
        timeout_s = float(timeout_s)
        key = (gold, predicted, timeout_s)
        with self._lock:
            if os.getpid() != self._owner_pid:  # forked: the child process belongs to the parent
                self._proc, self._replies, self._owner_pid = None, None, os.getpid()
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            verdict = self._check_locked(gold, predicted, timeout_s)
            if self.cache_size and verdict.error is None:
                self._cache[key] = verdict
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return verdict

    def _check_locked(self, gold: str, predicted: str, timeout_s: float) -> Verdict:
        for attempt in range(2):  # a child found dead (killed from outside, crashed) is replaced once
            try:
                if not self._alive():
                    self._kill()
                    self._start()
                self._next_id += 1
                request = {"id": self._next_id, "gold": gold, "pred": predicted, "timeout_s": timeout_s}
                assert self._proc is not None and self._proc.stdin is not None  # _start opened it with stdin=PIPE
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except RuntimeError as exc:  # failed start-up
                return Verdict(False, "math_verify", error=str(exc))
            except (OSError, ValueError) as exc:  # broken pipe: the child died
                self._kill()
                if attempt:
                    return Verdict(False, "math_verify", error=f"math-verify worker unavailable: {exc}")
                continue
            status, reply = self._receive(timeout_s + self.kill_grace_s)
            if status == "timeout":  # hard bound: the child is stuck (e.g. in C code); replace it
                self._kill()
                return Verdict(False, "math_verify", timed_out=True)
            if status == "eof":
                self._kill()
                if attempt:
                    return Verdict(False, "math_verify", error="math-verify worker exited during the check")
                continue
            assert reply is not None  # status == "reply" comes with the message
            if reply.get("id") != self._next_id:
                self._kill()
                return Verdict(False, "math_verify", error=f"math-verify worker protocol error: {reply!r}"[:300])
            return Verdict(
                bool(reply.get("equal")), "math_verify", timed_out=bool(reply.get("timed_out")),
                error=reply.get("error")
            )
        raise AssertionError("unreachable")


_DEFAULT_WORKER: MathVerifyWorker | None = None
_DEFAULT_WORKER_LOCK = threading.Lock()


def default_worker() -> MathVerifyWorker:
    """The process-wide `MathVerifyWorker`, created on first use and stopped at interpreter exit."""
    global _DEFAULT_WORKER
    with _DEFAULT_WORKER_LOCK:
        if _DEFAULT_WORKER is None:
            _DEFAULT_WORKER = MathVerifyWorker()
            atexit.register(_DEFAULT_WORKER.close)
        return _DEFAULT_WORKER


def check_equivalence(
    gold: str,
    predicted: str,
    *,
    timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    use_math_verify: bool = True,
    worker: MathVerifyWorker | None = None,
) -> Verdict:
    """Is ``predicted`` the same answer as ``gold``? Raw strings in; the rule order is in the module docstring.

    Args:
      gold: reference answer (raw; normalised here).
      predicted: extracted model answer (raw; normalised here).
      timeout_s: hard bound on the math-verify step (the parent kills the worker after
        ``timeout_s + worker.kill_grace_s``).
      max_answer_chars: predictions longer than this (before normalisation) are rejected unparsed;
        so is a longer gold, with ``error`` saying so (ground truths are normalised in this
        process, so their size is bounded like that of predictions).
      use_math_verify: False keeps only the string and decimal rules (the official DAPO reward
        is the string rule alone).
      worker: the math-verify process to use; default `default_worker()`.

    Raises `MathVerifyMissingError` when math-verify must judge (``use_math_verify`` and the string
    and decimal rules did not decide) but is not installed: without it every such correct answer
    would score wrong, silently.

    >>> check_equivalence("1/2", r"\\dfrac{1}{2}", use_math_verify=False)
    Verdict(equal=False, method='exact', timed_out=False, error=None)
    >>> check_equivalence(r"\\frac{1}{2}", r"\\dfrac{1}{2}").method
    'exact'
    """
    _checks.check_number("timeout_s (seconds)", timeout_s, minimum=0, exclusive_minimum=True)
    _checks.check_int("max_answer_chars", max_answer_chars, minimum=1)
    _checks.require(isinstance(gold, str) and isinstance(predicted, str),
                    f"gold and predicted must be str, got {type(gold).__name__}, {type(predicted).__name__}",
                    error=TypeError)
    if len(gold) > max_answer_chars:
        return Verdict(False, "rejected", error=f"gold answer is {len(gold)} characters, over max_answer_chars="
                                                f"{max_answer_chars}: not compared")
    if len(predicted) > max_answer_chars:
        return Verdict(False, "rejected")
    gold_norm, pred_norm = normalize_answer(gold), normalize_answer(predicted)
    if not gold_norm:
        return Verdict(False, "rejected", error=f"gold answer {gold!r} is empty after normalisation")
    if not pred_norm:
        return Verdict(False, "rejected")
    if gold_norm == pred_norm:
        return Verdict(True, "exact")
    decimal = numeric_equal(gold_norm, pred_norm)
    if decimal is not None:
        return Verdict(decimal, "numeric")
    if not use_math_verify:
        return Verdict(False, "exact")
    require_math_verify()
    return (worker if worker is not None else default_worker()).check(gold_norm, pred_norm, timeout_s)


def is_equivalent(
    gold: str,
    predicted: str,
    timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
    *,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    use_math_verify: bool = True,
    worker: MathVerifyWorker | None = None,
) -> bool:
    """`check_equivalence` as a bool: True iff judged equal; False on timeout or error.

    >>> is_equivalent("5", "$5$."), is_equivalent("5", "6")
    (True, False)
    """
    return check_equivalence(
        gold,
        predicted,
        timeout_s=timeout_s,
        max_answer_chars=max_answer_chars,
        use_math_verify=use_math_verify,
        worker=worker,
    ).equal
