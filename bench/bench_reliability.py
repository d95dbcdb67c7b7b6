"""The reliability figures: fuzz cases per property, injected faults, from the test suite itself.

    python bench/bench_reliability.py --json docs/bench/reliability.json

Runs the property-based fuzz tests (tests/test_fuzz.py), the fault tests (tests/test_faults.py,
and the corrupt-checkpoint and corrupt-cache tests of tests/test_training.py and
tests/test_embedding_store.py) and the loading-security scan (tests/test_load_security.py)
through pytest, counting hypothesis' test cases per property (its observability callback) and
each test's outcome. A fuzz case that raised a traceback fails its property, so "failed" is the
number of tracebacks. The figures are the suite's: CI runs the same tests on every change.
"""

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

# Hypothesis' observations without line coverage, which would trace every line (4x slower);
# read when hypothesis is imported, so set first.
os.environ.setdefault("HYPOTHESIS_EXPERIMENTAL_OBSERVABILITY_NOCOVER", "1")

import pytest  # noqa: E402
from hypothesis.internal.observability import (  # noqa: E402
    add_observability_callback,
    remove_observability_callback,
)

REPO = Path(__file__).resolve().parents[1]
FUZZ = "tests/test_fuzz.py"
FAULTS = [
    "tests/test_faults.py",
    "tests/test_training.py::test_a_corrupt_checkpoint_is_named_and_latest_resumes_from_the_one_before",
    "tests/test_training.py::test_latest_with_every_checkpoint_corrupt_is_a_user_error",
    "tests/test_training.py::test_an_interrupted_save_is_ignored_and_the_last_good_checkpoint_kept",
    "tests/test_embedding_store.py::test_a_corrupt_file_is_rebuilt_with_a_one_line_warning",
    "tests/test_embedding_store.py::test_a_failed_write_is_a_user_error_and_leaves_nothing_half_written",
    "tests/test_embedding_store.py::test_an_interrupted_build_leaves_no_file",
]
SECURITY = "tests/test_load_security.py"


class Collector:
    """A pytest plugin: each test's outcome, and hypothesis' cases and failures per property."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.cases: dict[str, Counter] = defaultdict(Counter)  # test id -> {status: count}
        self.test = ""

    def pytest_runtest_setup(self, item) -> None:
        self.test = item.nodeid  # a property's cases are counted under its test (and parameters)

    def observe(self, observation) -> None:
        if getattr(observation, "type", None) == "test_case":
            self.cases[self.test][str(observation.status)] += 1

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            if report.nodeid not in self.outcomes or report.outcome != "passed":
                self.outcomes[report.nodeid] = report.outcome


def test_name(nodeid: str) -> tuple[str, str]:
    """tests/test_faults.py::test_a_full_disk_while_x[at-rng] -> ('a full disk while x', 'at-rng')."""
    name, _, parameters = nodeid.split("::")[-1].removeprefix("test_").partition("[")
    return name.replace("_", " "), parameters.removesuffix("]")


def readable(nodeid: str) -> str:
    """tests/test_faults.py::test_a_full_disk_while_x[2] -> 'a full disk while x (2)'."""
    name, parameters = test_name(nodeid)
    return name + (f" ({parameters})" if parameters else "")


def run(paths: list[str]) -> tuple[Collector, int, float]:
    collector = Collector()
    add_observability_callback(collector.observe)
    start = time.time()
    try:
        status = pytest.main(["-q", "-p", "no:cacheprovider", *paths], plugins=[collector])
    finally:
        remove_observability_callback(collector.observe)
    return collector, int(status), time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures here (docs/bench/reliability.json)")
    args = parser.parse_args(argv)

    collector, status, seconds = run([str(REPO / p) for p in [FUZZ, *FAULTS, SECURITY]])
    # "gave_up": a drawn input the property rejected as not applicable (hypothesis' filters)
    properties = [
        {"property": readable(name), "cases": c["passed"] + c["failed"], "failed": c["failed"]}
        for name, c in collector.cases.items()
    ]
    fuzz_tests = {k: v for k, v in collector.outcomes.items() if k.startswith(FUZZ)}
    fault_tests = {k: v for k, v in collector.outcomes.items() if not k.startswith((FUZZ, SECURITY))}
    figures = {
        "fuzz": {
            "properties": properties,
            "cases": sum(p["cases"] for p in properties),
            "tracebacks": sum(p["failed"] for p in properties),
            "tests": len(fuzz_tests),
            "tests_failed": sum(o != "passed" for o in fuzz_tests.values()),
        },
        "faults": [
            {"fault": test_name(k)[0], "variant": test_name(k)[1], "file": k.split("::")[0], "outcome": v}
            for k, v in fault_tests.items()
        ],
        "security": {
            "tests": sum(k.startswith(SECURITY) for k in collector.outcomes),
            "failed": sum(k.startswith(SECURITY) and v != "passed" for k, v in collector.outcomes.items()),
        },
        "seconds": round(seconds),
        "pytest_status": status,
    }
    width = max(len(p["property"]) for p in properties) if properties else 10
    print(f"\n{'property':{width}}  cases  tracebacks")
    for p in properties:
        print(f"{p['property']:{width}}  {p['cases']:5d}  {p['failed']:10d}")
    print(f"\n{len(figures['faults'])} faults injected:")
    for fault in figures["faults"]:
        print(f"  {fault['outcome']:7s} {fault['fault']} {fault['variant']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_name(args.json.name + ".tmp")
        temporary.write_text(json.dumps(figures, indent=1) + "\n")
        temporary.replace(args.json)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
