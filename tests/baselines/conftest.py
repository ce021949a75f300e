"""The baseline training tests use the training tests' tiny real corpus (built once per session with the
data package) and their one-intra-op-thread rule."""
from tests.train.conftest import _one_thread, tiny_data  # noqa: F401  (fixtures, registered by name)
