"""The launcher's claim on a Triton server's shared memory: regions of a server killed with
its launcher (nothing could unlink them) are freed by the next launch; a living one's stay."""

import os
import signal
import subprocess
import sys
import textwrap

from service.triton_launch import claim_regions, reclaim_stale


def _killed_owner(folder: str) -> str:
    """The prefix a process claimed (and made a region under) before it was SIGKILLed."""
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from service.triton_launch import claim_regions
        fd, prefix = claim_regions({folder!r})
        open(os.path.join({folder!r}, prefix + "region"), "wb").write(b"x" * 4096)
        print(prefix, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    prefix = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return prefix


def test_a_dead_servers_regions_are_freed_and_a_living_ones_kept(tmp_path):
    folder = str(tmp_path)
    dead = _killed_owner(folder)
    fd, alive = claim_regions(folder)
    try:
        open(os.path.join(folder, alive + "region"), "wb").close()
        assert reclaim_stale(folder) == [dead + "region"]
        assert sorted(os.listdir(folder)) == sorted([alive[:-1] + ".lock", alive + "region"])
        assert reclaim_stale(folder) == []
    finally:
        os.close(fd)
    assert reclaim_stale(folder) == [alive + "region"] and os.listdir(folder) == []


def test_the_container_entry_point_execs_the_server_holding_its_claim(tmp_path):
    """`python -m service.triton_launch exec ARGS` (Dockerfile.triton's entry point) becomes
    `tritonserver ARGS --backend-config=python,shm-region-prefix-name=PREFIX`, the claim's lock
    held by the server itself: locked while it runs, freed once it is gone."""
    import json
    import stat

    from tests.deploy.test_docker import DOCKERFILES, instructions

    fake = tmp_path / "tritonserver"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import fcntl, json, os, sys
        prefix = sys.argv[-1].rsplit("=", 1)[1]
        fd = os.open(os.path.join("/dev/shm", prefix[:-1] + ".lock"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = False
        except OSError:
            locked = True
        print(json.dumps({{"argv": sys.argv[1:], "locked": locked, "pid": os.getpid()}}))
    """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    entry = json.loads(next(rest for op, rest in instructions(DOCKERFILES[1]) if op == "ENTRYPOINT"))
    assert entry[:4] == ["python3", "-m", "service.triton_launch", "exec"]
    proc = subprocess.run([sys.executable, *entry[1:]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["argv"][:-1] == ["--model-repository=/models"]
    assert seen["argv"][-1].startswith("--backend-config=python,shm-region-prefix-name=atoken_triton_")
    assert seen["locked"], "the server must hold its claim"
    prefix = seen["argv"][-1].rsplit("=", 1)[1]
    reclaim_stale()  # the server has exited: its lock file goes
    assert not os.path.exists(os.path.join("/dev/shm", prefix[:-1] + ".lock"))
