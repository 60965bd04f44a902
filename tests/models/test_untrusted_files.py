"""Untrusted files: a model directory is read from safetensors only, never unpickled (a
pickle can run code), and a chat template cannot reach Python internals (tests/data/
test_chat.py: test_raise_exception_and_sandbox)."""
import builtins
import json
import pickle

import pytest

from rlhf_jax.models import hf
from rlhf_jax.models.config import preset
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.sharding import make_mesh


class _Payload:
  """Unpickling this creates `marker`: the proof that a pickle was loaded."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return builtins.open, (self.marker, "w")


@pytest.fixture
def pickled_model(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(preset("nano"))))
  marker = tmp_path / "unpickled"
  (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
  return tmp_path, marker


def test_a_pickle_checkpoint_is_refused_without_being_loaded(pickled_model):
  directory, marker = pickled_model
  with pytest.raises(FileNotFoundError, match="only safetensors checkpoints import"):
    load_hf_model(directory, make_mesh())
  assert not marker.exists()


def test_the_payload_would_have_run(pickled_model):
  """The marker is a real test of the above: loading the pickle does create it."""
  directory, marker = pickled_model
  with open(directory / "pytorch_model.bin", "rb") as f:
    pickle.load(f).close()
  assert marker.exists()
