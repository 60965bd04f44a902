"""Meshes and the one logical-axis rules table: the only place PartitionSpecs are written.

Mesh axes: 'data' (pure data parallelism), 'fsdp' (data parallelism whose members also shard
the parameters and optimizer state), 'tensor' (Megatron-style model parallelism over heads and
MLP width). Parameters carry logical axis names (rlhf_jax.models.layers.param); the rules below
map each name to mesh axes. Meshes use AxisType.Auto: jit's partitioner propagates shardings
from the annotated parameters and batch; model code annotates one activation, the embedding
lookup's rows (constrain_rows).
"""
import functools
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the leading (batch) dimension of every input

LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # A LoRA adapter's rank (tens): too small to be worth splitting. Its other axes are the
    # adapted projection's, so adapters shard like their weights (models/layers.py: LoRA).
    "lora_rank": None,
    # The leading axis of a stacked layer stack (models/layer_stack.py): each device keeps
    # every layer's share, so the scan over layers needs no communication to index it.
    "layers": None,
}


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Fills at most one -1 with the remaining devices; checks the product."""
  sizes = [data, fsdp, tensor]
  flags = "--mesh_data/--mesh_fsdp/--mesh_tensor"
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of {flags} may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{flags}: mesh sizes must be positive or -1 (fill), got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed sizes "
                       f"{sizes} ({flags}); pick sizes whose product divides {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {flags} = {sizes} uses {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are available; use -1 for one axis to fill the rest")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all). Pass a sub-list of
  devices for a smaller mesh, e.g. devices=jax.devices()[:1] for an unsharded baseline."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes: tuple, shape: tuple, mesh: Mesh) -> P:
  """PartitionSpec for a parameter. A dimension whose size is not divisible by its mesh axes
  stays replicated (e.g. 2 kv heads on a 4-way tensor axis), so every preset runs on every mesh."""
  spec = []
  used = set()
  for name, dim in zip(axes, shape):
    if name not in LOGICAL_RULES:
      raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
    mesh_axes = LOGICAL_RULES[name]
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or size == 1 or dim % size:
      spec.append(None)
    else:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def logical_axes(state: nnx.State):
  """Pure-dict pytree (same structure as state.to_pure_dict()) of logical-axis tuples."""
  tree: dict = {}
  for path, var in state.flat_state():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = var.get_metadata()["logical_axes"]
  return tree


def param_shardings(state: nnx.State, mesh: Mesh):
  """NamedShardings for every parameter of an (abstract) module state, as a pure dict."""
  axes = logical_axes(state)
  shapes = state.to_pure_dict()
  return jax.tree.map(lambda ax, x: NamedSharding(mesh, logical_to_spec(ax, x.shape, mesh)),
                      axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def init_sharded(factory: Callable[[nnx.Rngs], nnx.Module], key, mesh: Mesh):
  """Builds a module's parameters directly in their shardings: eval_shape -> shardings ->
  jit(init, out_shardings). No host ever holds a full unsharded copy.

  Returns (graphdef, params as a pure dict, the params' shardings)."""
  abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh)

  def init(key):
    return nnx.split(factory(nnx.Rngs(key)))[1].to_pure_dict()

  init = jax.jit(init, out_shardings=shardings)
  return graphdef, init(key), shardings


def traced_on(fn: Callable, mesh: Mesh) -> Callable:
  """fn, traced with `mesh` as the abstract mesh, so that constrain_rows inside it applies (jit
  under an Auto mesh traces with no mesh of its own)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def constrain_rows(x):
  """Pins an activation's leading (batch) dimension to the data axes when traced on a mesh
  (traced_on) whose data axes divide it; otherwise x as is.

  The one activation the model annotates: the embedding lookup. Its table is sharded on
  `embed` over fsdp, so the partitioner would shard the lookup's output on d_model and gather
  the batch onto every device: under fsdp each device then held the whole batch's activations
  (XLA warns of an "involuntary full rematerialization"; the 1B DPO step on a v5e-8 planned
  54.5 GiB per device instead of 23)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  rows = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if rows == 1 or x.shape[0] % rows:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device of the mesh holds the whole array (scalars, metrics, counters)."""
  return NamedSharding(mesh, P())


def mesh_of(params) -> Mesh:
  """The mesh a pytree of arrays (a model's params) lives on: their NamedSharding's, or a
  mesh of the devices they sit on (numpy leaves: the first device)."""
  leaf = jax.tree.leaves(params)[0]
  where = getattr(leaf, "sharding", None)
  if isinstance(where, NamedSharding):
    return where.mesh
  return make_mesh(devices=sorted(where.device_set, key=lambda d: d.id) if where is not None
                   else jax.devices()[:1])


@functools.lru_cache(maxsize=None)  # asked for every leaf of every batch: cache the answer
def process_rows(mesh: Mesh, global_rows: int) -> slice:
  """The rows of a `global_rows`-row batch that this process's devices hold under
  batch_sharding(mesh): the rows it reads, samples, scores and passes to shard_batch. With
  several processes each holds one contiguous block (all rows in one process). A batch the
  data axes do not divide is replicated (shard_global), so every process holds all of it."""
  if global_rows % int(np.prod([mesh.shape[a] for a in BATCH_AXES])):
    return slice(0, global_rows)
  index = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  blocks = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                   for s in index.values()})
  lo, hi = blocks[0][0], blocks[-1][1]
  if sum(b - a for a, b in blocks) != hi - lo:
    raise ValueError(f"this process's devices hold rows {blocks} of the batch, not one "
                     f"contiguous block; build the mesh from jax.devices() in their order "
                     f"(sharding.make_mesh) so each process owns whole rows")
  return slice(lo, hi)


def shard_batch(batch, mesh: Mesh, *, global_rows: int | None = None):
  """Places a host batch (pytree of numpy arrays holding THIS PROCESS's rows,
  process_rows(mesh, global_rows)) on the mesh as global arrays. global_rows defaults to the
  local rows times the number of processes' row blocks (all rows in one process)."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    rows = global_rows or _global_rows(mesh, len(x))
    return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

  return jax.tree.map(put, batch)


def _global_rows(mesh: Mesh, local_rows: int) -> int:
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  probe = process_rows(mesh, shards)  # how many of the batch's shards this process holds
  return local_rows * shards // (probe.stop - probe.start)


def shard_global(batch, mesh: Mesh):
  """Places a host batch that every process holds WHOLE (the same global rows everywhere,
  e.g. a prompt list drawn from a shared seed) on the mesh, rows over the data axes; a batch
  whose rows the data axes do not divide (4 prompts on 8 devices) is replicated instead."""
  rows_split = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

  def put(x):
    x = np.asarray(x)
    where = batch_sharding(mesh) if len(x) % rows_split == 0 else replicated(mesh)
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])

  return jax.tree.map(put, batch)


def to_host(x) -> np.ndarray:
  """A global array as one numpy array on every process (a cross-process gather when other
  processes hold some of it; a plain copy in one process)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding.is_fully_replicated:  # every process holds all of it (metrics, scalars)
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def gather_rows(x_local, mesh: Mesh, global_rows: int) -> np.ndarray:
  """Every process's rows process_rows(mesh, global_rows) of a host value (a reward, a
  verifier's verdict) assembled into the global rows, on every process: how a value computed on
  local rows becomes global, identical everywhere."""
  x_local = np.asarray(x_local)
  if jax.process_count() == 1:
    return x_local
  mine = process_rows(mesh, global_rows)
  starts = np.asarray(multihost_utils.process_allgather(np.int64(mine.start)))
  parts = np.asarray(multihost_utils.process_allgather(x_local, tiled=False))
  out = np.empty((global_rows, *x_local.shape[1:]), x_local.dtype)
  for start, part in zip(starts, parts):  # processes sharing a block (tensor axis) agree
    out[start:start + len(part)] = part
  return out
