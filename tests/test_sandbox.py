"""The renderer boundary against hostile completions.

Each case is matplotlib code (the renderer that executes the completion's Python) sent through
the TRL reward function, as a policy's completion would be. Every snippet ends by raising an
error that reports what the attack got (``GOT: ...``) or why it was refused (``BLOCKED: ...``),
so a test sees both that the attack ran and that it failed for the expected reason. Secrets are
canaries this test writes into its own temporary folders; nothing of the real user's is read.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import rewards
from vfeedback.integrations import sandbox
from vfeedback.integrations.trl import CodeToImage, reward_function

torch.set_num_threads(1)

OK, WHY = sandbox.bwrap_status()
needs_bwrap = pytest.mark.skipif(not OK, reason=f"bubblewrap cannot run here: {WHY} (the refusal path is tested below)")
REPO = Path(__file__).resolve().parents[1]


class Mean(rewards.Reward):
    """Mean pixel value: any image scores, so a None can only come from the renderer."""

    name = "mean"
    needs_prompt = False

    def forward(self, images, prompts=None, **context):
        return images.float().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def canaries(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    secret = f"CANARY-{uuid.uuid4().hex}"
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{secret}\n")
    (root / "dataset.jsonl").write_text(f'{{"prompt": "{secret}"}}\n')
    return dict(root=root, home=home, secret=secret)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _run(code: str, timeout: float = 30, memory_mb: int = 1024):
    """One completion through CodeToImage + reward_function; returns (score, reason, isolation)."""
    render = CodeToImage("matplotlib", size=32, timeout=timeout, memory_mb=memory_mb)
    fn = reward_function(Mean(), render=render)
    out = fn(["draw"], [f"```python\n{code}\n```"])
    assert fn.calls == 1 and len(out) == 1
    iso = next(iter(fn.isolation), None)
    return out[0], fn.last_errors[0], iso


def _attack(body: str) -> str:
    """Wrap an attack: ``GOT: <what it read>`` if it worked, ``BLOCKED: <exception>`` if not."""
    lines = "\n".join("    " + ln for ln in body.strip().splitlines())
    return f"try:\n{lines}\nexcept Exception as e:\n    raise RuntimeError(f'BLOCKED: {{type(e).__name__}}: {{e}}')\nraise RuntimeError('GOT: ' + str(got)[:300])"


@needs_bwrap
def test_a_harmless_chart_renders_inside_the_boundary():
    score, why, iso = _run("plt.plot([0, 1], [1, 0])")
    assert why is None and 0.5 < score <= 1.0  # mostly white
    assert iso == "bwrap+seccomp"


@needs_bwrap
@pytest.mark.parametrize("target", ["ssh", "dataset", "project"])
def test_cannot_read_host_files(canaries, target, monkeypatch):
    monkeypatch.setenv("HOME", str(canaries["home"]))
    path = {"ssh": canaries["home"] / ".ssh" / "id_rsa", "dataset": canaries["root"] / "dataset.jsonl",
            "project": REPO / "pyproject.toml"}[target]
    # the literal host path and the guest's idea of ~ both
    score, why, _ = _run(_attack(f"got = open({str(path)!r}).read()\nif {target!r} == 'ssh':\n    got += open(__import__('os').path.expanduser('~/.ssh/id_rsa')).read()"))
    assert score is None
    assert why.startswith("RuntimeError: BLOCKED: FileNotFoundError"), why
    assert canaries["secret"] not in why and "[project]" not in why


@needs_bwrap
def test_environment_holds_nothing_of_the_trainer(canaries, monkeypatch):
    monkeypatch.setenv("VF_TEST_TOKEN", canaries["secret"])
    secret = canaries["secret"]
    code = (f"import os\nenv = ''\nfor p in ('/proc/self/environ', '/proc/1/environ'):\n    env += open(p, 'rb').read().decode()\n"
            f"got = ' '.join(sorted(os.listdir('/'))) + '|' + ('LEAKED' if {secret!r} in env or 'VF_TEST_TOKEN' in env else 'clean')"
            f" + '|' + ('home-is-tmp' if 'HOME=/tmp' in env else 'other-home')"
            f" + '|' + ','.join(ln.split(':')[0].strip() for ln in open('/proc/net/dev').read().splitlines()[2:])")
    score, why, _ = _run(_attack(code))
    assert score is None and why.startswith("RuntimeError: GOT: ")  # reading the environments works ...
    assert why.endswith("|clean|home-is-tmp|lo"), why  # ... they hold nothing of the trainer's; loopback is the only interface
    assert secret not in why
    root = set(why[len("RuntimeError: GOT: "):].split("|", 1)[0].split())
    system = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "proc", "sbin", "tmp", "usr", "var"}
    # anything else at the guest's root is only the path to the interpreter's own folders (/work, /root,
    # /home, or wherever CI put the clone: /check), never the trainer's other folders
    interpreter = {Path(sys.base_prefix).resolve().parts[1], Path(sys.prefix).resolve().parts[1]}
    assert root - system <= interpreter, (root, interpreter)
    assert "proc" in root and "usr" in root


@needs_bwrap
def test_writes_stay_in_the_private_tmp(canaries):
    before = _snapshot(canaries["root"])
    worker = hashlib.sha256(sandbox._WORKER.read_bytes()).hexdigest()
    marker = f"vf-hostile-{uuid.uuid4().hex}"
    # host paths, and the guest's own root and /dev (bubblewrap tmpfs, made read-only)
    targets = [str(canaries["root"] / "pwned"), str(REPO / "pwned"), "/usr/lib/pwned", sandbox._GUEST_WORKER,
               str(Path(sys.prefix) / "pwned"), "/pwned", "/dev/pwned", "/etc/pwned"]
    code = (f"import os\nopen('/tmp/{marker}', 'w').write('x')\nerrs = []\n"
            f"for t in {targets!r}:\n    try:\n        open(t, 'a').write('pwned')\n        errs.append('WROTE ' + t)\n"
            f"    except OSError as e:\n        errs.append(type(e).__name__)\n"
            # the private /tmp is capped (64 MiB): filling it ends in ENOSPC (28), not in host memory
            f"try:\n    for i in range(8):\n        open(f'/tmp/fill{{i}}', 'wb').write(bytes(30 << 20))\n"
            f"except OSError as e:\n    errs.append('fill-errno-' + str(e.errno))\n"
            f"raise RuntimeError('RESULT ' + ' '.join(errs))")
    score, why, _ = _run(code)
    assert score is None and why.startswith("RuntimeError: RESULT "), why
    *words, fill = why.split()[2:]
    errs = {}  # target -> what the guest got: an error name, or WROTE
    it = iter(words)
    for t in targets:
        e = next(it)
        if e == "WROTE":
            next(it)  # the path printed after WROTE
        errs[t] = e
    assert next(it, None) is None, why
    for t, e in errs.items():
        # a host path under /tmp (a checkout or venv there, as in a CI clone) lies inside the
        # guest's private /tmp, where writing is allowed and lands in the guest's tmpfs; every
        # other target must refuse the write. Nothing may appear on the host either way.
        if not (e == "WROTE" and Path(t).is_relative_to("/tmp")):
            assert e in {"FileNotFoundError", "OSError", "PermissionError"}, (t, e, why)  # EROFS is a bare OSError
        if t != sandbox._GUEST_WORKER:
            assert not Path(t).exists(), t
    assert fill == "fill-errno-28"
    assert _snapshot(canaries["root"]) == before
    assert not (REPO / "pwned").exists() and not Path(f"/tmp/{marker}").exists()  # the guest's /tmp is not the host's
    assert hashlib.sha256(sandbox._WORKER.read_bytes()).hexdigest() == worker


@needs_bwrap
def test_no_socket_reaches_the_host():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        # _socket is the C module: it bypasses the worker's Python-level socket stubs
        score, why, _ = _run(_attack(f"import _socket\ns = _socket.socket(2, 1)\ns.connect(('127.0.0.1', {port}))\ngot = 'connected'"))
        assert score is None and why.startswith("RuntimeError: BLOCKED: PermissionError"), why
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()


@needs_bwrap
def test_fork_bomb_and_shell_out_fail_at_once():
    # a fork bomb is only safe to run behind the seccomp filter (root is exempt from RLIMIT_NPROC)
    _, why, iso = _run(_attack("import os\nos.getpid()\ngot = 'probe'"))
    assert iso == "bwrap+seccomp" and why == "RuntimeError: GOT: probe", why
    t = time.monotonic()
    score, why, iso = _run(_attack("import os\nwhile True:\n    os.fork()"))
    assert score is None and why.startswith("RuntimeError: BLOCKED: PermissionError"), why
    score, why, _ = _run(_attack("import subprocess\ngot = subprocess.run(['/usr/bin/id'], capture_output=True).stdout"))
    assert score is None and why.startswith("RuntimeError: BLOCKED: PermissionError"), why
    assert time.monotonic() - t < 60


@needs_bwrap
def test_unbounded_allocation_hits_the_memory_limit():
    score, why, _ = _run("x = []\nwhile True:\n    x.append(bytearray(64 << 20))", memory_mb=512)
    assert score is None and why.startswith("MemoryError"), why


@needs_bwrap
def test_sleeping_past_the_timeout_is_killed():
    tag = uuid.uuid4().hex[:12]
    t = time.monotonic()
    score, why, _ = _run(f"import time\nopen('/proc/self/comm', 'w').write('vf{tag}')\ntime.sleep(120)", timeout=8)
    assert score is None and why.startswith("timeout: rendering ran over 8 s"), why
    assert time.monotonic() - t < 30
    time.sleep(0.5)
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(p) == f"vf{tag}"]
    assert alive == []


def _comm(p: Path) -> str:
    try:
        return (p / "comm").read_text().strip()
    except OSError:
        return ""


@needs_bwrap
def test_printing_megabytes_is_capped():
    score, why, _ = _run("import os\nfor _ in range(48):\n    os.write(1, b'x' * (1 << 20))\nprint('y' * (1 << 20))\nraise RuntimeError('BLOCKED: printed')")
    assert score is None and why == "RuntimeError: BLOCKED: printed"


@needs_bwrap
def test_cannot_kill_the_trainer():
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = os.getpid()
        score, why, _ = _run(_attack(f"import os\nos.kill({me}, 9)\nos.kill({sentinel.pid}, 9)\ngot = 'killed'"))
        assert score is None and why.startswith("RuntimeError: BLOCKED: ProcessLookupError"), why
        # kill(-1): every process the guest may signal -- in its own PID namespace there is none
        # (kill(-1) spares the caller and the namespace's init)
        score, why, _ = _run("import os, signal\nos.kill(-1, signal.SIGKILL)")
        assert score is None and why == "ProcessLookupError: [Errno 3] No such process", why
        assert sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()


def test_without_bubblewrap_untrusted_code_is_refused_unless_weak(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    sandbox.bwrap_status.cache_clear()
    try:
        assert sandbox.bwrap_status() == (False, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)")
        score, why, iso = _run("plt.plot([0, 1], [1, 0])")
        assert score is None and iso == "none"
        assert why.startswith("sandbox: refused to run untrusted code: bubblewrap is not installed") and "sandbox: weak" in why
        fn = reward_function(Mean(), render=CodeToImage("matplotlib", size=32, sandbox="weak"))
        logged = {}
        out = fn(["draw"], ["plt.plot([0, 1], [1, 0])"], log_metric=logged.__setitem__)
        assert out[0] is not None and 0.5 < out[0] <= 1.0
        (iso,) = fn.isolation
        assert iso in ("weak", "weak+seccomp")
        assert logged == {"mean_code_to_image/failed_frac": 0.0, f"mean_code_to_image/isolation/{iso}": 1.0}
    finally:
        sandbox.bwrap_status.cache_clear()


def test_bad_sandbox_setting_names_the_field():
    with pytest.raises(ValueError, match=r"^sandbox: 'none' is not one of strict"):
        CodeToImage("svg", sandbox="none")
