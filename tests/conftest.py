"""Test set-up: without a GPU, Triton kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported), so CI tests them too.  With a GPU they
compile for it and the GPU tests run."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pydiff  # noqa: E402,F401


def pytest_report_header(config):
    return f"pydiff build: {pydiff.build_info()}; cpu backends: {pydiff.available_backends(torch.device('cpu'))}"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: a thread pool only adds overhead there (and
    stalls badly on a loaded 2-core machine). Modules opt in with an autouse fixture."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _reset_backend():
    old = pydiff.get_backend()
    yield
    pydiff.set_backend(old)


def pytest_configure(config):
    # the Triton interpreter evaluates masked-off lanes too (1/0 on invalid rows): numpy warns
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


_FAILLOG = os.environ.get("PYDIFF_FAILLOG")
_TESTLOG = os.environ.get("PYDIFF_TESTLOG")


def pytest_runtest_logreport(report):
    """With PYDIFF_FAILLOG=path, append each failure to that file as soon as it happens (the GPU check
    runs under a hard time limit: a run cut short still says what failed and why); with
    PYDIFF_TESTLOG=path, one line per finished test (outcome, seconds, node id), so such a run also
    says which tests it reached. Written by the controlling process only under pytest-xdist."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if _TESTLOG and (report.when == "call" or (report.when == "setup" and not report.passed)):
        with open(_TESTLOG, "a") as f:
            f.write(f"{report.outcome} {report.duration:.1f}s {report.nodeid}\n")
    if not _FAILLOG or not report.failed:
        return
    text = report.longreprtext or ""
    if len(text) > 2500:
        text = text[:600] + "\n[...]\n" + text[-1900:]
    with open(_FAILLOG, "a") as f:
        f.write(f"=== FAILED {report.nodeid} ({report.when})\n{text}\n")
