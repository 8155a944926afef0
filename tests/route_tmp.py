"""The route a reader follows through the repository: which files a command's calls pass through, and how often
the calls switch from one file to another, until a named function is called.

    python tests/route.py [--until lib/checkpoint.py:save] two_tier.py ARGS...

prints {"files": [...], "visits": N} as JSON (--show: every visit too). A visit is a call into a function of
another repository file than the last call's (module bodies, class bodies and module-level comprehensions, which
run at import, are not calls a reader follows). tests/test_route.py holds the training's two routes to a budget:
a new run to its first checkpoint, and a resumed run to its first step."""
import argparse
import json
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CO_NEWLOCALS = 0x2  # set for functions and comprehensions, not for module and class bodies


class Reached(BaseException):
    """The function the route ends at was called (a BaseException: no handler of the program catches it)."""


def trace(script, argv, until):
    """(files, visits) of running `script` with `argv` until the function `until` ('lib/x.py:name') is called."""
    end_file, end_name = until.split(":")
    visits = []

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        path = code.co_filename
        if not path.startswith(REPO + os.sep) or os.sep + ".venv" + os.sep in path or \
                os.path.relpath(path, REPO).startswith("tests" + os.sep) or not code.co_flags & CO_NEWLOCALS:
            return
        caller = frame.f_back
        if caller is not None and caller.f_code.co_name == "<module>" and caller.f_code.co_filename == path:
            return  # a comprehension in a module's body: import time
        rel = os.path.relpath(path, REPO)
        if not visits or visits[-1][0] != rel:
            visits.append((rel, code.co_name))
        if rel == end_file and code.co_name == end_name:
            raise Reached

    sys.argv = [script] + list(argv)
    sys.path.insert(0, REPO)
    sys.setprofile(profile)
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except (Reached, SystemExit):
        pass
    finally:
        sys.setprofile(None)
    if not visits or visits[-1][0] != end_file:
        raise SystemExit(f"error: the command ended before {until} was called")
    return sorted({f for f, _ in visits}), visits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--until", default="lib/checkpoint.py:save", help="FILE:FUNCTION the route ends at")
    p.add_argument("--show", action="store_true", help="print every visit too")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the command's own lines; the JSON alone goes to standard output
    files, visits = trace(a.script, a.args, a.until)
    result = {"files": files, "visits": len(visits)}
    if a.show:
        result["route"] = [f"{f}:{name}" for f, name in visits]
    print(json.dumps(result), file=stdout)


if __name__ == "__main__":
    main()
