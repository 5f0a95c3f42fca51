"""The container image (deploy/Dockerfile), as far as it can be checked without a container
engine: its invariants (non-root numeric user, the torch pin and CPU index, every COPY source
present and not ignored, no remote code, entrypoint and command that e3rl accepts, paths that
agree with the chart), and the step that matters at run time: kernels compiled ahead of time
load in a process that has no compiler and writes nothing to the cache."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CHART = ROOT / "deploy" / "helm" / "e3rl"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (the last one is the image)."""
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def global_args() -> dict[str, str]:
    args = {}
    for word, rest in instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    return args


def stage_args(stage: list[tuple[str, str]]) -> dict[str, str]:
    return {rest.partition("=")[0]: rest.partition("=")[2].strip('"')
            for word, rest in stage if word == "ARG"}


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def json_form(stage, word: str) -> list[str]:
    (rest,) = [r for w, r in stage if w == word][-1:]
    return json.loads(rest)


def test_runtime_image_runs_as_a_numeric_non_root_user_on_python_slim():
    *_, runtime = stages()
    base = runtime[0][1]
    assert base == "${PYTHON_IMAGE}" and global_args()["PYTHON_IMAGE"] == "python:3.11-slim"
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "the image must set a USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    # The chart runs as the same user (and group, for the volumes' fsGroup).
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    assert values["podSecurityContext"]["fsGroup"] == int(gid)
    # No compiler in the image that runs (only in the build stage).
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    assert "g++" not in runs and "build-essential" not in runs


def test_torch_is_the_makefiles_pin_from_the_cpu_index_by_default():
    build = stages()[0]
    args = stage_args(build)
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.M).group(1).strip()
    assert args["TORCH_SPEC"] == pin == "torch==2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [rest for word, rest in build if word == "RUN"]
    torch_step = next(r for r in runs if '"${TORCH_SPEC}"' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_step
    # The package comes after torch, constrained to it, from the copied sources (not editable).
    package_step = next(r for r in runs if "pip install --constraint" in r)
    assert runs.index(package_step) > runs.index(torch_step)
    assert re.search(r"pip install --constraint \S+ \.( |$)", package_step)
    assert "-e " not in package_step


def test_no_remote_code_anywhere_in_deploy():
    for path in (ROOT / "deploy").rglob("*"):
        if path.is_file():
            assert "trust_remote_code" not in path.read_text(errors="ignore"), path


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        for i in range(len(parts)):
            prefix = "/".join(parts[: i + 1])
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and
                                                    fnmatch.fnmatch(parts[i], pattern[3:])):
                return True
    return False


def test_every_copy_source_exists_and_is_in_the_build_context():
    patterns = dockerignore()
    assert {".git", "runs", "**/__pycache__"} <= set(patterns)
    assert any(p.startswith(".venv") for p in patterns)
    sources = []
    for stage in stages():
        for word, rest in stage:
            if word == "COPY" and "--from=" not in rest:
                *srcs, _dest = shlex.split(rest)
                sources += [s for s in srcs if not s.startswith("--")]
    assert {"pyproject.toml", "README.md", "engine", "server", "trainer",
            "models/arith-chain"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    # What the package needs is all there: pip install . reads the readme and package dirs.
    assert ignored("runs/x", patterns) and ignored("engine/__pycache__/x.pyc", patterns)
    assert not ignored("engine/csrc/fused.cpp", patterns)


def test_entrypoint_command_and_paths_agree_with_e3rl_and_the_chart():
    from e3rl.server.cli import build_parser

    build, *_, runtime = stages()
    assert json_form(runtime, "ENTRYPOINT") == ["e3rl"]
    cmd = json_form(runtime, "CMD")
    args = build_parser().parse_args(cmd)  # the default command parses
    assert cmd[0] == "serve" and args.host == "0.0.0.0"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    model = values["model"]["imagePath"]
    assert args.model == model
    copies = [shlex.split(rest) for word, rest in runtime if word == "COPY"]
    assert ["models/arith-chain", model] in copies
    env = env_of(runtime)
    assert env["E3RL_MODEL"] == model
    # The kernels are built where the image looks for them, then copied as they are.
    built_in = env_of(build)["TORCH_EXTENSIONS_DIR"]
    assert env["TORCH_EXTENSIONS_DIR"] == built_in
    assert ["--from=build", built_in, built_in] in copies
    build_runs = [rest for word, rest in build if word == "RUN"]
    assert any("python -m e3rl.engine.build_kernels --isa all" in r for r in build_runs)
    # Everything written at run time goes under /tmp, as the chart mounts it; the chart
    # sets the same variables (a custom image without them still works read-only).
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR",
                "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[key] == "/tmp" or env[key].startswith("/tmp/"), key
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers.split('define "e3rl.runtimeEnv"')[1].split("{{- end -}}")[0]
    chart_env = dict(re.findall(r"- name: (\w+)\n  value: (\S+)", block))
    for key, value in chart_env.items():
        if key in env:
            assert env[key] == value.strip('"'), key
    assert env["HF_HUB_OFFLINE"] == "1"


def test_prebuilt_kernels_load_without_a_compiler_and_without_writing(tmp_path):
    """What the image's build step makes and its pods do: ``build_kernels`` compiles into the
    cache; a later process with no compiler on its PATH (and ``CXX`` pointing nowhere) loads
    the library from there, runs a kernel, and leaves the directory as it was."""
    from e3rl.engine import kernels

    isa = kernels.cpu_isa()
    (built,) = kernels.prebuild([isa])  # in the usual cache; ninja skips an up-to-date build
    name = kernels.library_name(isa)
    cache = tmp_path / "torch_extensions"
    (cache / name).mkdir(parents=True)
    shutil.copy2(built, cache / name / built.name)  # what the image copies: the .so alone
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    bare = tmp_path / "bin"  # an empty PATH: no c++, no ninja
    bare.mkdir()
    env = {"PATH": str(bare), "CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(cache),
           "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = ("import torch\nfrom e3rl.engine import kernels\nkernels.load_cpu_kernels()\n"
            "ids, logprobs, entropy = kernels.greedy_sample(torch.tensor([[0.0, 3.0, 1.0]]))\n"
            "assert kernels.loaded() and ids.tolist() == [1], ids\nprint('loaded')\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # no lock, no build
    # The same process without the library: no compiler, so it says so (and serving falls
    # back to SDPA), rather than loading something else.
    shutil.rmtree(cache / name)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "could not build e3rl's CPU kernels" in done.stderr


def test_library_names_separate_instruction_sets_and_sources():
    from e3rl.engine import kernels

    names = {kernels.library_name(isa) for isa in kernels.ISA_FLAGS}
    assert len(names) == len(kernels.ISA_FLAGS)
    assert all(re.fullmatch(r"e3rl_cpu_kernels_[0-9a-f]{12}", n) for n in names)
    done = subprocess.run([sys.executable, "-m", "e3rl.engine.build_kernels", "--isa", "sse9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown instruction set(s) sse9" in done.stderr
