"""Sessions: tests (per package, each in an environment of that package alone), kernels, lint, bench, gpu.

Plain `nox` runs what CI runs: tests, kernels and lint.
"""

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests", "kernels", "lint"]
nox.options.reuse_existing_virtualenvs = True

PACKAGES = ["kernels", "layers", "models", "data", "train"]
CI_ENV = {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci")}


def sync(session: nox.Session, *args: str) -> None:
    """Install exactly what the lock says for the given selection into the session's venv."""
    session.run_install(
        "uv",
        "sync",
        "--frozen",
        "--no-default-groups",
        *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


@nox.session
@nox.parametrize("package", [*PACKAGES, "root"])
def tests(session: nox.Session, package: str) -> None:
    """A package's tests with only that package, its declared dependencies and the test tools."""
    if package == "root":
        sync(session, "--all-packages", "--group", "dev")
        session.run("pytest", "tests", *session.posargs, env=CI_ENV)
        return
    # the optional extras too (transformers, lm-eval, matplotlib): their tests skip only where absent
    extras = {
        "models": ["--extra", "hf"],
        "train": ["--extra", "eval", "--extra", "hf", "--extra", "plots"],
    }
    sync(session, "--package", f"moe-{package}", "--group", "test", *extras.get(package, []))
    session.run(
        "pytest",
        f"packages/{package}/tests",
        "-m",
        "not triton and not gpu",
        *session.posargs,
        env=CI_ENV,
    )


@nox.session
def kernels(session: nox.Session) -> None:
    """Triton kernels executed on the CPU by the Triton interpreter (tiny shapes); then the host
    reads of the layers' and models' training steps with their experts on those kernels."""
    sync(session, "--package", "moe-kernels", "--group", "test", "--extra", "triton")
    env = {**CI_ENV, "TRITON_INTERPRET": "1"}
    session.run("pytest", "packages/kernels/tests", "-m", "triton", *session.posargs, env=env)
    # the Triton interpreter needs numpy, which moe-models' test group lacks: the dev group
    sync(session, "--all-packages", "--group", "dev")
    host_reads = [
        "packages/layers/tests/test_host_reads.py",
        "packages/models/tests/test_host_reads.py",
    ]
    session.run("pytest", *host_reads, "-m", "triton", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print a table per entry and write JSON under bench-results/."""
    sync(session, "--all-packages", "--group", "dev")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """The GPU-only tests (Triton and CuPy on CUDA), for a machine with CUDA."""
    sync(session, "--all-packages", "--group", "dev", "--extra", "cuda")
    session.run("pytest", "-m", "gpu or triton", "packages", "tests", *session.posargs)
