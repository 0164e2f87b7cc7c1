"""What the estimator-conformance tests share: a check's name, and check_estimator's array-API
checks run in a fresh process where SCIPY_ARRAY_API=1 holds from the start (scipy reads it
once, at import)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys


def check_name(check) -> str:
    while isinstance(check, functools.partial):
        check = check.func
    return getattr(check, "__wrapped__", check).__name__


def array_api_results_in_fresh_process(imports: str, estimators) -> dict:
    """{repr(estimator): [(check, status, exception)...]} for every estimator, the array-API
    checks only; ``imports`` makes the estimators' names known (e.g. "from probes import X")."""
    code = (
        "import json\n"
        "from unittest import SkipTest\n"
        "from sklearn.utils.estimator_checks import estimator_checks_generator\n"
        f"{imports}\n"
        "out = {}\n"
        f"for e in [{', '.join(repr(e) for e in estimators)}]:\n"
        "    res = out.setdefault(repr(e), [])\n"
        "    for est, check in estimator_checks_generator(e):\n"
        "        c = check\n"
        "        while hasattr(c, 'func'):\n"
        "            c = c.func\n"
        "        name = getattr(c, '__wrapped__', c).__name__\n"
        "        if not name.startswith('check_array_api'):\n"
        "            continue\n"
        "        try:\n"
        "            check(est)\n"
        "            res.append((name, 'passed', ''))\n"
        "        except SkipTest as exc:\n"
        "            res.append((name, 'skipped', str(exc)))\n"
        "        except Exception as exc:\n"
        "            res.append((name, 'failed', repr(exc)))\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
