"""xmatch_jax: image-text matching and cross-modal retrieval in JAX/Flax."""

__version__ = '0.1.0'

# Subpackages and modules reachable as attributes (imported on first use).
_SUBMODULES = (
  'api',
  'checkpoints',
  'convert',
  'data',
  'errors',
  'inference',
  'losses',
  'metrics',
  'models',
  'pairwise',
  'parallel',
  'progress',
  'rerank',
  'run_setup',
)


def __getattr__(name):
  # Lazy, so `import xmatch_jax.data` does not pull in jax and orbax.
  if name == 'Retriever':
    from xmatch_jax.api import Retriever  # pylint: disable=g-import-not-at-top

    return Retriever
  if name in _SUBMODULES:
    # `import xmatch_jax; xmatch_jax.data.load_split(...)` works without importing xmatch_jax.data first.
    import importlib  # pylint: disable=g-import-not-at-top

    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
