"""xmatch_jax: image-text matching and cross-modal retrieval in JAX/Flax."""

__version__ = '0.1.0'


def __getattr__(name):
  # Lazy, so `import xmatch_jax.data` does not pull in jax and orbax.
  if name == 'Retriever':
    from xmatch_jax.api import Retriever  # pylint: disable=g-import-not-at-top
    return Retriever
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
