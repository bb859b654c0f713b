"""The safe torch.save reader: both formats give the stored values; code in a pickle is refused, not run."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from xmatch_jax.convert import torch_pickle

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


@pytest.mark.parametrize('name', ['torch_state_zip.pt', 'torch_state_legacy.pt'])
def test_both_torch_save_formats_give_the_saved_values(name):
  checkpoint = torch_pickle.load(os.path.join(FIXTURES, name))
  expected = np.load(os.path.join(FIXTURES, 'torch_state_expected.npz'))
  state, extra = checkpoint['model']
  assert list(state) == list(expected.files)  # order kept (OrderedDict)
  for key in expected.files:
    np.testing.assert_array_equal(np.asarray(state[key], expected[key].dtype), expected[key], err_msg=key)
    assert state[key].shape == expected[key].shape
  assert state['half'].dtype == np.float16 and state['bf16'].dtype.name == 'bfloat16'
  assert state['steps'].dtype == np.int64 and state['flag'].shape == ()
  np.testing.assert_array_equal(extra['bias'], [1, 1])
  assert checkpoint['epoch'] == 7 and checkpoint['best_rsum'] == 412.5
  assert vars(checkpoint['opt']) == {'margin': 0.2, 'max_violation': True, 'data_name': 'f30k_precomp'}


class _Payload:
  def __reduce__(self):
    return (os.system, ('touch /tmp/xmatch_pwned',))


def test_code_in_a_legacy_pickle_is_refused(tmp_path):
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    for header in (0x1950A86A20F9469CFC6C, 1001, {'little_endian': True}):
      pickle.dump(header, f)
    pickle.dump({'state_dict': _Payload()}, f)
  with pytest.raises(pickle.UnpicklingError, match=r'evil.pth: refusing to load global (posix|os)\.system'):
    torch_pickle.load(str(path))
  assert not os.path.exists('/tmp/xmatch_pwned')


def test_code_in_a_zip_checkpoint_is_refused(tmp_path):
  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', pickle.dumps(_Payload(), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match='refusing to load global'):
    torch_pickle.load(str(path))


def test_truncated_and_foreign_files_are_errors(tmp_path):
  data = open(os.path.join(FIXTURES, 'torch_state_legacy.pt'), 'rb').read()
  (tmp_path / 'cut.pt').write_bytes(data[:-10])
  with pytest.raises(ValueError, match='cut.pt: file ends inside storage'):
    torch_pickle.load(str(tmp_path / 'cut.pt'))
  (tmp_path / 'text.pt').write_text('hello')
  with pytest.raises(ValueError, match='text.pt: not a PyTorch checkpoint'):
    torch_pickle.load(str(tmp_path / 'text.pt'))
  buffer = io.BytesIO()
  pickle.dump({'a': 1}, buffer)
  (tmp_path / 'plain.pkl').write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match='wrong magic number'):
    torch_pickle.load(str(tmp_path / 'plain.pkl'))
  with pytest.raises(FileNotFoundError):
    torch_pickle.load(str(tmp_path / 'missing.pt'))
