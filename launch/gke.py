"""GKE: one experiment command on every host of a TPU slice or of N GPU nodes, as a JobSet
(one Indexed Job of N pods), applied with kubectl; or the same run as an `xpk workload create`.

    python -m launch.gke apply --name=sft-v5e --image=IMAGE --tpu_type=v5litepod-16 \
        -- python -m experiments.sft --flagfile=experiments/configs/sft_tiny.flags
    python -m launch.gke apply --name=sft-h100 --image=IMAGE --gpu_type=nvidia-h100-80gb \
        --num_nodes=2 --gpus_per_node=8 -- python -m experiments.sft --flagfile=...
    python -m launch.gke logs   --name=sft-v5e       # every pod's output, prefixed by pod
    python -m launch.gke status --name=sft-v5e
    python -m launch.gke delete --name=sft-v5e
    python -m launch.gke xpk --name=sft-v5e --image=IMAGE --tpu_type=v5litepod-16 \
        --cluster=C --project=P --zone=Z -- python -m experiments.sft --flagfile=...

Add --dry_run to print the manifest and the commands instead. TPU pods need no coordinator
flags: GKE gives each pod of a TPU slice TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, from which
jax.distributed.initialize finds its peers. GPU pods get them explicitly: the coordinator is
pod 0 under the JobSet's headless service (<name>-workers-0-0.<name>), the process id the pod's
completion index ($JOB_COMPLETION_INDEX). The image must hold this repository, installed with
`pip install -e ".[tpu]"` or `".[cuda]"`, at --workdir_in_image (docs/launch.md).
"""
import dataclasses
import shlex
import sys

from launch import common, tpu_types, yaml_emit
from launch.common import Command, LaunchError, Note, WriteFile
from rlhf_jax.pipeline.config import flag

ACTIONS = ("apply", "logs", "status", "delete", "xpk")
REPLICATED_JOB = "workers"
NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"

USAGE = ("python -m launch.gke apply --name=sft-v5e --image=IMAGE --tpu_type=v5litepod-16 -- "
         "python -m experiments.sft --flagfile=experiments/configs/sft_tiny.flags")


@dataclasses.dataclass(frozen=True)
class GkeConfig:
  action: str = flag("", "what to do (the first argument): " + ", ".join(ACTIONS))
  name: str = flag("", "the JobSet's name (lowercase, digits, '-'); pods are "
                       "<name>-workers-0-<i>")
  namespace: str = flag("default", "the Kubernetes namespace")
  image: str = flag("", "apply/xpk: the container image holding this repository, installed")
  workdir_in_image: str = flag("/app", "apply/xpk: the repository's directory in the image "
                                       "(the command runs there)")
  tpu_type: str = flag("", "a TPU slice, e.g. " + tpu_types.EXAMPLES + "; or use --gpu_type")
  topology: str = flag("", "the TPU slice's topology, e.g. 4x4 or 2x2x4; default: the usual "
                           "one for its size")
  gpu_type: str = flag("", "GPU nodes' cloud.google.com/gke-accelerator label, e.g. "
                           "nvidia-h100-80gb; or use --tpu_type")
  num_nodes: int = flag(1, "GPU: how many nodes (one pod, one JAX process each)")
  gpus_per_node: int = flag(8, "GPU: GPUs per node, all driven by the node's one process")
  coordinator_port: int = flag(8476, "GPU: the port jax.distributed's coordinator listens on "
                                     "in pod 0")
  max_restarts: int = flag(0, "how often the JobSet restarts all pods after one fails (a "
                              "restarted run resumes from its latest checkpoint)")
  cluster: str = flag("", "xpk: the GKE cluster (created with xpk)")
  project: str = flag("", "xpk: the Google Cloud project")
  zone: str = flag("", "xpk: the cluster's zone")
  dry_run: bool = flag(False, "print the manifest and the commands instead of running them")

  def __post_init__(self):
    common.require_action(self.action, ACTIONS,
                          "give an action first: python -m launch.gke <action> --name=...")
    common.require(self.name, "name", "sft-v5e")
    # Pod hostnames <name>-workers-<job>-<pod> must fit a 63-character DNS label.
    common.check_pattern(self.name, r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", "name",
                         "up to 40 lowercase letters, digits and '-', starting with a letter")
    common.check_pattern(self.namespace, r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", "namespace",
                         "a Kubernetes namespace such as default")
    if self.action not in ("apply", "xpk"):
      return
    common.require(self.image, "image", "us-docker.pkg.dev/my-project/rlhf/rlhf_jax:latest")
    if any(c.isspace() for c in self.image):
      raise LaunchError(f"--image={self.image!r} has whitespace: pass the image reference only")
    if bool(self.tpu_type) == bool(self.gpu_type):
      raise LaunchError("pass exactly one of --tpu_type (e.g. --tpu_type=v5litepod-16) and "
                        "--gpu_type (e.g. --gpu_type=nvidia-h100-80gb)")
    if self.tpu_type:
      tpu_types.topology(tpu_types.parse_accelerator_type(self.tpu_type, "tpu_type"),
                         self.topology)
    else:
      common.check_pattern(self.gpu_type, r"nvidia-[a-z0-9-]+", "gpu_type",
                           "a GKE accelerator label such as nvidia-h100-80gb or nvidia-l4")
      if self.num_nodes < 1 or self.gpus_per_node < 1:
        raise LaunchError("--num_nodes and --gpus_per_node must be at least 1")
    if not 0 < self.coordinator_port < 65536:
      raise LaunchError(f"--coordinator_port={self.coordinator_port} is not a port")
    if self.max_restarts < 0:
      raise LaunchError("--max_restarts must be 0 or more")
    common.check_pattern(self.workdir_in_image, r"/[A-Za-z0-9._/-]*", "workdir_in_image",
                         "an absolute path such as /app")
    if self.action == "xpk":
      common.require(self.cluster, "cluster", "my-cluster")
      common.require(self.project, "project", "my-project")
      common.require(self.zone, "zone", "us-west4-a")


@dataclasses.dataclass(frozen=True)
class Shape:
  """What each pod gets: how many pods, the node selector and the accelerator resource."""
  pods: int
  node_selector: dict
  resource: str
  per_pod: int


def shape(cfg: GkeConfig) -> Shape:
  if cfg.tpu_type:
    tpu = tpu_types.parse_accelerator_type(cfg.tpu_type, "tpu_type")
    selector = {"cloud.google.com/gke-tpu-accelerator": tpu.generation.gke_accelerator,
                "cloud.google.com/gke-tpu-topology": tpu_types.topology(tpu, cfg.topology)}
    return Shape(tpu.hosts, selector, "google.com/tpu", tpu.chips_per_host)
  return Shape(cfg.num_nodes, {"cloud.google.com/gke-accelerator": cfg.gpu_type},
               "nvidia.com/gpu", cfg.gpus_per_node)


def coordinator_host(cfg: GkeConfig) -> str:
  """Pod 0's DNS name under the JobSet's headless service (its subdomain is the JobSet name)."""
  return f"{cfg.name}-{REPLICATED_JOB}-0-0.{cfg.name}"


def container_command(cfg: GkeConfig, command: list[str]) -> list[str]:
  """TPU: the experiment command itself. GPU: the command plus the coordinator flags, in bash
  so that the process id is read from the pod's $JOB_COMPLETION_INDEX. Every `$` is doubled:
  Kubernetes reads $(NAME) in a command as its own variable reference and $$ as a `$`."""
  if cfg.tpu_type:
    argv = list(command)
  else:
    flags = [f"--coordinator_address={coordinator_host(cfg)}:{cfg.coordinator_port}",
             f"--num_processes={cfg.num_nodes}"]
    script = (f"exec {shlex.join([*command, *flags])} "
              '--process_id="${JOB_COMPLETION_INDEX}"')
    argv = ["bash", "-c", script]
  return [arg.replace("$", "$$") for arg in argv]


def jobset(cfg: GkeConfig, command: list[str]) -> dict:
  """The JobSet manifest: one Job of `pods` Indexed pods, failing as a whole (backoffLimit 0),
  restarted as a whole up to --max_restarts times."""
  s = shape(cfg)
  container = {
      "name": "experiment",
      "image": cfg.image,
      "workingDir": cfg.workdir_in_image,
      "command": container_command(cfg, command),
      "resources": {"limits": {s.resource: s.per_pod}},
  }
  pod_spec = {
      "restartPolicy": "Never",
      "nodeSelector": s.node_selector,
      # GKE taints accelerator nodes; the toleration lets these pods onto them.
      "tolerations": [{"key": s.resource, "operator": "Exists", "effect": "NoSchedule"}],
      "containers": [container],
  }
  if cfg.gpu_type:
    # The pod's process drives all the node's GPUs. Stated, so that jax.distributed does not
    # go looking for a cluster to read them from (it would warn that the `kubernetes` package
    # is missing).
    container["env"] = [{"name": "JAX_LOCAL_DEVICE_IDS",
                         "value": ",".join(str(i) for i in range(cfg.gpus_per_node))}]
    # NCCL and data loaders share memory through /dev/shm, 64 MB by default in a pod.
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    pod_spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
  metadata = {"name": cfg.name, "namespace": cfg.namespace}
  if cfg.tpu_type:
    # All pods of the Job on one node pool, i.e. one TPU slice.
    metadata["annotations"] = {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": metadata,
      "spec": {
          "failurePolicy": {"maxRestarts": cfg.max_restarts},
          # Pod hostnames <name>-workers-0-<i>.<name>, resolvable before the pods are ready.
          "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
          "replicatedJobs": [{
              "name": REPLICATED_JOB,
              "replicas": 1,
              "template": {"spec": {
                  "parallelism": s.pods,
                  "completions": s.pods,
                  "completionMode": "Indexed",
                  "backoffLimit": 0,
                  "template": {"spec": pod_spec},
              }},
          }],
      },
  }


def _kubectl(cfg: GkeConfig, *args: str) -> Command:
  return Command(("kubectl", *args, "-n", cfg.namespace))


def _logs(cfg: GkeConfig, pods: int = 64) -> Command:
  # --max-log-requests: kubectl follows at most 5 pods unless told more.
  return _kubectl(cfg, "logs", "-f", "--prefix", f"--max-log-requests={pods}",
                  "-l", f"{NAME_LABEL}={cfg.name}")


def apply(cfg: GkeConfig, command: list[str]) -> list[common.Step]:
  common.require_command(command, USAGE)
  text = yaml_emit.dump(jobset(cfg, command))
  common.check_heredoc_safe(text, "the manifest")
  path = common.GENERATED_DIR / f"{cfg.name}.jobset.yaml"
  pods = shape(cfg).pods
  then = "\n".join("  " + step.render() for step in (
      _kubectl(cfg, "get", "pods", "-l", f"{NAME_LABEL}={cfg.name}", "-w"),
      _logs(cfg, pods), _kubectl(cfg, "delete", "jobset", cfg.name)))
  return [WriteFile(path, text), _kubectl(cfg, "apply", "-f", str(path)),
          Note(f"{pods} pod{'s' if pods > 1 else ''}; then watch them, follow every pod's "
               f"output, and delete the JobSet when done:\n{then}\n"
               "the same run through xpk: `python -m launch.gke xpk` with these flags and "
               "--cluster, --project, --zone")]


def xpk_device_type(cfg: GkeConfig) -> str:
  """xpk names GPU node types like the GKE label without 'nvidia-', plus the GPU count."""
  return f"{cfg.gpu_type.removeprefix('nvidia-')}-{cfg.gpus_per_node}"


def xpk(cfg: GkeConfig, command: list[str]) -> list[common.Step]:
  """`xpk workload create`: xpk builds a JobSet like the one above. On GPUs it sets
  JAX_COORDINATOR_ADDRESS/PORT, NNODES and NODE_RANK in each pod, passed on as the coordinator
  flags (without double quotes: xpk pastes the command into its manifest between them)."""
  common.require_command(command, USAGE)
  script = f"cd {cfg.workdir_in_image} && {shlex.join(command)}"
  argv = ["xpk", "workload", "create", f"--cluster={cfg.cluster}", f"--workload={cfg.name}",
          f"--docker-image={cfg.image}"]
  if cfg.tpu_type:
    argv += [f"--tpu-type={cfg.tpu_type}", "--num-slices=1"]
  else:
    script += (" --coordinator_address=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT}"
               " --num_processes=${NNODES} --process_id=${NODE_RANK}")
    argv += [f"--device-type={xpk_device_type(cfg)}", f"--num-nodes={cfg.num_nodes}"]
  if '"' in script:
    raise LaunchError("xpk pastes --command into its YAML between double quotes, so an "
                      "argument with a quote cannot go through it: drop the quote, or use "
                      "`python -m launch.gke apply`")
  argv += [f"--command={script}", f"--project={cfg.project}", f"--zone={cfg.zone}"]
  return [Command(tuple(argv))]


def build(action: str | None, flag_argv: list[str], command: list[str]):
  """(steps, dry_run) for `python -m launch.gke <action> <flags> [-- command]`."""
  if action is not None:
    flag_argv = [f"--action={action}", *flag_argv]
  cfg = common.parse_flags(GkeConfig, flag_argv)
  if cfg.action == "apply":
    return apply(cfg, command), cfg.dry_run
  if cfg.action == "xpk":
    return xpk(cfg, command), cfg.dry_run
  common.refuse_command(command, cfg.action)
  if cfg.action == "logs":
    steps = [_logs(cfg)]
  elif cfg.action == "status":
    steps = [_kubectl(cfg, "get", "jobset", cfg.name),
             _kubectl(cfg, "get", "pods", "-l", f"{NAME_LABEL}={cfg.name}", "-o", "wide")]
  else:
    steps = [_kubectl(cfg, "delete", "jobset", cfg.name)]
  return steps, cfg.dry_run


if __name__ == "__main__":
  sys.exit(common.main(build, doc=__doc__, config_cls=GkeConfig))
