"""Launch scripts (launch/): syntax, --help, the commands they print under DRY_RUN=1, and the commands they run.

Nothing external runs: `gcloud`, `srun`, `scontrol`, `suti` (and, for the commands run on TPU workers,
`mountpoint`, `sudo`, `gcsfuse`) are fakes on PATH that record their arguments.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_setup.sh", "tpu_pod.sh", "gpu_single_node.sh", "slurm_multinode.sbatch", "local_cpu.sh"]
SEP = "\x1f"  # separates the recorded arguments of one call

# A fake command: records its name and arguments as one line in $FAKE_LOG, then does its fake's extra part.
FAKE_HEADER = """#!/usr/bin/env bash
{ printf '%s' "$(basename "$0")"; printf '\\037%s' "$@"; printf '\\n'; } >> "$FAKE_LOG"
"""
FAKE_EXTRAS = {
    # scp keeps a copy of what it was asked to send, so the test can open it.
    "gcloud": 'if [[ $4 == scp ]]; then cp "$5" "$FAKE_DIR/sent.tgz"; fi\n',
    "scontrol": 'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-a01\\ngpu-a02\\n"; fi\n',
    # srun runs its command as task 1 of the job (the options before it dropped), like one SLURM task.
    "srun": ('while [[ ${1:-} == --* ]]; do shift; done\n'
             'if [[ -n ${FAKE_SRUN_WAIT:-} ]]; then\n'
             '  trap \'echo TERM >> "$FAKE_DIR/srun-signals"; kill $sleeper; exit 143\' TERM\n'
             '  echo started >> "$FAKE_DIR/srun-signals"; sleep 60 & sleeper=$!; wait $sleeper; exit 0\n'
             'fi\n'
             'SLURM_PROCID=1 exec "$@"\n'),
    # suti's toyweb writes a shard, so a second run finds it.
    "suti": ('if [[ "$1 $2" == "data toyweb" ]]; then mkdir -p "$4" && : > "$4/00000.tar"; fi\n'
             'exit "${FAKE_SUTI_STATUS:-0}"\n'),
    # mountpoint answers "mounted" when FAKE_MOUNTED=1; sudo and gcsfuse only record.
    "mountpoint": '[[ ${FAKE_MOUNTED:-0} == 1 ]]\n',
    "sudo": "",
    "gcsfuse": "",
}


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, extra in FAKE_EXTRAS.items():
    path = bin_dir / name
    path.write_text(FAKE_HEADER + extra)
    path.chmod(0o755)
  return tmp_path


def clean_env(fake_dir: Path, **extra: str) -> dict[str, str]:
  """The caller's environment without SLURM / XLA / launch settings, fakes first on PATH."""
  keep = {k: v for k, v in os.environ.items()
          if not k.startswith(("SLURM_", "XLA_", "JAX_", "CUDA_", "TPU_", "SUTI", "DRY_RUN"))
          and k not in ("WORKDIR", "CONFIG", "DATA", "ZONE", "PROJECT", "ROOT", "STEPS", "GPUS")}
  keep.update(PATH=f"{fake_dir / 'bin'}:{os.environ['PATH']}", FAKE_LOG=str(fake_dir / "calls.log"),
              FAKE_DIR=str(fake_dir), TMPDIR=str(fake_dir))
  keep.update(extra)
  return keep


def run_script(name: str, env: dict[str, str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / name), *args], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=120)


def calls(fake_dir: Path) -> list[list[str]]:
  """The recorded calls of the fakes, each as [name, arg1, arg2, ...]."""
  log = fake_dir / "calls.log"
  return [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []


def printed_commands(stdout: str) -> list[str]:
  return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_and_are_strict(name: str):
  subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)
  text = (LAUNCH / name).read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in text
  assert os.access(LAUNCH / name, os.X_OK)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_prints_usage(name: str, fakes: Path):
  for flag in ("--help", "-h"):
    result = run_script(name, clean_env(fakes), flag)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "DRY_RUN=1" in result.stdout
    assert "set -euo" not in result.stdout  # the header only
  assert calls(fakes) == []


def test_scripts_share_the_helpers_of_common_sh():
  subprocess.run(["bash", "-n", str(LAUNCH / "common.sh")], check=True)
  source_line = 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"\n'
  for name in SCRIPTS:
    text = (LAUNCH / name).read_text()
    if name.endswith(".sbatch"):  # sbatch runs a spool copy: no sibling file to source, its own helpers
      assert "common.sh\"" not in text and "\ndie() {" in text
    else:
      assert source_line in text and "\ndie() {" not in text and "\nshow() {" not in text, name


def test_readme_covers_every_script():
  readme = (LAUNCH / "README.md").read_text()
  for name in SCRIPTS:
    assert f"launch/{name}" in readme


# --- TPU ---

def tpu_env(fakes: Path, **extra: str) -> dict[str, str]:
  settings = dict(TPU_NAME="fake-tpu", ZONE="fake-zone1-a", PROJECT="fake-project", CONFIG="configs/toy.py",
                  WORKDIR="/mnt/fake-bucket/run1")
  return clean_env(fakes, **{**settings, **extra})


def test_tpu_pod_dry_run_prints_sync_setup_and_distributed_train(fakes: Path):
  result = run_script("tpu_pod.sh", tpu_env(fakes, DRY_RUN="1"), "--config.mesh.fsdp=4")
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  ssh = [c for c in commands if c.startswith("gcloud compute tpus tpu-vm ssh fake-tpu")]
  assert len(ssh) == 3  # unpack, setup, train
  assert all("--zone=fake-zone1-a" in c and "--worker=all" in c and "--project=fake-project" in c for c in ssh)
  assert any(c.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in c for c in commands)
  assert "launch/tpu_setup.sh" in ssh[1]
  train = ssh[2]
  assert "suti train --config configs/toy.py --workdir /mnt/fake-bucket/run1 --distributed --config.mesh.fsdp=4" \
      in train
  assert "gcsfuse" not in result.stdout and "mountpoint" not in result.stdout  # no MOUNT_BUCKET, no mount
  assert calls(fakes) == []  # a dry run runs nothing


def test_tpu_pod_runs_gcloud_on_all_workers_and_sends_the_tree(fakes: Path):
  result = run_script("tpu_pod.sh", tpu_env(fakes, DATA="gs://fake-bucket/pairs/*.tar"), "--config.x=a b")
  assert result.returncode == 0, result.stderr
  recorded = calls(fakes)
  assert [c[:5] for c in recorded] == [["gcloud", "compute", "tpus", "tpu-vm", verb]
                                       for verb in ("scp", "ssh", "ssh", "ssh")]
  assert recorded[0][6] == "fake-tpu:suti-jax.tgz"
  train_command = next(a for a in recorded[3] if a.startswith("--command="))
  assert "--config.data.shards=gs://fake-bucket/pairs/\\*.tar --distributed --config.x=a\\ b" in train_command
  with tarfile.open(fakes / "sent.tgz") as tar:
    names = set(tar.getnames())
  assert {"setup.py", "launch/tpu_setup.sh", "configs/toy.py"} <= names
  assert not any(n.startswith((".git/", ".venv/")) or "__pycache__" in n for n in names)
  assert not list(fakes.glob("suti-jax-*.tgz"))  # the local tarball is removed


def test_tpu_pod_train_only_detached(fakes: Path):
  result = run_script("tpu_pod.sh", tpu_env(fakes, STEPS="train", DETACH="1"))
  assert result.returncode == 0, result.stderr
  (call,) = calls(fakes)
  command = next(a for a in call if a.startswith("--command="))
  assert command.startswith("--command=cd suti-jax && source .venv/bin/activate && nohup suti train ")
  assert command.endswith("--distributed > train.log 2>&1 < /dev/null &")


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE", "WORKDIR"])
def test_tpu_pod_needs_its_settings(fakes: Path, missing: str):
  env = tpu_env(fakes)
  del env[missing]
  result = run_script("tpu_pod.sh", env)
  assert result.returncode == 2
  assert result.stderr.startswith(f"tpu_pod.sh: error: set {missing}") and result.stderr.count("\n") == 1
  assert calls(fakes) == []


def test_tpu_pod_rejects_a_url_workdir(fakes: Path):
  result = run_script("tpu_pod.sh", tpu_env(fakes, WORKDIR="gs://fake-bucket/run1", DRY_RUN="1"))
  assert result.returncode == 2
  assert result.stderr.startswith("tpu_pod.sh: error: WORKDIR=gs://fake-bucket/run1 is a URL")
  assert "gcsfuse" in result.stderr and result.stderr.count("\n") == 1
  assert result.stdout == "" and calls(fakes) == []


def worker_command(call: list[str]) -> str:
  return next(a for a in call if a.startswith("--command="))[len("--command="):]


def test_tpu_pod_mount_bucket_dry_run_mounts_on_all_workers(fakes: Path):
  result = run_script("tpu_pod.sh", tpu_env(fakes, DRY_RUN="1", MOUNT_BUCKET="fake-bucket"))
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""  # WORKDIR is under the mount point: no warning
  ssh = [c for c in printed_commands(result.stdout) if c.startswith("gcloud compute tpus tpu-vm ssh fake-tpu")]
  assert len(ssh) == 4  # unpack, setup, mount, train
  assert all("--worker=all" in c for c in ssh)
  assert "MOUNT_BUCKET=fake-bucket bash launch/tpu_setup.sh" in ssh[1]  # which installs gcsfuse
  assert "mountpoint -q /mnt/fake-bucket" in ssh[2] and "sudo mkdir -p /mnt/fake-bucket" in ssh[2]
  assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 fake-bucket /mnt/fake-bucket" in ssh[2]
  assert "--workdir /mnt/fake-bucket/run1" in ssh[3]
  assert calls(fakes) == []


@pytest.mark.parametrize("mounted", [False, True])
def test_tpu_pod_mount_command_runs_gcsfuse_once(fakes: Path, mounted: bool):
  env = tpu_env(fakes, MOUNT_BUCKET="fake-bucket", MOUNT_POINT="/mnt/my point/", STEPS="mount",
                WORKDIR="/mnt/my point/run1", GCSFUSE_FLAGS="--implicit-dirs -o ro")
  result = run_script("tpu_pod.sh", env)
  assert result.returncode == 0, result.stderr
  (call,) = calls(fakes)
  command = worker_command(call)
  (fakes / "calls.log").unlink()
  # What a worker's shell does with the command (fakes for mountpoint, sudo, gcsfuse).
  on_worker = subprocess.run(["bash", "-c", command], env=clean_env(fakes, FAKE_MOUNTED=str(int(mounted))),
                             capture_output=True, text=True, cwd=fakes)
  assert on_worker.returncode == 0, on_worker.stderr
  owner = f"{os.getuid()}:{os.getgid()}"
  expected = [["mountpoint", "-q", "/mnt/my point"]]
  if not mounted:
    expected += [["sudo", "mkdir", "-p", "/mnt/my point"], ["sudo", "chown", owner, "/mnt/my point"],
                 ["gcsfuse", "--implicit-dirs", "-o", "ro", "fake-bucket", "/mnt/my point"]]
  assert calls(fakes) == expected


def test_tpu_pod_train_stops_where_the_bucket_is_not_mounted(fakes: Path):
  env = tpu_env(fakes, MOUNT_BUCKET="fake-bucket", MOUNT_POINT="/mnt/my point", STEPS="train",
                WORKDIR="/mnt/my point/run1")
  result = run_script("tpu_pod.sh", env)
  assert result.returncode == 0, result.stderr
  (call,) = calls(fakes)
  (fakes / "calls.log").unlink()
  on_worker = subprocess.run(["bash", "-c", worker_command(call)], env=clean_env(fakes), capture_output=True,
                             text=True, cwd=fakes)
  assert on_worker.returncode == 1
  assert on_worker.stderr.startswith("/mnt/my point is not mounted on ")
  assert on_worker.stderr.endswith(": run STEPS=mount\n")
  assert calls(fakes) == [["mountpoint", "-q", "/mnt/my point"]]  # suti never started


@pytest.mark.parametrize("setting, message", [
    ({"STEPS": "mount"}, "STEPS has mount but MOUNT_BUCKET is not set"),
    ({"STEPS": "sync,deploy"}, "unknown step 'deploy' in STEPS (sync,setup,mount,train)"),
    ({"MOUNT_BUCKET": "gs://fake-bucket"}, "MOUNT_BUCKET is a bucket name (my-bucket), got 'gs://fake-bucket'"),
])
def test_tpu_pod_bad_steps_and_mounts(fakes: Path, setting: dict[str, str], message: str):
  result = run_script("tpu_pod.sh", tpu_env(fakes, **setting))
  assert result.returncode == 2
  assert result.stderr == f"tpu_pod.sh: error: {message}\n"
  assert calls(fakes) == []


def test_tpu_setup_installs_the_pinned_jax_for_tpu(fakes: Path):
  pinned = re.search(r'"jax==([0-9.]+)"', (REPO / "setup.py").read_text()).group(1)
  result = run_script("tpu_setup.sh", clean_env(fakes, DRY_RUN="1", PYTHON="python3.11"))
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  venv = f"{REPO}/.venv"
  assert commands[0] == f"python3.11 -m venv {venv}" or Path(venv, "bin/python").exists()
  assert f"{venv}/bin/python -m pip install --extra-index-url https://download.pytorch.org/whl/cpu -e '.[dev]'" \
      in commands
  assert any(c.startswith(f"{venv}/bin/python -m pip install 'jax[tpu]=={pinned}'") for c in commands)
  assert "jax.device_count()" in commands[-1]
  assert not any("gcsfuse" in c for c in commands)  # only with MOUNT_BUCKET


@pytest.mark.skipif(shutil.which("gcsfuse") is not None, reason="gcsfuse is installed here: nothing to install")
def test_tpu_setup_installs_gcsfuse_for_a_mount(fakes: Path):
  (fakes / "bin" / "gcsfuse").unlink()  # a worker without it
  result = run_script("tpu_setup.sh", clean_env(fakes, DRY_RUN="1", PYTHON="python3.11", MOUNT_BUCKET="b"))
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  apt_list = next(c for c in commands if "/etc/apt/sources.list.d/gcsfuse.list" in c)
  assert "https://packages.cloud.google.com/apt gcsfuse-" in apt_list
  assert commands.index(apt_list) < commands.index("sudo apt-get update -q") \
      < commands.index("sudo apt-get install -y -q gcsfuse")
  assert "jax.device_count()" in commands[-1]  # the device check stays last
  assert calls(fakes) == []


def test_tpu_setup_keeps_an_installed_gcsfuse(fakes: Path):
  result = run_script("tpu_setup.sh", clean_env(fakes, DRY_RUN="1", PYTHON="python3.11", MOUNT_BUCKET="b"))
  assert result.returncode == 0, result.stderr
  assert "apt-get" not in result.stdout  # the fake gcsfuse is on PATH


# --- GPU, one node ---

def test_gpu_single_node_dry_run(fakes: Path):
  env = clean_env(fakes, DRY_RUN="1", CONFIG="configs/imagen64.py", WORKDIR="/fake/runs/a", GPUS="0,1")
  result = run_script("gpu_single_node.sh", env, "--config.mesh.fsdp=2")
  assert result.returncode == 0, result.stderr
  (command,) = printed_commands(result.stdout)
  assert command == ("env XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
                     " CUDA_VISIBLE_DEVICES=0,1 suti train --config configs/imagen64.py --workdir /fake/runs/a"
                     " --config.mesh.fsdp=2")
  assert "--distributed" not in command  # one process: nothing to join
  assert calls(fakes) == []


def test_gpu_single_node_runs_suti_with_its_environment(fakes: Path):
  # The fake suti records XLA_FLAGS too, through a wrapper that prints it first.
  env = clean_env(fakes, WORKDIR="/fake/runs/a", XLA_FLAGS="--xla_dump_to=/tmp/x", MEM_FRACTION="0.5")
  (fakes / "bin" / "suti").write_text(FAKE_HEADER.replace('"$@"', '"$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$@"'))
  result = run_script("gpu_single_node.sh", env, "--config.train.steps=7", "--config.name=a b")
  assert result.returncode == 0, result.stderr
  assert calls(fakes) == [["suti", "--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=true", "0.5",
                           "train", "--config", "configs/imagen64.py", "--workdir", "/fake/runs/a",
                           "--config.train.steps=7", "--config.name=a b"]]


# --- SLURM ---

def test_sbatch_header():
  directives = re.findall(r"^#SBATCH (\S+)", (LAUNCH / "slurm_multinode.sbatch").read_text(), re.M)
  assert "--ntasks-per-node=1" in directives and "--requeue" in directives
  assert any(d.startswith("--nodes=") for d in directives)
  assert any(d.startswith("--gpus-per-node=") for d in directives)
  assert any(d.startswith("--time=") for d in directives)
  assert any(re.fullmatch(r"--signal=(B:)?\w+@120", d) for d in directives)


def slurm_env(fakes: Path, **extra: str) -> dict[str, str]:
  # VENV points nowhere so the script falls back to the fake `suti` on PATH even where the checkout has a .venv
  # (a CI clone does): the real trainer must never run here.
  return clean_env(fakes, WORKDIR="/shared/runs/b", CONFIG="configs/toy.py", SLURM_JOB_ID="1234",
                   VENV=str(fakes / "no-venv"),
                   SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NTASKS="2", SLURM_GPUS_ON_NODE="4",
                   SLURM_SUBMIT_DIR=str(REPO), **extra)


def test_slurm_dry_run_auto_detection(fakes: Path):
  result = run_script("slurm_multinode.sbatch", slurm_env(fakes, DRY_RUN="1"), "--config.mesh.fsdp=4",
                      cwd=fakes)
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in commands  # else JAX gives each process one GPU
  assert commands[-1] == ("srun --kill-on-bad-exit=1 suti train --config configs/toy.py"
                          " --workdir /shared/runs/b --distributed --config.mesh.fsdp=4")
  assert calls(fakes) == []


def test_slurm_dry_run_explicit_coordinator(fakes: Path):
  result = run_script("slurm_multinode.sbatch", slurm_env(fakes, DRY_RUN="1", LAUNCH="explicit"), cwd=fakes)
  assert result.returncode == 0, result.stderr
  srun = printed_commands(result.stdout)[-1]
  port = 61440 + 1234 % 4096
  assert srun.startswith("srun --kill-on-bad-exit=1 bash -c "
                         "'exec suti train \"$@\" --process-id \"$SLURM_PROCID\"' suti-train")
  assert srun.endswith(f"--config configs/toy.py --workdir /shared/runs/b --coordinator gpu-a01:{port}"
                       " --num-processes 2")
  assert calls(fakes) == [["scontrol", "show", "hostnames", "gpu-a[01-02]"]]


def test_slurm_explicit_task_gets_its_process_id(fakes: Path):
  env = slurm_env(fakes, LAUNCH="explicit", COORDINATOR_PORT="29400")
  result = run_script("slurm_multinode.sbatch", env, "--config.train.steps=3", cwd=fakes)
  assert result.returncode == 0, result.stderr
  suti_call = calls(fakes)[-1]
  assert suti_call == ["suti", "train", "--config", "configs/toy.py", "--workdir", "/shared/runs/b",
                       "--coordinator", "gpu-a01:29400", "--num-processes", "2", "--config.train.steps=3",
                       "--process-id", "1"]


@pytest.mark.parametrize("signal_name, requeued", [("SIGUSR1", True), ("SIGTERM", False)])
def test_slurm_signal_saves_and_requeues_only_at_the_time_limit(fakes: Path, signal_name: str, requeued: bool):
  """USR1 is SLURM's warning before the time limit (--signal=B:USR1@120); TERM is preemption or scancel."""
  env = slurm_env(fakes, FAKE_SRUN_WAIT="1")
  proc = subprocess.Popen(["bash", str(LAUNCH / "slurm_multinode.sbatch")], env=env, cwd=fakes,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  signals = fakes / "srun-signals"
  deadline = time.monotonic() + 60
  while not signals.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(getattr(signal, signal_name))
  _, stderr = proc.communicate(timeout=60)
  assert signals.read_text().split() == ["started", "TERM"]  # the trainer got SIGTERM (and saves)
  assert f"{signal_name[3:]}: SIGTERM to the trainer" in stderr
  assert (calls(fakes)[-1] == ["scontrol", "requeue", "1234"]) == requeued
  assert proc.returncode == 143  # the trainer's exit status


def test_slurm_passes_on_the_trainer_status_without_requeue(fakes: Path):
  result = run_script("slurm_multinode.sbatch", slurm_env(fakes, FAKE_SUTI_STATUS="3"), cwd=fakes)
  assert result.returncode == 3
  assert [c[0] for c in calls(fakes)] == ["srun", "suti"]  # no scontrol requeue


def test_slurm_explicit_outside_slurm_is_one_clear_error(fakes: Path):
  env = clean_env(fakes, WORKDIR="/w", CONFIG="configs/toy.py", LAUNCH="explicit")
  result = run_script("slurm_multinode.sbatch", env)
  assert result.returncode == 2
  assert result.stderr == ("slurm_multinode.sbatch: error: LAUNCH=explicit needs SLURM_JOB_NODELIST "
                           "(run it under sbatch)\n")


# --- local CPU ---

def test_local_cpu_dry_run_prints_toyweb_then_train(fakes: Path):
  root = fakes / "local"
  result = run_script("local_cpu.sh", clean_env(fakes, DRY_RUN="1", ROOT=str(root), STEPS="20"))
  assert result.returncode == 0, result.stderr
  toyweb, train = printed_commands(result.stdout)
  assert toyweb == f"suti data toyweb --out {root}/toyweb --pages 300 --seed 0 --image-size 16 --shard-size 100"
  assert train == (f"suti train --config configs/toy.py --workdir {root}/train "
                   f"'--config.data.shards={root}/toyweb/*.tar' --config.train.steps=20 "
                   "--config.train.log_every=10 --config.train.checkpoint_every=100")
  assert calls(fakes) == [] and not root.exists()


def test_local_cpu_simulated_devices_and_two_processes(fakes: Path):
  root = fakes / "local"
  env = clean_env(fakes, DRY_RUN="1", ROOT=str(root), DEVICES="4", FSDP="2", PROCESSES="2", PORT="23456")
  result = run_script("local_cpu.sh", env, "--no-progress")
  assert result.returncode == 0, result.stderr
  trains = [c for c in printed_commands(result.stdout) if " suti train " in c]
  assert len(trains) == 2
  for i, command in enumerate(trains):
    assert command.startswith("env XLA_FLAGS=--xla_force_host_platform_device_count=4 "
                              "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo suti train --config configs/toy.py")
    assert command.endswith("--config.mesh.data=-1 --config.mesh.fsdp=2 --distributed --coordinator "
                            f"localhost:23456 --num-processes 2 --process-id {i} --no-progress "
                            f"> {root}/process-{i}.log 2>&1 &")


def test_local_cpu_runs_and_reuses_the_toy_web(fakes: Path):
  root = fakes / "local"
  env = clean_env(fakes, ROOT=str(root), PAGES="10", STEPS="5", PROCESSES="2")
  first = run_script("local_cpu.sh", env)
  assert first.returncode == 0, first.stderr
  second = run_script("local_cpu.sh", env)
  assert second.returncode == 0, second.stderr
  assert "toy web already in" in second.stdout
  recorded = calls(fakes)
  assert [c[1:3] for c in recorded].count(["data", "toyweb"]) == 1
  trains = [c for c in recorded if c[1] == "train"]
  assert len(trains) == 4  # two processes, two runs
  assert sorted(c[-1] for c in trains) == ["0", "0", "1", "1"]
  assert all(f"--config.data.shards={root}/toyweb/*.tar" in c and "--config.train.steps=5" in c for c in trains)


@pytest.mark.parametrize("setting, message", [
    ({"BATCH": "30", "DEVICES": "4"}, "BATCH=30 does not divide by DEVICES x PROCESSES = 4"),
    ({"PROCESSES": "two"}, "PROCESSES must be a positive integer, got 'two'"),
])
def test_local_cpu_bad_settings(fakes: Path, setting: dict[str, str], message: str):
  result = run_script("local_cpu.sh", clean_env(fakes, ROOT=str(fakes / "local"), **setting))
  assert result.returncode == 2
  assert result.stderr == f"local_cpu.sh: error: {message}\n"
  assert calls(fakes) == []
