"""Child-process side of `fipo_jax.rewards.verify.MathVerifyWorker` (run as a script, not imported).

Protocol: one JSON object per line. After importing math-verify the worker writes
``{"ready": true}`` (or ``{"ready": false, "error": ...}``). Then for each request
``{"id", "gold", "pred", "timeout_s"}`` on stdin it writes ``{"id", "equal", "timed_out", "error"}``
on stdout, and it exits at end of input.

``gold`` and ``pred`` are normalised answers; each is parsed as ``$...$`` LaTeX by math-verify and
compared with ``verify(gold, pred)`` (gold first). The whole check runs under a
``setitimer(ITIMER_REAL)`` deadline in this process's main thread, so slow pure-Python sympy work is
interrupted here; math-verify's own ``signal.alarm`` timeouts are turned off because they would
reset this timer. The parent still kills the process if a reply is late (C-level work such as a
huge integer power cannot be interrupted by a signal). The address space can be capped
(``argv[1]`` = MiB, 0 = no cap) so a runaway expression fails with MemoryError instead of
swapping the host. SIGINT is ignored: a Ctrl-C meant for the trainer must not kill the worker;
it exits when the parent closes its stdin.

Only the standard library and math-verify are imported, so start-up does not pay for JAX.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys


class _Deadline(BaseException):
    """Raised by SIGALRM; a BaseException so `except Exception` inside sympy cannot swallow it."""


def _on_alarm(signum, frame):
    raise _Deadline()


def _limit_memory(megabytes: int) -> None:
    if megabytes <= 0:
        return
    try:
        import resource
    except ImportError:  # not POSIX: no cap; the parent's kill still bounds time
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = megabytes * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _check(parse, verify, gold: str, pred: str, timeout_s: float) -> dict:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=None)
        pred_parsed = parse(f"${pred}$", parsing_timeout=None)
        equal = bool(gold_parsed) and bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
        return {"equal": equal, "timed_out": False, "error": None}
    except MemoryError:
        return {"equal": False, "timed_out": False, "error": "MemoryError in math-verify"}
    except Exception as exc:  # a parser bug on odd input is a wrong answer, reported
        return {"equal": False, "timed_out": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol stream
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        _limit_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
        from math_verify import parse, verify

        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    except ModuleNotFoundError as exc:  # the package itself is not importable here: name the extra
        send({"ready": False, "error": f"{exc}: pip install 'fipo_jax[train]' (math-verify)"})
        return 1
    except BaseException as exc:
        send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    signal.signal(signal.SIGALRM, _on_alarm)
    send({"ready": True})
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        request_id = None
        try:
            request = json.loads(line)
            request_id = request["id"]
            reply = _check(parse, verify, str(request["gold"]), str(request["pred"]), float(request["timeout_s"]))
        except _Deadline:  # the alarm fired between the check and its cancellation
            reply = {"equal": False, "timed_out": True, "error": None}
        except Exception as exc:
            reply = {"equal": False, "timed_out": False, "error": f"bad request: {type(exc).__name__}: {exc}"[:300]}
        send({"id": request_id, **reply})


if __name__ == "__main__":
    sys.exit(main())
