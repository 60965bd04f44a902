"""Host-side pieces of Nash-MD-PG (rlhf_jax.rl.algorithms.nash_md): the leave-one-out baseline and
the within-group (response, opponent) pairs, against explicit loops."""
import numpy as np
import pytest

from rlhf_jax.rl.algorithms import nash_md


@pytest.mark.parametrize("group_size", [None, 2, 3])
def test_leave_one_out_baseline_is_the_mean_of_the_others_in_the_group(group_size):
  s = np.random.default_rng(0).normal(size=6)
  g = len(s) if group_size is None else group_size
  want = [np.mean([s[k] for k in range(i - i % g, i - i % g + g) if k != i])
          for i in range(len(s))]
  np.testing.assert_allclose(nash_md.leave_one_out_baseline(s, group_size), want, rtol=1e-6)


@pytest.mark.parametrize("scores,group_size", [(np.ones(5), 2), (np.ones(3), 1),
                                               (np.ones(1), None), (np.ones((2, 2)), 2)])
def test_leave_one_out_baseline_refuses_broken_groups(scores, group_size):
  with pytest.raises(ValueError, match="whole groups of >= 2"):
    nash_md.leave_one_out_baseline(scores, group_size)


def test_group_pairs_enumerate_each_response_against_its_groups_opponents():
  i, j = nash_md.group_pairs(6, 3)
  want = [(r, o) for r in range(6) for o in range(3 * (r // 3), 3 * (r // 3) + 3)]
  assert list(zip(i.tolist(), j.tolist())) == want
  i1, j1 = nash_md.group_pairs(4, 1)  # group size 1: each response meets its own opponent
  assert i1.tolist() == j1.tolist() == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="groups of 4"):
    nash_md.group_pairs(6, 4)
