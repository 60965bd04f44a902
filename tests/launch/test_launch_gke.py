"""launch.gke: the JobSet manifests (TPU slice and GPU nodes), the kubectl and xpk commands,
and the errors for bad input."""
import os
import re
import subprocess

import pytest

import launch_testing as lt
from launch import common, gke

SFT = ["python", "-m", "experiments.sft", "--flagfile=experiments/configs/sft_tiny.flags"]
TPU = ["apply", "--name=sft-v5e", "--image=us-docker.pkg.dev/p/r/rlhf:1",
       "--tpu_type=v5litepod-16"]
GPU = ["apply", "--name=sft-h100", "--image=us-docker.pkg.dev/p/r/rlhf:1",
       "--gpu_type=nvidia-h100-80gb", "--num_nodes=2", "--gpus_per_node=8"]


pytestmark = pytest.mark.usefixtures("nothing_runs")  # tests/launch/conftest.py


def kubernetes_expand(arg: str) -> str:
  """What a container receives of a manifest's command argument: Kubernetes reads $(NAME) as
  a variable and $$ as `$`. The launcher's arguments must have no $(NAME) left to expand."""
  assert not re.search(r"(?<!\$)(\$\$)*\$\(", arg), arg
  return arg.replace("$$", "$")


def manifest(argv: list[str]) -> tuple[str, str]:
  out = lt.dry_run(gke.build, argv)
  [(path, text)] = lt.files(out).items()
  return out, text


def test_tpu_slice_jobset():
  out, text = manifest([*TPU, "--", *SFT])
  path = common.GENERATED_DIR / "sft-v5e.jobset.yaml"
  assert lt.commands(out) == [f"mkdir -p {path.parent}", f"kubectl apply -f {path} -n default"]
  for line in [
      "kind: JobSet",
      "    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool",
      "          parallelism: 4",  # v5litepod-16: 16 chips, 4 hosts of 4
      "          completions: 4",
      "          completionMode: Indexed",
      "                cloud.google.com/gke-tpu-accelerator: tpu-v5-lite-podslice",
      '                cloud.google.com/gke-tpu-topology: "4x4"',
      "                      google.com/tpu: 4",
  ]:
    assert line in text.splitlines(), line
  spec = gke.jobset(lt_config(TPU), SFT)["spec"]["replicatedJobs"][0]["template"]["spec"]
  [container] = spec["template"]["spec"]["containers"]
  # The container runs the experiment command itself; JAX reads TPU_WORKER_ID/HOSTNAMES.
  assert [kubernetes_expand(a) for a in container["command"]] == SFT
  assert "--coordinator_address" not in text


def lt_config(argv: list[str]) -> gke.GkeConfig:
  action, flags, _ = common.split_argv(argv)
  return common.parse_flags(gke.GkeConfig, [f"--action={action}", *flags])


def test_gpu_jobset_passes_coordinator_and_completion_index():
  hard = ["it's $HOME", "$$ and $(X)"]  # reach the process as typed, past Kubernetes and bash
  _, text = manifest([*GPU, "--", "printf", "%s\\n", *hard])
  assert "                cloud.google.com/gke-accelerator: nvidia-h100-80gb" in text
  assert "                      nvidia.com/gpu: 8" in text
  assert "          parallelism: 2" in text
  pod = gke.jobset(lt_config(GPU), ["printf", "%s\\n", *hard])[
      "spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  # All of the node's GPUs for its one process, stated so that JAX looks for no cluster.
  assert pod["containers"][0]["env"] == [{"name": "JAX_LOCAL_DEVICE_IDS",
                                          "value": "0,1,2,3,4,5,6,7"}]
  bash, dash_c, script = (kubernetes_expand(a) for a in pod["containers"][0]["command"])
  assert (bash, dash_c) == ("bash", "-c")
  # Run the pod's script as pod 1 would, with printf standing in for the experiment.
  ran = lt._run(["bash", "-c", script], capture_output=True, text=True, check=True,
                env={**os.environ, "JOB_COMPLETION_INDEX": "1"})
  assert ran.stdout.splitlines() == [
      *hard, "--coordinator_address=sft-h100-workers-0-0.sft-h100:8476",
      "--num_processes=2", "--process_id=1"]


def test_manifest_parses_back_as_yaml():
  yaml = pytest.importorskip("yaml")  # not a dependency; checked where it is installed
  for argv in (TPU, GPU):
    _, text = manifest([*argv, "--", *SFT])
    assert yaml.safe_load(text) == gke.jobset(lt_config(argv), SFT)


def test_kubectl_follow_status_delete():
  name = ["--name=sft-v5e", "--namespace=team"]
  assert lt.commands(lt.dry_run(gke.build, ["logs", *name])) == [
      "kubectl logs -f --prefix --max-log-requests=64 "
      "-l jobset.sigs.k8s.io/jobset-name=sft-v5e -n team"]
  assert lt.commands(lt.dry_run(gke.build, ["status", *name])) == [
      "kubectl get jobset sft-v5e -n team",
      "kubectl get pods -l jobset.sigs.k8s.io/jobset-name=sft-v5e -o wide -n team"]
  assert lt.commands(lt.dry_run(gke.build, ["delete", *name])) == [
      "kubectl delete jobset sft-v5e -n team"]


def test_xpk_recipes():
  where = ["--cluster=rlhf", "--project=my-proj", "--zone=us-west4-a"]
  [tpu] = lt.commands(lt.dry_run(gke.build, ["xpk", *TPU[1:], *where, "--", *SFT]))
  assert lt.words(tpu) == [
      "xpk", "workload", "create", "--cluster=rlhf", "--workload=sft-v5e",
      "--docker-image=us-docker.pkg.dev/p/r/rlhf:1", "--tpu-type=v5litepod-16",
      "--num-slices=1",
      "--command=cd /app && python -m experiments.sft "
      "--flagfile=experiments/configs/sft_tiny.flags",
      "--project=my-proj", "--zone=us-west4-a"]
  [gpu] = lt.commands(lt.dry_run(gke.build, ["xpk", *GPU[1:], *where, "--", *SFT]))
  words = lt.words(gpu)
  assert "--device-type=h100-80gb-8" in words and "--num-nodes=2" in words
  assert words[words.index("--num-nodes=2") + 1] == (
      "--command=cd /app && python -m experiments.sft "
      "--flagfile=experiments/configs/sft_tiny.flags "
      "--coordinator_address=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT} "
      "--num_processes=${NNODES} --process_id=${NODE_RANK}")


@pytest.mark.parametrize("argv, message", [
    (["apply", "--name=a", "--image=i", "--", *SFT], "exactly one of --tpu_type"),
    (["apply", "--name=a", "--image=i", "--tpu_type=v4-32", "--gpu_type=nvidia-l4", "--",
      *SFT], "exactly one of --tpu_type"),
    (["apply", "--name=a", "--tpu_type=v4-32", "--", *SFT], "--image is required"),
    (["apply", "--name=a", "--image=i", "--tpu_type=v4-32", "--topology=4x4", "--", *SFT],
     "v4 topologies are AxBxC"),
    (["apply", "--name=a", "--image=i", "--tpu_type=v4-32", "--topology=2x2x2", "--", *SFT],
     "holds 8 chips but v4-32 has 16"),
    (["apply", "--name=a", "--image=i", "--tpu_type=v5e-16", "--", *SFT], "v5litepod-16"),
    (["apply", "--name=a", "--image=i", "--gpu_type=h100", "--", *SFT], "--gpu_type='h100'"),
    (["apply", "--name=Sft", "--image=i", "--tpu_type=v4-32", "--", *SFT], "--name='Sft'"),
    (["apply", "--name=" + "a" * 41, "--image=i", "--tpu_type=v4-32", "--", *SFT],
     "up to 40"),
    (["apply", "--name=a", "--image=i", "--tpu_type=v4-32"], "no experiment command"),
    (["xpk", "--name=a", "--image=i", "--tpu_type=v4-32", "--", *SFT], "--cluster is required"),
    (["xpk", "--name=a", "--image=i", "--tpu_type=v4-32", "--cluster=c", "--project=p",
      "--zone=z", "--", *SFT, "--note=it's"], "an argument with a quote cannot go through"),
    (["delete", "--name=a", "--", *SFT], "`delete` takes no command"),
    (["launch", "--name=a"], "give an action first"),
])
def test_bad_input_is_refused_before_anything_runs(argv, message, capsys, monkeypatch,
                                                   tmp_path):
  monkeypatch.setattr(common, "GENERATED_DIR", tmp_path)
  assert common.main(gke.build, argv) == 2
  assert not list(tmp_path.iterdir())
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err, err


def test_without_dry_run_the_manifest_is_written_then_applied(monkeypatch, tmp_path):
  monkeypatch.setattr(common, "GENERATED_DIR", tmp_path / "gen")
  ran = []
  monkeypatch.setattr(subprocess, "run", lambda argv, check: ran.append(list(argv)))
  assert common.main(gke.build, [*TPU, "--", *SFT]) == 0
  path = tmp_path / "gen" / "sft-v5e.jobset.yaml"
  assert ran == [["kubectl", "apply", "-f", str(path), "-n", "default"]]
  assert "google.com/tpu: 4" in path.read_text()


def test_help_lists_every_flag(capsys):
  assert common.main(gke.build, ["apply", "--help"], doc=gke.__doc__,
                     config_cls=gke.GkeConfig) == 0
  out = capsys.readouterr().out
  assert out.startswith("GKE: one experiment command")
  assert "  --gpu_type (default ''): GPU nodes' cloud.google.com/gke-accelerator label" in out
  assert "  --dry_run (default false): " in out
