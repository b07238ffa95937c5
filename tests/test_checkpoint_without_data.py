"""A checkpoint saved with no iterator state (an imported model that has read
no data) restores with data state None, beside ones that have it."""

from moe_jax import checkpoint as checkpoint_lib
from tests.test_checkpoint import abstract
from tests.test_checkpoint import assert_trees_equal
from tests.test_checkpoint import make_state


def test_no_data_item_restores_as_none_and_later_steps_keep_theirs(tmp_path):
  directory = tmp_path / 'checkpoints'
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3,
                                            asynchronous=False)
  checkpoints.save(0, make_state(0), None)
  checkpoints.close()
  assert not (directory / '0' / 'data').exists()
  assert (directory / '0' / checkpoint_lib.CHECKSUMS).is_file()

  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  step, state, data = checkpoints.restore_latest(abstract(make_state(0)))
  assert (step, data) == (0, None)
  assert_trees_equal(state, make_state(0))
  # Training on from it saves the iterator state as before.
  checkpoints.save(1, make_state(1), {'next_index': 1})
  checkpoints.close()
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  assert checkpoints.restore_latest(abstract(make_state(1)))[2] == {
      'next_index': 1}
  assert checkpoints.restore(0, abstract(make_state(0)))[1] is None
  checkpoints.close()
