"""Real DICOM files for tests: the local stack's (stack/dicom_files.py), imported here by the tests."""
from stack.dicom_files import *  # noqa: F401,F403
from stack.dicom_files import TEST_FILES, path, storable, with_uids  # noqa: F401
